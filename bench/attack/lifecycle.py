"""Attacks that own their server: its shutdown and request timeout bounds, its start-up beside busy
cores (the draft policy), a start-up on a broken checkpoint, and a log that nobody reads."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.attack.lab import LONG, Lab, Result, Stream, counts, launch, stream_sse, wait_idle
from bench.server import NotReady, Server

# ---- attacks: time bounds --------------------------------------------------------------------


@dataclass
class Shutdown:
    exit_code: int | None  # None: still running 25 s after the signal (then killed)
    exit_s: float  # from the last signal to the exit
    streams: list[Stream]
    signalled_at: float  # time.monotonic() of the first signal

    def summary(self, drain_s: float) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "exit_s": round(self.exit_s, 2),
            "streams": dict(Counter(s.kind for s in self.streams)),
            "ended_after_drain": sum(s.ended_at > self.signalled_at + drain_s for s in self.streams),
        }


async def _streams_then_signal(srv: Server, n: int, second_after: float | None) -> Shutdown:
    """n long streams, then SIGTERM (and a second one `second_after` s later); waits for the exit."""
    deadline = time.monotonic() + 45
    body = {"parameters": {"max_new_tokens": LONG, "speculative": False}}
    tasks = [
        asyncio.create_task(stream_sse(srv.url, "/generate_stream", {"inputs": f"ROMEO {i}:", **body}, deadline))
        for i in range(n)
    ]
    await asyncio.sleep(0.8)  # the streams are running
    srv.proc.send_signal(signal.SIGTERM)
    t_sig = t_last = time.monotonic()
    if second_after is not None:
        await asyncio.sleep(second_after)
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
        t_last = time.monotonic()
    while srv.proc.poll() is None and time.monotonic() < t_sig + 25:
        await asyncio.sleep(0.05)
    exited = time.monotonic()
    code = srv.proc.poll()
    if code is None:
        srv.proc.kill()
    return Shutdown(code, exited - t_last, list(await asyncio.gather(*tasks)), t_sig)


def shutdown_bounds(lab: Lab, drain_s: float = 1.0, streams: int = 64) -> Result:
    """SIGTERM: exit 0 within the drain + 2 s, streams cut by the drain end with an error event;
    a second SIGTERM: exit 130 within 1 s. The drain is short (1 s) so that streams outlast it
    on a fast host too: with 3 s, eager steps finished all 64 streams within it (2026-12-06),
    and the attack had nothing to judge."""
    with lab.dedicated(drain_timeout_s=drain_s, max_new_tokens=LONG) as srv:
        one = asyncio.run(_streams_then_signal(srv, streams, None)).summary(drain_s)
    with lab.dedicated(drain_timeout_s=drain_s, max_new_tokens=LONG) as srv:
        two = asyncio.run(_streams_then_signal(srv, streams, 0.5)).summary(drain_s)
    defect_one = one["exit_code"] != 0 or one["exit_s"] > drain_s + 2 or one["streams"].get("cut", 0) > 0
    defect_two = two["exit_code"] != 130 or two["exit_s"] > 1.0
    reproduced = one["ended_after_drain"] > 0 or defect_one  # else every stream ended within the drain
    return Result(
        "shutdown-bounds",
        f"{streams} streams × {LONG} tokens, SIGTERM (MTP_DRAIN_TIMEOUT_S={drain_s:g}); "
        "then SIGTERM twice, 0.5 s apart",
        f"one signal: exit {one['exit_code']} after {one['exit_s']:.1f} s, streams {counts_of(one['streams'])} "
        f"({one['ended_after_drain']} ended after the drain); two signals: exit {two['exit_code']} "
        f"{two['exit_s']:.1f} s after the second",
        True if defect_one or defect_two else (False if reproduced else None),
        {"one_signal": one, "two_signals": two},
    )


def counts_of(kinds: Mapping[str, int]) -> str:
    return ", ".join(f"{k}×{n}" for k, n in sorted(kinds.items()))


EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Cancelled\w*|Group))\b", re.M)


def timeout_traceback(srv: Server, streams: int = 40) -> Result:
    """A request that runs past MTP_REQUEST_TIMEOUT_S is answered with a timeout and logs no traceback."""

    async def load() -> list[Stream]:
        deadline = time.monotonic() + 30
        gen = {"parameters": {"max_new_tokens": LONG, "speculative": False}}
        calls = [
            stream_sse(srv.url, "/generate_stream", {"inputs": f"ROMEO {i}:", **gen}, deadline) for i in range(streams)
        ]
        calls += [
            stream_sse(
                srv.url, "/v1/completions", {"prompt": f"JULIET {i}:", "max_tokens": LONG, "stream": True}, deadline
            )
            for i in range(8)
        ]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(load())
    wait_idle(srv.url)
    time.sleep(0.3)
    log = srv.log()
    timeouts = sum(s.error_type() == "timeout" or s.status == 504 for s in results)
    tracebacks = log.count("Traceback")
    asgi = log.count("Exception in ASGI application")
    errors = sorted(set(EXCEPTION_LINE.findall(log)))
    return Result(
        "timeout-traceback",
        f"{streams} /generate_stream + 8 /v1/completions streams × {LONG} tokens under MTP_REQUEST_TIMEOUT_S=1; "
        "the server log",
        f"streams {counts([s.kind for s in results])}, {timeouts} timed out; log: {tracebacks} tracebacks, "
        f"{asgi} 'Exception in ASGI application'" + (f" ({', '.join(errors)[:120]})" if errors else ""),
        None if timeouts == 0 else tracebacks > 0 or asgi > 0,
        {"timeouts": timeouts, "tracebacks": tracebacks, "asgi_exceptions": asgi, "exceptions": errors},
    )


COST_LINE = re.compile(r"verify-step cost \(ms\) by batch size and drafts: (\{[^;]*\})")  # the first table


def _generate_timed(http: httpx.Client, prompt: str, new_tokens: int) -> tuple[float, float, float, float]:
    """(seconds, tokens, drafted tokens, verify steps) of one greedy /generate request."""
    t0 = time.perf_counter()
    r = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "details": True}})
    seconds = time.perf_counter() - t0
    details = r.json()["details"]
    spec = details["speculation"]
    return seconds, details["generated_tokens"], spec["drafted_tokens"], spec["verify_steps"]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict):
        return {prefix: obj}
    return {
        k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}.{key}" if prefix else str(key)).items()
    }


def _draft_settings(srv: Server) -> dict[str, Any]:
    """What the server shows of its draft policy: the start-up cost line in its log, /info and /metrics fields."""
    m = COST_LINE.search(srv.log())
    costs = ast.literal_eval(m.group(1)) if m else None
    found = {k: v for k, v in _flatten(httpx.get(f"{srv.url}/info", timeout=10).json()).items() if "draft" in k.lower()}
    lines = httpx.get(f"{srv.url}/metrics", timeout=10).text.splitlines()
    found.update({ln.split()[0]: ln.split()[-1] for ln in lines if "draft" in ln and not ln.startswith("#")})
    return {"batch1_cost_ms": costs.get(1) if costs else None, "exposed": found}


def draft_policy_contention(lab: Lab, new_tokens: int = 200, budget_s: float = 10.0, busy_loops: int = 2) -> Result:
    """A server started while other processes held the cores decodes, once they are gone, about as fast
    as one that verifies every draft (its start-up timing of the verify step must not fix a bad draft count).

    The reference runs with MTP_ADAPTIVE_DRAFTS=false: it times nothing at start-up, so a busy machine
    cannot skew it, and at batch 1 every draft is the fastest choice for the bundled model (the step
    costs about the same whatever it carries). Two busy loops on the 2-core machine: with one, the
    start-up timings on an otherwise idle machine came out only ~20 % high and the draft count held."""
    prompts = ["ROMEO:", "JULIET:", "KING RICHARD:"]
    try:
        totals, seen = _contended_vs_reference(lab, prompts, new_tokens, budget_s, busy_loops)
    except NotReady as exc:  # on a machine busy beyond the busy loops, start-up can take minutes
        return Result(
            "draft-policy-contention",
            f"a server started beside {busy_loops} busy loops",
            f"{exc} (load average {os.getloadavg()[0]:.1f})",
            None,
        )
    tps = {k: v[1] / v[0] for k, v in totals.items()}
    drafts = {k: v[2] / v[3] if v[3] else 0.0 for k, v in totals.items()}
    ratio = tps["contended"] / tps["reference"]
    return Result(
        "draft-policy-contention",
        f"greedy {new_tokens}-token /generate at batch 1, alternating: a server started beside {busy_loops} busy "
        "loops (killed once ready) vs one with MTP_ADAPTIVE_DRAFTS=false",
        f"{tps['contended']:.0f} vs {tps['reference']:.0f} tokens/s (ratio {ratio:.2f}); drafts per verify step "
        f"{drafts['contended']:.2f} vs {drafts['reference']:.2f}; its batch-1 step cost (ms) by drafts: "
        f"{seen['batch1_cost_ms']}",
        ratio < 0.7,
        {"tokens_per_s": tps, "ratio": ratio, "drafts_per_step": drafts, "draft_policy": seen},
    )


def _contended_vs_reference(
    lab: Lab, prompts: list[str], new_tokens: int, budget_s: float, busy_loops: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per server: (seconds, tokens, drafted tokens, verify steps) summed over alternating requests;
    and what the contended server shows of its draft policy."""
    # torch's default threads (the setting under test); batch 1 only, which keeps the start-up timing short
    settings: dict[str, object | None] = {"torch_threads": None, "max_batch_size": 1}
    totals = {"contended": [0.0] * 4, "reference": [0.0] * 4}
    with lab.dedicated(30, adaptive_drafts="false", **settings) as reference:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy_loops)]
        try:
            time.sleep(0.5)
            with lab.dedicated(40, **settings) as contended:
                for p in busy:
                    p.kill()
                    p.wait()
                clients = {
                    k: httpx.Client(base_url=s.url, timeout=30)
                    for k, s in (("contended", contended), ("reference", reference))
                }
                for http in clients.values():
                    _generate_timed(http, prompts[0], 20)  # warm
                end = time.monotonic() + budget_s
                for i in range(30):  # alternating requests: drift on the shared machine hits both alike
                    if i and time.monotonic() > end:
                        break
                    for name, http in clients.items():
                        one = _generate_timed(http, prompts[i % len(prompts)], new_tokens)
                        totals[name] = [a + b for a, b in zip(totals[name], one, strict=True)]
                for http in clients.values():
                    http.close()
                seen = _draft_settings(contended)
        finally:
            for p in busy:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return totals, seen


# ---- attacks: start-up -----------------------------------------------------------------------------


def broken_config(checkpoint: str, workdir: Path) -> Result:
    """A checkpoint with an unreadable config.json stops `mtp serve` with a message, not a traceback."""
    bad = workdir / "broken-checkpoint"
    bad.mkdir(exist_ok=True)
    for f in Path(checkpoint).iterdir():
        if f.name != "config.json" and not (bad / f.name).exists():
            (bad / f.name).symlink_to(f.resolve())
    (bad / "config.json").write_text('{"d_model": 256, "n_layers": ')  # cut short
    srv = launch(str(bad), workdir, {})
    try:
        code: int | None = srv.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
        srv.stop()
    out = srv.log()
    last = next((ln for ln in reversed(out.splitlines()) if ln.strip()), "")
    return Result(
        "broken-config",
        "`mtp serve` on a checkpoint whose config.json is cut short",
        f"exit {code}, {'a traceback' if 'Traceback' in out else 'no traceback'} in its output; last line: "
        f"{last[-100:]!r}",
        "Traceback" in out or code in (None, 0),
        {"exit_code": code, "output_tail": out[-1500:]},
    )


# ---- attacks: the server's own output -----------------------------------------------------------


def log_reader_stall(lab: Lab, requests: int = 1500) -> Result:
    """A server whose log nobody reads: its stdout and stderr a pipe (64 KiB) that fills, as when
    a log shipper or a container's log driver falls behind. Each request logs an access line
    (about 100 bytes), so 1,500 `/health` requests write more than the pipe holds. It must go on
    answering; once the reader is back, every line must be there."""
    read_end, write_end = os.pipe()
    srv = Server.start(lab.checkpoint, {"device": "cpu", "log_level": "INFO", **lab.defaults}, output=write_end)
    os.close(write_end)
    out = bytearray()

    def read_all() -> None:
        while chunk := os.read(read_end, 1 << 16):
            out.extend(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    answered, stalled_at = 0, None
    try:
        srv.wait_ready()  # the start-up lines fit in the pipe unread
        with httpx.Client(timeout=5) as client:
            for i in range(requests):
                try:
                    answered += client.get(f"{srv.url}/health").status_code == 200
                except httpx.TimeoutException:
                    stalled_at = i + 1
                    break
    finally:
        reader.start()  # the reader comes back
        srv.stop()
        reader.join(timeout=10)
        os.close(read_end)
    logged = out.count(b'"GET /health HTTP/1.1" 200')
    stall = f"; request {stalled_at}: no answer in 5 s" if stalled_at else ""
    result = f"{answered} of {requests} answered with nobody reading the log{stall}; once read: {logged} access lines"
    details = {"answered": answered, "stalled_at": stalled_at, "access_lines": logged}
    what = f"{requests} `/health` requests while the server's stderr is a pipe nobody reads"
    return Result("log-reader-stall", what, result, answered < requests or logged < answered, details)
