"""`mtp serve`: the HTTP service. Every field of app.config.Settings is a flag (--max-batch-size
for max_batch_size); a flag not given leaves the MTP_* environment variable, or the default."""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from app.cli.base import CLISubcommand, flag, value_parser
from app.config import Settings

HELP = {
    "device": "auto | cpu | cuda",
    "draft_tokens": "drafts verified per pass (default k - 1)",
    "api_key": "prefer the variable: a flag shows in the process list",
    "cors_origins": "allowed CORS origins",
}


def _unwrap_optional(annotation: Any) -> Any:
    """int | None -> int; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return annotation


def _add_setting(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    kind = _unwrap_optional(field.annotation)
    default = "unset" if field.default is None else field.default
    env = f"MTP_{name.upper()}"
    text = HELP.get(name) or field.description
    options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{text}; {env}" if text else env}
    options["help"] += f" (default: {default})".replace("%", "%%")
    if get_origin(kind) is Literal:
        options["choices"] = list(get_args(kind))
    elif get_origin(kind) is list:
        options["nargs"] = "*"
        options["metavar"] = "VALUE"
    elif kind is bool:
        options["type"] = value_parser(bool)
        options["metavar"] = "{true,false}"
    else:
        options["type"] = value_parser(kind)
    parser.add_argument(flag(name), **options)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given (top-level --log-level included), the rest from MTP_* or defaults."""
    return Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None})


class ServeCommand(CLISubcommand):
    name = "serve"
    help = "run the HTTP service (flags override MTP_* environment variables)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for name, field in Settings.model_fields.items():
            _add_setting(parser, name, field)

    def run(self, args: argparse.Namespace) -> int:
        from app.serve import serve

        try:
            settings = settings_from_args(args)
        except ValidationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return serve(settings)
