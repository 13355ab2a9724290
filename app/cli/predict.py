"""`mtp predict`: the top tokens of each of the k heads after a text."""

from __future__ import annotations

import argparse

from app.cli.base import CLISubcommand, add_checkpoint, add_device, load_model


class PredictCommand(CLISubcommand):
    name = "predict"
    help = "top tokens for each of the k heads after a text"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("text")
        add_checkpoint(parser, corpus=False)
        parser.add_argument("--top-n", type=int, default=5)
        add_device(parser)

    def run(self, args: argparse.Namespace) -> int:
        from app.decoding.predict import score_next

        model, tok = load_model(args)
        ids = tok.encode(args.text)[-model.cfg.max_seq_len :]
        scores = score_next(model, [ids], args.top_n)
        for j in range(model.cfg.k):
            top = zip(scores.top_ids[0][j], scores.top_probs[0][j], strict=True)
            print(f"head {j + 1} (+{j + 1}): " + ", ".join(f"{tok.id_to_text(i)!r} {p:.3f}" for i, p in top))
        print("greedy k-token continuation:", repr(tok.decode(scores.greedy[0])))
        return 0
