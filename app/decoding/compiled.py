"""torch.compile'd decode steps at fixed shapes (gpt-fast style), for generate() on a static batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from app.decoding.generate import step_inputs
from app.decoding.speculative import StepResult
from app.model.model import MTPTransformer


class CompiledDecoder:
    """torch.compile'd decode steps, gpt-fast style, for generate() on a static batch.

    The compiled step attends over the whole KV cache under the position mask (stale entries
    past a row's position are masked), so its shapes never change from step to step: each
    (batch, tokens-per-step) pair compiles once — T = 1 for plain steps, T = k for verify
    passes. Inductor's freezing folds and prepacks the weights, which is most of the gain on
    CPU. The caches are allocated here for `max_batch` rows and kept across generate() calls.
    For all-greedy batches `greedy_step` also compiles the acceptance and drafting into the
    step's graph; sampled batches run the compiled forward and the eager accept_drafts.
    """

    def __init__(self, model: MTPTransformer, max_batch: int, autotune: bool = False) -> None:
        if model.cfg.head_type != "linear":
            raise ValueError(
                f"compiled decoding covers the linear MTP head only, not head_type {model.cfg.head_type!r}: "
                "decode this model eagerly (no CompiledDecoder; `--no-compile` in mtp bench)"
            )
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights are constants of the compiled graph
        self.model = model
        self.max_batch = max_batch
        self.cache_len = model.cfg.max_seq_len + model.cfg.k - 1
        model.setup_caches(max_batch)
        self._caches = model.kv_caches()
        # autotune: Inductor times its C++ GEMM template (AVX-512 micro-kernels, specialised
        # to each frozen weight's shape) against ATen's MKL call for every matmul and keeps
        # the faster; compiling takes minutes instead of seconds.
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"} if autotune else None
        )
        # The drafting heads' rows of the MTP projection as a Linear of their own: the C++
        # template reads a frozen weight that is a row-offset view from its first row (wrong
        # drafts; torch 2.13), so it gets a copy. Head 1's rows start at 0 and stay a view.
        self._drafter: nn.Linear | None = None
        if autotune and model.cfg.k > 1:
            V, proj = model.cfg.vocab_size, model.head.proj
            self._drafter = nn.Linear(proj.in_features, proj.out_features - V, bias=proj.bias is not None)
            self._drafter.to(device=proj.weight.device, dtype=proj.weight.dtype).requires_grad_(False)
            with torch.no_grad():
                self._drafter.weight.copy_(proj.weight[V:])
                if proj.bias is not None:
                    self._drafter.bias.copy_(proj.bias[V:])
        self._step = torch.compile(self._eager_step, dynamic=False, options=options)
        self._greedy = torch.compile(self._eager_greedy_step, dynamic=False, options=options)

    def _draft_logits(self, h: Tensor) -> Tensor:
        """Heads 2..k at hidden states h [B, C] -> [B, k-1, V]."""
        if self._drafter is None:
            return self.model.head(h, heads=slice(1, None))
        return self._drafter(h).unflatten(-1, (self.model.cfg.k - 1, self.model.cfg.vocab_size))

    def attach(self) -> None:
        """Put this decoder's caches back on the model (an eager generate() may have replaced
        them); the same tensors every time, so the compiled graphs stay valid."""
        self.model.set_kv_caches(self._caches)

    def _eager_step(self, idx: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        h = self.model.trunk(idx, input_pos, kv_len=self.cache_len)
        return self.model.head(h, heads=slice(0, 1)), h

    def __call__(self, idx: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Head 1's logits [B, T, 1, V] and the hidden states [B, T, C] at positions input_pos."""
        return self._step(idx, input_pos)

    def _eager_greedy_step(
        self, idx: Tensor, input_pos: Tensor, max_accept: Tensor, draft: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h = self.model.trunk(idx, input_pos, kv_len=self.cache_len)
        logits = self.model.head(h, heads=slice(0, 1))[:, :, 0].float()  # [B, T, V]
        B, T, _ = logits.shape
        rows = torch.arange(B, device=idx.device)
        top = torch.softmax(logits, dim=-1).argmax(-1)  # [B, T], as accept_drafts picks it
        if T > 1:
            agree = (idx[:, 1:] == top[:, :-1]).long()
            n_acc = torch.minimum(agree.cumprod(dim=-1).sum(dim=-1), max_accept)
        else:
            n_acc = torch.zeros(B, dtype=torch.long, device=idx.device)
        offsets = torch.arange(T, device=idx.device)[None, :]
        padded = torch.cat([idx[:, 1:], idx.new_zeros(B, 1)], dim=1)
        tokens = torch.where(offsets < n_acc[:, None], padded, top[rows, n_acc][:, None])
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]
        if draft:
            q = torch.softmax(self._draft_logits(h[rows, n_acc]).float(), dim=-1)
            drafts = q.argmax(-1)  # [B, k-1]
        else:
            drafts = idx.new_zeros(B, 0)
        return tokens, n_acc + 1, logprobs, drafts

    def greedy_step(self, cur: Tensor, drafts: Tensor | None, pos: Tensor, max_accept: Tensor) -> StepResult:
        """A whole greedy decode step as one compiled graph: the forward over [cur, drafts],
        acceptance (drafts equal to head 1's argmax, at most max_accept [B] of them), the
        bonus token, log-probabilities and the next drafts from heads 2..k — what
        forward_step + accept_drafts compute for all-greedy rows, without their eager ops."""
        idx, input_pos = step_inputs(cur, drafts, pos)
        T = idx.shape[1]
        draft = drafts is not None and drafts.shape[1] > 0
        tokens, n_emitted, logprobs, nxt = self._greedy(idx, input_pos, max_accept.clamp(max=T - 1), draft)
        return StepResult(tokens, n_emitted, logprobs, nxt, None)
