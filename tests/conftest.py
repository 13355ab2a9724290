"""Shared fixtures: tiny checkpoints, in-process apps and clients, and real `mtp serve` processes.

Every model here is a few thousand parameters, so a test spends its time in the service, not
in matrix multiplies. Subprocesses run with one BLAS/OpenMP thread.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.engine import Engine
from app.main import create_app
from app.model.checkpoint import save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer
from bench.server import Server

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINING_TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    * 20
    + "The quick brown fox jumps over the lazy dog. " * 20
    + "naïve café, 東京, こんにちは. " * 5
)
TINY = {"d_model": 32, "n_layers": 2, "num_heads": 4, "d_ff": 64, "k": 3, "max_seq_len": 64, "dropout_rate": 0.0}
# eager decode steps unless a test asks for compiled ones: compiling costs seconds per shape
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MTP_COMPILE": "false"}
READY_TIMEOUT_S = 90.0


# ---- checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([TRAINING_TEXT], vocab_size=300)


def _build(tok: Tokenizer, seed: int = 0, **overrides: Any) -> MTPTransformer:
    torch.manual_seed(seed)
    model = MTPTransformer(ModelConfig(vocab_size=tok.vocab_size, **{**TINY, **overrides}))
    return model.eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """A seeded random tiny MTP model (k=3, context 64)."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", _build(tiny_tokenizer), tiny_tokenizer)


def _biased(tok: Tokenizer, token_id: int, heads: range) -> MTPTransformer:
    """The tiny model with a huge bias on token_id in the given heads (0 = head 1): they always predict it."""
    model = _build(tok)
    with torch.no_grad():
        for j in heads:
            model.head.proj.bias[j * tok.vocab_size + token_id] = 100.0  # head j+1 owns rows jV..(j+1)V-1
    return model


@pytest.fixture(scope="session")
def eos_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """Head 1 always predicts <|endoftext|>: every generation ends on its first token."""
    model = _biased(tiny_tokenizer, tiny_tokenizer.eot_id, range(1))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "eos", model, tiny_tokenizer)


@pytest.fixture(scope="session")
def repeat_token(tiny_tokenizer: Tokenizer) -> int:
    return tiny_tokenizer.encode(" the")[0]


@pytest.fixture(scope="session")
def repeat_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer, repeat_token: int) -> Path:
    """Every head always predicts the same token: greedy output repeats it and every draft is accepted."""
    model = _biased(tiny_tokenizer, repeat_token, range(TINY["k"]))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "repeat", model, tiny_tokenizer)


@pytest.fixture(scope="session")
def lead_byte_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """Every head predicts the lone byte 0xE6 (the first byte of a 3-byte UTF-8 character, as in 東)."""
    token_id = tiny_tokenizer.hf.token_to_id(chr(0xE6))  # the byte-level alphabet spells 0xE6 as 'æ'
    assert tiny_tokenizer.token_bytes(token_id) == b"\xe6"
    model = _biased(tiny_tokenizer, token_id, range(TINY["k"]))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lead-byte", model, tiny_tokenizer)


@pytest.fixture(scope="session")
def sequential_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """The tiny model with sequential MTP modules (k=3): weights spread so that logits are O(1) and
    drafts depend on the modules' caches, and one token favoured by the shared output projection,
    so that some module drafts are accepted (a random model's almost never are; +1.0 left 1 of 138
    eager drafts accepted, too few for a test to count on)."""
    model = _build(tiny_tokenizer, head_type="sequential")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen))
        model.head.proj.bias[tiny_tokenizer.encode(" the")[0]] += 2.0
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "sequential", model, tiny_tokenizer)


# ---- in-process apps ------------------------------------------------------------------------


@pytest.fixture
def app_factory(checkpoint: Path) -> Callable[..., FastAPI]:
    """create_app(Settings(...)) on the tiny checkpoint; keyword arguments override settings."""

    def make(**overrides: Any) -> FastAPI:
        overrides.setdefault("checkpoint", checkpoint)
        overrides.setdefault("device", "cpu")
        overrides.setdefault("compile", False)  # compiled steps: tests/engine/test_compiled.py
        return create_app(Settings(**overrides))

    return make


@pytest.fixture
def client_factory(app_factory: Callable[..., FastAPI]) -> Iterator[Callable[..., TestClient]]:
    """A started TestClient (lifespan run: model loaded, engine warm); closed after the test."""
    with contextlib.ExitStack() as stack:

        def make(**overrides: Any) -> TestClient:
            return stack.enter_context(TestClient(app_factory(**overrides), raise_server_exceptions=False))

        yield make


@pytest.fixture
def client(client_factory: Callable[..., TestClient]) -> TestClient:
    return client_factory()


@pytest.fixture
async def aclient_factory(
    app_factory: Callable[..., FastAPI],
) -> AsyncIterator[Callable[..., Any]]:
    """(app, httpx.AsyncClient over ASGITransport) with the lifespan run in this test's event loop.

    ASGITransport does not run the lifespan itself, so it is entered here. It also buffers whole
    responses: tests that need a live stream drive the ASGI app directly or use a real server.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def make(**overrides: Any) -> tuple[FastAPI, httpx.AsyncClient]:
            app = app_factory(**overrides)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30)
            )
            return app, client

        yield make


def parse_sse(text: str) -> list[Any]:
    """The `data:` payloads of a server-sent-events body, JSON-decoded ("[DONE]" kept as a string)."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data frame: {block!r}"
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture
def sse() -> Callable[[str], list[Any]]:
    return parse_sse


def assert_envelope(response: httpx.Response, status: int, error_type: str | None = None) -> dict[str, Any]:
    """The service's error reply: the status, {"error", "error_type"} and no traceback text."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["error_type"], str)
    if error_type is not None:
        assert body["error_type"] == error_type, body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


@pytest.fixture
def envelope() -> Callable[..., dict[str, Any]]:
    return assert_envelope


@torch.no_grad()
def head1_prompt_logprobs(model: MTPTransformer, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t = 1..L-1 under head 1, from the model's own uncached forward:
    what TGI's decoder_input_details reports for every input token but the first."""
    logits = model(torch.tensor([ids]))[0, :-1, 0].float()  # [L-1, V]: position t predicts token t + 1
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


# ---- real `mtp serve` processes -------------------------------------------------------------


def start_server(ckpt: Path, workdir: Path, *args: str, forward_delay_s: float = 0.0, **env: str) -> Server:
    """`python -m app.cli serve ARGS...` on CKPT (bench/server.py), its log in workdir; not yet ready.

    env: raw environment variables (MTP_IDLE_TIMEOUT_S="1"); forward_delay_s: every forward
    pass sleeps that long (the server runs as tests/slow_serve.py)."""
    full_env = {**SERVER_ENV, **env, "TEST_FORWARD_DELAY_S": str(forward_delay_s)}
    module = "tests.slow_serve" if forward_delay_s > 0 else "app.cli"
    return Server.start(ckpt, args=args, env=full_env, log_dir=workdir, module=module)


def set_fault_hook(engine: Engine, hook: Callable[[str], None] | None) -> None:
    """Call hook(kind) at the start of each forward pass the engine runs ("predict", "prefill",
    "decode"), on its worker thread, to slow it or raise inside it; None removes the hook."""
    passes = engine.core.passes
    passes.__dict__.pop("_guarded", None)
    if hook is None:
        return
    run = passes._guarded

    def guarded(kind: str, fn: Callable[[], Any]) -> Any:
        hook(kind)
        return run(kind, fn)

    passes._guarded = guarded  # type: ignore[method-assign]


def forward_passes(engine: Engine) -> int:
    """Forward passes the engine has run, from its metrics (mtp_forward_duration_seconds_count)."""
    registry = engine.stats.metrics.registry
    kinds = ("predict", "prefill", "decode")
    return int(sum(registry.get_sample_value("mtp_forward_duration_seconds_count", {"kind": k}) or 0 for k in kinds))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[Server]:
    """One real uvicorn server on the tiny checkpoint, shared by the tests that need a socket."""
    srv = start_server(checkpoint, tmp_path_factory.mktemp("server"), "--device", "cpu")
    try:
        srv.wait_ready(READY_TIMEOUT_S)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server_factory(tmp_path: Path, checkpoint: Path) -> Iterator[Callable[..., Server]]:
    """Start a dedicated server (e.g. with a per-forward delay); stopped after the test."""
    started: list[Server] = []

    def make(*args: str, forward_delay_s: float = 0.0, **env: str) -> Server:
        srv = start_server(
            checkpoint, tmp_path / f"s{len(started)}", "--device", "cpu", *args, forward_delay_s=forward_delay_s, **env
        )
        started.append(srv)
        srv.wait_ready(READY_TIMEOUT_S)
        return srv

    yield make
    for srv in started:
        srv.stop()
