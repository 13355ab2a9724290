"""The `mtp` command: every setting is a `serve` flag, each benchmark has only its own options,
and `mtp bench` without the bench package says what to install."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.cli.bench import BENCHMARKS
from app.cli.serve import settings_from_args
from app.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_a_serve_flag_and_unset_flags_leave_the_environment() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert not set(Settings.model_fields) & {k for k, v in vars(args).items() if v is not None}
    for name in Settings.model_fields:
        if name == "cors_origins":
            continue
        value = "true" if Settings.model_fields[name].annotation is bool else "1"
        if name == "dtype":
            value = "float32"
        got = parser.parse_args(["serve", "--" + name.replace("_", "-"), value])
        assert name in vars(got), name


def test_serve_flags_are_typed_and_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["serve", "--speculative", "false", "--max-wait-ms", "2.5", "--port", "0", "--cors-origins", "a", "b"]
    )
    assert (args.speculative, args.max_wait_ms, args.port, args.cors_origins) == (False, 2.5, 0, ["a", "b"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "float64"])
    monkeypatch.setenv("MTP_MAX_QUEUE_SIZE", "7")
    monkeypatch.setenv("MTP_PORT", "9")
    settings = settings_from_args(args)
    assert (settings.max_queue_size, settings.port) == (7, 0)


def test_log_level_goes_before_or_after_serve() -> None:
    assert build_parser().parse_args(["--log-level", "WARNING", "serve"]).log_level == "WARNING"
    assert build_parser().parse_args(["serve", "--log-level", "DEBUG"]).log_level == "DEBUG"


def test_an_invalid_setting_is_a_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "own", "foreign"),
    [
        ("speculative", "--draft-sweep", "--clients"),
        ("service", "--clients", "--draft-sweep"),
        ("transformers", "--n-layer", "--repeats"),
        ("engine", "--repeats", "--n-layer"),
        ("plot", "--png", "--checkpoint"),
    ],
)
def test_each_benchmark_has_only_its_own_options(
    name: str, own: str, foreign: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", name, "--help"])
    help_text = capsys.readouterr().out
    assert own in help_text and foreign not in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", name, foreign, "1"])


def test_documented_benchmark_defaults() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench", "speculative"]).new_tokens == 200
    assert parser.parse_args(["bench", "service"]).new_tokens == 64
    assert {b.name for b in BENCHMARKS} == {
        "speculative",
        "transformers",
        "service",
        "engine",
        "step",
        "threads",
        "plot",
    }


def test_mtp_bench_without_the_bench_package_says_what_to_install(tmp_path: Path) -> None:
    # a copy of `app` alone, as in the runtime image: no bench/ beside it
    shutil.copytree(REPO_ROOT / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; sys.path.insert(0, sys.argv[1]); from app.cli import main; sys.exit(main(sys.argv[2:]))"
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), "bench", "step", "--no-compile"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert "pip install -e '.[bench]'" in r.stderr and "Traceback" not in r.stderr
