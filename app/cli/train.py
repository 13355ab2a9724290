"""`mtp train`: a tokenizer and a model on a corpus. Every option is a TrainConfig or
ModelConfig field with that field's default, so no default is written twice."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from typing import Any

from app import config
from app.cli.base import CLISubcommand, flag, value_parser
from app.model.config import HEAD_TYPES, ModelConfig
from app.training.train import TrainConfig

CHOICES = {
    "precision": ["auto", "fp32", "bf16"],
    "save_dtype": ["float32", "float16", "bfloat16"],
    "head_type": list(HEAD_TYPES),
}
TYPES: dict[str, type] = {"mtp_weight": float}  # fields whose default (None) does not say their type
HELP = {
    "head_type": "linear: one Linear d_model -> k*vocab; sequential: DeepSeek-V3's MTP modules "
    "(one block per extra depth, teacher-forced in training)",
    "head_weights": "comma-separated loss weights, one per head; None: equal, or --mtp-weight's",
    "mtp_weight": "DeepSeek-V3's MTP loss weight λ: head 1 weighs 1 and heads 2..k λ/(k-1) each "
    "(L_main + λ/(k-1) Σ L_j, divided by 1+λ like every weighting); either head type; not with --head-weights",
    "eval_windows": "windows of held-out text per periodic evaluation",
}


def _add_fields(parser: argparse.ArgumentParser, cls: type[Any], skip: set[str], prefix: str = "") -> None:
    for f in fields(cls):
        if f.name in skip:
            continue
        value = f.default
        assert value is not MISSING, f"{cls.__name__}.{f.name} needs a default to be an option"
        parser.add_argument(
            flag(f.name),
            type=value_parser(TYPES.get(f.name, type(value))),
            default=value,
            choices=CHOICES.get(f.name),
            help=f"{prefix}{HELP.get(f.name, f.name)} (default {value})",
        )


class TrainCommand(CLISubcommand):
    name = "train"
    help = "train a tokenizer and model on a corpus"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
        parser.add_argument("--out", required=True)
        _add_fields(parser, ModelConfig, skip=set(), prefix="model: ")
        _add_fields(parser, TrainConfig, skip={"corpus", "out", "model"})
        parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state")

    def run(self, args: argparse.Namespace) -> int:
        from app.training.train import train

        model_cfg = ModelConfig(**{f.name: getattr(args, f.name) for f in fields(ModelConfig)})
        train_fields = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "model"}
        report = train(TrainConfig(**train_fields, model=model_cfg), resume=args.resume)
        print(json.dumps({"wall_time_s": report["wall_time_s"], "heldout": report["heldout"]}, indent=2))
        return 0
