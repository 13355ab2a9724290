"""`mtp`: the top-level parser, built from one CLISubcommand per module."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app.cli.base import CLISubcommand
from app.cli.bench import BenchCommand
from app.cli.distill import DistillCommand
from app.cli.evaluate import EvalCommand
from app.cli.generate import GenerateCommand
from app.cli.import_gpt2 import ImportGPT2Command
from app.cli.predict import PredictCommand
from app.cli.serve import ServeCommand
from app.cli.train import TrainCommand

SUBCOMMANDS: list[CLISubcommand] = [
    TrainCommand(),
    DistillCommand(),
    EvalCommand(),
    PredictCommand(),
    GenerateCommand(),
    ImportGPT2Command(),
    ServeCommand(),
    BenchCommand(),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtp", description="Multi-token-prediction transformer: train, evaluate, serve."
    )
    parser.add_argument("--log-level", default=None, help="default INFO (for serve: MTP_LOG_LEVEL)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.subparser_init(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (args.log_level or "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.model.checkpoint import CheckpointError

    try:
        return int(args.func(args))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
