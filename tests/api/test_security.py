"""Startup checks, CORS, JSON logs, and a dead inference worker."""

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.engine.core import Stop
from app.engine.engine import Engine


def serve_once(ckpt: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTP_CHECKPOINT": str(ckpt), "MTP_PORT": "0"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("damage", ["corrupt_weights", "missing_tokenizer", "bad_config"])
def test_broken_checkpoint_fails_startup_with_a_clear_message(tmp_path: Path, checkpoint: Path, damage: str) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    if damage == "corrupt_weights":
        (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
        expected = "model.safetensors"
    elif damage == "missing_tokenizer":
        (ckpt / "tokenizer.json").unlink()
        expected = "tokenizer.json: missing file"
    else:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["num_heads"] = 5  # d_model is not divisible by it
        (ckpt / "config.json").write_text(json.dumps(cfg))
        expected = "config.json: invalid config"
    done = serve_once(ckpt)
    assert done.returncode != 0
    assert expected in done.stderr


def test_cors_is_off_by_default(client: TestClient) -> None:
    r = client.options("/predict", headers={"Origin": "https://example.com", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_allows_configured_origins(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(cors_origins=["https://ok.example"])
    headers = {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/predict", headers=headers)
    assert r.headers.get("access-control-allow-origin") == "https://ok.example"
    r = client.options("/predict", headers={**headers, "Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_json_log_lines_carry_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    from app.logs import request_id_var, setup_logging

    setup_logging("INFO", json_lines=True)
    token = request_id_var.set("abc-123")
    try:
        logging.getLogger("app.test").info("hello")
    finally:
        request_id_var.reset(token)
        for handler in logging.getLogger().handlers:
            handler.flush()  # lines are written by a thread of their own; flush() writes what waits
        logging.getLogger().handlers[:] = []
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["request_id"] == "abc-123" and line["message"] == "hello" and line["level"] == "INFO"


def test_dead_worker_turns_health_and_ready_to_503(client: TestClient) -> None:
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    assert client.get("/ready").status_code == 200
    client.portal.call(_cancel_worker, engine)  # type: ignore[union-attr]
    for path in ("/health", "/ready"):
        r = client.get(path)
        assert r.status_code == 503
        assert "worker" in r.json()["error"]


async def _cancel_worker(engine: Engine) -> None:
    engine.core.put(Stop())  # the core loop ends as if it had died
    while engine.health().alive:
        await asyncio.sleep(0.01)
