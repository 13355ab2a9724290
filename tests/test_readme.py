"""The README opens with the two commands, and CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [next(line for line in b.splitlines() if line and not line.startswith("#")) for b in blocks[:2]]


def test_readme_opens_with_a_serve_command_and_a_test_command() -> None:
    serve, test = readme_commands()
    assert "mtp serve" in serve
    assert "pytest" in test


def test_ci_runs_the_readme_test_command() -> None:
    _, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci
