"""The multi-token-prediction (MTP) transformer.

Reads top to bottom: KV cache, attention, feed-forward, block, MTP heads (linear and sequential),
model. Its hyperparameters, ModelConfig, are in config.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.model.config import ModelConfig


class KVCache(nn.Module):
    """Preallocated keys and values for one attention layer.

    k_cache, v_cache: [max_batch, num_heads, max_seq_len + k - 1, head_dim]. Row b holds one
    sequence; a token at position p lives at index p, so a rejected speculative token is simply
    overwritten when a later token takes its position, and masked until then. The k - 1 slack
    slots take the padding drafts of a verify pass near the end of the context, which no valid
    query ever attends.
    """

    k_cache: Tensor
    v_cache: Tensor

    def __init__(
        self, max_batch: int, cfg: ModelConfig, dtype: torch.dtype, device: Any, length: int | None = None
    ) -> None:
        super().__init__()
        shape = (max_batch, cfg.num_heads, length or cfg.max_seq_len + cfg.k - 1, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, row0: int = 0) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, T, Dh] at per-row positions input_pos [B, T] into cache rows
        row0..row0+B-1; return those rows' keys and values [B, H, S, Dh] (views, no copy)."""
        batch = k.shape[0]
        rows = torch.arange(row0, row0 + batch, device=k.device)[:, None]  # [B, 1]
        # advanced indices on dims 0 and 2 put [B, T] first: the target is [B, T, H, Dh]
        self.k_cache[rows, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[rows, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache[row0 : row0 + batch], self.v_cache[row0 : row0 + batch]

    def gather(self, rows: Tensor, length: int) -> None:
        """Rows 0..len(rows)-1 take a copy of rows `rows` (any, repeats allowed), positions < length."""
        self.k_cache[: len(rows), :, :length] = self.k_cache[rows, :, :length]
        self.v_cache[: len(rows), :, :length] = self.v_cache[rows, :, :length]

    def compact(self, rows: Tensor, length: int | None = None) -> None:
        """Move cache rows `rows` to rows 0..len(rows)-1: ascending, or any order in which no
        row is written before it is read (a row that moves is not among the destinations, as
        in the engine's `fill_order`).

        Only rows that move are copied, and only positions < length when given (entries past a
        row's position are masked until overwritten, so they need not follow it)."""
        S = self.k_cache.shape[2] if length is None else min(length, self.k_cache.shape[2])
        # Row by row, in order, with no temporary: for ascending rows destination i is never a
        # source still to be read (rows[j] > rows[i] >= i for j > i). A gather would allocate
        # a buffer of a new size (rows x length) at nearly every compaction.
        for i, src in enumerate(rows.tolist()):
            if src != i:
                self.k_cache[i, :, :S].copy_(self.k_cache[src, :, :S])
                self.v_cache[i, :, :S].copy_(self.v_cache[src, :, :S])


# How a compiled CPU step attends its cached keys: "explicit" (masked_attention, which Inductor
# turns into loops of its own, fused with the cache writes around them) or "sdpa" (the ATen
# flash-attention kernel, called from the graph). `python -m bench.batch_step` times both.
COMPILED_CPU_ATTENTION = "explicit"


def masked_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of q [B, H, T, Dh] over keys and values [B, H, S, Dh] where mask [B, 1, T, S]
    holds, written out as products, sums and a softmax, as scaled_dot_product_attention computes it.

    For a compiled CPU decode step (1 to k queries per row over every row's cached keys): ATen's
    flash-attention kernel, called from the graph, is built for long query blocks, and at 16 rows
    of 3 queries took a third of the step in a one-off profile (benchmark 42). Written out,
    Inductor compiles it to vectorised loops over the keys, fused with the cache writes, and
    the engine's greedy steps at batches 1 to 16 ran 1.03 to 1.18 times faster for it, with
    the same tokens (docs/benchmarks.md, benchmark 42)."""
    scores = (q[:, :, :, None, :] * keys[:, :, None, :, :]).sum(-1) * (1.0 / math.sqrt(q.shape[-1]))
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (weights[..., None] * values[:, :, None, :, :]).sum(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout_rate)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, input_pos: Tensor | None, kv_len: int | None, row0: int = 0) -> Tensor:
        B, T, C = x.shape
        H, Dh = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        dropout = self.cfg.dropout_rate if self.training else 0.0
        if self.kv_cache is None or input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            keys, values = self.kv_cache.update(input_pos, k, v, row0)  # [B, H, S, Dh]
            S = kv_len if kv_len is not None else keys.shape[2]
            keys, values = keys[:, :, :S], values[:, :, :S]
            if keys.dtype != q.dtype:  # a narrower cache (kv_dtype) is attended in the model's dtype
                keys, values = keys.to(q.dtype), values.to(q.dtype)  # compiled: converted in the loops that read it
            key_pos = torch.arange(S, device=x.device)
            mask = key_pos[None, None, :] <= input_pos[:, :, None]  # [B, T, S]
            explicit = COMPILED_CPU_ATTENTION == "explicit" and x.device.type == "cpu" and not self.training
            if explicit and torch.compiler.is_compiling():
                y = masked_attention(q, keys, values, mask[:, None])
            else:
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Post-norm (as specified): x -> attn -> residual + LN -> FFN -> residual + LN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn = CausalSelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.ffn = FeedForward(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)

    def forward(self, x: Tensor, input_pos: Tensor | None, kv_len: int | None, row0: int = 0) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), input_pos, kv_len, row0)
            return x + self.ffn(self.ln2(x))
        x = self.ln1(x + self.attn(x, input_pos, kv_len, row0))
        return self.ln2(x + self.ffn(x))


def head_span(heads: slice | None, k: int) -> tuple[int, int]:
    """The first and one-past-last head (0-based) that `heads` (step 1; None: all k) selects.
    Plain arithmetic, not slice.indices, which torch.compile's tracer breaks its graph at."""
    if heads is None:
        return 0, k
    start, stop = heads.start or 0, k if heads.stop is None else heads.stop
    start, stop = start + k if start < 0 else start, stop + k if stop < 0 else stop
    return max(0, min(start, k)), max(0, min(stop, k))


class MTPHead(nn.Module):
    """One Linear d_model -> k * vocab, viewed as k next-token distributions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.k, self.vocab_size = cfg.k, cfg.vocab_size
        self.proj = nn.Linear(cfg.d_model, cfg.k * cfg.vocab_size, bias=cfg.bias)

    def forward(self, h: Tensor, heads: slice | None = None) -> Tensor:
        """Logits [..., k, V]; with `heads`, only those heads' rows of the projection are computed."""
        if heads is None:
            return self.proj(h).unflatten(-1, (self.k, self.vocab_size))  # [..., k, V]
        start, stop = head_span(heads, self.k)
        rows = slice(start * self.vocab_size, stop * self.vocab_size)  # contiguous rows: a view, no copy
        bias = self.proj.bias[rows] if self.proj.bias is not None else None
        return F.linear(h, self.proj.weight[rows], bias).unflatten(-1, (stop - start, self.vocab_size))


class MTPModule(nn.Module):
    """DeepSeek-V3's MTP module for one extra depth j: the previous depth's state at position t
    and the embedding of token t + j, each RMS-normed, concatenated, projected 2d -> d, then one
    causal block (with its own KV cache when serving). The shared output projection reads its
    state; it predicts token t + j + 1."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_h = nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.norm_emb = nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.block = Block(cfg)
        # a pre-norm block leaves its residual stream un-normed: like the trunk's ln_f, but its own
        self.ln_f = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias) if cfg.norm_position == "pre" else None
        )

    def forward(self, h_prev: Tensor, emb: Tensor, input_pos: Tensor | None, kv_len: int | None, row0: int) -> Tensor:
        # normed in float32 (under CPU autocast the state arrives in bf16; a bf16 model's weights are bf16)
        x = torch.cat([_rms_float(self.norm_h, h_prev), _rms_float(self.norm_emb, emb)], dim=-1)  # [B, T, 2C]
        x = self.proj(x.to(h_prev.dtype))  # [B, T, C]
        x = self.block(x, input_pos, kv_len, row0)
        return self.ln_f(x) if self.ln_f is not None else x


def _rms_float(norm: nn.RMSNorm, x: Tensor) -> Tensor:
    """norm(x) computed in float32, whatever the dtypes of x and of the norm's weight."""
    weight = norm.weight.float() if norm.weight is not None else None
    return F.rms_norm(x.float(), norm.normalized_shape, weight, norm.eps)


class SequentialHeads(nn.Module):
    """Head 1 is the output projection on the trunk's state, shared by the k - 1 MTP modules
    (depths 1..k-1). Depth j needs the tokens up to t + j, so only head 1 is computed from a state
    alone; the model's mtp_state runs a depth (then this proj gives its logits)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.k, self.vocab_size = cfg.k, cfg.vocab_size
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.bias)  # shared by every depth
        self.depths = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.k - 1))

    def forward(self, h: Tensor, heads: slice | None = None) -> Tensor:
        """Head 1's logits [..., 1, V]; `heads` may only select head 1 (as MTPHead's slice(0, 1))."""
        if head_span(heads, self.k) != (0, 1):
            raise ValueError("sequential heads compute only head 1 from a state; run mtp_state for depths 2..k")
        return self.proj(h)[..., None, :]  # [..., 1, V]


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # [S, 1]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table  # [S, d_model]


def shift_left(idx: Tensor, steps: int) -> Tensor:
    """idx [B, T] moved `steps` positions left, zero-padded at the end: out[:, t] = idx[:, t + steps]."""
    out = torch.zeros_like(idx)
    out[:, : max(idx.shape[1] - steps, 0)] = idx[:, steps:]
    return out  # [B, T]


class MTPTransformer(nn.Module):
    pos_table: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positional_encoding == "learned":
            self.pos_emb: nn.Embedding | None = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            self.pos_emb = None
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.emb_dropout = nn.Dropout(cfg.dropout_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias) if cfg.norm_position == "pre" else None
        )
        self.head: MTPHead | SequentialHeads = MTPHead(cfg) if cfg.head_type == "linear" else SequentialHeads(cfg)
        # the KV caches' dtype; None: the weights'. The engine sets it (EngineConfig.kv_cache_dtype),
        # before it allocates them, so an eager generate() on the same model stores keys alike
        self.kv_dtype: torch.dtype | None = None
        self.apply(self._init_weights)
        self.emb_scale = math.sqrt(cfg.d_model)
        if self.pos_emb is None:  # unit-variance scaled embeddings, comparable to the sin/cos table
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.d_model**-0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def setup_caches(self, max_batch: int, dtype: torch.dtype | None = None) -> None:
        """Allocate one KV cache per layer: the caches decoding runs on (module_caches lends
        passing ones). dtype: default kv_dtype, else the weights'."""
        ref = self.head.proj.weight
        for attn in self._attentions():
            attn.kv_cache = KVCache(max_batch, self.cfg, dtype or self.kv_dtype or ref.dtype, ref.device)

    @contextlib.contextmanager
    def module_caches(self, rows: int, length: int) -> Iterator[list[KVCache]]:
        """Sequential heads: for the block, the MTP modules get caches of their own (rows x
        length positions, the weights' dtype) and the trunk none, in place of the caches set;
        those come back after it. Yields the modules' caches, depth 1 first."""
        if not isinstance(self.head, SequentialHeads):
            raise ValueError("module_caches needs sequential heads")
        ref, saved = self.head.proj.weight, self.kv_caches()
        lent = [KVCache(rows, self.cfg, ref.dtype, ref.device, length) for _ in self.head.depths]
        self.set_kv_caches([None] * len(self.blocks) + list(lent))
        try:
            yield lent
        finally:
            self.set_kv_caches(saved)

    def kv_caches(self) -> list[KVCache | None]:
        return [attn.kv_cache for attn in self._attentions()]

    def set_kv_caches(self, caches: list[KVCache | None]) -> None:
        for attn, cache in zip(self._attentions(), caches, strict=True):
            attn.kv_cache = cache

    def reset_caches(self) -> None:
        for attn in self._attentions():
            attn.kv_cache = None

    def compact_cache_rows(self, rows: Tensor, length: int | None = None) -> None:
        """Move the cached keys/values of rows `rows` to rows 0..len(rows)-1 (in an order
        KVCache.compact allows); with length, only positions < length (what the surviving rows
        have filled)."""
        for attn in self._attentions():
            assert attn.kv_cache is not None
            attn.kv_cache.compact(rows, length)

    def _attentions(self) -> list[CausalSelfAttention]:
        """The trunk's attention layers, then the MTP modules' (one per depth, sequential heads)."""
        blocks = [cast(Block, block) for block in self.blocks]
        if isinstance(self.head, SequentialHeads):
            blocks += [cast(MTPModule, module).block for module in self.head.depths]
        return [block.attn for block in blocks]

    def trunk(self, idx: Tensor, input_pos: Tensor | None = None, kv_len: int | None = None, row0: int = 0) -> Tensor:
        """Hidden states [B, T, d_model] for token ids idx [B, T] (depth 0 of sequential heads).

        Without input_pos: a plain causal pass over positions 0..T-1 (training, no cache).
        With input_pos [B, T]: per-row positions, written to and read from KV-cache rows
        row0..row0+B-1; kv_len bounds the keys attended (default: max position + 1).
        """
        B, T = idx.shape
        if input_pos is None:
            pos = torch.arange(T, device=idx.device).expand(B, T)
        else:  # slack positions past the context (padding drafts) reuse the last embedding
            pos = input_pos.clamp(max=self.cfg.max_seq_len - 1)
        if self.pos_emb is not None:
            x = self.tok_emb(idx) + self.pos_emb(pos)
        else:  # Vaswani et al.: scale embeddings by sqrt(d_model) so the fixed table doesn't drown them
            x = self.tok_emb(idx) * self.emb_scale + self.pos_table[pos].to(self.tok_emb.weight.dtype)
        x = self.emb_dropout(x)  # [B, T, C]
        if input_pos is not None and kv_len is None:
            kv_len = int(input_pos.max()) + 1  # attend only over the filled part of the cache
        for block in self.blocks:
            x = block(x, input_pos, kv_len, row0)
        return self.ln_f(x) if self.ln_f is not None else x

    def forward(
        self,
        idx: Tensor,
        input_pos: Tensor | None = None,
        kv_len: int | None = None,
        last_only: bool = False,
        row0: int = 0,
    ) -> Tensor:
        """MTP logits: [B, T, k, V], or [B, k, V] for the last position with last_only.

        Sequential heads are teacher-forced over the window (training and evaluation, no cache):
        depth j at position t reads the true tokens up to t + j, so at the last j positions, whose
        token t + j lies past the window, its logits are computed on padding and must be ignored.
        """
        if isinstance(self.head, SequentialHeads):
            if input_pos is not None or last_only:
                raise ValueError("sequential heads: forward is the teacher-forced window; serve with trunk + mtp_state")
            return self._teacher_forced(idx)
        h = self.trunk(idx, input_pos, kv_len, row0)
        if last_only:
            h = h[:, -1]  # [B, C]
        return self.head(h)

    def _teacher_forced(self, idx: Tensor) -> Tensor:
        h = self.trunk(idx)  # [B, T, C], depth 0
        logits = [self.head.proj(h)]  # head 1: [B, T, V]
        for depth in range(1, self.cfg.k):
            h = self.mtp_state(depth, h, shift_left(idx, depth))  # [B, T, C]
            logits.append(self.head.proj(h))  # [B, T, V]
        return torch.stack(logits, dim=2)  # [B, T, k, V]

    def mtp_state(
        self,
        depth: int,
        h_prev: Tensor,
        next_ids: Tensor,
        input_pos: Tensor | None = None,
        kv_len: int | None = None,
        row0: int = 0,
    ) -> Tensor:
        """Run sequential depth `depth` (1..k-1): its state [B, T, C]; head.proj(state) gives its
        logits [B, T, V], which callers project only at the positions they read.

        h_prev [B, T, C] is depth - 1's state at positions t (depth 0: trunk()'s), next_ids [B, T]
        the tokens at t + depth; the logits are for the tokens at t + depth + 1. Without input_pos
        t = 0..T-1, uncached. With input_pos [B, T] (the positions t, per row) the module's own KV
        cache is written and read there, in rows row0..row0+B-1, as trunk() does: module j's entry
        at t depends on token t + j, so after a rejected draft the positions that read it are
        simply run again (drafting with the modules: app/decoding/sequential.py).
        """
        if not isinstance(self.head, SequentialHeads) or not 1 <= depth < self.cfg.k:
            raise ValueError(f"mtp_state needs sequential heads and 1 <= depth < k, got depth {depth}")
        if input_pos is not None and kv_len is None:
            kv_len = int(input_pos.max()) + 1
        module = cast(MTPModule, self.head.depths[depth - 1])
        return module(h_prev, self.tok_emb(next_ids), input_pos, kv_len, row0)  # [B, T, C]

    @torch.no_grad()
    def predict_proba(self, idx: Tensor) -> Tensor:
        """Softmax per head at the last position: [B, k, V]. Sequential depth j conditions on
        the greedy tokens of heads 1..j (a chain, where the linear heads are marginals)."""
        if not isinstance(self.head, SequentialHeads):
            return torch.softmax(self.forward(idx, last_only=True).float(), dim=-1)
        h = self.trunk(idx)  # [B, T, C]
        logits = [self.head.proj(h[:, -1])]  # [B, V]
        seq = idx
        for depth in range(1, self.cfg.k):
            seq = torch.cat([seq, logits[-1].argmax(-1, keepdim=True)], dim=1)  # [B, T + depth]
            h = self.mtp_state(depth, h, seq[:, depth:])  # [B, T, C]
            logits.append(self.head.proj(h)[:, -1])  # [B, V]
        return torch.softmax(torch.stack(logits, dim=1).float(), dim=-1)  # [B, k, V]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
