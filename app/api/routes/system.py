"""Health, readiness, info, tokenize and metrics."""

from __future__ import annotations

import subprocess

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import __version__
from app.api.deps import ServingDep, StateDep
from app.api.errors import APIError, envelope
from app.api.schemas import (
    INFERENCE_ERRORS,
    HealthResponse,
    InfoResponse,
    Limits,
    TokenizeRequest,
    TokenizeResponse,
    TokenOut,
    error_responses,
)
from app.config import REPO_ROOT

router = APIRouter(tags=["system"])
HEALTHCHECK = "healthcheck"  # the error_type of TGI's /health when it answers 503


# GET and HEAD as two routes: one route with both methods gives both operations one
# operationId in /openapi.json, which client generators refuse.
@router.get("/health", response_model=HealthResponse, responses=error_responses(503))
@router.head("/health", response_model=HealthResponse, responses=error_responses(503))
async def health(state: StateDep) -> HealthResponse | JSONResponse:
    """200 when the service can serve (TGI's meaning): the model is loaded and warm and the
    inference worker is alive and making progress; draining still counts as alive."""
    if state.engine is None or not (state.ready or state.draining):
        return envelope(503, "model loading", HEALTHCHECK)
    h = state.engine.health()
    if not h.alive or h.stalled:
        return envelope(503, f"inference worker unhealthy: {h.detail}", HEALTHCHECK)
    return HealthResponse(status="ok", worker=h.detail)


@router.get("/ready", response_model=HealthResponse, responses=error_responses(503))
@router.head("/ready", response_model=HealthResponse, responses=error_responses(503))
async def ready(state: StateDep) -> HealthResponse | JSONResponse:
    """Readiness: the model is loaded and warm, the worker is healthy, and the server is not draining."""
    if state.draining:
        return envelope(503, "draining", "not_ready")
    if not state.ready or state.engine is None:
        return envelope(503, "model loading", "not_ready")
    h = state.engine.health()
    if not h.alive or h.stalled:
        return envelope(503, f"inference worker unhealthy: {h.detail}", "not_ready")
    return HealthResponse(status="ready", worker=h.detail)


def _git_sha() -> str | None:
    """The checkout's commit, if this code runs from one (an image has no .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


GIT_SHA = _git_sha()


@router.get("/info", response_model=InfoResponse, responses=error_responses(401, 503))
async def info(serving: ServingDep) -> InfoResponse:
    """The model's configuration, the service's limits, version, device and dtype."""
    s, cfg = serving.settings, serving.model_config
    engine_info = serving.engine.info()
    return InfoResponse(
        model_id=serving.state.model_id,
        version=__version__,
        model=cfg.to_dict(),
        k=cfg.k,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
        device=engine_info["device"],
        dtype=engine_info["dtype"],
        kv_cache_dtype=engine_info["kv_cache_dtype"],
        speculative=engine_info["speculative"],
        draft_policy=engine_info["draft_policy"],
        threads=engine_info["threads"],
        thread_timings=engine_info["thread_timings"],
        compiled=engine_info.get("compiled"),
        limits=Limits(
            max_input_tokens=serving.state.max_input_tokens,
            max_new_tokens=min(s.max_new_tokens, cfg.max_seq_len - 1),
            max_top_n=min(s.max_top_n, cfg.vocab_size),
            max_logprobs=min(s.max_logprobs, cfg.vocab_size),
            max_candidates=s.max_candidates,
            max_candidate_tokens=s.max_candidate_tokens,
            max_inputs_per_request=serving.max_inputs,
            max_stop_sequences=s.max_stop_sequences,
            max_stop_length=s.max_stop_length,
            max_body_bytes=s.max_body_bytes,
            max_batch_size=s.max_batch_size,
            max_running=engine_info["running_limit"],
            max_queue_size=s.max_queue_size,
            request_timeout_s=s.request_timeout_s,
            max_input_chars=s.max_input_chars,
            max_tokenize_tokens=s.max_tokenize_tokens,
            max_temperature=s.max_temperature,
            max_top_k=cfg.vocab_size,
            max_pending_bodies_per_client=s.pending_bodies_per_client,
            body_timeout_s=s.body_timeout_s,
            idle_timeout_s=s.idle_timeout_s,
            max_connections=s.max_connections,
            max_header_bytes=s.max_header_bytes,
        ),
        auth_required=s.api_key is not None,
        model_dtype=engine_info["dtype"],
        model_device_type=engine_info["device"].split(":")[0],
        max_input_tokens=serving.state.max_input_tokens,
        max_total_tokens=cfg.max_seq_len,
        max_stop_sequences=s.max_stop_sequences,
        max_concurrent_requests=s.max_queue_size,
        sha=GIT_SHA,
    )


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(*INFERENCE_ERRORS))
async def tokenize(req: TokenizeRequest, serving: ServingDep) -> TokenizeResponse:
    """Token ids and character offsets of a text."""
    [enc] = await serving.encodings([req.inputs], "inputs")
    if len(enc.ids) > serving.settings.max_tokenize_tokens:
        raise APIError(
            422, f"inputs has {len(enc.ids)} tokens; /tokenize returns at most {serving.settings.max_tokenize_tokens}"
        )
    return TokenizeResponse(
        tokens=[
            TokenOut(id=i, text=serving.tokenizer.id_to_text(i), start=a, stop=b)
            for i, (a, b) in zip(enc.ids, enc.offsets, strict=True)
        ]
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    """Prometheus exposition."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
