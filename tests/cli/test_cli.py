"""The `mtp` command: every setting is a `serve` flag, each benchmark has only its own options,
and `mtp bench` without the bench package says what to install."""

import json
import shutil
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app import config
from app.cli import bench as bench_cli
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
        annotation = Settings.model_fields[name].annotation
        value = "true" if annotation is bool else "1"
        if typing.get_origin(annotation) is typing.Literal:  # dtype, compile_gemm_backends: one of its values
            value = str(typing.get_args(annotation)[0])
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
    assert main(["serve", "--max-batch-size", "8", "--max-running", "9"]) == 2  # more rows than the batch holds
    assert "max_running (9) cannot exceed max_batch_size (8)" in capsys.readouterr().err


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


class Recorder:
    """A stand-in for a bench module: each bench_* call's arguments, and an empty result."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return ("hf", "ours") if name == "make_gpt2_pair" else {}

        return call


@pytest.mark.parametrize(
    ("argv", "called", "kwargs"),
    [
        (
            ["speculative", "--device", "cuda", "--dtype", "bfloat16", "--prompts", "3", "--no-compile"],
            "bench_speculative",
            {"n_prompts": 3, "new_tokens": 200, "device": "cuda", "dtype": "bfloat16", "compile": False}
            | {"autotune": False, "draft_sweep": False},
        ),
        (
            ["service", "--clients", "4", "--torch-threads", "2"],
            "bench_service",
            {"device": "cpu", "dtype": "float32", "torch_threads": 2, "draft_tokens": None, "clients": 4}
            | {"seconds": 15.0, "streams": 16, "new_tokens": 64},
        ),
        (
            ["step", "--autotune", "--device", "cuda"],
            "bench_step",
            {"device": "cuda", "dtype": "float32", "compile": True, "autotune": True},
        ),
        (
            ["transformers", "--device", "cuda", "--no-compile"],
            "bench_vs_transformers",
            {"new_tokens": 64, "device": "cuda", "compile": False, "autotune": False},
        ),
        (
            ["engine", "--repeats", "2", "--offline"],
            "bench_engine",
            {"streams": 16, "new_tokens": 64, "repeats": 2, "offline": True},
        ),
        (["threads", "--prompts", "2"], "bench_threads", {"n_prompts": 2, "new_tokens": 64}),
    ],
)
def test_each_benchmark_passes_its_options_to_its_bench_function(
    argv: list[str], called: str, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = Recorder()
    monkeypatch.setattr(bench_cli, "import_bench", lambda module: fake)
    assert main(["bench", *argv, "--out", str(tmp_path / "r.json")]) == 0
    *_, (name, args, got), written = fake.calls
    assert name == called and got == kwargs
    assert args[0] == ("hf" if name == "bench_vs_transformers" else str(config.DEFAULT_CHECKPOINT))
    assert written == ("write_json", ({}, str(tmp_path / "r.json")), {})


def test_predict_generate_and_eval_run_on_a_checkpoint(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(checkpoint)
    assert main(["predict", "To be, or not", "--checkpoint", ckpt, "--top-n", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "head 1 (+1)",
        "head 2 (+2)",
        "head 3 (+3)",
        "greedy k-token continuation",
    ]
    assert main(["generate", "To be", "--checkpoint", ckpt, "--max-new-tokens", "4", "--no-speculative"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", "To be", "--checkpoint", ckpt, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == plain and plain.startswith("To be")  # greedy: speculation changes nothing
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    assert main(["eval", ckpt, str(text), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [h["head"] for h in report["per_head"]] == [1, 2, 3] and report["bytes"] == len(text.read_bytes())
    assert main(["predict", "x", "--checkpoint", str(tmp_path / "none")]) == 2  # a missing checkpoint: a message
