"""The engine on compiled decode steps (MTP_COMPILE): the eager tokens at every batch size the
continuous batch passes through, a draft policy over the compiled widths, and no compiling
once the engine is ready."""

from __future__ import annotations

import asyncio
import shutil
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.decoding.generate import generate as static_generate
from app.decoding.sampling import SamplingParams
from app.engine.compile import compiled_batch_limit
from app.engine.config import EngineConfig
from app.engine.drafts import EXPLORE_EVERY
from app.engine.types import GenerateJob
from app.model.checkpoint import load_checkpoint
from tests.engine.test_engine import PROMPTS, run

pytestmark = [
    pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
    ),
    # a cold compile of one test's graphs took 293-314 s on a slow 2-core host (the default limit: 300 s)
    pytest.mark.timeout(900),
]


def graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def fused_steps(engine: Any) -> list[int | None]:
    """From now on, each fused greedy step the engine runs appends the drafts its modules make
    (None: the decoder's default) to the returned list."""
    compiled = engine.core.batch.compiled
    step, made = compiled.greedy_step, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        made.append(args[6] if len(args) > 6 else kwargs.get("n_drafts"))
        return step(*args, **kwargs)

    compiled.greedy_step = counted
    return made


def eager_tokens(checkpoint: Path, device: str = "cpu", kv_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Plain greedy tokens of PROMPTS on an eager copy of the checkpoint (20 new tokens each),
    its keys and values kept in kv_dtype (the engine's: the same keys, rounded alike)."""
    model, tok = load_checkpoint(checkpoint, device=device)  # its own model: the engine keeps its caches
    model.kv_dtype = kv_dtype
    return static_generate(model, PROMPTS, 20, speculative=False, eos_id=tok.eot_id).tokens


def test_the_compiled_batch_sizes_default_to_every_batch_size() -> None:
    """A batch pads to a compiled size up to the limit; larger batches run eager steps."""
    assert compiled_batch_limit(EngineConfig(max_batch_size=16)) == 16
    assert compiled_batch_limit(EngineConfig(max_batch_size=2)) == 2
    assert compiled_batch_limit(EngineConfig(max_batch_size=16, compile_max_batch_size=8)) == 8
    assert compiled_batch_limit(EngineConfig(max_batch_size=16, compile_max_batch_size=32)) == 16


async def test_compiled_engine_gives_the_eager_greedy_tokens_and_never_compiles_after_start(
    engine_factory: Callable[..., Any], checkpoint: Path, tmp_path: Path
) -> None:
    engine = await engine_factory(
        start=False,
        compile=True,
        compile_autotune=False,
        compile_cache_dir=str(tmp_path),
        max_batch_size=4,
        compile_max_batch_size=2,  # batches of 3 and 4 run eager steps
    )
    await engine.start(warmup=True)  # compiles, warms up and times the draft policy on compiled steps
    info = engine.info()["compiled"]
    # k = 3: greedy batches verify 0, 1 or 2 drafts (fused steps); others 0 or 2 (forward steps)
    assert (info["batch_sizes"], info["greedy_widths"], info["widths"]) == ([1, 2], [1, 2, 3], [1, 3])
    assert any(tmp_path.iterdir())  # Inductor's cache lives where the setting says
    policy = engine.core.batch.policy
    assert policy is not None and policy.choices == [0, 1, 2] and policy.batches == [1, 2, 4]  # 4: eager steps
    # compiled CPU steps of float32 weights keep keys and values in bfloat16 (kv_cache_dtype auto)
    assert engine.info()["kv_cache_dtype"] == "bfloat16"
    assert {c.k_cache.dtype for c in engine.model.kv_caches() if c is not None} == {torch.bfloat16}
    want = eager_tokens(checkpoint, kv_dtype=torch.bfloat16)

    before = graphs_compiled()
    alone = [(await run(engine, GenerateJob(p, max_new_tokens=20)))[0] for p in PROMPTS]
    three = await asyncio.gather(*(run(engine, GenerateJob(p, max_new_tokens=20)) for p in PROMPTS[:3]))
    plain = await asyncio.gather(*(run(engine, GenerateJob(p, max_new_tokens=20, speculative=False)) for p in PROMPTS))
    # a row asking for top log-probabilities takes the forward step: the same greedy tokens
    mixed = await asyncio.gather(
        *(run(engine, GenerateJob(p, max_new_tokens=20, top_logprobs=2 * (i % 2))) for i, p in enumerate(PROMPTS))
    )
    sampled = SamplingParams(do_sample=True, temperature=0.8, seed=1, frequency_penalty=0.3)
    await asyncio.gather(*(run(engine, GenerateJob(p, max_new_tokens=20, sampling=sampled)) for p in PROMPTS))
    assert alone == want
    assert [t for t, _ in three] == want[:3]
    assert [t for t, _ in plain] == want
    assert [t for t, _ in mixed] == want
    assert graphs_compiled() == before  # every step ran a shape compiled before the engine was ready


async def test_compiled_engine_with_sequential_modules_gives_the_eager_greedy_tokens(
    engine_factory: Callable[..., Any], sequential_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential MTP modules on compiled steps: an all-greedy speculating batch of one runs the
    fused step (modules included) at the widths the draft policy picks; a batch of two runs
    eager steps, and its longer request goes on alone on fused steps over the caches and
    carried states the eager steps left; rows the policy sends plain run the fused plain step (no
    module). Every request gets the eager plain tokens, and nothing compiles once the engine is
    ready."""
    engine = await engine_factory(
        sequential_checkpoint,
        start=False,
        compile=True,
        compile_autotune=False,
        compile_cache_dir=str(tmp_path),
        max_batch_size=2,
        compile_max_batch_size=1,  # four graphs: compiling costs seconds each
        compile_draft_counts=[],  # widths 1 and 3
        adaptive_threads=False,  # one thread count, whose timings the test sets below
    )
    await engine.start(warmup=True)  # the draft policy times the fused steps, modules included
    policy = engine.core.batch.policy
    plain_costs = {b: row[0] for b, row in policy.shallow.items()}  # plain steps, which it timed too,
    policy.shallow.clear()  # may well be faster here: keep rows drafting until the end (idle between requests)
    # and every draft count as dear as the others, whatever this machine times, so the policy
    # verifies both drafts (the most expected tokens) on all but its re-timing runs
    policy.recent = {b: [deque([1.0]) for _ in row] for b, row in policy.recent.items()}
    monkeypatch.setattr(policy, "observe_cost", lambda *args: None)
    info = engine.info()["compiled"]
    assert (info["batch_sizes"], info["greedy_widths"], info["widths"]) == ([1], [1, 3], [1, 3])
    assert info["shallow_depths"] == [0]  # the plain greedy step; one module's would be width 2
    fused = fused_steps(engine)
    want = eager_tokens(sequential_checkpoint, kv_dtype=engine.model.kv_dtype)

    before = graphs_compiled()
    alone = [await run(engine, GenerateJob(p, max_new_tokens=20)) for p in PROMPTS]
    assert [t for t, _ in alone] == want
    assert sum(fin.accepted_tokens for _, fin in alone) > 0  # the modules' drafts were verified and kept
    assert fused
    for rows, lengths in (((0, 1), (6, 20)), ((2, 3), (20, 6))):  # a batch of two, then its longer row alone
        fused_before = len(fused)
        jobs = [GenerateJob(PROMPTS[b], n) for b, n in zip(rows, lengths, strict=True)]
        two = await asyncio.gather(*(run(engine, job) for job in jobs))
        assert [t for t, _ in two] == [want[b][:n] for b, n in zip(rows, lengths, strict=True)]
        assert len(fused) > fused_before
    plain = await asyncio.gather(*(run(engine, GenerateJob(p, max_new_tokens=20, speculative=False)) for p in PROMPTS))
    assert [t for t, _ in plain] == want
    # now the policy goes plain at once: drafting steps look dear (1 s), and plain rows never
    # time a drafting step that could undo it (each request below chooses once, and none of
    # those choices starts a re-timing run)
    policy.shallow.update({b: {0: window} for b, window in plain_costs.items()})
    policy.recent = {b: [deque([1.0]) for _ in row] for b, row in policy.recent.items()}
    policy.until_explore = dict.fromkeys(policy.until_explore, EXPLORE_EVERY)
    fused_before = len(fused)
    chosen = [await run(engine, GenerateJob(p, max_new_tokens=20)) for p in PROMPTS]
    assert [t for t, _ in chosen] == want and set(fused[fused_before:]) == {0}  # the fused plain step, no module
    assert sum(fin.verify_steps for _, fin in chosen) == 0
    assert graphs_compiled() == before


async def test_compiled_shallow_steps_are_graphs_of_their_own_and_give_the_eager_greedy_tokens(
    engine_factory: Callable[..., Any], sequential_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shallow step (the first of k - 1 = 2 modules drafts one token, and the step verifies it)
    is compiled before the engine is ready and timed with the others. Where the policy picks it,
    every step of the request runs it, one draft a step, with the eager plain tokens, and
    nothing compiles once the engine is ready."""
    engine = await engine_factory(
        sequential_checkpoint,
        start=False,
        compile=True,
        compile_autotune=False,
        compile_cache_dir=str(tmp_path),
        max_batch_size=1,
        compile_draft_counts=[1],  # greedy widths 1, 2 and 3; a shallow step is width 2
        adaptive_threads=False,  # one thread count: fewer graphs
    )
    await engine.start(warmup=True)
    info = engine.info()["compiled"]
    assert (info["greedy_widths"], info["shallow_depths"]) == ([1, 2, 3], [0, 1])
    policy = engine.core.batch.policy
    assert set(policy.shallow[1]) == {0, 1}  # plain and shallow(1) steps were timed at start-up
    # shallow(1) the clear pick whatever this machine timed
    policy.recent = {b: [deque([1.0]) for _ in row] for b, row in policy.recent.items()}
    policy.shallow = {b: {1: deque([1e-3])} for b in policy.shallow}
    monkeypatch.setattr(policy, "observe_cost", lambda *args: None)
    made = fused_steps(engine)
    want = eager_tokens(sequential_checkpoint, kv_dtype=engine.model.kv_dtype)

    before = graphs_compiled()
    got = [await run(engine, GenerateJob(p, max_new_tokens=20)) for p in PROMPTS]
    assert [t for t, _ in got] == want
    assert sum(fin.verify_steps for _, fin in got) > 0
    assert all(fin.drafted_tokens == fin.verify_steps for _, fin in got)  # one draft a step
    assert made and set(made) == {1}  # every fused step ran the shallow graph: one module drafted
    assert graphs_compiled() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ckpt", ["checkpoint", "sequential_checkpoint"])
async def test_the_engine_on_cuda_replays_cuda_graphs_with_the_eager_greedy_tokens(
    engine_factory: Callable[..., Any], request: pytest.FixtureRequest, tmp_path: Path, ckpt: str
) -> None:
    """On CUDA the engine captures every compiled shape as a CUDA graph before it is ready (none
    skipped). Requests alone, in batches of up to 4 (3 and 4 rows on eager steps, then their
    last rows alone on the graphs, over the caches and states the eager steps left), plain,
    and asking for top log-probabilities (the forward step) get the eager plain tokens;
    seeded sampled requests get the same text twice; nothing compiles once the engine is ready."""
    path = request.getfixturevalue(ckpt)
    skips = int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])
    engine = await engine_factory(
        path,
        start=False,
        device="cuda",
        compile=True,
        compile_cache_dir=str(tmp_path),
        max_batch_size=4,
        compile_max_batch_size=2,  # batches of 3 and 4 run eager steps
        compile_draft_counts=[],  # widths 1 and 3: fewer graphs
    )
    await engine.start(warmup=True)
    info = engine.info()["compiled"]
    assert info["batch_sizes"] == [1, 2]
    want = eager_tokens(path, "cuda", kv_dtype=engine.model.kv_dtype)
    before = graphs_compiled()
    alone = [(await run(engine, GenerateJob(p, max_new_tokens=20)))[0] for p in PROMPTS]
    three = await asyncio.gather(*(run(engine, GenerateJob(p, max_new_tokens=20)) for p in PROMPTS[:3]))
    plain = await asyncio.gather(*(run(engine, GenerateJob(p, max_new_tokens=20, speculative=False)) for p in PROMPTS))
    mixed = await asyncio.gather(
        *(run(engine, GenerateJob(p, max_new_tokens=20, top_logprobs=2 * (i % 2))) for i, p in enumerate(PROMPTS))
    )
    sampled = SamplingParams(do_sample=True, temperature=0.8, seed=1)
    twice = [
        await asyncio.gather(*(run(engine, GenerateJob(p, max_new_tokens=20, sampling=sampled)) for p in PROMPTS))
        for _ in range(2)
    ]
    assert alone == want
    assert [t for t, _ in three] == want[:3]
    assert [t for t, _ in plain] == want
    assert [t for t, _ in mixed] == want
    assert [t for t, _ in twice[0]] == [t for t, _ in twice[1]]  # seeded: the same text again
    assert graphs_compiled() == before
    assert int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]) == skips
