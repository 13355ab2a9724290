"""`mtp bench NAME`: one subcommand per benchmark, each with only its own options.

The benchmarks live in the top-level `bench` package of the repository, not in the runtime
package: they are imported only when one runs, and without the checkout (the image) or the
`[bench]` extra the command says so instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

from app import config
from app.cli.base import CLISubcommand, add_checkpoint, add_device, device_options

INSTALL = "benchmarks need the repository checkout: pip install -e '.[bench]'"
EXTRA = {"bench", "httpx", "transformers", "matplotlib"}  # imported by the benchmarks, not by the service


def import_bench(module: str) -> ModuleType:
    """bench.<module> from the checkout beside `app` (an installed `mtp` script does not have
    the repository root on sys.path)."""
    if importlib.util.find_spec("bench") is None and (config.REPO_ROOT / "bench" / "__init__.py").is_file():
        sys.path.append(str(config.REPO_ROOT))
    return importlib.import_module(f"bench.{module}")


class Benchmark(CLISubcommand):
    """A `mtp bench` subcommand: measure() returns its figures, printed as JSON and written to
    --out; a missing `bench` package or extra is an error message."""

    def subparser_init(self, subparsers: Any) -> argparse.ArgumentParser:
        parser = super().subparser_init(subparsers)
        parser.set_defaults(func=self.guarded_run)
        return parser

    def guarded_run(self, args: argparse.Namespace) -> int:
        try:
            return self.run(args)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if missing not in EXTRA:
                raise
            print(f"error: mtp bench {self.name}: cannot import {exc.name}; {INSTALL}", file=sys.stderr)
            return 2

    def measure(self, args: argparse.Namespace) -> dict[str, Any]:
        """Run the benchmark: its figures and ratios, as one JSON object."""
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        import_bench("decoding").write_json(self.measure(args), args.out)
        return 0


def add_compile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument(
        "--autotune", action="store_true", help="compiled runs: Inductor's C++ GEMM for each matmul (without: MKL)"
    )


def compile_options(args: argparse.Namespace) -> dict[str, bool]:
    """add_compile's options as the benchmarks' keyword arguments: compile, autotune."""
    return {"compile": not args.no_compile, "autotune": args.autotune}


def add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="also write the JSON here")


class Speculative(Benchmark):
    name = "speculative"
    help = "self-speculative vs plain greedy decoding at batch 1 (benchmark 1)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_checkpoint(parser)
        add_device(parser)
        parser.add_argument("--prompts", type=int, default=10)
        parser.add_argument("--new-tokens", type=int, default=200)
        add_compile(parser)
        parser.add_argument("--draft-sweep", action="store_true", help="also time 1 .. k-2 drafts per verify pass")
        add_out(parser)

    def measure(self, args: argparse.Namespace) -> dict[str, Any]:
        return import_bench("decoding").bench_speculative(
            args.checkpoint,
            args.corpus,
            n_prompts=args.prompts,
            new_tokens=args.new_tokens,
            **device_options(args),
            **compile_options(args),
            draft_sweep=args.draft_sweep,
        )


class Transformers(Benchmark):
    name = "transformers"
    help = "ours vs transformers' generate() on the same random GPT-2 weights (benchmark 2)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT), help="its tokenizer is used")
        parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS), help="for --distill-prompts")
        parser.add_argument("--workdir", default="/tmp/mtp-bench-gpt2", help="where the GPT-2 pair is written")
        parser.add_argument("--n-layer", type=int, default=12)
        parser.add_argument("--n-embd", type=int, default=768)
        parser.add_argument("--n-head", type=int, default=12)
        parser.add_argument("--distill-prompts", type=int, default=0, help="self-distil heads 2..k first")
        add_device(parser, dtype=False)
        parser.add_argument("--new-tokens", type=int, default=64)
        add_compile(parser)
        add_out(parser)

    def measure(self, args: argparse.Namespace) -> dict[str, Any]:
        hf_dir, ours_dir = import_bench("gpt2_fixture").make_gpt2_pair(
            args.workdir, args.checkpoint, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head
        )
        if args.distill_prompts:  # train heads 2..k briefly (self-distillation), as the benchmark asks
            from app.training.distill import distill_heads

            distill_heads(
                str(ours_dir), args.corpus, prompts=args.distill_prompts, new_tokens=96, steps=300, save_dtype="float32"
            )
        return import_bench("decoding").bench_vs_transformers(
            str(hf_dir), str(ours_dir), new_tokens=args.new_tokens, device=args.device, **compile_options(args)
        )


class Service(Benchmark):
    name = "service"
    help = "a real server under concurrent /predict clients and /generate streams (benchmark 3)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_checkpoint(parser)
        add_device(parser)
        parser.add_argument("--clients", type=int, default=32, help="concurrent /predict clients")
        parser.add_argument("--seconds", type=float, default=15.0, help="length of each /predict phase")
        parser.add_argument("--streams", type=int, default=16, help="concurrent /generate streams")
        parser.add_argument("--new-tokens", type=int, default=64)
        parser.add_argument("--torch-threads", type=int, default=None, help="intra-op threads (server and baseline)")
        parser.add_argument("--draft-tokens", type=int, default=None, help="the server's MTP_DRAFT_TOKENS")
        add_out(parser)

    def measure(self, args: argparse.Namespace) -> dict[str, Any]:
        return import_bench("service").bench_service(
            args.checkpoint,
            args.corpus,
            **device_options(args),
            torch_threads=args.torch_threads,
            draft_tokens=args.draft_tokens,
            clients=args.clients,
            seconds=args.seconds,
            streams=args.streams,
            new_tokens=args.new_tokens,
        )


class EngineBench(Benchmark):
    name = "engine"
    help = "/generate's continuous batch without HTTP: adaptive draft counts vs fixed, plain and no shallow steps"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_checkpoint(parser)
        parser.add_argument("--streams", type=int, default=16)
        parser.add_argument("--new-tokens", type=int, default=64)
        parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats of each mode")
        parser.add_argument(
            "--offline", action="store_true", help="also generate() at batch 1 on the engine's steps, per draft count"
        )
        add_out(parser)

    def measure(self, args: argparse.Namespace) -> dict[str, Any]:
        return import_bench("engine").bench_engine(
            args.checkpoint,
            args.corpus,
            streams=args.streams,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            offline=args.offline,
        )


class Step(Benchmark):
    name = "step"
    help = "the cost of one plain decode step vs verify passes of 1 .. k-1 drafts"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_checkpoint(parser, corpus=False)
        add_device(parser)
        add_compile(parser)
        add_out(parser)

    def measure(self, args: argparse.Namespace) -> dict[str, Any]:
        return import_bench("step").bench_step(args.checkpoint, **device_options(args), **compile_options(args))


class Threads(Benchmark):
    name = "threads"
    help = "decoding before and after a second thread runs a torch op"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_checkpoint(parser, corpus=False)
        parser.add_argument("--prompts", type=int, default=10)
        parser.add_argument("--new-tokens", type=int, default=64)
        add_out(parser)

    def measure(self, args: argparse.Namespace) -> dict[str, Any]:
        return import_bench("threads").bench_threads(
            args.checkpoint, n_prompts=args.prompts, new_tokens=args.new_tokens
        )


class Plot(Benchmark):
    name = "plot"
    help = "one PNG of the result JSON files in a folder"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--results", default="docs/bench", help="folder of result JSON files")
        parser.add_argument("--png", default="docs/benchmarks.png")

    def run(self, args: argparse.Namespace) -> int:  # a PNG, not a JSON report
        import_bench("plot").plot_benchmarks(args.results, args.png)
        return 0


BENCHMARKS: list[Benchmark] = [Speculative(), Transformers(), Service(), EngineBench(), Step(), Threads(), Plot()]


class BenchCommand(CLISubcommand):
    name = "bench"
    help = "benchmarks that print their figures and ratios as JSON (needs the repository checkout)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        subparsers = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
        for benchmark in BENCHMARKS:
            benchmark.subparser_init(subparsers)

    def run(self, args: argparse.Namespace) -> int:  # each benchmark sets its own func
        raise NotImplementedError
