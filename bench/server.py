"""A real `mtp serve` process for benchmarks, reliability suites and tests.

The one place that starts a server subprocess: settings go in as MTP_* environment variables
(extra command-line flags after them), it listens on a free loopback port, and it runs this
checkout's code: the `app` package next to this `bench` package is first on its PYTHONPATH,
so a suite started from a `git worktree` of an older commit measures that commit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

import app

ROOT = Path(app.__file__).resolve().parent.parent  # the servers import `app` from here
HOST = "127.0.0.1"


class ServerExited(RuntimeError):
    """The server process ended before it became ready."""


class NotReady(RuntimeError):
    """The server did not answer /ready with 200 in time."""


def progress(bench: str, what: str, result: dict[str, Any]) -> dict[str, Any]:
    """result, after printing it on one line to stderr under the benchmark's name: a run stopped
    part-way still shows the phases it finished (the JSON comes at the end)."""
    print(f"{bench}: {what}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def host_times() -> list[int] | None:
    """This machine's CPU time counters (/proc/stat's first line, in ticks); None where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Of the CPU time between two host_times(), the share the hypervisor gave to other guests
    (steal): where it is high, a figure measured then says more about the host than the code."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    delta = [a - b for a, b in zip(after, before, strict=False)]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest time is in user)
    return round(delta[7] / total, 3) if total > 0 else None


def thread_times(pid: int) -> dict[int, int] | None:
    """CPU time (user + system, ticks) of each thread of process pid; None where /proc has none."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def thread_cores(pid: int, before: dict[int, int] | None, after: dict[int, int] | None, wall: float) -> dict[str, Any]:
    """Cores each kind of thread of a server kept busy between two thread_times(): the main
    thread (uvicorn's event loop), the busiest other one (the inference thread while it decodes)
    and the rest together (its OpenMP workers and any others)."""
    if before is None or after is None or wall <= 0:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    used = {tid: (t - before.get(tid, 0)) / tick / wall for tid, t in after.items()}
    main = used.pop(pid, 0.0)
    busiest = max(used, key=used.__getitem__, default=None)
    top = used.pop(busiest, 0.0) if busiest is not None else 0.0
    return {"event_loop": round(main, 2), "busiest_other": round(top, 2), "rest": round(sum(used.values()), 2)}


def measured(measure: Callable[[], dict[str, Any]], pid: int | None = None) -> dict[str, Any]:
    """measure()'s figures, with the share of the host's CPU time stolen while it ran, and with
    a server's pid, the cores its threads kept busy (bench.server.thread_cores)."""
    before, threads, t0 = host_times(), thread_times(pid) if pid else None, time.perf_counter()
    result = measure()
    out = {**result, "steal_share": steal_share(before, host_times())}
    if pid:
        out["server_cores"] = thread_cores(pid, threads, thread_times(pid), time.perf_counter() - t0)
    return out


def histogram_totals(
    url: str, name: str, label: str = "kind", text: str | None = None
) -> dict[str, tuple[float, float]]:
    """{label value: (sum, count)} so far of the server's histogram `name` (from `text`, a
    /metrics page already fetched, or a fresh one); an unlabelled histogram's is under ""."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    if text is None:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    for line in text.splitlines():
        for field, into in (("sum", sums), ("count", counts)):
            head = f"{name}_{field}"
            if not line.startswith(head):
                continue
            rest = line[len(head) :]
            if rest.startswith(f'{{{label}="'):
                into[rest[len(label) + 3 :].split('"', 1)[0]] = float(line.split()[-1])
            elif rest.startswith(" "):
                into[""] = float(rest)
    return {key: (sums.get(key, 0.0), counts.get(key, 0.0)) for key in sums.keys() | counts.keys()}


def forward_totals(url: str, route: str = "/generate") -> dict[str, tuple[float, float]]:
    """{kind: (seconds, passes)} of the server's forward passes so far (mtp_forward_duration_seconds),
    with, from the same /metrics page, "queue": (seconds, requests) from submission to the first
    pass (mtp_queue_time_seconds) and "request": (seconds, requests) of `route` as the server's
    middleware timed them (mtp_request_duration_seconds)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = histogram_totals(url, "mtp_forward_duration_seconds", text=text)
    out["queue"] = histogram_totals(url, "mtp_queue_time_seconds", text=text).get("", (0.0, 0.0))
    out["request"] = histogram_totals(url, "mtp_request_duration_seconds", "route", text).get(route, (0.0, 0.0))
    return out


def per_request(
    before: Mapping[str, tuple[float, float]], after: Mapping[str, tuple[float, float]], wall: float, requests: int
) -> dict[str, float]:
    """Where a sequential stream's time went, per request, from the server's totals before and
    after it (forward_totals): the prefill pass, the decode passes (and how many), and the rest
    of the request's wall time, outside any pass. The rest is split in three where the totals
    hold the server's own timings: the client and the wire (the wall time outside the server's
    middleware: the client's HTTP work, the sockets, uvicorn's parsing), the queue (submission
    to the prefill pass: the core's wake-up and its batch forming) and the server's remainder
    (the route before submission and after the last token, the core loop between passes, the
    events' delivery). The server's time for a request goes on past its reply's last byte (the
    response's tasks end) while the client sends its next request, so the client part can read
    below zero."""

    def delta(kind: str, i: int) -> float:
        return after.get(kind, (0.0, 0.0))[i] - before.get(kind, (0.0, 0.0))[i]

    prefill, decode = delta("prefill", 0) / requests, delta("decode", 0) / requests
    out = {
        "wall_ms": round(wall / requests * 1e3, 3),
        "prefill_ms": round(prefill * 1e3, 3),
        "decode_ms": round(decode * 1e3, 3),
        "decode_passes": round(delta("decode", 1) / requests, 1),
        "outside_passes_ms": round((wall / requests - prefill - decode) * 1e3, 3),
    }
    if delta("request", 1) == requests and delta("queue", 1) == requests:
        server, queue = delta("request", 0) / requests, delta("queue", 0) / requests
        out["client_and_wire_ms"] = round((wall / requests - server) * 1e3, 3)
        out["queue_ms"] = round(queue * 1e3, 3)
        out["server_rest_ms"] = round((server - queue - prefill - decode) * 1e3, 3)
    return out


def choices_by_batch(url: str) -> dict[str, Any]:
    """The draft policy's choice and the work around a step at every measured batch size (from
    /info) when a run ended: what a concurrent load's batch sizes ran."""
    policy = httpx.get(f"{url}/info", timeout=30).json().get("draft_policy") or {}
    return {"drafts_by_batch": policy.get("drafts_by_batch"), "around_step_ms": policy.get("around_step_ms")}


def policies(url: str) -> dict[str, Any]:
    """What the server's draft and thread policies chose at batch 1 (from /info) when a run
    ended, and what they chose from: the draft policy's batch-1 step costs and acceptance
    rates, the thread policy's cost per expected token and passes at each count."""
    info = httpx.get(f"{url}/info", timeout=30).json()
    policy = info.get("draft_policy") or {}
    timings = info.get("thread_timings") or {}
    return {
        "drafts_at_batch_1": (policy.get("drafts_by_batch") or {}).get("1"),
        "threads_at_batch_1": (info.get("threads") or {}).get("decode/1"),
        # what the thread policy chose from: each count's ms per expected token and its passes
        "thread_cost_ms_at_batch_1": (timings.get("cost_ms") or {}).get("decode/1"),
        "thread_passes_at_batch_1": (timings.get("passes") or {}).get("decode/1"),
        "thread_early_retimings": timings.get("early_retimings"),
        "thread_moves_at_batch_1": (timings.get("moves") or {}).get("decode/1"),
        "acceptance": policy.get("acceptance"),
        "step_ms_at_batch_1": (policy.get("step_ms") or {}).get("1"),
        "shallow_step_ms_at_batch_1": (policy.get("shallow_step_ms") or {}).get("1"),
        "around_step_ms_at_batch_1": (policy.get("around_step_ms") or {}).get("1"),
        "max_running": (info.get("limits") or {}).get("max_running"),  # rows decoding at once at most
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_env(
    settings: Mapping[str, object | None], env: Mapping[str, str], inherit_mtp: bool, root: Path = ROOT
) -> dict[str, str]:
    """The child's environment: ours (MTP_* dropped unless inherit_mtp), then the settings as
    MTP_NAME (None: left unset), then `env` as given, with root first on PYTHONPATH."""
    out = {k: v for k, v in os.environ.items() if inherit_mtp or not k.startswith("MTP_")}
    out.update({f"MTP_{k.upper()}": str(v) for k, v in settings.items() if v is not None})
    out.update(env)
    paths = [str(root), *out.get("PYTHONPATH", "").split(os.pathsep)]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return out


def baseline_tree(ref: str) -> Path:
    """A detached worktree of ref (reused if it exists), whose `app` a baseline server runs."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.gettempdir()) / f"mtp-baseline-{sha.strip()[:12]}"
    if not (path / "app").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha.strip()], cwd=ROOT, check=True)
    return path


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path | None  # None: the server writes to our stdout/stderr

    @classmethod
    def start(
        cls,
        checkpoint: str | Path,
        settings: Mapping[str, object | None] | None = None,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        output: int | None = None,
        inherit_mtp: bool = False,
        module: str = "app.cli",
        root: Path = ROOT,
    ) -> Server:
        """`python -m app.cli serve ARGS...` from ROOT on a free port; not yet ready (see wait_ready).

        settings: Settings fields (e.g. max_queue_size=16), passed as MTP_* variables; env: raw
        variables, applied last; log_dir: write the server's output to log_dir/server-PORT.log;
        output: else a file descriptor for its stdout and stderr (a pipe, say: not read by log());
        inherit_mtp: keep our own MTP_* variables (they are dropped by default, so that a
        setting of the caller's shell does not leak into a measurement); module: what
        `python -m` runs (a test launcher that wraps app.cli, say); root: the checkout whose
        `app` runs (another commit's worktree, for a comparison).
        """
        port = free_port()
        base = {"checkpoint": checkpoint, "host": HOST, "port": port, **(settings or {})}
        full_env = server_env(base, env or {}, inherit_mtp, root)
        cmd = [sys.executable, "-m", module, "serve", *args]
        if log_dir is None:
            return cls(subprocess.Popen(cmd, cwd=root, env=full_env, stdout=output, stderr=output), port, None)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"server-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        return cls(proc, port, log_path)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_ready(self, timeout: float = 900.0) -> Server:  # a cold compile of the decode steps takes minutes
        """Poll /ready until it answers 200; ServerExited or NotReady (with the log's tail) if not."""
        deadline = time.monotonic() + timeout
        # One client for every poll: httpx.get builds a client per call, loading its TLS
        # certificates each time (50 ms of CPU here against 1.2 ms on one client), which took
        # about a third of a core from the server's start-up.
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerExited(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/ready").status_code == 200:
                        return self
                time.sleep(0.1)
        raise NotReady(f"server not ready after {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the service drains, then exits); SIGKILL if it is still running after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def running(
    checkpoint: str | Path,
    settings: Mapping[str, object | None] | None = None,
    *,
    log_dir: Path | None = None,
    inherit_mtp: bool = False,
    ready_timeout: float = 900.0,
    root: Path = ROOT,
) -> Iterator[Server]:
    """A started, ready Server (see Server.start), stopped on leaving the block."""
    srv = Server.start(checkpoint, settings, log_dir=log_dir, inherit_mtp=inherit_mtp, root=root)
    try:
        ready = srv.wait_ready(ready_timeout)
        # The load generators run in this process, beside torch's objects: a full collection
        # of them stalled every client for 0.1-0.2 s (an overload burst's refusals all measured
        # about 200 ms). Frozen, the collector scans only what the load itself makes.
        gc.collect()
        gc.freeze()
        yield ready
    finally:
        srv.stop()
