"""The `mtp` command: one module per subcommand, each owning its options and its run.

app/cli/main.py builds the parser from SUBCOMMANDS; `python -m app.cli` runs the same.
"""

from app.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
