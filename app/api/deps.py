"""Typed dependencies: the service state the lifespan built, handed to routes.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in a
thread pool, a thread hop per dependency per request that costs more than the check itself.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.api.errors import APIError
from app.config import Settings
from app.engine.engine import Engine
from app.metrics import Metrics
from app.model.model import ModelConfig
from app.model.tokenizer import Tokenizer


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    engine: Engine | None = None
    tokenizer: Tokenizer | None = None
    model_config: ModelConfig | None = None
    model_id: str = ""
    ready: bool = False
    draining: bool = False
    startup_error: str | None = None

    @property
    def max_input_tokens(self) -> int:
        assert self.model_config is not None
        cap = self.settings.max_input_tokens or self.model_config.max_seq_len
        return min(cap, self.model_config.max_seq_len)


async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


@dataclass
class Serving:
    """What an inference route needs once the service is ready."""

    state: ServiceState
    engine: Engine
    tokenizer: Tokenizer
    model_config: ModelConfig
    settings: Settings


async def get_serving(state: StateDep) -> Serving:
    if state.draining:
        raise APIError(503, "the server is shutting down", "not_ready")
    if not state.ready or state.engine is None or state.tokenizer is None or state.model_config is None:
        raise APIError(503, "the model is not ready yet", "not_ready")
    return Serving(state, state.engine, state.tokenizer, state.model_config, state.settings)


ServingDep = Annotated[Serving, Depends(get_serving)]


async def require_api_key(request: Request, state: StateDep) -> None:
    """Bearer-token check in constant time; a no-op when no MTP_API_KEY is set."""
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key", "unauthorized")


AuthDep = Depends(require_api_key)
