"""The engine's configuration, its health report, and the one thread that runs its tensor work."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from app.decoding.compiled import GEMM_BACKENDS, GemmBackends

KVCacheDtype = Literal["auto", "float32", "bfloat16", "float16"]


def inference_thread() -> ThreadPoolExecutor:
    """The one thread that runs every tensor operation of the service, model loading included.

    With OpenMP (torch's CPU backend) each thread that runs a parallel op gets a thread team
    of its own, and the team stays. With more OpenMP threads than cores, libgomp sleeps
    sooner between parallel regions, and a decode step (hundreds of small parallel ops) pays
    a wake-up for many of them: on 2 cores, one op on a second thread made decoding on the
    worker 1.3-1.6x slower for good (`mtp bench threads`). So the model is loaded, its caches
    allocated and every forward pass run on this thread only.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtp-worker")


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue_size: int = 256
    # decode rows run at once, at most max_batch_size; more wait in the queue for a row. None:
    # max_batch_size (every waiting request joins the running batch at its next step)
    max_running: int | None = None
    # prompt tokens one prefill pass takes at most (its first prompt always goes): a burst of long
    # prompts is prefilled over several steps, with the running rows' decode steps between them
    max_prefill_tokens: int = 1024
    # with rows decoding, the share of the inference thread's time that prefill and /predict
    # passes may take: after such a pass the running rows decode for (1 - share) / share of its
    # length before the next one (1: no limit). A burst of prompts, or of /predict requests,
    # then slows the running streams about 1 / (1 - share)-fold at most, not without bound
    prefill_share: float = 0.5
    # sequential heads score a /predict candidate on a copy of its input's cached module positions:
    # prompt tokens x candidates one /predict pass takes at most (its first input always goes)
    max_candidate_tokens: int = 16384
    speculative: bool = True
    draft_tokens: int | None = None  # drafts verified per pass; None = k - 1, or fewer where faster
    adaptive_drafts: bool = True  # with draft_tokens None: time the step at start-up and adapt (drafts.py)
    adaptive_threads: bool = True  # CPU: run each decode step at the thread count timed fastest now (threads.py)
    # decode steps as torch.compile'd graphs at fixed shapes (app/decoding/compiled.py); False: eager
    compile: bool = True
    compile_autotune: bool = True  # CPU: Inductor's max-autotune GEMMs (False: MKL for every matmul)
    # CPU, with compile_autotune: "CPP", Inductor's C++ GEMM template for every matmul; "CPP,ATEN":
    # timed against MKL matmul by matmul while compiling (app/decoding/compiled.py, GEMM_BACKENDS)
    compile_gemm_backends: GemmBackends = GEMM_BACKENDS
    compile_cpp_wrapper: bool = True  # CPU: each compiled step's wrapper in C++ (faster steps, run without the GIL)
    # largest batch compiled; larger batches run eager steps. None: max_batch_size (every
    # bucket; each batch size compiled adds to a cold start-up; see compiled_batch_limit)
    compile_max_batch_size: int | None = None
    compile_cache_dir: str | None = None  # Inductor's on-disk cache; None: $TORCHINDUCTOR_CACHE_DIR or torch's
    # draft counts a compiled verify pass may carry (a step pads to the next); None: 0, 1, 3 and k - 1
    compile_draft_counts: list[int] | None = None
    # the KV caches' dtype (app/model/checkpoint.py, resolve_kv_dtype); auto: bfloat16 for
    # float32 weights in compiled CPU steps, else the weights'
    kv_cache_dtype: KVCacheDtype = "auto"
    # a stream's tokens after its first are handed to the event loop at most this often, several
    # steps' tokens in one write (core.py); 0: after every step
    stream_interval_ms: float = 10.0
    # decode steps one turn of the core loop runs in a row while no request waits and no message
    # comes (core.py); 1: the loop's turn around every step. Streamed rows end a run at the stream
    # interval and every run ends at the metrics' flush (0.1 s), so this bounds final-only rows
    decode_steps_in_a_row: int = 256
    request_timeout_s: float = 60.0
    stall_timeout_s: float = 30.0

    @property
    def running_limit(self) -> int:
        """Rows that decode at once: max_running, never more than max_batch_size."""
        return min(self.max_running or self.max_batch_size, self.max_batch_size)


@dataclass
class Health:
    alive: bool  # the worker task is running
    stalled: bool  # a forward pass has run longer than stall_timeout_s
    accepting: bool  # not draining or stopped
    detail: str
