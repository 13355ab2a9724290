"""Service settings: flags and MTP_* environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.decoding.compiled import GemmBackends
from app.engine.config import EngineConfig, KVCacheDtype

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "default"  # the bundled model
DEFAULT_CORPUS = REPO_ROOT / "data" / "tinyshakespeare.txt"  # the training corpus, shipped with the repository
ENGINE = EngineConfig()  # the engine's settings take their defaults from its own config


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MTP_", extra="ignore")

    checkpoint: Path = DEFAULT_CHECKPOINT
    host: str = "127.0.0.1"
    # proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (uvicorn's forwarded_allow_ips:
    # addresses or networks, comma-separated, or "*"); None: no proxy, the connection's own address
    forwarded_allow_ips: str | None = None
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"  # "auto" = CUDA if available, else CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on CPU, bfloat16 on CUDA

    torch_threads: int | None = Field(None, ge=1)  # intra-op threads for the forward pass; None = torch's default
    # glibc: allocations of at least this many bytes get their own mmap and go back to the OS
    # when freed (0 = leave glibc's adaptive threshold, under which RSS keeps each new peak)
    malloc_mmap_threshold: int = Field(16_777_216, ge=0, le=33_554_432)

    # batching
    max_batch_size: int = Field(ENGINE.max_batch_size, ge=1, le=256)
    max_wait_ms: float = Field(ENGINE.max_wait_ms, ge=0.0, le=1000.0)
    max_queue_size: int = Field(ENGINE.max_queue_size, ge=1)
    # decode rows run at once, at most max_batch_size (None: max_batch_size); the rest wait in the queue
    max_running: int | None = Field(ENGINE.max_running, ge=1)
    # prompt tokens a prefill pass takes at most (its first prompt always); the rest wait a step
    max_prefill_tokens: int = Field(ENGINE.max_prefill_tokens, ge=1)
    # with rows decoding, the share of the inference thread's time prefill and /predict passes may take
    prefill_share: float = Field(ENGINE.prefill_share, gt=0.0, le=1.0)
    # sequential heads: prompt tokens x candidates a /predict request, and a pass, may ask to score
    max_candidate_tokens: int = Field(ENGINE.max_candidate_tokens, ge=1)
    # a stream's tokens after its first leave at most this often, several steps' in one write (0: every step)
    stream_interval_ms: float = Field(ENGINE.stream_interval_ms, ge=0.0, le=1000.0)
    # decode steps a turn of the core loop runs in a row while nothing waits (1: a turn per step)
    decode_steps_in_a_row: int = Field(ENGINE.decode_steps_in_a_row, ge=1, le=1024)
    speculative: bool = ENGINE.speculative  # self-speculative decoding by default when k > 1
    draft_tokens: int | None = Field(
        ENGINE.draft_tokens, ge=0
    )  # drafts verified per pass (None: k - 1, or fewer where faster)
    adaptive_drafts: bool = ENGINE.adaptive_drafts  # greedy batches verify the draft count timed fastest for their size
    adaptive_threads: bool = ENGINE.adaptive_threads  # CPU: decode steps at 1 or torch_threads threads, the faster now
    # compiled decode steps (app/engine/compile.py): not ready until compiled; false: eager steps
    compile: bool = ENGINE.compile
    compile_autotune: bool = ENGINE.compile_autotune  # CPU: Inductor's max-autotune GEMMs (false: MKL)
    # CPU, with compile_autotune: CPP (the C++ GEMM template everywhere) or CPP,ATEN (timed against MKL)
    compile_gemm_backends: GemmBackends = ENGINE.compile_gemm_backends
    compile_cpp_wrapper: bool = ENGINE.compile_cpp_wrapper  # CPU: Inductor's wrapper code in C++, not Python
    # larger batches: eager steps; None: max_batch_size (every batch size compiled)
    compile_max_batch_size: int | None = Field(ENGINE.compile_max_batch_size, ge=1)
    compile_cache_dir: str | None = ENGINE.compile_cache_dir  # None: $TORCHINDUCTOR_CACHE_DIR or ~/.cache/mtp/inductor
    compile_draft_counts: list[int] | None = Field(ENGINE.compile_draft_counts)  # None: 1, 3 and k - 1
    # auto: bfloat16 for float32 weights in compiled CPU steps (half the bytes read per key), else the weights'
    kv_cache_dtype: KVCacheDtype = ENGINE.kv_cache_dtype

    # per-request caps
    max_input_tokens: int | None = Field(None, ge=1)  # None = the model's context
    max_new_tokens: int = Field(256, ge=1)
    max_top_n: int = Field(100, ge=1)
    max_logprobs: int = Field(20, ge=0)  # most likely tokens per generated token (logprobs, top_n_tokens)
    max_candidates: int = Field(32, ge=0)
    max_inputs_per_request: int = Field(32, ge=1)
    max_stop_sequences: int = Field(8, ge=0)
    max_stop_length: int = Field(64, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_input_chars: int = Field(32_768, ge=1)  # characters of any one text input, checked before tokenizing
    max_tokenize_tokens: int = Field(8_192, ge=1)  # tokens /tokenize returns at most
    max_temperature: float = Field(100.0, gt=0)
    request_timeout_s: float = Field(ENGINE.request_timeout_s, gt=0)
    body_timeout_s: float = Field(10.0, gt=0)  # a request body must arrive within this (slow-drip guard)
    # the last this-many free queue places are kept from a client address that already holds
    # as many places whose bodies are still arriving (None: a quarter of the queue, at least 4)
    max_pending_bodies_per_client: int | None = Field(None, ge=1)

    # connections
    idle_timeout_s: float = Field(30.0, gt=0)  # no whole request header, or no byte of a waiting reply taken: closed
    max_connections: int = Field(2048, ge=1)  # open connections; more are refused (kept below the fd limit too)
    max_header_bytes: int = Field(65_536, ge=1024)  # a longer request line + headers: 431 (Node's default: 16 KiB)

    # operations
    drain_timeout_s: float = Field(30.0, ge=0)
    stall_timeout_s: float = Field(
        ENGINE.stall_timeout_s, gt=0
    )  # a forward pass running longer marks the worker stalled
    warmup: bool = True
    api_key: str | None = None
    cors_origins: list[str] = []
    log_json: bool = False
    log_level: str = "INFO"

    @property
    def pending_bodies_per_client(self) -> int:
        return self.max_pending_bodies_per_client or max(4, self.max_queue_size // 4)

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("max_running")
    @classmethod
    def _running_within_the_batch(cls, v: int | None, info: ValidationInfo) -> int | None:
        batch = info.data.get("max_batch_size")
        if v is not None and batch is not None and v > batch:
            raise ValueError(f"max_running ({v}) cannot exceed max_batch_size ({batch}): a row runs in the batch")
        return v
