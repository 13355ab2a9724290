"""The `mtp` command: train, eval, predict, generate, import-gpt2, serve, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from app import config
from app.model.model import ModelConfig

DEFAULT_CHECKPOINT = str(config.DEFAULT_CHECKPOINT)
DEFAULT_CORPUS = str(config.DEFAULT_CORPUS)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    defaults = ModelConfig()
    for f in fields(ModelConfig):
        value = getattr(defaults, f.name)
        parsers: dict[type, Callable[[str], Any]] = {bool: _parse_bool, int: int, float: float}
        kind = parsers.get(type(value), str)
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=value, help=f"model: {f.name} (default {value})"
        )


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def cmd_train(args: argparse.Namespace) -> int:
    from app.training.train import TrainConfig, train

    model_cfg = ModelConfig(**{f.name: getattr(args, f.name) for f in fields(ModelConfig)})
    tc = TrainConfig(
        corpus=args.corpus,
        out=args.out,
        model=model_cfg,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        head_weights=args.head_weights,
        eval_interval=args.eval_interval,
        eval_windows=args.eval_windows,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        save_dtype=args.save_dtype,
    )
    report = train(tc, resume=args.resume)
    print(json.dumps({"wall_time_s": report["wall_time_s"], "heldout": report["heldout"]}, indent=2))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
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


def cmd_eval(args: argparse.Namespace) -> int:
    from app.model.checkpoint import load_checkpoint
    from app.training.data import read_corpus, split_text
    from app.training.evaluate import evaluate_text

    model, tok = load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    text = read_corpus(args.file)
    if args.heldout:
        text = split_text(text)[1]
    stats = evaluate_text(model, tok, text)
    print(
        json.dumps(
            {
                "bits_per_byte": round(stats["bits_per_byte"], 4),
                "per_head": [
                    {"head": j + 1, "loss": round(lo, 4), "top1": round(acc, 4)}
                    for j, (lo, acc) in enumerate(zip(stats["loss"], stats["top1"], strict=True))
                ],
                "tokens": stats["tokens_scored"],
                "bytes": stats["bytes"],
            },
            indent=2,
        )
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from app.decoding.predict import score_next
    from app.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    ids = tok.encode(args.text)[-model.cfg.max_seq_len :]
    scores = score_next(model, [ids], args.top_n)
    for j in range(model.cfg.k):
        row = ", ".join(
            f"{tok.id_to_text(i)!r} {p:.3f}" for i, p in zip(scores.top_ids[0][j], scores.top_probs[0][j], strict=True)
        )
        print(f"head {j + 1} (+{j + 1}): {row}")
    print("greedy k-token continuation:", repr(tok.decode(scores.greedy[0])))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from app.decoding.generate import generate
    from app.decoding.sampling import SamplingParams
    from app.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
    ids = tok.encode(args.text)
    budget = model.cfg.max_seq_len - args.max_new_tokens
    if budget < 1:
        raise SystemExit(f"--max-new-tokens must be below the context ({model.cfg.max_seq_len})")
    ids = ids[-budget:]  # keep the end of a long prompt
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        do_sample=args.temperature > 0,
        seed=args.seed,
    )
    out = generate(model, [ids], args.max_new_tokens, params, speculative=not args.no_speculative, eos_id=tok.eot_id)
    print(args.text + tok.decode(out.tokens[0]))
    st = out.stats
    logging.getLogger("mtp").info(
        "%d tokens in %d forward passes (%.2f tokens per verify pass)",
        len(out.tokens[0]),
        st.forward_passes,
        st.mean_accepted_length,
    )
    return 0


def cmd_import_gpt2(args: argparse.Namespace) -> int:
    from app.model.gpt2 import import_gpt2

    out = import_gpt2(args.src, args.out, k=args.k, seed=args.seed, dtype=args.dtype, max_seq_len=args.max_seq_len)
    print(out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.config import Settings
    from app.serve import serve

    names = set(Settings.model_fields)
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return serve(Settings(**overrides))


def cmd_bench(args: argparse.Namespace) -> int:
    from app.bench.decoding import bench_speculative, bench_vs_transformers, write_json

    if args.new_tokens is None:
        args.new_tokens = 200 if args.bench == "speculative" else 64
    if args.bench == "speculative":
        result = bench_speculative(
            args.checkpoint,
            args.corpus,
            n_prompts=args.prompts,
            new_tokens=args.new_tokens,
            device=args.device,
            dtype=args.dtype,
            compile=not args.no_compile,
            autotune=args.autotune,
            draft_sweep=args.draft_sweep,
        )
    elif args.bench == "transformers":
        from app.bench.gpt2_fixture import make_gpt2_pair

        hf_dir, ours_dir = make_gpt2_pair(
            args.workdir, args.checkpoint, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head
        )
        if args.distill_prompts:  # train heads 2..k briefly (self-distillation), as the benchmark asks
            from app.training.distill import distill_heads

            distill_heads(
                str(ours_dir), args.corpus, prompts=args.distill_prompts, new_tokens=96, steps=300, save_dtype="float32"
            )
        result = bench_vs_transformers(
            str(hf_dir),
            str(ours_dir),
            new_tokens=args.new_tokens,
            device=args.device,
            compile=not args.no_compile,
            autotune=args.autotune,
        )
    elif args.bench == "step":
        from app.bench.step import bench_step

        result = bench_step(
            args.checkpoint, device=args.device, dtype=args.dtype, compile=not args.no_compile, autotune=args.autotune
        )
    elif args.bench == "engine":
        from app.bench.engine import bench_engine

        result = bench_engine(
            args.checkpoint, args.corpus, streams=args.streams, new_tokens=args.new_tokens, repeats=args.repeats
        )
    elif args.bench == "threads":
        from app.bench.threads import bench_threads

        result = bench_threads(args.checkpoint, n_prompts=args.prompts, new_tokens=args.new_tokens or 64)
    elif args.bench == "service":
        from app.bench.service import bench_service

        result = bench_service(
            args.checkpoint,
            args.corpus,
            device=args.device,
            dtype=args.dtype,
            torch_threads=args.torch_threads,
            draft_tokens=args.draft_tokens,
            clients=args.clients,
            seconds=args.seconds,
            streams=args.streams,
            new_tokens=args.new_tokens,
        )
    else:
        from app.bench.plot import plot_benchmarks

        plot_benchmarks(args.results, args.png)
        return 0
    write_json(result, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtp", description="Multi-token-prediction transformer: train, evaluate, serve."
    )
    parser.add_argument("--log-level", default=None, help="default INFO (for serve: MTP_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a tokenizer and model on a corpus")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--out", required=True)
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--head-weights", default=None, help="comma-separated loss weights, one per head")
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill-heads", help="self-distil heads 2..k towards head 1 (faster speculative decoding)")
    p.add_argument("checkpoint")
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--out", default=None, help="write here instead of updating the checkpoint in place")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--sampled-every", type=int, default=2, help="every n-th sequence sampled, the rest greedy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="bits per byte and per-head loss/accuracy on a text file")
    p.add_argument("checkpoint")
    p.add_argument("file")
    p.add_argument(
        "--heldout", action="store_true", help="evaluate only the last 10%% (the training split's held-out part)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top tokens for each of the k heads after a text")
    p.add_argument("text")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--top-n", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="continue a text (self-speculative decoding by default)")
    p.add_argument("text")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-speculative", action="store_true", help="plain one-token-per-pass decoding")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("import-gpt2", help="convert a GPT-2 checkpoint directory (safetensors) to this format")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--k", type=int, default=4, help="number of MTP heads (heads 2..k are new)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.set_defaults(func=cmd_import_gpt2)

    p = sub.add_parser("serve", help="run the HTTP service (flags override MTP_* environment variables)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-wait-ms", type=float, default=None)
    p.add_argument("--max-queue-size", type=int, default=None)
    p.add_argument("--max-input-tokens", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--request-timeout-s", type=float, default=None)
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--drain-timeout-s", type=float, default=None)
    p.add_argument("--speculative", type=_parse_bool, default=None)
    p.add_argument("--draft-tokens", type=int, default=None, help="drafts verified per pass (default k - 1)")
    p.add_argument("--log-json", type=_parse_bool, default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks that print their figures and ratios as JSON")
    p.add_argument("bench", choices=["speculative", "transformers", "service", "engine", "step", "threads", "plot"])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--corpus", default=DEFAULT_CORPUS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=None, help="default: 200 (speculative), 64 (others)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--repeats", type=int, default=4, help="engine: interleaved repeats of each mode")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--workdir", default="/tmp/mtp-bench-gpt2", help="transformers: where the GPT-2 pair is written")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--distill-prompts", type=int, default=0, help="transformers: self-distil heads 2..k first")
    p.add_argument("--torch-threads", type=int, default=None, help="service: intra-op threads (server and baseline)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    p.add_argument(
        "--autotune", action="store_true", help="compiled runs: autotune each matmul (Inductor's C++ GEMM vs ATen)"
    )
    p.add_argument("--draft-sweep", action="store_true", help="speculative: also time 1 .. k-2 drafts per verify pass")
    p.add_argument("--draft-tokens", type=int, default=None, help="service: the server's MTP_DRAFT_TOKENS")
    p.add_argument("--results", default="docs/bench", help="plot: folder of result JSON files")
    p.add_argument("--png", default="docs/benchmarks.png")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=cmd_bench)
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
