"""Mixture-of-Experts feed-forward: a top-k router, stacked SwiGLU experts, dropless dispatch.

Plain PyTorch, like the rest of ``models/``: expert parallelism is applied from outside
(``torchtitan/distributed/expert_parallel.py``) by hooks on ``MoE.experts``, so the forward
below reads the same on one process and under EP.

One MoE layer, for ``T`` tokens of width ``dim`` and ``E`` routed experts:

1. **Route** (``TokenChoiceTopKRouter``): ``scores = softmax|sigmoid(gate(x))`` in fp32; each
   token picks the ``top_k`` experts of ``scores + expert_bias`` (the bias steers selection
   only; with expert groups, among the best groups only) and weighs them with the *unbiased* scores, optionally renormalised to sum to 1
   (``route_norm``) and multiplied by ``route_scale``.
2. **Dispatch** (dropless, token choice, no capacity factor): the ``T * top_k`` token copies
   are sorted by expert (a stable sort, so each expert sees its tokens in token order) and
   handed to ``GroupedExperts`` as one ``[T * top_k, dim]`` tensor plus the number of rows per
   expert.
3. **Experts** (``GroupedExperts``): ``w2 @ (silu(w1 @ x) * (w3 @ x))`` per expert, computed
   with ``torch._grouped_mm`` (one kernel for all experts) or an exact per-expert loop.
4. **Combine**: each copy's output times its routing weight is added back to its token
   (``index_add``), so every token receives exactly ``top_k`` expert outputs; shared experts,
   if any, are a dense SwiGLU on every token added on top.

Load balancing without an auxiliary loss (DeepSeek-V3): ``tokens_per_expert`` accumulates the
routed copies seen since the last optimizer step; ``moe_balance.build_moe_step_hooks`` returns the
callable the trainer runs after each optimizer step, which sums the counts over the ranks
that saw different tokens and moves ``expert_bias`` by ``coeff * sign(mean - load)``.
The optional sequence-level auxiliary loss (``aux_loss_alpha > 0``) is attached to the
layer's output by an autograd function (see :class:`_AttachAuxLoss`), so the trainer's loss
needs no change.

With ``score_func="softmax"``, ``route_norm=norm_topk_prob``, no shared experts and
``load_balance_coeff`` at its zero bias, this is exactly Hugging Face's
``Qwen3MoeSparseMoeBlock`` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.models.common.feed_forward import FeedForward

__all__ = [
    "FeedForward",
    "GroupedExperts",
    "MoE",
    "MoEArgs",
    "TokenChoiceTopKRouter",
    "sequence_aux_loss",
]

_BASE_INIT_STD = 0.02


@dataclass
class MoEArgs:
    """One MoE layer's routing and balancing options (TorchTitan's names)."""

    num_experts: int = 8
    # Shared experts, each of the routed experts' hidden size: one dense SwiGLU of hidden
    # size num_shared_experts * hidden_dim that every token goes through.
    num_shared_experts: int = 0
    top_k: int = 1
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    route_norm: bool = False  # renormalise the top-k weights to sum to 1
    route_scale: float = 1.0
    # Rate of the auxiliary-loss-free expert-bias update; None = no update (the bias stays 0).
    load_balance_coeff: float | None = 1e-3
    # Weight of the sequence-level auxiliary balance loss; 0 = off.
    aux_loss_alpha: float = 0.0
    # torch._grouped_mm for the experts; False = an exact per-expert loop.
    use_grouped_mm: bool = True
    # Group-limited routing (DeepSeek-V3's node-limited routing): the experts form
    # num_expert_groups equal groups, a group scores the sum of its two best experts, and a
    # token picks its top_k among the num_limited_groups best groups only. None = off.
    num_expert_groups: int | None = None
    num_limited_groups: int | None = None

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if (self.num_expert_groups is None) != (self.num_limited_groups is None):
            raise ValueError("num_expert_groups and num_limited_groups go together: set both or neither")
        if self.num_expert_groups is not None:
            groups, limited = self.num_expert_groups, self.num_limited_groups
            if groups < 1 or self.num_experts % groups or self.num_experts // groups < 2:
                raise ValueError(
                    f"num_expert_groups ({groups}) must divide num_experts ({self.num_experts}) into "
                    "groups of at least 2 experts"
                )
            if not 1 <= limited <= groups or self.top_k > limited * (self.num_experts // groups):
                raise ValueError(
                    f"num_limited_groups ({limited}) must be in [1, num_expert_groups={groups}] and its "
                    f"groups must hold at least top_k ({self.top_k}) experts"
                )


# ---- experts ----------------------------------------------------------------------------


def _group_alignment(x: torch.Tensor) -> int:
    """Rows each expert's group is padded to for ``torch._grouped_mm``.

    On CUDA every group's start offset must be 16-byte aligned (the weight-gradient GEMM
    splits the token dimension at the offsets): 8 rows in bf16, 4 in fp32. The CPU kernel
    takes any offsets (measured, torch 2.13), so it is not padded.
    """
    if x.device.type == "cuda":
        return max(1, 16 // x.element_size())
    return 1


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (expert parallelism), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as stacked weights.

    ``w1`` (gate) and ``w3`` (up) are ``[E, hidden, dim]``, ``w2`` (down) is
    ``[E, dim, hidden]``: expert ``e`` computes ``w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))``,
    the layout of ``nn.Linear`` weights stacked on a leading expert dim.

    ``forward(x, num_tokens_per_expert)`` takes the token copies sorted by expert (``x`` is
    ``[N, dim]``, the first ``num_tokens_per_expert[0]`` rows go to expert 0, ...). Under
    expert parallelism the weights are DTensors sharded on the expert dim and hooks set by
    ``apply_ep`` exchange the rows, so ``forward`` sees only this rank's experts' rows and
    counts and computes with the local shard.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, use_grouped_mm: bool = True) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.use_grouped_mm = use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = _local(self.w1), _local(self.w2), _local(self.w3)
        if torch.is_autocast_enabled(x.device.type):
            # Autocast has no rule for grouped GEMMs: cast as it casts nn.Linear (on CUDA the
            # grouped kernel takes bf16 only; fp32 would fall back to a slow loop).
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w1, w2, w3 = (t.to(dtype) for t in (x, w1, w2, w3))
        if self.use_grouped_mm and _grouped_mm_available(x, w1):
            return _experts_grouped_mm(x, num_tokens_per_expert, w1, w2, w3)
        if torch.compiler.is_compiling():
            # The loop reads the counts on the host, which a full graph cannot.
            return _experts_masked(x, num_tokens_per_expert, w1, w2, w3)
        return _experts_loop(x, num_tokens_per_expert, w1, w2, w3)

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1, mean=0.0, std=_BASE_INIT_STD)
        for w in (self.w2, self.w3):
            nn.init.trunc_normal_(w, mean=0.0, std=init_std)


def _grouped_mm_available(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Where ``torch._grouped_mm`` runs: CPU, and CUDA from Hopper (sm90) on; each weight row
    must be 16-byte aligned (``dim`` and ``hidden`` times the element size). Under
    ``torch.compile`` bf16 only (torch 2.13's shape function refuses other dtypes)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.device.type != "cpu":
        return False
    hidden, dim = w1.shape[-2], w1.shape[-1]
    return (dim * x.element_size()) % 16 == 0 and (hidden * x.element_size()) % 16 == 0


def _experts_loop(
    x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """The exact fallback: one SwiGLU per expert on its slice of rows (syncs for the counts)."""
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        n = int(n)
        xe = x[start : start + n]
        start += n
        outs.append(torch.matmul(F.silu(torch.matmul(xe, w1[e].t())) * torch.matmul(xe, w3[e].t()), w2[e].t()))
    if start != x.shape[0]:
        # Rows past the counts (padding): no expert owns them.
        outs.append(x.new_zeros(x.shape[0] - start, w2.shape[1]))
    return torch.cat(outs, dim=0)


def _experts_masked(
    x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """Exact and free of host syncs, at ``E`` times the FLOPs: every expert runs on every
    row and a row keeps its own expert's result (for compiled non-bf16 runs: tests)."""
    ends = torch.cumsum(counts.to(torch.int64), 0)
    row = torch.arange(x.shape[0], device=x.device)
    expert_of_row = torch.searchsorted(ends, row, right=True)
    out = x.new_zeros(x.shape[0], w2.shape[1])
    for e in range(w1.shape[0]):
        ye = torch.matmul(F.silu(torch.matmul(x, w1[e].t())) * torch.matmul(x, w3[e].t()), w2[e].t())
        out = torch.where((expert_of_row == e).unsqueeze(-1), ye, out)
    return out


def _experts_grouped_mm(
    x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """All experts in three grouped GEMMs; no host sync.

    Where groups must start on aligned rows (CUDA), each expert's rows are copied into a
    buffer padded per group; its size is the static bound ``N + E * (align - 1)`` so the
    host never waits for the counts.
    """
    align = _group_alignment(x)
    counts = counts.to(torch.int64)
    if align > 1:
        padded = (counts + align - 1) // align * align
        padded_starts = torch.cumsum(padded, 0) - padded
        starts = torch.cumsum(counts, 0) - counts
        expert_of_row = torch.repeat_interleave(
            torch.arange(counts.numel(), device=x.device), counts, output_size=x.shape[0]
        )
        row = torch.arange(x.shape[0], device=x.device)
        dest = padded_starts[expert_of_row] + (row - starts[expert_of_row])
        bound = x.shape[0] + counts.numel() * (align - 1)
        xg = x.new_zeros(bound, x.shape[1]).index_copy(0, dest, x)
        offs = torch.cumsum(padded, 0).to(torch.int32)
    else:
        xg = x
        offs = torch.cumsum(counts, 0).to(torch.int32)
    h = F.silu(torch._grouped_mm(xg, w1.transpose(-2, -1), offs=offs)) * torch._grouped_mm(
        xg, w3.transpose(-2, -1), offs=offs
    )
    out = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    return out[dest] if align > 1 else out


# ---- router -----------------------------------------------------------------------------


class TokenChoiceTopKRouter(nn.Module):
    """Scores every expert for every token and picks each token's top-k.

    ``forward(x [T, dim], expert_bias [E] | None)`` -> ``(top_weights [T, k] fp32,
    top_experts [T, k] int64, scores [T, E] fp32)``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: str,
        route_norm: bool,
        route_scale: float,
        num_expert_groups: int | None = None,
        num_limited_groups: int | None = None,
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.route_norm = route_norm
        self.route_scale = route_scale
        self.num_expert_groups = num_expert_groups
        self.num_limited_groups = num_limited_groups

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """``choice`` with the experts outside each token's best groups set to -inf; a
        group's score is the sum of its two best experts' choice scores."""
        groups = choice.view(choice.shape[0], self.num_expert_groups, -1)
        group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
        best = group_scores.topk(self.num_limited_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        if self.score_func == "softmax":
            scores = F.softmax(logits, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits.to(torch.float32))
        if expert_bias is not None or self.num_expert_groups is not None:
            # The bias (and the group limit) pick the experts; the weights stay the unbiased scores.
            choice = scores + expert_bias if expert_bias is not None else scores
            if self.num_expert_groups is not None:
                choice = self._limit_to_groups(choice)
            _, top_experts = torch.topk(choice, self.top_k, dim=-1)
            top_weights = scores.gather(-1, top_experts)
        else:
            top_weights, top_experts = torch.topk(scores, self.top_k, dim=-1)
        if self.route_norm:
            top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            top_weights = top_weights * self.route_scale
        return top_weights, top_experts, scores

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, mean=0.0, std=init_std)


# ---- the auxiliary loss ------------------------------------------------------------------


class _AttachAuxLoss(torch.autograd.Function):
    """Returns ``out`` unchanged; in backward also sends gradient ``scale`` to ``aux``.

    The effect is that of adding ``scale * aux`` to whatever loss ``out`` flows into, without
    the trainer seeing a second loss: the gradient of the auxiliary loss enters the backward
    pass wherever ``out``'s does (also on a pipeline stage, also under activation
    checkpointing). ``scale`` is ``MoE.aux_loss_grad_scale`` (1 by default; the family's
    parallelize function sets it to ``1 / micro-batches per step`` so the auxiliary term is
    averaged over micro-batches like the main loss is).
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        shape, dtype, device = ctx.aux_meta
        return grad_out, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def sequence_aux_loss(
    scores: torch.Tensor, top_experts: torch.Tensor, bs: int, top_k: int, num_experts: int
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (without alpha), averaged over sequences.

    Per sequence of ``L`` tokens: ``sum_i f_i * P_i`` with ``f_i = E / (k L) * #tokens that
    chose expert i`` (no gradient) and ``P_i`` the mean over the tokens of expert i's score
    normalised over experts. Under context or sequence parallelism a rank sees part of each
    sequence, and the loss is that of its part.
    """
    scores = scores.view(bs, -1, num_experts)
    seq_len = scores.shape[1]
    probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    with torch.no_grad():
        chosen = torch.zeros(bs, num_experts, device=scores.device, dtype=scores.dtype)
        chosen.scatter_add_(1, top_experts.view(bs, -1), torch.ones_like(top_experts.view(bs, -1), dtype=scores.dtype))
        f = chosen * (num_experts / (top_k * seq_len))
    p = probs.mean(dim=1)
    return (f * p).sum(dim=-1).mean()


# ---- the layer --------------------------------------------------------------------------


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer: ``[bs, slen, dim] -> [bs, slen, dim]``.

    Submodules: ``router`` (``router.gate``: ``nn.Linear(dim, num_experts)``), ``experts``
    (``GroupedExperts``) and ``shared_experts`` (``FeedForward`` or ``None``).
    Buffers: ``expert_bias`` ``[E]`` fp32 (persistent: it is trained state, checkpointed;
    present even when ``load_balance_coeff`` is None, then it stays 0) and
    ``tokens_per_expert`` ``[E]`` fp32 (not persistent: routed copies counted since the last
    optimizer step, on this rank, summed over micro-batches).
    """

    def __init__(self, moe_args: MoEArgs, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.moe_args = moe_args
        self.num_experts = moe_args.num_experts
        self.top_k = moe_args.top_k
        self.load_balance_coeff = moe_args.load_balance_coeff
        self.aux_loss_alpha = moe_args.aux_loss_alpha
        # Whether forward adds to tokens_per_expert (see torchtitan/distributed/pipeline.py).
        self.collect_stats = True
        # Gradient the auxiliary loss enters backward with (see _AttachAuxLoss).
        self.aux_loss_grad_scale = 1.0
        self.router = TokenChoiceTopKRouter(
            dim,
            moe_args.num_experts,
            moe_args.top_k,
            moe_args.score_func,
            moe_args.route_norm,
            moe_args.route_scale,
            moe_args.num_expert_groups,
            moe_args.num_limited_groups,
        )
        self.experts = GroupedExperts(dim, hidden_dim, moe_args.num_experts, moe_args.use_grouped_mm)
        self.shared_experts = (
            FeedForward(dim, hidden_dim * moe_args.num_shared_experts) if moe_args.num_shared_experts > 0 else None
        )
        self.register_buffer("expert_bias", torch.zeros(moe_args.num_experts, dtype=torch.float32), persistent=True)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(moe_args.num_experts, dtype=torch.float32), persistent=False
        )
        # The last forward's auxiliary loss value (detached), for logging; None when off.
        self.last_aux_loss: torch.Tensor | None = None
        # Each expert's load in the last optimizer step, summed over the data ranks (set by
        # the step hook of build_moe_step_hooks; read by moe_metrics).
        self.last_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, slen, dim = x.shape
        x = x.reshape(-1, dim)
        # The bias steers selection even when it is not updated (a loaded DeepSeek-V3 bias, or
        # zeros: the same choice as none).
        top_weights, top_experts, scores = self.router(x, self.expert_bias)

        flat_experts = top_experts.reshape(-1)
        # A fixed-size count (bincount's size depends on the data: no full graph under
        # torch.compile); scatter_add is deterministic on CUDA in deterministic mode.
        num_tokens_per_expert = torch.zeros(
            self.num_experts, dtype=torch.int64, device=flat_experts.device
        ).scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
        # Not counted: forwards run with collect_stats off (a pipeline stage's shape-inference
        # pass). An activation-checkpoint recompute re-runs this forward and counts the layer's
        # tokens a second time: every expert's count of that layer doubles, which leaves the
        # bias update (a sign of mean - load) and the router metrics (fractions of the layer's
        # copies) unchanged. Asking autograd whether it is recomputing would break the graph.
        if self.collect_stats:
            with torch.no_grad():
                self.tokens_per_expert.add_(num_tokens_per_expert.to(self.tokens_per_expert.dtype))

        # Dispatch: the T*k token copies sorted by expert; a stable sort keeps token order.
        order = torch.argsort(flat_experts, stable=True)
        token_of_copy = order // self.top_k
        routed_out = self.experts(x[token_of_copy], num_tokens_per_expert)
        # Combine: weight each copy's output and add it to its token, exactly once.
        weights = top_weights.reshape(-1)[order].to(x.dtype)
        routed_out = routed_out * weights.unsqueeze(-1)
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        out = out.index_add(0, token_of_copy, routed_out.to(out.dtype))
        out = out.view(bs, slen, dim)

        if self.aux_loss_alpha > 0 and torch.is_grad_enabled():
            aux = self.aux_loss_alpha * sequence_aux_loss(scores, top_experts, bs, self.top_k, self.num_experts)
            self.last_aux_loss = aux.detach()
            out = _AttachAuxLoss.apply(out, aux, self.aux_loss_grad_scale)
        return out

    def init_weights(self, init_std: float, buffer_device: torch.device | None = None) -> None:
        device = self.expert_bias.device if buffer_device is None else buffer_device
        with torch.no_grad():
            self.router.init_weights(init_std)
            self.experts.init_weights(init_std)
            if self.shared_experts is not None:
                self.shared_experts.init_weights(init_std)
            self.expert_bias = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
            self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.float32, device=device)
