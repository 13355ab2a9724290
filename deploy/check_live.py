"""Dashboard queries and alert rules run in a real Prometheus scraping a live server; called by deploy/check.sh.

PYTHONPATH=. python deploy/check_live.py DASHBOARD.json ALERTS.yml   (from the checkout, project installed)

Starts `mtp serve` on the bundled model (bench/server.py) and Prometheus (`prometheus` on
PATH) scraping it every second with ALERTS.yml loaded, both on free loopback ports. Sends two
waves of traffic (/predict, /generate with and without a stop sequence, a 200-token
/generate_stream, /v1/completions, one invalid request, probes), waits until Prometheus has
scraped the second wave, then fails on any of:

- an alert rule that does not evaluate cleanly in Prometheus (/api/v1/rules);
- a dashboard query that errors or returns no series with a finite value, with $route as
  Grafana's "All" builds it (the route variable's values, filtered by its regex) and
  $__rate_interval as 5m;
- a route selection that holds a probe or scrape (/health, /ready, /metrics) or misses an
  inference route;
- an alert expression that fires on this healthy traffic, or whose measurement (the
  expression without its final threshold, each side of an `or`) returns no series;
- a failure counted that the traffic did not cause (only its invalid requests are).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.server import free_port, running

PROBES = ("/health", "/ready", "/metrics")
INFERENCE_ROUTES = ("/predict", "/generate", "/generate_stream", "/v1/completions")
RATE_INTERVAL = "5m"  # wider than the whole run: every rate() spans both waves
FAILURES: list[str] = []


def fail(msg: str) -> None:
    print(f"FAIL {msg}", file=sys.stderr)
    FAILURES.append(msg)


def send_wave(url: str, long_stream: bool) -> dict[str, int]:
    """One wave of traffic; returns the requests sent per (route) that must answer 200."""
    ok: dict[str, int] = {}
    requests: list[tuple[str, dict[str, Any], int]] = [
        ("/predict", {"inputs": "ROMEO:\nBut soft, what light", "top_n": 3}, 200),
        ("/predict", {"inputs": ""}, 422),  # counted as a validation failure
        ("/generate", {"inputs": "JULIET:\n", "parameters": {"max_new_tokens": 40}}, 200),
        ("/generate", {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 60, "stop": ["the"]}}, 200),
        ("/v1/completions", {"model": "default", "prompt": "ROMEO:", "max_tokens": 20}, 200),
    ]
    if long_stream:
        requests.append(("/generate_stream", {"inputs": "KING RICHARD:\n", "parameters": {"max_new_tokens": 200}}, 200))
    with httpx.Client(base_url=url, timeout=120) as client:
        for route, body, status in requests:
            r = client.post(route, json=body)
            if r.status_code != status:
                raise SystemExit(f"FAIL POST {route} {body}: {r.status_code}, expected {status}: {r.text[:500]}")
            if status == 200:
                ok[route] = ok.get(route, 0) + 1
        for probe in ("/health", "/ready"):
            client.get(probe).raise_for_status()
    return ok


def start_prometheus(workdir: Path, target: str, rules: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules.resolve())],
        "scrape_configs": [{"job_name": "mtp-serve", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    cmd = [
        "prometheus",
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_until(what: str, check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"FAIL {what} within {timeout:.0f} s")


def query(prom: str, expr: str) -> list[dict[str, Any]] | str:
    """The instant vector `expr` gives now, or Prometheus' error message."""
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    if body.get("status") != "success":
        return f"{body.get('errorType')}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def finite(result: list[dict[str, Any]] | str) -> bool:
    """A query's result holds a series with a finite value (not an error, not empty, not all NaN)."""
    return not isinstance(result, str) and any(math.isfinite(float(s["value"][1])) for s in result)


def equals(prom: str, expr: str, value: float) -> bool:
    result = query(prom, expr)
    return finite(result) and float(result[0]["value"][1]) == value  # type: ignore[index]


def all_routes(prom: str, variable: dict[str, Any]) -> str:
    """What Grafana puts for $route when "All" is selected and no allValue is set: the variable's
    label values that its regex keeps, regex-escaped and joined as (a|b|...)."""
    match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
    assert match, variable["definition"]
    metric, label = match.groups()
    r = httpx.get(f"{prom}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=30)
    values = r.json()["data"]
    pattern = variable.get("regex") or "/.*/"
    keep = re.compile(pattern.strip("/"))  # a JavaScript /regex/; this one means the same in Python
    kept = [v for v in values if keep.search(v)]
    for probe in PROBES:
        if probe not in values:
            fail(f"no traffic was labelled route={probe!r}: the check could not test the route selection")
        if probe in kept:
            fail(f"the dashboard's route selection includes the probe or scrape {probe}")
    for route in INFERENCE_ROUTES:
        if route not in kept:
            fail(f"the dashboard's route selection misses {route}")
    print(f"ok  route selection (All): {', '.join(kept)}")
    return "(" + "|".join(re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in kept) + ")"


def check_dashboard(prom: str, dashboard: dict[str, Any]) -> None:
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "route"]
    routes = all_routes(prom, variable)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$route", routes)
            name = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
            result = query(prom, expr)
            if isinstance(result, str):
                fail(f"{name}: {result}\n  {expr}")
            elif not finite(result):
                fail(f"{name}: no series with a finite value\n  {expr}")
            else:
                print(f"ok  {name}: {len(result)} series")


def measurements(expr: str) -> list[str]:
    """An alert expression's measured sides: split at a top-level `or` line, final threshold removed."""
    sides = re.split(r"\n\s*or\s*\n", expr.strip())
    return [re.sub(r"\s*(==|!=|>=|<=|>|<)\s*-?[0-9.]+\s*$", "", side.strip()) for side in sides]


def check_alerts(prom: str, rules_file: Path) -> None:
    loaded = httpx.get(f"{prom}/api/v1/rules", timeout=30).json()["data"]["groups"]
    by_name = {rule["name"]: rule for group in loaded for rule in group["rules"]}
    for group in yaml.safe_load(rules_file.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            state = by_name.get(name)
            if state is None or state.get("health") != "ok":
                fail(f"alert {name} in Prometheus: {state and (state.get('health'), state.get('lastError'))}")
                continue
            fired = query(prom, rule["expr"])
            if isinstance(fired, str):
                fail(f"alert {name}: {fired}")
            elif fired:
                fail(f"alert {name} fires on healthy traffic: {fired}")
            for side in measurements(rule["expr"]):
                result = query(prom, side)
                if not finite(result):
                    fail(f"alert {name}: its measurement returns {result or 'no series'}\n  {side}")
            print(f"ok  alert {name}: evaluates, measures, silent")


def check_failures(prom: str, invalid_sent: int) -> None:
    """The only failures counted are the invalid requests sent: a stop sequence is no cancellation."""
    result = query(prom, "sum by (reason) (mtp_request_failures_total)")
    if isinstance(result, str) or not result:
        fail(f"mtp_request_failures_total: {result or 'no series'}")
        return
    for series in result:
        reason, value = series["metric"]["reason"], float(series["value"][1])
        expected = invalid_sent if reason == "validation" else 0
        if value != expected:
            fail(f"mtp_request_failures_total{{reason={reason!r}}} is {value:g}, expected {expected}")


def main() -> int:
    dashboard_path, rules_path = map(Path, sys.argv[1:3])
    if shutil.which("prometheus") is None:
        raise SystemExit("FAIL prometheus not on PATH (Debian package `prometheus`)")
    dashboard = json.loads(dashboard_path.read_text())
    settings = {"device": "cpu", "compile": False}  # eager steps: the server is ready in seconds
    with tempfile.TemporaryDirectory() as tmp, running("models/default", settings, log_dir=Path(tmp)) as srv:
        prometheus, prom = start_prometheus(Path(tmp), f"127.0.0.1:{srv.port}", rules_path)
        try:
            wait_until("Prometheus ready", lambda: httpx.get(f"{prom}/-/ready", timeout=2).status_code == 200)
            wait_until("first scrape", lambda: query(prom, 'up{job="mtp-serve"} == 1'))
            sent: dict[str, int] = {}
            for wave in range(2):
                for route, n in send_wave(srv.url, long_stream=wave == 1).items():
                    sent[route] = sent.get(route, 0) + n
                expr, n = 'sum(mtp_requests_total{route="/predict",status="200"})', sent["/predict"]
                wait_until("a scrape of the traffic", lambda e=expr, n=n: equals(prom, e, n))
                time.sleep(2.5)  # two more scrapes and rule evaluations
            check_alerts(prom, rules_path)
            check_dashboard(prom, dashboard)
            check_failures(prom, invalid_sent=2)
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
            if FAILURES:
                print((Path(tmp) / "prometheus.log").read_text()[-3000:], file=sys.stderr)
    print(f"{'FAIL' if FAILURES else 'ok'}  live check: {len(FAILURES)} failures")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
