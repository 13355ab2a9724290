"""Attack suite: known failure modes, each reproduced against a real `mtp serve` process.

    python -m bench.attack [--only NAME[,NAME]] [--out FILE] [--checkpoint DIR] [--no-compile]

Every attack runs over loopback with loops bounded in count and time, and judges the server
only by what it measures: statuses, timings, counters in /metrics, the server's own log.
Prints a Markdown table (attack | what was measured | result | verdict); exits non-zero if
any attack shows its defect or could not run. The servers run the code of the checkout this
suite lives in (bench/server.py), so the same suite in a `git worktree` of an older commit
records a "before". With `--no-compile` (eager steps) the 28 attacks it had on 2026-12-04 took 3 min 10 s on the
project's 2-core CPU with nothing else running (2026-12-04, docs/reliability.md); with the default
compiled steps each server's start compiles them at one torch thread first (7 minutes for the
first server on 2026-12-02, with a cache warmed only by servers at the default thread count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from app.config import DEFAULT_CHECKPOINT
from bench.attack.batch import logit_bias_bulk, prefill_burst
from bench.attack.connections import (
    cut_short_body,
    disconnect_nonstream,
    head_refusal_framing,
    idle_connections,
    pipelined_leave,
    unread_replies,
)
from bench.attack.door import (
    door_shedding,
    head_probes,
    host_redirect,
    keyless_malformed,
    keyless_post_routes,
    keyless_queue_lock,
    oversized_fanout,
    refused_multi_prompt,
)
from bench.attack.inputs import (
    chat_default_max_tokens,
    chat_message_body,
    huge_header,
    id_list_prompt,
    logit_bias_keys,
    logit_bias_oversized,
    lone_surrogate,
    stop_stream_leak,
    streamed_logprobs,
    token_id_body,
    tokenize_bomb,
    top_k_overflow,
)
from bench.attack.lab import AUTH, COMMON, LONG, SHORT_BODY, Lab, Result
from bench.attack.lifecycle import (
    broken_config,
    draft_policy_contention,
    log_reader_stall,
    shutdown_bounds,
    timeout_traceback,
)
from bench.attack.replies import chat_logprobs_reply, predict_candidates
from bench.server import ROOT

# ---- the suite ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    run: Callable[[Lab], Result]


def _shared(fn: Callable[[str], Result], settings: Mapping[str, object] = COMMON) -> Callable[[Lab], Result]:
    return lambda lab: fn(lab.shared(settings).url)


def _idle(lab: Lab) -> Result:
    with lab.dedicated(idle_timeout_s=3, max_connections=64) as srv:
        return idle_connections(srv.url, 3.0, 64)


def _unread(lab: Lab) -> Result:
    with lab.dedicated(idle_timeout_s=3, max_connections=16) as srv:
        return unread_replies(srv.url, 3.0, 16)


def _timeout(lab: Lab) -> Result:
    with lab.dedicated(request_timeout_s=1, max_new_tokens=LONG) as srv:
        return timeout_traceback(srv)


WIDE = {**COMMON, "max_queue_size": 256}

# Ordered so that attacks on the same shared server run together.
ATTACKS = [
    Attack("keyless-queue-lock", _shared(keyless_queue_lock, AUTH)),
    Attack("keyless-malformed", _shared(keyless_malformed, AUTH)),
    Attack("keyless-post-routes", _shared(keyless_post_routes, AUTH)),
    Attack("head-refusal-framing", _shared(head_refusal_framing, AUTH)),
    Attack("lone-surrogate", _shared(lone_surrogate)),
    Attack("logit-bias-keys", _shared(logit_bias_keys)),
    Attack("logit-bias-bulk", _shared(logit_bias_bulk)),
    # a queue that takes two bursts of 32 prompts, or n = 32 choices (COMMON's 16 would refuse them)
    Attack("prefill-burst", _shared(prefill_burst, WIDE)),
    Attack("chat-logprobs-reply", _shared(chat_logprobs_reply, WIDE)),
    Attack("predict-candidates", _shared(predict_candidates, WIDE)),
    Attack("host-redirect", _shared(host_redirect)),
    Attack("head-probes", _shared(head_probes)),
    Attack("top-k-overflow", _shared(top_k_overflow)),
    Attack("stop-stream-leak", _shared(stop_stream_leak)),
    Attack("streamed-logprobs", _shared(streamed_logprobs)),
    Attack("oversized-fanout", _shared(oversized_fanout)),
    Attack("refused-multi-prompt", _shared(refused_multi_prompt)),
    Attack("door-shedding", _shared(door_shedding)),
    Attack("disconnect-nonstream", _shared(disconnect_nonstream)),
    Attack("pipelined-leave", lambda lab: pipelined_leave(lab.shared(COMMON))),
    Attack("tokenize-bomb", _shared(tokenize_bomb)),
    Attack("token-id-body", _shared(token_id_body)),
    Attack("chat-message-body", _shared(chat_message_body)),
    Attack("logit-bias-oversized", _shared(logit_bias_oversized)),
    Attack("id-list-prompt", _shared(id_list_prompt)),
    Attack("huge-header", _shared(huge_header)),
    Attack("cut-short-body", _shared(cut_short_body, SHORT_BODY)),
    Attack("chat-default-max-tokens", _shared(chat_default_max_tokens, SHORT_BODY)),
    Attack("timeout-traceback", _timeout),
    Attack("idle-connections", _idle),
    Attack("unread-replies", _unread),
    Attack("shutdown-bounds", shutdown_bounds),
    Attack("draft-policy-contention", draft_policy_contention),
    Attack("broken-config", lambda lab: broken_config(lab.checkpoint, lab.workdir)),
    Attack("log-reader-stall", log_reader_stall),
]


def run_attacks(
    attacks: list[Attack], checkpoint: str, torch_threads: int = 1, compile_steps: bool = True
) -> list[Result]:
    results = []
    defaults = {"torch_threads": torch_threads or None, "compile": None if compile_steps else "false"}
    with tempfile.TemporaryDirectory(prefix="mtp-attack-") as tmp, Lab(checkpoint, Path(tmp), defaults) as lab:
        for i, attack in enumerate(attacks, 1):
            t0 = time.monotonic()
            try:
                r = attack.run(lab)
            except Exception as exc:  # report it and go on with the next attack
                r = Result(
                    attack.name, "-", f"the attack failed: {type(exc).__name__}: {exc}"[:300], None, crashed=True
                )
            r.seconds = round(time.monotonic() - t0, 1)
            print(f"[{i}/{len(attacks)}] {r.name}: {r.verdict} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
            results.append(r)
    return results


def table(results: list[Result]) -> str:
    rows = ["| attack | what was measured | result | verdict |", "| --- | --- | --- | --- |"]
    for r in results:
        cells = (r.name, r.measured, r.result, r.verdict)
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)


def commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.attack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--only", default="", help="comma-separated attack names: " + ", ".join(a.name for a in ATTACKS))
    ap.add_argument("--out", default=None, help="also write the results here as JSON")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="MTP_TORCH_THREADS of the servers (0: torch's default). One thread keeps a busy neighbour on a "
        "2-core machine from slowing every step many times over; draft-policy-contention always uses the default",
    )
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="eager steps (MTP_COMPILE=false) in every server: each starts in seconds, where compiling the "
        "default model's steps at one thread takes minutes per server, longer on a cold cache",
    )
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - {a.name for a in ATTACKS}
    if unknown:
        ap.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    attacks = [a for a in ATTACKS if not names or a.name in names]
    t0 = time.monotonic()
    load = os.getloadavg()[0]
    results = run_attacks(attacks, args.checkpoint, args.torch_threads, compile_steps=not args.no_compile)
    print(table(results))
    if args.out:
        report = {
            "code": str(ROOT),
            "commit": commit(),
            "checkpoint": args.checkpoint,
            "seconds": round(time.monotonic() - t0, 1),
            "load_average_1m_at_start": load,
            "torch_threads": args.torch_threads,
            "compile": not args.no_compile,
            "defects": sum(bool(r.defect) for r in results),
            "attacks": [{**asdict(r), "verdict": r.verdict} for r in results],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.exit(1 if any(r.defect or r.crashed for r in results) else 0)


if __name__ == "__main__":
    main()
