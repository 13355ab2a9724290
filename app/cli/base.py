"""What every `mtp` subcommand is: a name, its own options and its run (vLLM's CLISubcommand)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app import config

if TYPE_CHECKING:  # the commands import torch only when they run
    from app.model.model import MTPTransformer
    from app.model.tokenizer import Tokenizer


class CLISubcommand:
    """One subcommand of `mtp`. Subclasses set `name` and `help`, add their options in
    add_arguments and do their work in run (an exit status)."""

    name: str
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this subcommand's options (none by default)."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError

    def subparser_init(self, subparsers: Any) -> argparse.ArgumentParser:
        """Register this subcommand on `subparsers` (an add_subparsers() result)."""
        parser: argparse.ArgumentParser = subparsers.add_parser(self.name, help=self.help, description=self.help)
        self.add_arguments(parser)
        parser.set_defaults(func=self.run)
        return parser


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def value_parser(kind: type) -> Callable[[str], Any]:
    """The argparse `type` for a field of this Python type (str for anything else)."""
    parsers: dict[type, Callable[[str], Any]] = {bool: parse_bool, int: int, float: float}
    return parsers.get(kind, str)


def flag(name: str) -> str:
    """The option for a field name: max_batch_size -> --max-batch-size."""
    return "--" + name.replace("_", "-")


def add_checkpoint(parser: argparse.ArgumentParser, corpus: bool = True) -> None:
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    if corpus:
        parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS), help="held-out prompts come from here")


def add_device(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--device", default="cpu")
    if dtype:
        parser.add_argument("--dtype", default="float32")


def device_options(args: argparse.Namespace) -> dict[str, str]:
    """add_device's options (with its dtype) as keyword arguments: device, dtype."""
    return {"device": args.device, "dtype": args.dtype}


def load_model(args: argparse.Namespace) -> tuple[MTPTransformer, Tokenizer]:
    """The model and tokenizer of args.checkpoint, on add_device's device and dtype."""
    from app.model.checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint, **device_options(args))
