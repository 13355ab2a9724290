"""The engine's compiled decode steps: which shapes, where Inductor caches them, and building
them on the inference thread before the service is ready."""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

from app.decoding.compiled import CompiledDecoder
from app.engine.config import EngineConfig
from app.model.model import MTPTransformer

log = logging.getLogger(__name__)

SMALL_BATCH = 2  # batch sizes compiled at one thread too, for the thread policy


def compile_shapes(cfg: EngineConfig, model: MTPTransformer) -> tuple[list[int], list[int], list[int], list[int]]:
    """The batch sizes, the widths (tokens per row per step) of the forward step, those of
    the fused greedy step, and the shallow depths (sequential heads: module counts d below the
    most, each a greedy step of width d + 1 whose first d modules draft; d = 0 is the plain
    greedy step, which runs no module) that the engine compiles.

    A batch pads to the next power of two (up to compiled_batch_limit). The draft policy picks, for
    all-greedy batches, among a few draft counts, each a width of the fused greedy step (with
    sequential heads it runs the modules too). Other batches (sampled, penalized, or asking
    for top log-probabilities, and with sequential heads plain ones) run the forward step and
    verify no drafts or the most any row verifies (sampled rows verify every draft), so it
    needs only those two widths. Fewer widths: fewer graphs, more padding."""
    k = model.cfg.k
    top = compiled_batch_limit(cfg)  # larger batches run eager steps
    sizes = sorted({min(2**i, top) for i in range(top.bit_length() + 1)})
    counts = cfg.compile_draft_counts if cfg.compile_draft_counts is not None else [1, 3]
    most = k - 1 if cfg.draft_tokens is None else min(cfg.draft_tokens, k - 1)
    chosen = sorted({1, most + 1} | {n + 1 for n in counts if 0 <= n < most})
    sequential = model.cfg.head_type == "sequential"
    shallow = [d for d in range(most) if d + 1 in chosen] if sequential else []  # d = 0: a plain greedy step
    return sizes, sorted({1, most + 1}), chosen, shallow


def compiled_batch_limit(cfg: EngineConfig) -> int:
    """The largest batch size compiled: compile_max_batch_size, by default every batch size up
    to max_batch_size, on CPU as on CUDA (as vLLM and SGLang capture a CUDA graph per batch
    bucket); never past max_batch_size. A compiled step attends only the filled part of the
    KV cache on CPU, so a large batch gains from it too: at 8 and 16 streams the compiled
    steps served more than the eager ones (docs/benchmarks.md, benchmark 39)."""
    limit = cfg.compile_max_batch_size if cfg.compile_max_batch_size is not None else cfg.max_batch_size
    return min(cfg.max_batch_size, limit)


def thread_counts(cfg: EngineConfig, model: MTPTransformer, batch: int) -> list[int]:
    """The intra-op thread counts a batch size is compiled at. With adaptive threads (CPU),
    batches of up to SMALL_BATCH rows get one thread as well as all of them, so the thread
    policy can fall back to one under a busy neighbour (threads.py); larger batches, where
    one thread is far slower, get all."""
    n = torch.get_num_threads()
    adaptive = cfg.adaptive_threads and model.head.proj.weight.device.type == "cpu"
    return sorted({1, n}) if adaptive and batch <= SMALL_BATCH else [n]


# Inductor writes its own default (/tmp/torchinductor_<user>) into $TORCHINDUCTOR_CACHE_DIR the
# first time it looks its cache up, which importing its config does; the server imports it before
# the steps compile. So the variable is also read as it was when this module was imported.
_ENV_AT_IMPORT = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def _inductor_default() -> str | None:
    """The directory Inductor puts in $TORCHINDUCTOR_CACHE_DIR when nobody set it (None: unknown)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def cache_dir(cfg: EngineConfig) -> Path:
    """Inductor's on-disk cache: the setting, else $TORCHINDUCTOR_CACHE_DIR as the user set it,
    else ~/.cache/mtp/inductor. The variable holding Inductor's own default, where it did not
    when this module was imported, is Inductor's doing, not the user's: it is passed over."""
    if cfg.compile_cache_dir:
        return Path(cfg.compile_cache_dir)
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and (env == _ENV_AT_IMPORT or env != _inductor_default()):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtp" / "inductor"


def build_compiled(model: MTPTransformer, cfg: EngineConfig) -> CompiledDecoder:
    """Compile every decode-step shape (inference thread, before any sequence holds a cache row).

    Allocates the model's KV caches for max_batch_size rows. A cold cache costs Inductor's
    code generation and autotuning for every shape; a warm one only tracing and loading."""
    path = cache_dir(cfg)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by Inductor whenever it touches its cache
    sizes, widths, greedy, shallow = compile_shapes(cfg, model)
    autotune = cfg.compile_autotune and model.head.proj.weight.device.type == "cpu"
    t0 = time.perf_counter()
    log.info(
        "compiling decode steps: batch sizes %s x widths %s (forward), %s (greedy) and shallow depths %s, "
        "autotune=%s (%s), cpp_wrapper=%s, cache %s",
        sizes,
        widths,
        greedy,
        shallow,
        autotune,
        cfg.compile_gemm_backends,
        cfg.compile_cpp_wrapper,
        path,
    )
    compiled = CompiledDecoder(
        model,
        cfg.max_batch_size,
        autotune=autotune,
        batch_sizes=sizes,
        widths=widths,
        greedy_widths=greedy,
        n_drafts=cfg.draft_tokens,
        shallow_depths=shallow,
        cpp_wrapper=cfg.compile_cpp_wrapper,
        gemm_backends=cfg.compile_gemm_backends,
    )
    for kind, b, w, n, seconds in compiled.warm(functools.partial(thread_counts, cfg, model)):
        log.info("compiled the %s step batch=%d width=%d threads=%d in %.1f s", kind, b, w, n, seconds)
    log.info("decode steps compiled in %.1f s", time.perf_counter() - t0)
    return compiled
