"""The attack suite (bench.attack): its cheap attacks against a real uvicorn server on the
tiny checkpoint find no defect, and its report is well-formed."""

from collections.abc import Callable
from typing import Any

import pytest

from bench import attack


@pytest.mark.parametrize(
    "run", [attack.lone_surrogate, attack.host_redirect, attack.head_probes], ids=lambda f: f.__name__
)
def test_cheap_attack_finds_no_defect(server: Any, run: Callable[[str], attack.Result]) -> None:
    result = run(server.url)
    assert result.defect is False, f"{result.name}: {result.result}"
    assert result.verdict == "ok"


def test_attack_names_are_unique() -> None:
    names = [a.name for a in attack.ATTACKS]
    assert len(names) == len(set(names))


def test_table_has_a_row_per_result_and_escapes_pipes() -> None:
    results = [
        attack.Result("a", "x | y", "200", False),
        attack.Result("b", "z", "500", True),
        attack.Result("c", "w", "n/a", None),
    ]
    lines = attack.table(results).splitlines()
    assert len(lines) == 2 + len(results)
    assert lines[2] == "| a | x \\| y | 200 | ok |"
    assert lines[3].endswith("| DEFECT |") and lines[4].endswith("| not reproduced |")
