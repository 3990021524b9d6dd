"""Chunked output projection + cross-entropy: the full fp32 logits are never materialised.

For Llama 3 the logits are ``tokens × 128K`` floats: 4 GiB in fp32 for 8192 tokens, the
largest activation of the step. Here the tokens are cut into chunks, and each chunk's
gradients are computed in the *forward*: its logits, the summed cross-entropy, the gradient
of that sum with respect to the logits (softmax minus the one-hot label), and from it the
chunk's share of the hidden states' gradient and of the weight's (accumulated in fp32), after
which the chunk's logits are dropped. Backward only scales the two saved gradients by the
incoming one. Compared with the plain loss no matmul is added (the earlier version
recomputed each chunk's projection in backward: one more output-projection forward, ~4% of
a 3B step at 8k tokens); compared with keeping the logits, the memory is one chunk's logits
plus the weight's gradient. The result equals the plain token-mean cross-entropy: the same
matmuls and the same fp32 log-softmax, summed per chunk and divided by the token count once.
Without gradients (validation, ``torch.no_grad``) only the loss is computed.

Integration without editing the model: :func:`apply_chunked_loss` turns ``model.output``
(an ``nn.Linear``) into :class:`ChunkedLossLinear` — same parameters and state-dict keys.
It behaves as a Linear until labels are set with :func:`labels_for_loss`; then its
forward returns the loss instead of the logits, so ``model(inputs)`` is the loss. Because
the loss is computed inside the output module's own forward, FSDP's hooks gather and free its
weight exactly as for the plain projection. Tensor-parallel (vocab-sharded) outputs are not
supported: the trainer refuses that combination.

Under pipeline parallelism the schedule, not the trainer, calls each stage per microbatch,
so labels cannot be set around the call: :func:`take_labels_kwarg` lets a stage take them
as the keyword argument ``labels``, which the schedule splits into microbatches like the
inputs and hands to every stage (stages without the output drop it). The last stage then
returns the microbatch loss and the schedule's loss function passes it through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "chunked_cross_entropy",
    "ChunkedLossLinear",
    "apply_chunked_loss",
    "labels_for_loss",
    "take_labels_kwarg",
]


IGNORE_INDEX = -100  # F.cross_entropy's default: labels equal to it add no loss


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)


def _chunk_loss_and_grad(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and its gradient with respect to the logits (in the
    hidden states' dtype): ``softmax(logits) - onehot(labels)``, zero on ignored tokens."""
    logits = F.linear(hidden, weight).float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    valid = (labels != IGNORE_INDEX).unsqueeze(-1)
    target = labels.clamp(min=0).unsqueeze(-1)
    loss = ((lse - logits.gather(-1, target)) * valid).sum()
    grad = torch.exp(logits - lse).scatter_add(-1, target, torch.full_like(lse, -1.0))
    return loss, (grad * valid).to(hidden.dtype)


_FP32_OUT_MATMUL = True  # cleared when this torch's addmm has no out_dtype variant


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with an fp32 ``acc`` and bf16 ``a``, ``b``: on CUDA one GEMM whose
    epilogue adds into fp32 (``addmm``'s ``out_dtype``); elsewhere a bf16 product added."""
    global _FP32_OUT_MATMUL
    if acc.dtype == a.dtype:
        torch.addmm(acc, a, b, out=acc)
        return
    if acc.is_cuda and _FP32_OUT_MATMUL:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _FP32_OUT_MATMUL = False
    acc += a @ b


class _LinearCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T``, chunk by chunk, gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, chunk_fn):  # noqa: ANN001, ANN205
        need_h, need_w = ctx.needs_input_grad[:2]  # a frozen output weight needs no gradient
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            loss, grad_logits = chunk_fn(h, weight, labels[start : start + chunk_size])
            total += loss
            if grad_h is not None:
                torch.mm(grad_logits, weight, out=grad_h[start : start + chunk_size])
            if grad_w is not None:
                _add_matmul(grad_w, grad_logits.t(), h)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205
        # Out of place: the zero-bubble pipeline schedules run this twice (once for the
        # input's gradient, once for the weight's), with the graph retained in between.
        grad_h, grad_w = ctx.saved_tensors  # freed once backward has run (unless retained)
        return (
            None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_total.to(grad_w.dtype),
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    chunk_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = (
        _chunk_loss_and_grad
    ),
) -> torch.Tensor:
    """Token-mean cross-entropy of ``hidden @ weight.T`` against ``labels``.

    ``hidden`` ``[..., dim]``, ``weight`` ``[vocab, dim]``, ``labels`` ``hidden.shape[:-1]``;
    ``chunk_size`` tokens per chunk. Equals
    ``F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), labels.flatten())``.
    ``chunk_fn`` computes one chunk's summed loss and logits gradient (a compiled
    ``_chunk_loss_and_grad``, say).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if y.numel() != h.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)}")
    if torch.is_autocast_enabled(h.device.type):
        # Cast the (vocab x dim) weight once, not once per chunk: autocast leaves a tensor
        # already in its dtype alone.
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropySum.apply(h, weight, y, chunk_size, chunk_fn)
    else:
        total = sum(_chunk_loss_sum(h[i : i + chunk_size], weight, y[i : i + chunk_size])
                    for i in range(0, h.shape[0], chunk_size))
    # Same denominator as F.cross_entropy's mean: tokens whose label is not ignore_index.
    return total / (y != IGNORE_INDEX).sum()


class ChunkedLossLinear(nn.Linear):
    """An output ``nn.Linear`` that returns the chunked loss while labels are set."""

    chunk_size: int = 1024
    labels: torch.Tensor | None = None
    chunk_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = (
        staticmethod(_chunk_loss_and_grad)
    )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return super().forward(x)
        if self.bias is not None:
            raise ValueError("chunked loss supports an output projection without bias only")
        return chunked_cross_entropy(x, self.weight, self.labels, self.chunk_size, self.chunk_fn)


def apply_chunked_loss(model: nn.Module, chunk_size: int, compile_backend: str | None = None) -> nn.Module:
    """Make ``model.output`` compute the loss in chunks of ``chunk_size`` tokens when given
    labels. Call on the model before FSDP wraps it (on meta is fine).

    ``compile_backend`` compiles each chunk's projection, loss and logits gradient (the loop
    around it stays eager): in eager, the fp32 cast, log-softmax, softmax and one-hot
    subtraction are separate passes over a ``chunk × vocab`` tensor."""
    output = getattr(model, "output", None)
    if output is None:  # a non-last pipeline stage
        return model
    if type(output) is not nn.Linear and not isinstance(output, ChunkedLossLinear):
        raise ValueError(
            f"training.loss_chunk_size needs model.output to be an nn.Linear, got {type(output).__name__}; "
            "set training.loss_chunk_size = 0"
        )
    output.__class__ = ChunkedLossLinear
    output.chunk_size = chunk_size
    if compile_backend is not None:
        output.chunk_fn = torch.compile(_chunk_loss_and_grad, backend=compile_backend)
    return model


@contextlib.contextmanager
def labels_for_loss(model: nn.Module, labels: torch.Tensor) -> Iterator[None]:
    """While active, ``model(inputs)`` returns the token-mean loss against ``labels``."""
    output = getattr(model, "output", None)
    if not isinstance(output, ChunkedLossLinear):
        raise ValueError("labels_for_loss needs a model prepared with apply_chunked_loss")
    output.labels = labels
    try:
        yield
    finally:
        output.labels = None


def take_labels_kwarg(stage: nn.Module) -> nn.Module:
    """Let ``stage(h, labels=y)`` return the chunked loss against ``y`` if ``stage`` holds the
    chunked-loss output, and ignore ``labels`` otherwise (for pipeline stages, which receive
    the schedule's per-microbatch keyword arguments). Returns ``stage``."""

    def set_labels(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        labels = kwargs.pop("labels", None)
        output = getattr(module, "output", None)
        if isinstance(output, ChunkedLossLinear):
            output.labels = labels
        return args, kwargs

    def clear_labels(module: nn.Module, args: tuple, result: torch.Tensor) -> None:
        output = getattr(module, "output", None)
        if isinstance(output, ChunkedLossLinear):
            output.labels = None

    stage.register_forward_pre_hook(set_labels, with_kwargs=True)
    stage.register_forward_hook(clear_labels, always_call=True)
    return stage
