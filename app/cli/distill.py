"""`mtp distill-heads`: self-distil heads 2..k towards head 1 (faster speculative decoding)."""

from __future__ import annotations

import argparse
import json

from app import config
from app.cli.base import CLISubcommand


class DistillCommand(CLISubcommand):
    name = "distill-heads"
    help = "self-distil heads 2..k towards head 1 (faster speculative decoding)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint")
        parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
        parser.add_argument("--out", default=None, help="write here instead of updating the checkpoint in place")
        parser.add_argument("--prompts", type=int, default=256)
        parser.add_argument("--steps", type=int, default=400)
        parser.add_argument("--sampled-every", type=int, default=2, help="every n-th sequence sampled, the rest greedy")
        parser.add_argument("--seed", type=int, default=0)

    def run(self, args: argparse.Namespace) -> int:
        from app.training.distill import distill_heads

        section = distill_heads(
            args.checkpoint,
            args.corpus,
            out=args.out,
            prompts=args.prompts,
            steps=args.steps,
            sampled_every=args.sampled_every,
            seed=args.seed,
        )
        print(json.dumps(section, indent=2))
        return 0
