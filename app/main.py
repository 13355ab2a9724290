"""create_app(): lifespan (load the model once, start the engine), routers, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import Any

import torch
from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Scope

from app import __version__
from app.api.deps import ServiceState
from app.api.direct import DirectRoutes
from app.api.docs import install_docs
from app.api.errors import install_error_handlers
from app.api.middleware import RequestContext
from app.api.routes import chat, generate, openai, predict, system
from app.config import Settings
from app.engine.admission import NO_RESERVATION
from app.engine.config import EngineConfig, inference_thread
from app.engine.engine import Engine
from app.metrics import Metrics
from app.model.checkpoint import load_checkpoint, load_config, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    s = state.settings
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    executor = inference_thread()  # loads the model and runs every forward pass: one OpenMP team
    try:
        load = functools.partial(load_checkpoint, s.checkpoint, device=device, dtype=dtype)
        model, tokenizer = await asyncio.get_running_loop().run_in_executor(executor, load)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    engine = Engine(
        model,
        eos_id=tokenizer.eot_id,
        cfg=EngineConfig(**{f.name: getattr(s, f.name) for f in fields(EngineConfig)}),  # the settings' values
        metrics=state.metrics,
        executor=executor,
    )
    state.engine, state.tokenizer, state.model_config = engine, tokenizer, model.cfg
    state.model_id = s.checkpoint.name
    try:
        await engine.start(warmup=s.warmup)
        await build_routes(app)
        freeze_heap()
        state.ready = True
        state.metrics.ready.set(1)
        log.info("model %s ready on %s (%s); API docs at /docs", state.model_id, device, dtype)
        yield
    finally:
        state.ready = False
        state.metrics.ready.set(0)
        if engine.pending():
            await engine.drain(s.drain_timeout_s)
        await engine.shutdown()


async def build_routes(app: FastAPI) -> None:
    """Walk the router once, so the first request to each route does not build it.

    FastAPI (0.165) builds an included router's routes (dependencies, validators, response
    fields) the first time a request is matched against it, so a fresh server's first request
    to each router waited for that. A path that no route matches is compared with every route,
    so one such request, sent to the router alone (no middleware, no metrics), builds them all."""
    path = "/.well-known/mtp-serve/build-routes"
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("localhost", 80),
        "client": ("localhost", 0),
        "state": {},
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    await app.router(scope, receive, send)


def freeze_heap() -> None:
    """After start-up: collect, then move every object alive into the permanent generation,
    which the cyclic garbage collector no longer scans (vLLM freezes its heap after start-up too).

    Torch, Inductor's compiled graphs and their sympy expressions leave about 900,000 tracked
    objects; a full collection of them took 0.94 s with the GIL held on this project's 2-core
    machine (docs/benchmarks.md, benchmark 11), a stall of the event loop and of the inference
    thread alike. Python runs one when the objects that survived into the oldest generation
    since the last reach a quarter of those it already holds: rarely, but at any moment while
    serving. Frozen, those collections scan only what serving made. Objects made later
    (requests, their events) are collected as before. A process serves one app for its life;
    in one that starts several (tests), each start-up freezes what the ones before left."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info(
        "garbage collector: %d objects frozen after start-up (collected in %.0f ms)",
        gc.get_freeze_count(),
        (time.perf_counter() - t0) * 1e3,
    )


class ServiceApp(FastAPI):
    """FastAPI with RequestContext in front of its whole middleware stack (error, telemetry
    and body-limit layers included), so load shedding answers before any of them runs, and
    the direct routes (app/api/direct.py) between the two."""

    request_context: dict[str, Any]
    door: RequestContext | None = None  # built with the middleware stack, at the first ASGI call (the lifespan)

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if not self.user_middleware:  # CORS wraps FastAPI's stack: a request routed past it would miss it
            stack = DirectRoutes(stack, self, [predict.DIRECT])
        self.door = RequestContext(stack, **self.request_context)
        return self.door


def add_head_routes(router: APIRouter) -> None:
    """HEAD wherever GET is served (RFC 9110: a server answers HEAD as it answers GET, without
    the body, which the server leaves out): a HEAD route beside each of the router's GET routes
    that has none, kept out of /openapi.json, where it would share the GET's operationId."""
    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    served = {r.path for r in routes if "HEAD" in (r.methods or ())}
    for r in [r for r in routes if "GET" in (r.methods or ()) and r.path not in served]:
        router.add_api_route(
            r.path.removeprefix(router.prefix),  # the router puts its prefix back
            r.endpoint,
            methods=["HEAD"],
            include_in_schema=False,
            response_model=r.response_model,
            response_class=r.response_class,
            dependencies=r.dependencies,
            name=f"{r.name}-head",
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    k = 1
    with contextlib.suppress(Exception):  # size per-head metrics; a broken checkpoint fails in the lifespan
        k = load_config(settings.checkpoint).k
    metrics = Metrics(k=k)
    app = ServiceApp(
        title="MTP inference service",
        version=__version__,
        description="Multi-token-prediction transformer: k-token probabilities and self-speculative generation.",
        lifespan=lifespan,
        redirect_slashes=False,  # a redirect would echo the Host header; /predict/ is simply not found
        docs_url=None,  # /docs and /redoc come from install_docs: local assets, not a CDN
        redoc_url=None,
        # Metrics are Prometheus (/metrics); FastAPI's native OpenTelemetry hooks would only
        # probe for providers on every request, so they are off.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.service = ServiceState(settings=settings, metrics=metrics)
    install_error_handlers(app)
    install_docs(app)
    add_head_routes(app.router)
    # The inference routes first: a request is matched against the routes in this order, and
    # every route tried before its own costs the event loop a match (system routes are rare)
    for router in (predict.router, generate.router, openai.router, chat.router, system.router):
        add_head_routes(router)
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
        )
    app.request_context = dict(
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        enter=lambda: engine.enter() if (engine := app.state.service.engine) is not None else NO_RESERVATION,
        api_key=settings.api_key,
        bodies_per_client=settings.pending_bodies_per_client,
        places_free=lambda: engine.places_free() if (engine := app.state.service.engine) is not None else 1 << 30,
        turns_away=lambda: (engine := app.state.service.engine) is not None and engine.turns_away(),
    )
    return app


def __getattr__(name: str) -> FastAPI:
    """`uvicorn app.main:app` builds the app from MTP_* settings on first access."""
    if name == "app":
        from app.logs import setup_logging

        settings = Settings()
        setup_logging(settings.log_level, settings.log_json)
        application = create_app(settings)
        globals()["app"] = application
        return application
    raise AttributeError(name)
