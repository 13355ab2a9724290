"""CompiledDecoder with shape buckets (the engine's compiled steps): rows padded to a batch size
and tokens to a width give the eager greedy tokens at every batch size and draft count, and
sampling through padded steps keeps the joint distribution."""

import copy
import shutil
import sys

import pytest
import torch

from app.decoding.compiled import KV_ROUND, CompiledDecoder, cache_cpp_templates
from app.decoding.generate import first_tokens, forward_step, generate, prefill
from app.decoding.sampling import BatchSampling, SamplingParams
from app.decoding.speculative import StepResult, accept_drafts
from tests.decoding.test_generate import N_NEW, assert_same_tokens
from tests.decoding.test_speculative import (
    PROMPT,
    SETTINGS,
    V_SMALL,
    chi2_pvalue,
    exact_joint,
    joint_counts,
)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
    ),
    # a cold compile of one test's graphs took 293-314 s on a slow 2-core host (the default limit: 300 s)
    pytest.mark.timeout(900),
]


def test_cpp_template_sources_compile_once_and_render_as_before() -> None:
    """After cache_cpp_templates (which CompiledDecoder calls), a template source Inductor's C++
    GEMM template renders is compiled once and renders what a fresh compilation renders;
    calling it again wraps nothing twice. (The compiled tests' autotuned steps, built through
    the cache, give the eager tokens: tests/decoding/test_generate.py.)"""
    from torch._inductor.codegen.common import KernelTemplate

    cache_cpp_templates()
    cache_cpp_templates()
    compile_source = KernelTemplate._template_from_string
    source = "void {{ name }}() {\n    {{ body | indent_except_first(1) }}\n}"
    first, again = compile_source(source), compile_source(source)
    assert first is again
    fresh = compile_source.__wrapped__(source)  # type: ignore[attr-defined]
    assert fresh is not first
    args = {"name": "kernel", "body": "int a = 1;\nint b = 2;"}
    assert first.render(**args) == fresh.render(**args) == "void kernel() {\n    int a = 1;\n    int b = 2;\n}"


def test_padded_shapes_give_the_eager_greedy_tokens_at_every_batch_size_and_draft_count(peaked_model, make_prompts):
    """Batch sizes 1..4 against compiled sizes 1, 2, 4 (3 pads to 4), draft counts 0..3 against
    widths 1, 2, 4 (2 drafts pad to width 4): the plain eager tokens, and the same acceptance
    as eager speculative decoding with that draft count."""
    model = copy.deepcopy(peaked_model(4))  # the decoder keeps caches on its model
    dec = CompiledDecoder(model, 4, batch_sizes=[1, 2, 4], widths=[1, 2, 4])
    assert dec.shapes() == [(b, w) for b in (1, 2, 4) for w in (1, 2, 4)]
    assert not dec.covers(5, 1) and not dec.covers(1, 5) and dec.covers(3, 3)
    prompts = make_prompts(4, model.cfg.vocab_size, 1, 12, seed=21)
    want = generate(model, prompts, N_NEW, speculative=False).tokens
    for n in range(1, 5):
        rows = prompts[:n]
        for draft_tokens in range(4):
            got = generate(model, rows, N_NEW, speculative=True, compiled=dec, draft_tokens=draft_tokens)
            assert_same_tokens(model, rows, got.tokens, want[:n], f"batch {n}, {draft_tokens} drafts")
            eager = generate(model, rows, N_NEW, speculative=True, draft_tokens=draft_tokens)
            assert got.stats.accepted_by_position == eager.stats.accepted_by_position
            dec.attach()
    sampled = [SamplingParams(do_sample=True, temperature=0.8, seed=s, frequency_penalty=0.5) for s in range(3)]
    got = generate(model, prompts[:3], N_NEW, sampled, compiled=dec, draft_tokens=2)  # forward path, padded
    assert got.tokens == generate(model, prompts[:3], N_NEW, sampled, draft_tokens=2).tokens


@pytest.mark.parametrize("head_type", ["linear", "sequential"])
def test_one_graph_per_shape_serves_every_context_length(peaked_model, make_prompts, head_type):
    """On CPU a step attends only the filled keys (rounded up to KV_ROUND), with the key count
    dynamic in the graph: rows of ragged lengths decoded to the end of the context cross
    every key bucket, through the slack slot that padding tokens reach there, and give the
    eager plain tokens with no graph compiled after the first step of each shape."""
    model = copy.deepcopy(peaked_model(3, head_type=head_type))
    assert model.cfg.max_seq_len > KV_ROUND  # the lengths cross a bucket boundary
    dec = CompiledDecoder(model, 4, batch_sizes=[4], widths=[1, 3], greedy_widths=[3])
    list(dec.warm())
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    prompts = make_prompts(3, model.cfg.vocab_size, 2, 9, seed=5)
    new = model.cfg.max_seq_len - max(map(len, prompts))  # the longest row fills the context
    want = generate(model, prompts, new, speculative=False).tokens
    dec.attach()
    got = generate(model, prompts, new, speculative=True, compiled=dec, draft_tokens=2)
    assert_same_tokens(model, prompts, got.tokens, want, head_type)
    assert got.stats.accepted > 0
    sampled = [SamplingParams(do_sample=True, temperature=0.8, seed=s) for s in range(3)]
    dec.attach()
    got = generate(model, prompts, new, sampled, compiled=dec, draft_tokens=2)  # the forward step
    assert got.tokens == generate(model, prompts, new, sampled, draft_tokens=2).tokens
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == graphs


def test_a_step_outside_the_compiled_shapes_is_refused(peaked_model, make_prompts):
    model = copy.deepcopy(peaked_model(3))
    dec = CompiledDecoder(model, 4, batch_sizes=[1, 2], widths=[1])
    prompts = make_prompts(3, model.cfg.vocab_size, 1, 5, seed=3)
    with pytest.raises(ValueError, match="no compiled shape holds 3"):
        generate(model, prompts, 4, speculative=False, compiled=dec)
    with pytest.raises(ValueError, match="widths"):
        CompiledDecoder(model, 4, batch_sizes=[1], widths=[1, 4])


def test_sampling_through_padded_compiled_steps_keeps_the_joint_distribution(small_model):
    """One draft per pass (width 2) padded to width 3, 6000 rows padded to 6016: x1..x3 keep
    the exact joint distribution of head 1 processed by the settings."""
    model = copy.deepcopy(small_model)
    n, settings = 6000, SETTINGS[1]
    dec = CompiledDecoder(model, 6016, batch_sizes=[6016], widths=[1, 3])
    params = [SamplingParams(do_sample=True, seed=i, **settings) for i in range(n)]
    out = generate(model, [PROMPT] * n, 4, params, speculative=True, draft_tokens=1, compiled=dec)
    tokens = torch.tensor([t[:3] for t in out.tokens])
    assert chi2_pvalue(joint_counts(tokens, V_SMALL), exact_joint(model, settings, depth=3)) > 1e-3


# --- sequential (DeepSeek-V3) MTP modules -----------------------------------------------------


@pytest.fixture(scope="module")
def seq_decoder(peaked_model) -> CompiledDecoder:
    """One decoder for the sequential tests (each graph compiles once): rows padded to 2 or 4, the
    fused greedy step at widths 1 and 3 (1 draft pads to 3), the forward step at width 3."""
    model = copy.deepcopy(peaked_model(3, head_type="sequential"))  # the decoder keeps caches on its model
    return CompiledDecoder(model, 4, batch_sizes=[2, 4], widths=[3], greedy_widths=[1, 3])


def test_fused_sequential_step_gives_the_eager_greedy_tokens_at_every_batch_size_and_draft_count(
    seq_decoder, make_prompts
):
    """The compiled greedy step runs the modules' chain too (their caches attended whole, the
    carried states passed through): batches of 1..4 rows of ragged prompts (1 and 3 padded with
    rows past the batch), 0..2 drafts (1 padded to width 3): the plain eager tokens, and the
    eager speculative path's acceptance at every draft position."""
    model, dec = seq_decoder.model, seq_decoder
    prompts = make_prompts(4, model.cfg.vocab_size, 1, 12, seed=22)
    want = generate(model, prompts, N_NEW, speculative=False).tokens
    accepted = 0
    for n in range(1, 5):
        rows = prompts[:n]
        for draft_tokens in range(3):
            dec.attach()
            got = generate(model, rows, N_NEW, speculative=True, compiled=dec, draft_tokens=draft_tokens)
            assert_same_tokens(model, rows, got.tokens, want[:n], f"batch {n}, {draft_tokens} drafts")
            eager = generate(model, rows, N_NEW, speculative=True, draft_tokens=draft_tokens)
            assert got.tokens == eager.tokens
            assert got.stats.accepted_by_position == eager.stats.accepted_by_position, (n, draft_tokens)
            accepted += got.stats.accepted
    assert accepted > 50  # the modules' drafts were often right: their caches and states matter


def test_sampled_rows_with_sequential_modules_take_the_compiled_forward_step(seq_decoder, make_prompts):
    """Seeded sampled rows run the compiled trunk (padded to 4 rows, width 3) with the modules
    drafting eagerly on its states: the eager tokens."""
    model, dec = seq_decoder.model, seq_decoder
    prompts = make_prompts(3, model.cfg.vocab_size, 2, 9, seed=23)
    sampled = [SamplingParams(do_sample=True, temperature=0.8, seed=s) for s in range(3)]
    dec.attach()
    got = generate(model, prompts, N_NEW, sampled, compiled=dec)
    assert got.tokens == generate(model, prompts, N_NEW, sampled).tokens


def test_a_fused_sequential_step_writes_the_eager_module_caches_and_states(seq_decoder, make_prompts):
    """One step of 3 ragged rows (padded to 4) verifying 1 draft (padded to width 3), from a
    prefill's caches and carried states: the eager step's tokens, drafts and new states, and
    every settled cache entry of the batch's rows as the eager step leaves it."""
    model, dec = seq_decoder.model, seq_decoder
    prompts = make_prompts(3, model.cfg.vocab_size, 1, 9, seed=24)
    B = len(prompts)
    sampling = BatchSampling.from_params([SamplingParams()] * B, [None] * B, torch.device("cpu"))
    want = torch.ones(B, dtype=torch.bool)
    dec.attach()
    with torch.inference_mode():
        first = first_tokens(prefill(model, prompts), sampling, want)
        assert first.states is not None and bool(first.states.abs().sum() > 0)
        caches = [c for c in model.kv_caches() if c is not None]
        saved = [(c.k_cache.clone(), c.v_cache.clone()) for c in caches]
        cur, pos = first.tokens[:, 0], torch.tensor([len(p) for p in prompts])
        drafts, max_accept = first.drafts[:, :1], torch.ones(B, dtype=torch.long)
        step = forward_step(model, cur, drafts, pos, states=first.states)
        eager = accept_drafts(step.head1, drafts, None, max_accept, sampling, want, step.drafts, 2)
        eager_entries = settled_entries(model, pos, pos + eager.n_emitted)
        for c, (k, v) in zip(caches, saved, strict=True):
            c.k_cache.copy_(k)
            c.v_cache.copy_(v)
        fused = dec.greedy_step(cur, drafts, pos, max_accept, states=first.states)
    assert fused.tokens.tolist() == eager.tokens.tolist() and fused.n_emitted.tolist() == eager.n_emitted.tolist()
    assert fused.drafts.tolist() == eager.drafts.tolist()
    assert fused.states is not None and eager.states is not None
    torch.testing.assert_close(fused.states, eager.states, atol=1e-5, rtol=1e-5)
    fused_entries = settled_entries(model, pos, pos + fused.n_emitted)
    for got, ref in zip(fused_entries, eager_entries, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_fused_step_runs_its_warm_graph_on_inputs_of_any_layout_and_says_where_each_row_goes_next(
    seq_decoder, make_prompts
):
    """The same step on fresh inputs and on views laid out otherwise (a size-1 dimension's
    stride, an offset into the storage), as a caller's slices of its own tensors are: the same
    tokens, drafts and states, and no graph compiled (with the graphs' guards not evaluated, a
    layout unlike the compiled one would otherwise make Dynamo compile again, or fail). The
    step's `last` and `next_pos` are each row's last emitted token and pos + n_emitted."""
    graphs, prompts, first = warm_then_prefill(seq_decoder, make_prompts, seed=25)
    with torch.inference_mode():
        fresh = (
            first.tokens[:, 0].clone(),
            first.drafts[:, :2].clone(),
            torch.tensor([len(p) for p in prompts]),
            torch.full((2,), 2),
            first.states.clone(),
        )
        wide = torch.zeros(2, 5, dtype=torch.long)  # columns 1..3: [cur, drafts]; 4: pos
        wide[:, 1], wide[:, 2:4], wide[:, 4] = fresh[0], fresh[1], fresh[2]
        states = torch.zeros(2, 3, first.states.shape[2])  # [B, k-2 = 1, C] at column 1
        states[:, 1:2] = first.states
        views = (wide[:, 1], wide[:, 2:4], wide[:, 4], torch.full((2, 2), 2)[:, 1], states[:, 1:2])
        assert not wide[:, 1].is_contiguous() and views[1].storage_offset() == 2
        got = [seq_decoder.greedy_step(c, d, p, m, states=st) for c, d, p, m, st in (fresh, views)]
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == graphs
    for res in got:
        assert res.last is not None and res.next_pos is not None and res.states is not None
        assert res.tokens.tolist() == got[0].tokens.tolist() and res.drafts.tolist() == got[0].drafts.tolist()
        torch.testing.assert_close(res.states, got[0].states)
        rows = torch.arange(2)
        assert res.last.tolist() == res.tokens[rows, res.n_emitted - 1].tolist()
        assert res.next_pos.tolist() == (fresh[2] + res.n_emitted).tolist()


def warm_then_prefill(dec, make_prompts, seed: int) -> tuple[int, list, StepResult]:
    """Compile every shape of `dec`, then prefill two prompts greedily on its caches: (the graphs
    compiled so far, the prompts, their first tokens, drafts and module states)."""
    model = dec.model
    list(dec.warm())
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    prompts = make_prompts(2, model.cfg.vocab_size, 3, 9, seed=seed)
    sampling = BatchSampling.from_params([SamplingParams()] * 2, [None] * 2, torch.device("cpu"))
    dec.attach()
    with torch.inference_mode():
        first = first_tokens(prefill(model, prompts), sampling, torch.ones(2, dtype=torch.bool))
    assert first.states is not None
    return graphs, prompts, first


def settled_entries(model, pos, P) -> list:
    """Each cache row's keys and values where a step over positions pos.. [B] settled them: the
    trunk's up to the step's last real position (pos + 1: one draft verified), module j's up to
    P - j, P [B] the bonus token's position. Past those lie entries of padding tokens or of
    tokens not yet known, which the next window rewrites before any query reads them."""
    L = model.cfg.n_layers  # the caches: the trunk's layers, then module 1's, module 2's, ...
    out = []
    for i, c in enumerate(c for c in model.kv_caches() if c is not None):
        ends = pos + 2 if i < L else P - (i - L + 1) + 1  # [B] one past the last settled position
        for b, n in enumerate(ends.tolist()):
            out += [c.k_cache[b, :, :n].clone(), c.v_cache[b, :, :n].clone()]
    return out


# --- CUDA: the compiled steps replayed as CUDA graphs (skipped without a GPU) ----------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cudagraph_skips() -> int:
    """How many graphs Inductor compiled without capturing a CUDA graph (mutated inputs, CPU ops...)."""
    return int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])


@cuda
def test_cuda_graph_steps_give_the_eager_greedy_tokens_at_every_batch_size_and_draft_count(peaked_model, make_prompts):
    """On CUDA every compiled shape is captured as a CUDA graph (none skipped) while warm() runs,
    and replaying them over the whole cache gives the eager plain tokens for batches of 1..4
    rows (padded to 2 and 4) at 0..2 drafts (1 on the shallow one-module graph), the eager
    speculative acceptance, and for seeded sampled rows on the forward step the eager sampled
    tokens. What a step keeps for the next (drafts, the modules' states) survives the next
    replay, which writes over the graphs' own outputs."""
    model = copy.deepcopy(peaked_model(3, head_type="sequential")).cuda()
    skips = cudagraph_skips()
    dec = CompiledDecoder(model, 4, batch_sizes=[2, 4], widths=[3], greedy_widths=[1, 2, 3], shallow_depths=[0, 1])
    assert dec.cuda_graphs and not dec.dynamic_kv
    assert len(list(dec.warm())) == 2 * (1 + 3 + 2)
    assert cudagraph_skips() == skips
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    prompts = make_prompts(4, model.cfg.vocab_size, 1, 12, seed=25)
    want = generate(model, prompts, N_NEW, speculative=False).tokens
    accepted = 0
    for n in range(1, 5):
        for draft_tokens in range(3):
            dec.attach()
            got = generate(model, prompts[:n], N_NEW, speculative=True, compiled=dec, draft_tokens=draft_tokens)
            assert_same_tokens(model, prompts[:n], got.tokens, want[:n], f"batch {n}, {draft_tokens} drafts")
            eager = generate(model, prompts[:n], N_NEW, speculative=True, draft_tokens=draft_tokens)
            assert got.stats.accepted_by_position == eager.stats.accepted_by_position, (n, draft_tokens)
            accepted += got.stats.accepted
    assert accepted > 50  # the modules' drafts, from the states carried between replays, were often right
    sampled = [SamplingParams(do_sample=True, temperature=0.8, seed=s) for s in range(3)]
    dec.attach()
    got = generate(model, prompts[:3], N_NEW, sampled, compiled=dec)
    assert got.tokens == generate(model, prompts[:3], N_NEW, sampled).tokens
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == graphs  # nothing compiled after warm()
    assert cudagraph_skips() == skips


COMPILE_IN_A_PROCESS = """
import json, sys, torch
from torch._dynamo.utils import counters
from app.decoding.compiled import CompiledDecoder
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
torch.manual_seed(int(sys.argv[1]))
cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, num_heads=4, d_ff=64, k=2, max_seq_len=32, dropout_rate=0.0)
model = MTPTransformer(cfg).eval()
dec = CompiledDecoder(model, 1, batch_sizes=[1], widths=[1])
idx = torch.randint(0, 64, (1, 5))
with torch.inference_mode():
    for i in range(5):  # one token a step, attending the cache
        head1, _ = dec(idx[:, i : i + 1], torch.tensor([[i]]))
    want = model(idx)[:, -1, 0]  # eager, the whole prompt at once
err = (head1[:, 0, 0] - want).abs().max().item()
print(json.dumps({**{k: int(v) for k, v in counters["inductor"].items() if k.startswith("fxgraph")}, "err": err}))
"""


def test_a_second_process_loads_the_compiled_step_from_the_cache(tmp_path):
    """A graph is lowered and its C++ wrapper built once per cache, not once per process: the
    next process with the same weights takes the graph from Inductor's FX graph cache (its
    MKL-packed weights notwithstanding) and builds no wrapper, and its step still gives the
    eager logits; other weights of the same shapes get an entry and a build of their own."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    cache = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}

    def compiled(seed: int) -> tuple[dict[str, float], set[str]]:
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_IN_A_PROCESS, str(seed)],
            env=env,
            check=True,
            timeout=600,
            capture_output=True,
            text=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1]), {p.name for p in cache.rglob("*.main.so")}

    first, wrappers = compiled(0)
    assert first["fxgraph_cache_miss"] == 1 and len(wrappers) == 1  # the forward step's graph and wrapper
    again, same = compiled(0)
    assert again.get("fxgraph_cache_hit") == 1 and "fxgraph_cache_miss" not in again
    assert same == wrappers  # loaded, not built again
    other, more = compiled(1)
    assert other["fxgraph_cache_miss"] == 1 and len(more - wrappers) == 1  # other weights: their own
    for run in (first, again, other):
        assert run["err"] < 1e-4, run


def test_models_of_one_architecture_keep_their_own_weights_in_compiled_steps(peaked_model, make_prompts):
    """Two models with the same shapes and other weights, compiled in one process: each step
    runs with its own model's weights (the graphs' cached code is keyed by their contents)."""
    a = copy.deepcopy(peaked_model(2))
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    prompts = make_prompts(1, a.cfg.vocab_size, 4, 8, seed=5)
    want = [generate(m, prompts, N_NEW, speculative=False).tokens for m in (a, b)]
    assert want[0] != want[1]
    for m, tokens in zip((a, b), want, strict=True):
        dec = CompiledDecoder(m, 1, batch_sizes=[1], widths=[1])
        got = generate(m, prompts, N_NEW, speculative=False, compiled=dec).tokens
        assert_same_tokens(m, prompts, got, tokens, "compiled, one of two models")


def test_a_warm_graph_checks_no_guards(seq_decoder, make_prompts):
    """A graph keeps none of Dynamo's guards: the key that picks it (CompiledDecoder._run) holds
    what it is specialised on, and its inputs are made dense at that shape. Inputs made outside
    inference mode, whose dispatch keys differ from the ones the graph was compiled with (a
    tensor guard checks them), run the warm graph with the tokens of inference-mode inputs,
    where a graph with guards would be compiled again."""
    dec = seq_decoder
    graphs, prompts, first = warm_then_prefill(dec, make_prompts, seed=26)
    with torch.inference_mode():
        inputs = [first.tokens[:, 0], first.drafts[:, :2], torch.tensor([len(p) for p in prompts]), torch.full((2,), 2)]
    plain = [t.clone() for t in inputs]  # made outside inference mode: not inference tensors
    assert all(t.is_inference() for t in inputs) and not any(t.is_inference() for t in plain)
    got = []
    with torch.inference_mode():
        for args in (inputs, plain):  # the same step twice: the cache entries it writes are the same
            got.append(dec.greedy_step(*args, states=first.states))
    assert int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == graphs
    assert got[1].tokens.tolist() == got[0].tokens.tolist() and got[1].drafts.tolist() == got[0].drafts.tolist()


def test_a_warm_graph_runs_its_compiled_code_without_dynamos_wrapper(seq_decoder, make_prompts):
    """Once a shape's graph is built, a step calls the code Dynamo made for it directly
    (dynamo_code): none of torch.compile's per-call wrapper runs, while the graph's own code
    (its C++ kernel's Python binding included) does. The tokens are checked against eager
    decoding by the tests above, which run the same direct calls."""
    dec = seq_decoder
    _, prompts, first = warm_then_prefill(dec, make_prompts, seed=27)
    with torch.inference_mode():
        args = (first.tokens[:, 0], first.drafts[:, :2], torch.tensor([len(p) for p in prompts]), torch.full((2,), 2))
        dec.greedy_step(*args, states=first.states)  # built by warm(): no compiling here
        called: list[str] = []

        def record(frame, event, arg) -> None:
            if event == "call":
                called.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

        sys.setprofile(record)
        try:
            dec.greedy_step(*args, states=first.states)
        finally:
            sys.setprofile(None)
    assert any(":_eager_greedy_step_" in c for c in called)  # the shape's own function ...
    assert not any(c.endswith(":compile_wrapper") for c in called), "a call went through Dynamo's wrapper"


def test_a_step_on_caches_with_fewer_rows_than_its_graph_writes_is_refused(seq_decoder, make_prompts):
    """With no guards, nothing in Dynamo checks the caches a graph writes: caches of one row
    (as an eager generate() of one prompt leaves on the model) under a step padded to two rows
    are refused with a clear error, before the graph runs; attach() puts the decoder's back."""
    model, dec = seq_decoder.model, seq_decoder
    list(dec.warm())
    cur, pos, accept = torch.zeros(2, dtype=torch.long), torch.full((2,), 5), torch.zeros(2, dtype=torch.long)
    model.setup_caches(1)
    try:
        with torch.inference_mode(), pytest.raises(RuntimeError, match="attach"):
            dec.greedy_step(cur, None, pos, accept)
        model.reset_caches()
        with torch.inference_mode(), pytest.raises(RuntimeError, match="attach"):
            dec.greedy_step(cur, None, pos, accept)
    finally:
        dec.attach()
    with torch.inference_mode():
        assert dec.greedy_step(cur, None, pos, accept).tokens.shape == (2, 1)
