"""Chunked output projection + cross-entropy: the full fp32 logits are never materialised.

For Llama 3 the logits are ``tokens × 128K`` floats: 4 GiB in fp32 for 8192 tokens, the
largest activation of the step. Here the tokens are cut into chunks, and each chunk's
gradients are computed in the *forward*: its logits, the summed cross-entropy, the gradient
of that sum with respect to the logits (softmax minus the one-hot label) written over the
logits themselves, and from it the chunk's share of the hidden states' gradient and of the
weight's, after which the chunk's buffer is dropped. Backward only scales the two saved
gradients by the incoming one. Compared with the plain loss no matmul is added and the
logits' gradient needs no second buffer: a chunk costs 2 bytes per bf16 logit (compiled:
one fused kernel; eager: a block of rows at a time), so the chunks can be large. One chunk
(``loss_chunk_size`` >= the tokens of a microbatch) takes the weight's gradient in one matmul;
with more, the chunks' shares of the weight's gradient are added in fp32 (a read and a write
of ``vocab × dim`` floats per chunk). Measured on H200s (docs/performance.md), chunks cost
1-8% more time than the compiled plain loss at 16K tokens (by machine), for their memory. The
result equals the plain token-mean cross-entropy: the same matmuls and the same fp32
log-softmax, summed per chunk and divided by the token count once. Without gradients
(validation, ``torch.no_grad``) only the loss is computed.

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
EAGER_BLOCK_ELEMENTS = 1 << 25  # eager: fp32 temporaries of this many elements at a time (128 MiB)


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One chunk's summed cross-entropy without gradients, its fp32 work a block of rows at a
    time (validation runs beside the training state: no temporary beyond the chunk's logits)."""
    logits = F.linear(hidden, weight)
    total = logits.new_zeros((), dtype=torch.float32)
    for rows in _row_blocks(logits):
        total += F.cross_entropy(logits[rows].float(), labels[rows], reduction="sum", ignore_index=IGNORE_INDEX)
    return total


def _row_blocks(logits: torch.Tensor) -> Iterator[slice]:
    """Slices of ``logits``' rows holding ``EAGER_BLOCK_ELEMENTS`` elements or fewer (one row at least)."""
    rows = max(1, EAGER_BLOCK_ELEMENTS // logits.shape[-1])
    return (slice(start, start + rows) for start in range(0, logits.shape[0], rows))


def _loss_and_logits_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of ``logits`` and its gradient with respect to them (in the
    logits' dtype): ``softmax(logits) - onehot(labels)``, zero on ignored tokens. Every
    element's arithmetic is fp32 and pointwise, the one-hot a comparison: compiled (through
    :func:`_overwrite_with_grad`), one fused kernel and no fp32 copy of the logits."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    valid = (labels != IGNORE_INDEX).unsqueeze(-1)
    target = labels.clamp(min=0).unsqueeze(-1)
    loss = ((lse - lf.gather(-1, target)) * valid).sum()
    onehot = torch.arange(lf.shape[-1], device=lf.device) == target
    grad = (torch.exp(lf - lse) - onehot.float()) * valid
    return loss, grad.to(logits.dtype)


def _overwrite_with_grad(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Write the logits' gradient over them and return their summed cross-entropy. The form
    to compile: the logits are the graph's input, so inductor's one fused kernel stores the
    gradient into their buffer (as an intermediate, it may allocate another)."""
    loss, grad = _loss_and_logits_grad(logits, labels)
    logits.copy_(grad)
    return loss


def _chunk_loss_and_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    overwrite: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and logits gradient, the gradient written over the
    logits (2 bytes per element in bf16): by ``overwrite`` (a compiled
    :func:`_overwrite_with_grad`) for the whole chunk at once, else eagerly a block of rows at
    a time, so the fp32 temporaries stay small whatever the chunk."""
    logits = F.linear(hidden, weight)
    if overwrite is not None:
        return overwrite(logits, labels), logits
    total = logits.new_zeros((), dtype=torch.float32)
    for rows in _row_blocks(logits):
        total += _overwrite_with_grad(logits[rows], labels[rows])
    return total, logits


# torch 2.11's CPU inductor sums the loss after its kernel wrote the gradient over the
# logits (the gradient is right, the loss is not; measured 2026-12-03): there the CPU keeps
# the eager blocks. CUDA and torch 2.13 are right (tests/gpu, tests/unit/test_chunked_loss.py).
_CPU_INPLACE_LOSS_WRONG = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


def compiled_chunk_fn(backend: str = "inductor", options: dict | None = None) -> Callable:
    """The chunk function with its loss and gradient compiled (one fused kernel per chunk);
    ``options``: inductor's, for measuring kernel choices (``scripts/benchmark_chunked_loss.py``)."""
    compiled = torch.compile(_overwrite_with_grad, backend=backend, options=options)

    def chunk(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden.device.type == "cpu" and _CPU_INPLACE_LOSS_WRONG and backend == "inductor":
            return _chunk_loss_and_grad(hidden, weight, labels)
        return _chunk_loss_and_grad(hidden, weight, labels, overwrite=compiled)

    return chunk


_FP32_OUT_MATMUL = True  # cleared when this torch's mm/addmm have no out_dtype variant


def _matmul_into_fp32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
    """``a @ b`` in fp32 (``acc`` is None) or ``acc += a @ b``, for bf16 ``a``, ``b``: on CUDA
    one GEMM that writes, or adds into, fp32 in its epilogue (``out_dtype``); elsewhere the
    product in the inputs' dtype, then converted or added."""
    global _FP32_OUT_MATMUL
    if a.dtype == torch.float32:
        return a @ b if acc is None else torch.addmm(acc, a, b, out=acc)
    if a.is_cuda and _FP32_OUT_MATMUL:
        try:
            if acc is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError):
            _FP32_OUT_MATMUL = False
    return (a @ b).float() if acc is None else acc.add_(a @ b)


class _LinearCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T``, chunk by chunk, gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, chunk_fn):  # noqa: ANN001, ANN205
        need_h, need_w = ctx.needs_input_grad[:2]  # a frozen output weight needs no gradient
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # one chunk: a single matmul in the weight's dtype; more: fp32 accumulated
        single = hidden.shape[0] <= chunk_size
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            loss, grad_logits = chunk_fn(h, weight, labels[start : start + chunk_size])
            total += loss
            if grad_h is not None:
                torch.mm(grad_logits, weight, out=grad_h[start : start + chunk_size])
            if need_w:
                if single:
                    grad_w = grad_logits.t() @ h
                else:
                    grad_w = _matmul_into_fp32(grad_logits.t(), h, grad_w)
            del loss, grad_logits  # freed before the next chunk's logits take their place
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
    ``chunk_fn`` computes one chunk's summed loss and logits gradient (``compiled_chunk_fn()``,
    say; by default the eager form, in blocks of rows).
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
        output.chunk_fn = compiled_chunk_fn(compile_backend)
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
