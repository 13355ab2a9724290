"""Fuzzing: schemathesis against a real server's /openapi.json.

    python -m bench.fuzz --max-examples 150

Runs every operation with schemathesis' examples, coverage and fuzzing phases and all its
checks but `positive_data_acceptance` (runtime limits such as the context length and the
caps in /info are not expressible in the schema, so a schema-valid request can rightly get
422). The server caps max_new_tokens at 16 so that thousands of generation cases fit in
minutes. Exits with schemathesis' status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from app.config import DEFAULT_CHECKPOINT
from bench.service import server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--max-examples", type=int, default=150)
    ap.add_argument("--report", default=None, help="write schemathesis' JUnit XML here")
    args = ap.parse_args()
    with server(args.checkpoint, "cpu", max_new_tokens=16, max_queue_size=1024) as srv:
        url = srv.url
        cmd = [
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            str(args.max_examples),
            "--workers",
            "2",
            "--phases",
            "examples,coverage,fuzzing",
            "--suppress-health-check",
            "all",
        ]
        if args.report:
            cmd += ["--report", "junit", "--report-junit-path", args.report]
        rc = subprocess.call(cmd)
    sys.exit(rc)


if __name__ == "__main__":
    main()
