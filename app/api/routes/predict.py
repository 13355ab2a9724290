"""POST /predict: the heads' top tokens at each position, the greedy continuation, candidate scores."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Request

from app.api.deps import Serving, ServingDep, unless_disconnected
from app.api.direct import DirectRoute
from app.api.errors import APIError
from app.api.schemas import (
    INFERENCE_ERRORS,
    CandidateScore,
    Continuation,
    PositionTop,
    PredictRequest,
    PredictResponse,
    PredictResult,
    TokenProb,
    error_responses,
)
from app.decoding.predict import Scores
from app.engine.types import PredictJob

router = APIRouter(tags=["inference"])


def _too_many(cap: int) -> APIError:
    return APIError(422, f"at most {cap} inputs per request")


async def _token_inputs(req: PredictRequest, serving: Serving) -> list[list[int]]:
    cap = serving.max_inputs
    if (req.inputs is None) == (req.input_ids is None):
        raise APIError(422, "give exactly one of inputs or input_ids")
    ids: list[list[int]] = []
    if req.inputs is not None:
        texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
        if not texts or any(not t for t in texts):
            raise APIError(422, "inputs must be non-empty texts")
        if len(texts) > cap:  # refused before any tokenizing
            raise _too_many(cap)
        ids = await serving.encode(texts, "inputs")
    elif req.input_ids:  # one row of ids, or several (validated as one or the other)
        rows = req.input_ids
        ids = [list(r) for r in cast(list[list[int]], rows)] if isinstance(rows[0], list) else [cast(list[int], rows)]
    if not ids or any(not row for row in ids):
        raise APIError(422, "inputs must not be empty")
    if len(ids) > cap:
        raise _too_many(cap)
    limit = serving.state.max_input_tokens
    for row in ids:  # the engine checks the ids against the model (vocabulary, context)
        if len(row) > limit:
            raise APIError(422, f"an input has {len(row)} tokens; the limit is {limit}")
    return ids


async def _candidates(req: PredictRequest, serving: Serving, positions: int) -> list[list[int]]:
    if not req.candidates:
        return []
    if len(req.candidates) > serving.settings.max_candidates:
        raise APIError(422, f"at most {serving.settings.max_candidates} candidates")
    texts = [c for c in req.candidates if isinstance(c, str)]
    cands = (
        await serving.encode(texts, "candidates") if texts else [list(c) for c in req.candidates if isinstance(c, list)]
    )
    for c in cands:  # the request's positions; the engine checks the ids against the model
        if not 1 <= len(c) <= positions:
            raise APIError(422, f"each candidate must be 1 to {positions} tokens (got {len(c)})")
    return cands


def _result(
    scores: Scores, prompt: list[int], positions: int, cands: list[list[int]], serving: Serving
) -> PredictResult:
    tok = serving.tokenizer
    tops = [
        PositionTop(
            position=j + 1,
            top=[
                TokenProb(id=i, text=tok.id_to_text(i), prob=p, logprob=lp)
                for i, p, lp in zip(
                    scores.top_ids[0][j], scores.top_probs[0][j], scores.top_logprobs[0][j], strict=True
                )
            ],
        )
        for j in range(positions)
    ]
    greedy = scores.greedy[0][:positions]
    scored = [
        CandidateScore(ids=ids, text=tok.decode(ids), logprobs=lps, total_logprob=sum(lps))
        for ids, lps in zip(cands, scores.candidates[0], strict=True)
    ]
    return PredictResult(
        input_length=len(prompt),
        positions=tops,
        greedy=Continuation(ids=greedy, text=tok.decode(greedy)),
        candidates=scored or None,
    )


@router.post("/predict", response_model=PredictResponse, responses=error_responses(*INFERENCE_ERRORS))
async def predict(req: PredictRequest, serving: ServingDep, request: Request) -> PredictResponse:
    """Score the next `positions` tokens of each input with the first `positions` MTP heads."""
    heads = serving.model_config.k
    positions = req.positions or heads
    if positions > heads:
        raise APIError(422, f"positions must be at most the model's head count k ({heads})")
    if req.top_n > serving.settings.max_top_n:
        raise APIError(422, f"top_n must be at most {serving.settings.max_top_n}")
    prompts = await _token_inputs(req, serving)
    cands = await _candidates(req, serving, positions)
    batch = [PredictJob(prompt_ids=p, top_n=req.top_n, candidates=cands) for p in prompts]
    if serving.model_config.head_type == "sequential" and cands:  # each candidate: the modules over its prompt
        cost, cap = sum(job.candidate_tokens for job in batch), serving.settings.max_candidate_tokens
        if cost > cap:
            raise APIError(422, f"candidates x input tokens is {cost}; the limit is {cap}")
    scores = await unless_disconnected(request, serving.engine.predict(batch, serving.reservation))
    results = [_result(s, p, positions, cands, serving) for s, p in zip(scores, prompts, strict=True)]
    return PredictResponse(positions=positions, k=positions, results=results)


# A well-formed /predict skips FastAPI's per-request layers (app/api/direct.py): the event
# loop's CPU per request is what holds served /predict under its in-process speed.
DIRECT = DirectRoute("/predict", PredictRequest, predict)
