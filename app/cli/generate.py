"""`mtp generate`: continue a text (self-speculative decoding by default)."""

from __future__ import annotations

import argparse
import logging

from app.cli.base import CLISubcommand, add_checkpoint, add_device, load_model


class GenerateCommand(CLISubcommand):
    name = "generate"
    help = "continue a text (self-speculative decoding by default)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("text")
        add_checkpoint(parser, corpus=False)
        parser.add_argument("--max-new-tokens", type=int, default=100)
        parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        parser.add_argument("--top-k", type=int, default=0)
        parser.add_argument("--top-p", type=float, default=1.0)
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument("--no-speculative", action="store_true", help="plain one-token-per-pass decoding")
        add_device(parser)

    def run(self, args: argparse.Namespace) -> int:
        from app.decoding.generate import generate
        from app.decoding.sampling import SamplingParams

        model, tok = load_model(args)
        budget = model.cfg.max_seq_len - args.max_new_tokens
        if budget < 1:
            raise SystemExit(f"--max-new-tokens must be below the context ({model.cfg.max_seq_len})")
        ids = tok.encode(args.text)[-budget:]  # keep the end of a long prompt
        params = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            do_sample=args.temperature > 0,
            seed=args.seed,
        )
        speculative = not args.no_speculative
        out = generate(model, [ids], args.max_new_tokens, params, speculative=speculative, eos_id=tok.eot_id)
        print(args.text + tok.decode(out.tokens[0]))
        logging.getLogger("mtp").info(
            "%d tokens in %d forward passes (%.2f tokens per verify pass)",
            len(out.tokens[0]),
            out.stats.forward_passes,
            out.stats.mean_accepted_length,
        )
        return 0
