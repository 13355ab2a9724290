"""`mtp eval`: bits per byte and per-head loss/accuracy of a checkpoint on a text file."""

from __future__ import annotations

import argparse
import json

from app.cli.base import CLISubcommand, add_device, load_model


class EvalCommand(CLISubcommand):
    name = "eval"
    help = "bits per byte and per-head loss/accuracy on a text file (sequential heads: teacher-forced)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint")
        parser.add_argument("file")
        parser.add_argument(
            "--heldout", action="store_true", help="evaluate only the last 10%% (the training split's held-out part)"
        )
        add_device(parser)

    def run(self, args: argparse.Namespace) -> int:
        from app.training.data import read_corpus, split_text
        from app.training.evaluate import evaluate_text

        model, tok = load_model(args)
        text = read_corpus(args.file)
        if args.heldout:
            text = split_text(text)[1]
        stats = evaluate_text(model, tok, text)
        per_head = [
            {"head": j + 1, "loss": round(lo, 4), "top1": round(acc, 4)}
            for j, (lo, acc) in enumerate(zip(stats["loss"], stats["top1"], strict=True))
        ]
        report = {
            "bits_per_byte": round(stats["bits_per_byte"], 4),
            "head_type": model.cfg.head_type,  # sequential: head j+1 teacher-forced on the true tokens
            "per_head": per_head,
            "tokens": stats["tokens_scored"],
            "bytes": stats["bytes"],
        }
        print(json.dumps(report, indent=2))
        return 0
