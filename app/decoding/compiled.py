"""torch.compile'd decode steps at fixed shapes (gpt-fast style): one implementation for
generate() on a static batch and for the engine's continuous batch."""

from __future__ import annotations

import bisect
import collections
import functools
import hashlib
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from app.decoding.generate import draft_count
from app.decoding.sequential import module_chain
from app.decoding.speculative import StepResult
from app.model.model import CausalSelfAttention, MTPTransformer

# Inductor's Python binding of a C++ CPU kernel calls it with the GIL held (torch 2.13:
# "kernel(args); Py_RETURN_NONE;"), so a compiled step holds the GIL from start to end, where
# an eager step's ATen ops release it. In the service the event loop could then neither answer
# at the door nor write tokens while a step runs. The arguments are parsed under the GIL (they
# are Python objects); the kernel, which touches none, runs without it.
_NOGIL_ENTRY = "[&](auto... a) {{ Py_BEGIN_ALLOW_THREADS kernel(a...); Py_END_ALLOW_THREADS }}({}); Py_RETURN_NONE;"


KV_ROUND = 32  # a CPU step attends the filled keys rounded up to this many positions

# The kernels a CPU step's matmuls may use with autotune (Inductor's max_autotune_gemm_backends):
# "CPP", Inductor's C++ GEMM template (AVX-512 micro-kernels specialised to each frozen weight's
# shape) for every matmul, with nothing to time; "CPP,ATEN", the template timed against ATen's
# MKL call for each matmul on its own while compiling, the faster kept (minutes more per cold
# start). Those timings, one matmul at a time in a loop, are at the mercy of whatever else runs
# during the cold start, and Inductor's cache keeps their choice for good: in a cache filled by a
# cold start on a busy machine, the engine's batch-1 plain step had MKL for every matmul and took
# 2.6 times as long at two threads as with the template (docs/benchmarks.md, benchmark 46).
GemmBackends = Literal["CPP", "CPP,ATEN"]
GEMM_BACKENDS: GemmBackends = "CPP"


def release_gil_in_cpu_kernels() -> None:
    """Make Inductor's C++ CPU kernels release the GIL while they run (kernels built from now on)."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    if CppPythonBindingsCodeCache.call_entry_function == "kernel({}); Py_RETURN_NONE;":
        CppPythonBindingsCodeCache.call_entry_function = _NOGIL_ENTRY


def cache_cpp_templates() -> None:
    """Compile each source of Inductor's C++ GEMM template once per process (process-wide).

    With autotuning, every matmul of every graph renders the template twice (among the
    candidates, then as the chosen kernel), and torch 2.13 compiles the template's Jinja
    sources anew at each render (`KernelTemplate._template_from_string`, ten per render: 580
    compilations, 6 of a graph's 22 s under cProfile, for the greedy step of width 3). A
    compiled Jinja template is immutable, so a cache keyed by the source (Inductor's
    constants: a bounded set) gives the same kernels. With the cache a warm start of the
    service took 0.78x the time (docs/benchmarks.md, benchmark 12), when warm starts still
    lowered every graph; since cache_frozen_graphs only cold starts render the template."""
    from torch._inductor.codegen.common import KernelTemplate

    render = KernelTemplate.__dict__.get("_template_from_string")
    if isinstance(render, staticmethod) and not hasattr(render.__func__, "cache_info"):
        cached = staticmethod(functools.lru_cache(maxsize=None)(render.__func__))
        KernelTemplate._template_from_string = cached  # type: ignore[method-assign]


_compiling = threading.local()  # .weights: the weights key of the decoder compiling on this thread


def stable_wrapper_keys() -> None:
    """Key each C++ wrapper's cached build by the model's weights, not by its constants' addresses (process-wide).

    Inductor writes a line per constant (a frozen weight, or a copy of one packed for MKL or
    the C++ GEMM template) at the top of a graph's wrapper source, ending in the tensor's
    `hash()`, so that graphs of the same code but other constants load as modules of their
    own; the wrapper's build is cached under a hash of that source. A tensor's hash is its
    identity, new in every process, so each start of the service compiled every graph's C++
    wrapper again (seconds each, dozens of graphs) instead of loading it. The constants' bytes
    would not do either: MKL's packed copies carry padding that differs from run to run. So a
    graph that CompiledDecoder compiles carries the digest of the model's parameters and
    config instead (its constants are computed from those alone): the same model gives the
    same source, and the cached build, in the next process, and another model's graphs stay
    apart from its, as the identities kept them. Graphs compiled elsewhere keep Inductor's line."""
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    original = CppWrapperCpu.write_constant
    if getattr(original, "stable", False):
        return

    def write_constant(self: Any, name: str, hashed: str) -> None:
        weights = getattr(_compiling, "weights", None)
        if weights is None:
            original(self, name, hashed)
            return
        described = hashed.rsplit(" ", 1)[0]  # device, dtype, size and stride, without the identity
        self.header.writeline(f"// {name} {described} weights {weights}")

    write_constant.stable = True  # type: ignore[attr-defined]
    CppWrapperCpu.write_constant = write_constant  # type: ignore[method-assign]


def cache_frozen_graphs() -> None:
    """Let Inductor's FX graph cache keep the graphs CompiledDecoder compiles (process-wide).

    Freezing packs each linear's weight for MKL as an mkldnn tensor, a constant of the graph,
    and the cache declines any graph with one ("mkldnn tensors unpickleable", torch 2.13), so a
    warm start lowered and generated every graph again and saved only autotuning and the C++
    builds. Nothing of a frozen constant's value needs to go into a cached graph: the cache
    keeps the code and, on a hit, takes the frozen constants from the graph being compiled
    (they are packed again from this process's weights), and it already keys a frozen
    parameter it does not inline by its metadata alone. The packed ones get that too (dtype and
    shape), and while
    a CompiledDecoder compiles, each frozen constant's key also carries the digest of its
    model's weights (weights_key), so graphs of two models of one architecture keep entries
    of their own, whatever else lowering derives from the weights. Graphs compiled elsewhere
    keep Inductor's rules. A warm start's graph then costs its tracing and freezing only
    (docs/benchmarks.md, benchmark 20)."""
    from torch._inductor import codecache
    from torch._inductor.freezing_utils import is_frozen_param

    pickler, validator = codecache.FxGraphCachePickler, codecache.CacheabilityValidator
    original_reduce = pickler._reduce_tensor
    if getattr(original_reduce, "stable", False):
        return
    original_check = validator.check_tensor

    def ours(t: Tensor) -> str | None:
        """The weights digest when t is a frozen constant of a graph a CompiledDecoder compiles."""
        weights = getattr(_compiling, "weights", None)
        return weights if weights is not None and is_frozen_param(t) else None

    def reduce_tensor(self: Any, t: Tensor) -> Any:
        weights = ours(t)
        if weights is None:
            return original_reduce(self, t)
        if t.is_mkldnn:  # opaque: no strides or storage to describe
            return codecache._ident, ((str(t.dtype), tuple(t.shape), "mkldnn", weights),)
        ident, (described,) = original_reduce(self, t)
        return ident, ((described, weights),)

    def check_tensor(t: Tensor) -> None:
        if ours(t) is None:
            original_check(t)

    reduce_tensor.stable = True  # type: ignore[attr-defined]
    pickler._reduce_tensor = reduce_tensor  # type: ignore[method-assign]
    validator.check_tensor = staticmethod(check_tensor)  # type: ignore[method-assign]


def weights_key(model: nn.Module) -> str:
    """A digest of a model's class, config and parameters (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(model).__qualname__} {getattr(model, 'cfg', None)!r}".encode())
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def no_guards(entries: Sequence[Any]) -> list[bool]:
    """A guard filter (torch.compile's guard_filter_fn) that keeps none of a graph's guards.

    The skip_guard_eval_unsafe stance (skip_guards) skips most guards, but not the tensor ones:
    each call still checked the tensors the graph reads, the dynamic key length's marking and a
    few lambda guards: at batch 1 a plain step took 251 us with them and 230 without, a step of
    one module and one draft 458 and 430 (`python -m bench.guards`, docs/benchmarks.md,
    benchmark 55). Nothing is left to check: the key a graph is chosen by (CompiledDecoder._run)
    holds its padded shape, draft count and thread count, greedy_step and __call__ hand it dense
    inputs of that shape, and the caches it reads are the ones on the model when it runs, as
    with the guards (which matched any caches of the same shape). Inputs the tensor guards told
    apart by their dispatch keys alone (made outside inference mode) ran into the stance's
    refusal to compile again; they now run the same graph."""
    return [False] * len(entries)


def skip_guards() -> None:
    """Let Dynamo run a compiled function's one graph without evaluating its guards (process-wide).

    Dynamo checks a graph's guards (shapes, strides, dtypes, the module's attributes, global
    state) before every call, to pick among the graphs a function has; skipped (with a function
    per shape), a batch-1 compiled step took 4-22 % less (`mtp bench step --autotune`, A/B,
    docs/benchmarks.md benchmark 5, run 5). CompiledDecoder gives each shape a function of its
    own, chosen by a key that holds everything its graph is specialised on
    (CompiledDecoder._run), so with a single graph per function there is nothing to pick and the
    check is skipped (the skip_guard_eval_unsafe stance: only guards that tell a function's
    graphs apart run; the call that compiles a function's graph leaves the stance for its
    duration). Set once, not per call: entering the stance as a context costs as much as the
    guards. This module's functions are the only torch.compile users in this project."""
    torch.compiler.set_stance(skip_guard_eval_unsafe=True)


def dynamo_code(compiled: Callable[..., Any]) -> Callable[..., Any] | None:
    """The code Dynamo runs for `compiled` (torch.compile of a bound method, called once), as a
    method to call directly; None where that is not one whole graph.

    Each call of a torch.compile'd function goes through Dynamo's wrapper: it sets the frame
    evaluation hook and the guard stance, checks for tracing and export, saves the dispatch
    keys, and the hook then finds the function's cached code and runs it (a frame of its own).
    That costs every call the same whatever the graph: at batch 1, where a compiled step took
    150-290 us, 10-19 us of it (`python -m bench.guards`, docs/benchmarks.md, benchmark 57). The
    code Dynamo made (its transformed bytecode: the compiled graph's call, with the inputs
    taken from the arguments) does the same work when called as a plain function, as vLLM
    dispatches to its compiled code. Only a function compiled to one graph qualifies: one
    cache entry (what a function per shape without guards has), and no graph break (a
    `__resume_at` function would run eagerly when called outside the hook)."""
    method = getattr(compiled, "_torchdynamo_orig_callable", None)
    func = getattr(method, "__func__", None)
    if method is None or func is None:
        return None
    try:
        entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(func.__code__)
    except Exception:  # not in this release of torch
        return None
    code = entries[0].code if len(entries) == 1 else None
    if (
        not isinstance(code, types.CodeType)
        or code.co_freevars != func.__code__.co_freevars
        or any(name.startswith("__resume_at") for name in code.co_names)
    ):
        return None
    run = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    return types.MethodType(run, method.__self__)


class CompiledDecoder:
    """torch.compile'd decode steps at fixed shapes, for generate() and the engine.

    A compiled step attends the KV cache under the position mask (stale entries past a row's
    position are masked), so each (batch, tokens-per-step) pair compiles once: on CUDA over the
    whole cache, a fixed shape that a CUDA graph replays; on CPU over the filled part (rounded
    up to KV_ROUND positions), whose length is a dynamic dimension of the one graph, since reading
    every cache row's unused positions costs time that grows with the batch.
    Inductor's freezing folds and prepacks the
    weights, which is most of the gain on CPU; on CUDA the graphs are also captured as CUDA
    graphs (mode "reduce-overhead"), so a step is one replay instead of dozens of launches.

    batch_sizes and widths, when given, are the shapes compiled: a step's rows are padded up to
    the next batch size (the padding rows are cache rows past the batch, which hold no
    sequence) and its tokens per row up to the next width (padding tokens are written past the
    row's position, where the mask hides them until real tokens overwrite them). Without them a
    step compiles at its own shape. The caches are allocated here for `max_batch` rows and kept.

    `__call__` runs the trunk and head 1 (any head type); for all-greedy batches
    `greedy_step` also compiles acceptance and drafting into the step's graph: heads 2..k of
    linear heads, or the chain of sequential modules (n_drafts of them, default k - 1: the
    drafts a step makes, fixed so that each shape is one graph). shallow_depths: fewer module
    counts d, each also compiled as a greedy step of width d + 1 whose first d modules draft
    (the engine's shallow steps, app/engine/drafts.py; d = 0: a plain greedy step, no module).
    cpp_wrapper (CPU): Inductor's wrapper code in C++, the default; False: in Python.
    gemm_backends (CPU, with autotune): the kernels its matmuls may use (GEMM_BACKENDS).
    guards: keep each graph's guards (the skip_guard_eval_unsafe stance still skips all but the
    tensor ones); by default none are kept (no_guards), except under a mode (CUDA graphs).
    direct: once a shape's graph is built, call the code Dynamo made for it directly
    (dynamo_code), not through torch.compile's wrapper; only where its guards are dropped, on
    CPU (a CUDA graph's replays are Dynamo's to manage).
    """

    def __init__(
        self,
        model: MTPTransformer,
        max_batch: int,
        autotune: bool = False,
        batch_sizes: Iterable[int] | None = None,
        widths: Iterable[int] | None = None,
        greedy_widths: Iterable[int] | None = None,
        n_drafts: int | None = None,
        shallow_depths: Iterable[int] = (),
        cpp_wrapper: bool = True,
        gemm_backends: str = GEMM_BACKENDS,
        guards: bool = False,
        direct: bool = True,
    ) -> None:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights are constants of the compiled graph
        release_gil_in_cpu_kernels()
        cache_cpp_templates()
        self.model = model
        self.max_batch = max_batch
        self.linear = model.cfg.head_type == "linear"
        self.k = model.cfg.k
        self.n_drafts = draft_count(self.k, n_drafts)  # sequential modules run per drafting step
        self.cache_len = model.cfg.max_seq_len + model.cfg.k - 1
        self.batch_sizes = sorted(set(batch_sizes)) if batch_sizes is not None else None
        self.widths = sorted(set(widths)) if widths is not None else None
        # the fused greedy step's widths (default: widths)
        greedy_widths = greedy_widths if greedy_widths is not None else self.widths
        self.greedy_widths = sorted(set(greedy_widths)) if greedy_widths is not None else None
        self.shallow_depths = sorted(set(shallow_depths))
        self._covered: dict[tuple[int, int, bool, int | None], bool] = {}  # covers(), asked every step
        self.threads: dict[int, list[int]] = {}  # batch size -> the thread counts warm() compiled it at
        if self.shallow_depths and (
            self.linear
            or self.shallow_depths[0] < 0
            or self.shallow_depths[-1] >= self.n_drafts
            or any(self.greedy_widths is not None and d + 1 not in self.greedy_widths for d in self.shallow_depths)
        ):
            raise ValueError(
                f"shallow depths need sequential heads, must be within 0..{self.n_drafts - 1}, "
                "and each depth + 1 must be a greedy width"
            )
        if self.batch_sizes is not None and (self.batch_sizes[0] < 1 or self.batch_sizes[-1] > max_batch):
            raise ValueError(f"compiled batch sizes must be within 1..{max_batch}")
        for ws in (self.widths, self.greedy_widths):
            if ws is not None and (ws[0] < 1 or ws[-1] > self.k):
                raise ValueError(f"compiled widths (tokens per row per step) must be within 1..{self.k}")
        model.setup_caches(max_batch)
        self._caches = model.kv_caches()
        # the first attention layer: its cache is checked before each step (_run)
        self._attention = next(m for m in model.modules() if isinstance(m, CausalSelfAttention))
        device = model.head.proj.weight.device
        self.dynamic_kv = device.type == "cpu"
        self._key_pos = torch.arange(self.cache_len, device=device)
        self._key_slices: dict[int, Tensor] = {}  # _keys' views of _key_pos, by length
        # autotune: Inductor's max-autotune GEMMs, from gemm_backends (see GEMM_BACKENDS)
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            {"max_autotune": True, "max_autotune_gemm_backends": gemm_backends} if autotune else None
        )
        if cpp_wrapper and device.type == "cpu":
            # Inductor's wrapper (the code that allocates a step's buffers and calls its kernels
            # one after another) as C++ instead of Python: a batch-1 step is a few dozen
            # kernels of microseconds each, and the Python wrapper's per-kernel work (argument
            # parsing, views, size checks) added up to a sizeable share of it. The C++ wrapper
            # also runs the whole step without the GIL, where the Python one let it go only
            # inside each C++ kernel and took it back between them (release_gil_in_cpu_kernels),
            # waiting for the event loop each time it held the GIL. Compiling each graph's
            # wrapper costs seconds more on a cold cache (the built wrapper is cached too).
            options = {**(options or {}), "cpp_wrapper": True}
            stable_wrapper_keys()
        # the model's key in the C++ wrappers' sources (stable_wrapper_keys) and in the FX graph
        # cache's keys of its graphs (cache_frozen_graphs)
        self._weights_key = weights_key(model)
        cache_frozen_graphs()
        mode = "reduce-overhead" if device.type == "cuda" and options is None else None
        if device.type == "cuda" and options is not None:
            options = {**options, "triton.cudagraphs": True, "max_autotune_gemm_backends": "TRITON,ATEN"}
        # The drafting heads' rows of the MTP projection as a Linear of their own: the C++
        # template reads a frozen weight that is a row-offset view from its first row (wrong
        # drafts; torch 2.13), so it gets a copy. Head 1's rows start at 0 and stay a view.
        self._drafter: nn.Linear | None = None
        if autotune and self.linear and model.cfg.k > 1:
            V, proj = model.cfg.vocab_size, model.head.proj
            self._drafter = nn.Linear(proj.in_features, proj.out_features - V, bias=proj.bias is not None)
            self._drafter.to(device=proj.weight.device, dtype=proj.weight.dtype).requires_grad_(False)
            with torch.no_grad():
                self._drafter.weight.copy_(proj.weight[V:])
                if proj.bias is not None:
                    self._drafter.bias.copy_(proj.bias[V:])
        self._mode, self._options = mode, options  # of every shape's torch.compile
        self.guards = guards
        self.cuda_graphs = device.type == "cuda"  # each shape's graph replays as a CUDA graph
        self.direct = direct and not guards and mode is None and not self.cuda_graphs  # see dynamo_code
        self._graphs: dict[tuple[int, ...], Callable[..., Any]] = {}  # see _run
        skip_guards()

    def _run(self, fn: Callable[..., Any], key: tuple[int, ...], *args: Any) -> Any:
        """fn(*args) as the compiled graph of shape `key`, compiled on its first call.

        Each shape gets a copy of fn with a code object of its own. Dynamo keeps its compiled
        graphs per code object, in a list that every call scans, checking each graph's guards
        until one holds (and moves the hit to the front). With one code object for every shape,
        a step whose shape differs from the last one's paid for that scan. With its own code
        object, each shape is one graph, and the key (which this class builds from the padded
        shape, the draft count and the thread count: everything the graph was specialised on)
        has already chosen it. Its guards need not run, and do not: see skip_guards and
        no_guards. Nor, once built, need Dynamo's wrapper: see dynamo_code. key[1] is the
        padded batch: the rows the graph writes in every cache."""
        if self.cuda_graphs:
            _cuda_graph_thread_state()
        cache = self._attention.kv_cache
        if cache is None or cache.k_cache.shape[0] < key[1]:
            # without guards nothing else would stop the graph writing past the caches' rows
            raise RuntimeError("the model's KV caches are not this decoder's: call attach() first")
        graph = self._graphs.get(key)
        if graph is None:
            func = fn.__func__  # type: ignore[attr-defined]
            name = f"{func.__name__}_" + "_".join(map(str, key))
            code = func.__code__.replace(co_name=name, co_qualname=name)
            copy = types.FunctionType(code, func.__globals__, name, func.__defaults__, func.__closure__)
            # dynamic=None, not False: False makes every call patch two Dynamo settings and put
            # them back, and each function here compiles once, so automatic dynamism never comes
            # into play: its shapes are static but for the keys' length, marked dynamic in _keys
            # (what `mtp bench step` shows of it: docs/benchmarks.md, benchmark 13)
            graph = self._graphs[key] = torch.compile(
                types.MethodType(copy, self), dynamic=None, mode=self._mode, options=self._compile_options()
            )
            _compiling.weights = self._weights_key  # read by stable_wrapper_keys and cache_frozen_graphs
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=False):  # Dynamo compiles only with guards on
                    out = graph(*args)
            finally:
                _compiling.weights = None
            if self.direct and (code := dynamo_code(graph)) is not None:
                self._graphs[key] = code  # the next calls skip Dynamo's wrapper (dynamo_code)
        else:
            out = graph(*args)
        if self.cuda_graphs:
            # A CUDA graph's outputs live in its memory pool, which the next replay (of any shape:
            # each call starts a new CUDA-graph-tree generation) writes over, and callers keep some
            # (drafts, the modules' carried states) into the next step: a few small copies.
            out = tuple(t.clone() if isinstance(t, Tensor) else t for t in out)
        return out

    def _compile_options(self) -> dict[str, Any] | None:
        """One shape's torch.compile options: a fresh dict each time, since torch.compile takes
        the guard filter out of the dict it is given. The filter drops every guard of the
        shape's graph (see no_guards); with a mode (CUDA graphs, no options allowed beside it)
        the graph keeps its guards, and the skip_guard_eval_unsafe stance skips all but the
        tensor ones."""
        if self._mode is not None or self.guards:
            return self._options
        return {**(self._options or {}), "guard_filter_fn": no_guards}

    def shapes(self, greedy: bool = False) -> list[tuple[int, int]]:
        """The (batch, width) shapes this decoder compiles (greedy: of the fused greedy step)."""
        widths = self.greedy_widths if greedy else self.widths
        if self.batch_sizes is None or widths is None:
            return []
        return [(b, w) for b in self.batch_sizes for w in widths]

    def warm(self, threads: Callable[[int], list[int]] | None = None) -> Iterator[tuple[str, int, int, int, float]]:
        """Compile every shape now (rows from 0 at positions 0.., so only while no sequence holds a
        cache row), yielding (step, batch, width, threads, seconds) as each is done: the forward
        step at `widths`, the fused greedy step at `greedy_widths`. threads(batch): the
        intra-op thread counts to compile that batch size at (Dynamo guards on the count, and
        Inductor's C++ kernels are built for it); default: the current count."""
        before = torch.get_num_threads()
        try:
            shapes = [("forward", b, w) for b, w in self.shapes()]
            shapes += [("greedy", b, w) for b, w in self.shapes(greedy=True)]
            shapes += [("shallow", b, d + 1) for b in self.batch_sizes or [] for d in self.shallow_depths]
            for kind, b, w in shapes:
                counts = threads(b) if threads is not None else [before]
                self.threads[b] = sorted(set(counts))
                for n in self.threads[b]:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    # CUDA graph trees run a graph's first call eagerly, record it on the second
                    # and replay it from the third: recorded here, before any request waits on it
                    for _ in range(3 if self.cuda_graphs else 1):
                        self._warm_step(kind, b, w)
                    yield kind, b, w, n, time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)

    def _warm_step(self, kind: str, b: int, w: int) -> None:
        """One step of a shape on zeros, rows from 0 at positions 0.. (see warm)."""
        device = self.model.head.proj.weight.device
        with torch.inference_mode():
            idx = torch.zeros(b, w, dtype=torch.long, device=device)
            pos = torch.arange(w, device=device).expand(b, w)
            if kind == "forward":
                self(idx, pos)
            else:
                drafts = idx[:, 1:] if w > 1 else None
                made = w - 1 if kind == "shallow" else None
                zero = idx.new_zeros(b)
                self.greedy_step(idx[:, 0], drafts, pos[:, 0], zero, want_drafts=self.k > 1, n_drafts=made)
            if device.type == "cuda":
                torch.cuda.synchronize()

    def thread_counts(self, b: int) -> list[int] | None:
        """The thread counts a step of b rows was compiled at (None: not compiled, any count)."""
        if self.batch_sizes is not None and b > self.batch_sizes[-1]:
            return None
        return self.threads.get(self.padded_batch(b))

    def covers(self, b: int, t: int, greedy: bool = False, n_drafts: int | None = None) -> bool:
        """Whether a step of b rows and t tokens each has a compiled shape (always, without
        buckets); greedy: a fused greedy step (compiled at greedy_widths), whose modules make
        n_drafts drafts (default: the decoder's; fewer: a shallow step, compiled at width
        n_drafts + 1 only)."""
        key = (b, t, greedy, n_drafts)
        if (known := self._covered.get(key)) is None:
            known = self._covered[key] = self._covers(b, t, greedy, n_drafts)
        return known

    def _covers(self, b: int, t: int, greedy: bool, n_drafts: int | None) -> bool:
        widths = self.greedy_widths if greedy else self.widths
        big = self.batch_sizes is not None and b > self.batch_sizes[-1]
        if big or (widths is not None and t > widths[-1]):
            return False
        if not greedy or self.linear or n_drafts is None or draft_count(self.k, n_drafts) == self.n_drafts:
            return True
        if self.batch_sizes is None:  # compiled at each step's own shape
            return True
        return n_drafts in self.shallow_depths and self.padded_width(t, greedy=True) == n_drafts + 1

    def padded_batch(self, b: int) -> int:
        return _bucket(self.batch_sizes, b)

    def padded_width(self, t: int, greedy: bool = False) -> int:
        return _bucket(self.greedy_widths if greedy else self.widths, t)

    def _draft_logits(self, h: Tensor) -> Tensor:
        """Heads 2..k at hidden states h [B, C] -> [B, k-1, V]."""
        if self._drafter is None:
            return self.model.head(h, heads=slice(1, None))
        return self._drafter(h).unflatten(-1, (self.model.cfg.k - 1, self.model.cfg.vocab_size))

    def attach(self) -> None:
        """Put this decoder's caches back on the model (an eager generate() may have replaced
        them); the same tensors every time, so the compiled graphs stay valid."""
        self.model.set_kv_caches(self._caches)

    def _pad(self, idx: Tensor, input_pos: Tensor, greedy: bool = False) -> tuple[Tensor, Tensor]:
        """Pad [B, T] step inputs to the compiled shape (unchanged without buckets)."""
        B, T = idx.shape
        PB, PT = self.padded_batch(B), self.padded_width(T, greedy)
        if (PB, PT) == (B, T):  # contiguous: Dynamo guards on strides too
            return idx.contiguous(), input_pos.contiguous()
        if PT > T:  # more tokens per row, at the positions after the row's last
            idx = torch.cat([idx, idx.new_zeros(B, PT - T)], dim=1)
            input_pos = input_pos[:, :1] + torch.arange(PT, device=idx.device)[None, :]
        if PB > B:  # rows past the batch: free cache rows, written at positions 0..PT-1
            idx = torch.cat([idx, idx.new_zeros(PB - B, PT)])
            input_pos = torch.cat([input_pos, torch.arange(PT, device=idx.device).expand(PB - B, PT)])
        return idx.contiguous(), input_pos.contiguous()

    def _keys(self, input_pos: Tensor) -> Tensor:
        """The key positions a step at (padded) input_pos attends: the whole cache at a fixed
        shape (CUDA graphs replay one shape), or on CPU the filled part, rounded up to KV_ROUND
        and marked dynamic, so one graph per (batch, width) serves every length."""
        return self._keys_to(int(input_pos.max()) if self.dynamic_kv else 0)

    def _keys_to(self, last: int) -> Tensor:
        """_keys for a step whose last query position is `last`."""
        if not self.dynamic_kv:
            return self._key_pos
        # below the cache's length: a slice to the end would be specialised. The last slot is
        # the slack one, which only padding queries sit at, and they need no keys of their own.
        most = self.cache_len - 1
        n = min(-(-(last + 1) // KV_ROUND) * KV_ROUND, most)
        keys = self._key_slices.get(n)
        if keys is None:  # one view per length, marked once: marking costs more than the slice
            keys = self._key_slices[n] = self._key_pos[:n]
            torch._dynamo.mark_dynamic(keys, 0, min=min(KV_ROUND, most), max=most)
        return keys

    def _eager_step(self, idx: Tensor, input_pos: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        h = self.model.trunk(idx, input_pos, kv_len=keys.shape[0])
        return self.model.head(h, heads=slice(0, 1)), h

    def __call__(self, idx: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Head 1's logits [B, T, 1, V] and the hidden states [B, T, C] at positions input_pos."""
        B, T = idx.shape
        pidx, ppos = self._pad(idx, input_pos)
        key = (0, *pidx.shape, torch.get_num_threads())
        head1, h = self._run(self._eager_step, key, pidx, ppos, self._keys(ppos))
        return head1[:B, :T], h[:B, :T]

    def _eager_greedy_step(
        self,
        cur: Tensor,
        drafts: Tensor | None,
        pos: Tensor,
        keys: Tensor,
        max_accept: Tensor,
        states: Tensor | None,
        n_drafts: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        # the step's inputs are built here, in the graph, not as eager ops around it
        idx = cur[:, None] if drafts is None else torch.cat([cur[:, None], drafts], dim=1)  # [B, T]
        B, T = idx.shape
        input_pos = pos[:, None] + torch.arange(T, device=idx.device)[None, :]
        kv_len = keys.shape[0]
        h = self.model.trunk(idx, input_pos, kv_len=kv_len)
        logits = self.model.head(h, heads=slice(0, 1))[:, :, 0].float()  # [B, T, V]
        rows = torch.arange(B, device=idx.device)
        top = torch.softmax(logits, dim=-1).argmax(-1)  # [B, T], as accept_drafts picks it
        if T > 1:
            agree = (idx[:, 1:] == top[:, :-1]).long()
            n_acc = torch.minimum(agree.cumprod(dim=-1).sum(dim=-1), max_accept.clamp(max=T - 1))
        else:
            n_acc = torch.zeros(B, dtype=torch.long, device=idx.device)
        offsets = torch.arange(T, device=idx.device)[None, :]
        padded = torch.cat([idx[:, 1:], idx.new_zeros(B, 1)], dim=1)
        bonus = top[rows, n_acc]  # [B]: the last token emitted, the next step's cur
        tokens = torch.where(offsets < n_acc[:, None], padded, bonus[:, None])
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]
        new_states = None
        if n_drafts == 0:
            nxt = idx.new_zeros(B, self.k - 1)  # as accept_drafts: zeros when none are made
        elif self.linear:
            q = torch.softmax(self._draft_logits(h[rows, n_acc]).float(), dim=-1)
            nxt = q.argmax(-1)  # [B, k-1]
        else:  # the modules over their windows, attending as many keys as the trunk
            nxt, new_states = module_chain(self.model, h, tokens, pos, n_acc, states, _greedy_pick, n_drafts, kv_len)
        return tokens, n_acc + 1, logprobs, nxt, new_states, bonus, pos + n_acc + 1

    def greedy_step(
        self,
        cur: Tensor,
        drafts: Tensor | None,
        pos: Tensor,
        max_accept: Tensor,
        want_drafts: bool | None = None,
        states: Tensor | None = None,
        n_drafts: int | None = None,
        max_pos: int | None = None,
    ) -> StepResult:
        """A whole greedy decode step as one compiled graph: the forward over [cur, drafts],
        acceptance (drafts equal to head 1's argmax, at most max_accept [B] of them), the
        bonus token, log-probabilities and the next drafts — from heads 2..k (linear heads),
        or from the sequential modules, which also bring their caches up to date and carry
        `states` [B, k-2, C] (the previous step's StepResult.states; None: zeros) to the
        returned StepResult.states. What forward_step + accept_drafts compute for all-greedy
        rows, without their eager ops; the result also holds each row's last token and the
        position after it (StepResult.last, .next_pos), computed in the graph as well. Padding
        tokens are never accepted (max_accept < the real width); padding rows run in cache
        rows past the batch.
        want_drafts: make the next drafts (default: when this step verifies some); n_drafts:
        how many the modules make (default: the decoder's; each count is a graph of its own);
        max_pos: the largest of pos, when the caller keeps it (saves reading it from pos)."""
        B = cur.shape[0]
        T = 1 if drafts is None else 1 + drafts.shape[1]
        draft = T > 1 if want_drafts is None else want_drafts and self.k > 1
        n_modules = self.n_drafts if n_drafts is None else draft_count(self.k, n_drafts)
        n_made = (self.k - 1 if self.linear else n_modules) if draft else 0
        PB, PT = self.padded_batch(B), self.padded_width(T, greedy=True)
        if PT > T:  # more tokens per row, never accepted: the real width caps acceptance
            max_accept = max_accept.clamp(max=T - 1)
            pad = cur.new_zeros(B, PT - T)
            drafts = pad if drafts is None else torch.cat([drafts, pad], dim=1)
        elif drafts is not None and T == 1:
            drafts = None
        if PB > B:  # rows past the batch: free cache rows, at positions 0..PT-1
            extra = PB - B
            cur, pos = torch.cat([cur, cur.new_zeros(extra)]), torch.cat([pos, pos.new_zeros(extra)])
            max_accept = torch.cat([max_accept, max_accept.new_zeros(extra)])
            if drafts is not None:
                drafts = torch.cat([drafts, drafts.new_zeros(extra, PT - 1)])
        pstates = None
        if not self.linear and n_made > 0:  # padding rows: zero states (their drafts are never read)
            if states is None or PB > B:
                C, dtype = self.model.cfg.d_model, self.model.tok_emb.weight.dtype
                pstates = cur.new_zeros(PB, self.k - 2, C, dtype=dtype)
                if states is not None:
                    pstates[:B] = states
            else:
                pstates = _dense(states)
        cur, pos, max_accept = _dense(cur), _dense(pos), _dense(max_accept)
        drafts = _dense(drafts) if drafts is not None else None
        top = int(pos.max()) if max_pos is None else max_pos  # padding rows sit lower
        key = (1, PB, PT, n_made, torch.get_num_threads())
        args = (cur, drafts, pos, self._keys_to(top + PT - 1), max_accept, pstates, n_made)
        tokens, n_emitted, logprobs, nxt, new_states, last, next_pos = self._run(self._eager_greedy_step, key, *args)
        if (PB, PT) == (B, T):
            return StepResult(tokens, n_emitted, logprobs, nxt, None, new_states, last, next_pos)
        kept = new_states[:B] if new_states is not None else None
        return StepResult(tokens[:B, :T], n_emitted[:B], logprobs[:B, :T], nxt[:B], None, kept, last[:B], next_pos[:B])


def _cuda_graph_thread_state() -> None:
    """Give the calling thread the per-thread state of Inductor's CUDA graph trees if it has none.

    torch 2.13 creates it in any thread on first use; older releases (2.11 seen) only in the
    thread that imported Inductor and in autograd's, and assert (with no message) in others,
    such as the engine's inference thread, which compiles and replays the engine's steps."""
    from torch._inductor import cudagraph_trees as trees

    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)


def _dense(t: Tensor) -> Tensor:
    """t, or a copy of it, laid out as a fresh tensor of its shape would be: row-major strides
    (size-1 dimensions included, which `contiguous` leaves as they are) from the start of its
    storage. A graph's inputs are laid out as when it compiled, and its guards, the strides
    among them, are not evaluated (skip_guards), so this makes sure."""
    stride, expected = t.stride(), 1
    for i in range(t.dim() - 1, -1, -1):
        if stride[i] != expected:
            return t.clone(memory_format=torch.contiguous_format)
        expected *= t.shape[i]
    return t if t.storage_offset() == 0 else t.clone(memory_format=torch.contiguous_format)


def _greedy_pick(j: int, logits: Tensor) -> Tensor:
    """A greedy module draft from its logits [B, V], as draft_next picks it for greedy rows."""
    return torch.softmax(logits.float(), dim=-1).argmax(-1)


def _bucket(sizes: list[int] | None, n: int) -> int:
    """The smallest compiled size at or above n (n itself without buckets, or past the largest)."""
    if sizes is None:
        return n
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"no compiled shape holds {n} (largest: {sizes[-1]})")
    return sizes[i]
