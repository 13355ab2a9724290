"""`mtp import-gpt2`: convert a GPT-2 checkpoint directory (safetensors) to this format."""

from __future__ import annotations

import argparse

from app.cli.base import CLISubcommand


class ImportGPT2Command(CLISubcommand):
    name = "import-gpt2"
    help = "convert a GPT-2 checkpoint directory (safetensors) to this format"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("src")
        parser.add_argument("out")
        parser.add_argument("--k", type=int, default=4, help="number of MTP heads (heads 2..k are new)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--dtype", default="float32")
        parser.add_argument("--max-seq-len", type=int, default=None)

    def run(self, args: argparse.Namespace) -> int:
        from app.model.gpt2 import import_gpt2

        out = import_gpt2(args.src, args.out, k=args.k, seed=args.seed, dtype=args.dtype, max_seq_len=args.max_seq_len)
        print(out)
        return 0
