"""Chunked output projection + cross-entropy equals the plain loss, and never builds the
full logits."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan.components.chunked_loss import (
    ChunkedLossLinear,
    apply_chunked_loss,
    chunked_cross_entropy,
    labels_for_loss,
)
from torchtitan.config import ConfigError, JobConfig
from torchtitan.models.llama3 import Transformer, llama3_configs

VOCAB, DIM = 96, 16


def _plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), labels.flatten())


def _data(seed: int = 0, ignore: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 10, DIM, generator=g, dtype=torch.float64).float()
    weight = torch.randn(VOCAB, DIM, generator=g) * 0.3
    labels = torch.randint(0, VOCAB, (3, 10), generator=g)
    if ignore:
        labels[0, :4] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 7, 30, 64])
@pytest.mark.parametrize("ignore", [False, True])
def test_loss_and_gradients_equal_plain(chunk_size: int, ignore: bool) -> None:
    hidden, weight, labels = _data(ignore=ignore)
    grads = []
    losses = []
    for fn in (_plain, lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for chunked, plain in zip(grads[1], grads[0]):
        torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)


class _MaxMatmulRows(TorchDispatchMode):
    """Largest row count of any [rows, VOCAB] matmul result, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "matmul", "bmm") and out.shape[-1] == VOCAB:
            self.rows = max(self.rows, out.numel() // VOCAB)
        return out


def test_full_logits_never_materialised() -> None:
    hidden, weight, labels = _data()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _MaxMatmulRows() as plain:
        _plain(h, w, labels).backward()
    with _MaxMatmulRows() as chunked:
        chunked_cross_entropy(h, w, labels, 8).backward()
    assert plain.rows == 30  # the check sees the full logits when they exist
    assert chunked.rows == 8


def test_bad_chunk_size() -> None:
    hidden, weight, labels = _data()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, labels, 0)


def test_model_output_returns_loss_only_with_labels() -> None:
    args = dataclasses.replace(
        copy.deepcopy(llama3_configs["debugmodel"]), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        vocab_size=VOCAB, multiple_of=16, max_seq_len=12,
    )
    torch.manual_seed(0)
    plain = Transformer(args)
    plain.init_weights()
    chunked = copy.deepcopy(plain)
    apply_chunked_loss(chunked, chunk_size=5)
    assert isinstance(chunked.output, ChunkedLossLinear)
    assert chunked.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, VOCAB, (2, 12))
    labels = torch.randint(0, VOCAB, (2, 12))
    # Without labels it is still the plain projection.
    torch.testing.assert_close(chunked(tokens), plain(tokens), rtol=0, atol=0)
    loss = F.cross_entropy(plain(tokens).flatten(0, 1).float(), labels.flatten())
    loss.backward()
    with labels_for_loss(chunked, labels):
        chunked_loss = chunked(tokens)
    chunked_loss.backward()
    assert chunked.output.labels is None
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-6, msg=name)


def test_compiles_to_the_same_loss() -> None:
    hidden, weight, labels = _data()
    fn = torch.compile(chunked_cross_entropy, backend="aot_eager")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels, 8)
    loss.backward()
    torch.testing.assert_close(loss, _plain(hidden, weight, labels), rtol=1e-6, atol=1e-6)
    assert h.grad is not None and w.grad is not None


def test_refused_with_tp() -> None:
    jc = JobConfig()
    jc.training.loss_chunk_size = 128
    jc.parallelism.tensor_parallel_degree = 2
    with pytest.raises(ConfigError, match="training.loss_chunk_size"):
        jc.validate()


def test_a_stage_takes_labels_as_a_keyword() -> None:
    """A pipeline stage gets the schedule's keyword arguments: the last stage returns the
    chunked loss against them, a stage without the output ignores them, and the labels do not
    outlive the call (a later plain call returns logits)."""
    from torchtitan.components.chunked_loss import take_labels_kwarg

    class LastStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.output = nn.Linear(16, 32, bias=False)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.output(self.norm(h))

    torch.manual_seed(0)
    last = LastStage()
    apply_chunked_loss(last, 5)
    take_labels_kwarg(last)
    h, y = torch.randn(2, 7, 16), torch.randint(0, 32, (2, 7))
    loss = last(h, labels=y)
    torch.testing.assert_close(loss, _plain(last.norm(h), last.output.weight, y), rtol=1e-6, atol=1e-6)
    assert last(h).shape == (2, 7, 32)
    middle = take_labels_kwarg(nn.Linear(16, 16))
    torch.testing.assert_close(middle(h, labels=y), middle(h))


def test_compiled_chunks_give_the_same_loss_and_gradients() -> None:
    """``compile_backend`` compiles each chunk's projection + loss (eager checkpointing
    around it, so backward still recomputes one chunk at a time); the last chunk is shorter."""
    torch.manual_seed(0)
    plain = nn.Sequential()
    plain.output = nn.Linear(DIM, VOCAB, bias=False)
    chunked = copy.deepcopy(plain)
    apply_chunked_loss(chunked, 8, compile_backend="aot_eager")
    assert chunked.output.chunk_fn is not ChunkedLossLinear.chunk_fn
    hidden, _, labels = _data(ignore=True)  # 30 tokens: chunks of 8, 8, 8, 6
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss = _plain(h1, plain.output.weight, labels)
    loss.backward()
    with labels_for_loss(chunked, labels):
        chunked_loss = chunked.output(h2)
    chunked_loss.backward()
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.output.weight.grad, plain.output.weight.grad, rtol=1e-6, atol=1e-6)


def test_no_matmul_is_added_and_backward_only_scales() -> None:
    """The gradients are made in the forward: the step's matmul FLOPs equal the plain loss's
    (no recomputed projection), and backward runs no matmul at all."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, labels = _data(ignore=True)
    counts = []
    for fn in (_plain, lambda h, w, y: chunked_cross_entropy(h, w, y, 8)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with FlopCounterMode(display=False) as fwd:
            loss = fn(h, w, labels)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        counts.append((fwd.get_total_flops(), bwd.get_total_flops()))
    (plain_f, plain_b), (chunk_f, chunk_b) = counts
    assert plain_b > 0 and chunk_b == 0
    assert chunk_f == plain_f + plain_b


def test_without_gradients_only_the_loss() -> None:
    hidden, weight, labels = _data(ignore=True)
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, labels, 7)
    torch.testing.assert_close(loss, _plain(hidden, weight, labels), rtol=1e-6, atol=1e-6)
    frozen = chunked_cross_entropy(hidden, weight, labels, 7)  # nothing requires a gradient
    assert not frozen.requires_grad


def test_bf16_matches_the_plain_loss() -> None:
    """In bf16 (the GPU dtype) the chunks' fp32 weight-gradient accumulation keeps the result
    as close to fp32 as the plain loss's single matmul is."""
    hidden, weight, labels = _data(ignore=True)
    ref = []
    for dtype, fn in ((torch.float32, _plain), (torch.bfloat16, _plain),
                      (torch.bfloat16, lambda h, w, y: chunked_cross_entropy(h, w, y, 4))):
        h = hidden.to(dtype).clone().requires_grad_()
        w = weight.to(dtype).clone().requires_grad_()
        loss = fn(h, w, labels)
        loss.backward()
        ref.append((loss.float(), h.grad.float(), w.grad.float()))
    exact, plain_bf16, chunked_bf16 = ref
    for e, p, c in zip(exact, plain_bf16, chunked_bf16):
        err_plain = (p - e).abs().max().item()
        assert (c - e).abs().max().item() <= 2 * err_plain + 1e-3


def test_a_retained_graph_runs_backward_twice() -> None:
    """The zero-bubble pipeline schedules run backward once for the inputs and again for the
    weights on a retained graph: both passes give the plain loss's gradients."""
    hidden, weight, labels = _data()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunked_cross_entropy(h, w, labels, 8)
    (gh,) = torch.autograd.grad(loss, [h], retain_graph=True)
    (gw,) = torch.autograd.grad(loss, [w])
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    _plain(h2, w2, labels).backward()
    torch.testing.assert_close(gh, h2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, w2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_a_frozen_input_gets_no_gradient_and_the_other_the_plain_one(frozen: str) -> None:
    hidden, weight, labels = _data(ignore=True)
    h, w = hidden.clone().requires_grad_(frozen != "hidden"), weight.clone().requires_grad_(frozen != "weight")
    chunked_cross_entropy(h, w, labels, 8).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    _plain(h2, w2, labels).backward()
    assert (h.grad is None) == (frozen == "hidden") and (w.grad is None) == (frozen == "weight")
    got, want = (w.grad, w2.grad) if frozen == "hidden" else (h.grad, h2.grad)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class _LargestVocabTemporary(TorchDispatchMode):
    """Elements of the largest ``[..., VOCAB]`` tensor an op creates (views and in-place results
    excepted), and the ``[VOCAB, DIM]`` matmuls by kind (``mm`` makes, ``addmm`` accumulates)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.weight_matmuls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == VOCAB
                and out.untyped_storage().data_ptr() not in inputs and name != "mm"):
            self.numel = max(self.numel, out.numel())
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (VOCAB, DIM) and name in ("mm", "addmm"):
            self.weight_matmuls.append(name)
        return out


@pytest.mark.parametrize("chunk_size", [8, 30, 64])
def test_eager_chunks_overwrite_the_logits_in_blocks(monkeypatch, chunk_size: int) -> None:
    """Eager, the logits' gradient is written over the logits 3 rows at a time, and without
    gradients the loss is summed 3 rows at a time: no temporary over the vocabulary is
    larger than a block; the results are the plain loss's."""
    import torchtitan.components.chunked_loss as cl

    monkeypatch.setattr(cl, "EAGER_BLOCK_ELEMENTS", 3 * VOCAB)
    hidden, weight, labels = _data(ignore=True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestVocabTemporary() as seen:
        loss = chunked_cross_entropy(h, w, labels, chunk_size)
    loss.backward()
    assert seen.numel == 3 * VOCAB
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = _plain(h2, w2, labels)
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), _LargestVocabTemporary() as seen:  # validation: the loss alone
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size)
    assert seen.numel == 3 * VOCAB
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("chunk_size", "matmuls"), [(30, ["mm"]), (64, ["mm"]), (8, ["mm"] + 3 * ["addmm"])])
def test_one_chunk_takes_the_weight_gradient_in_one_matmul(chunk_size: int, matmuls: list[str]) -> None:
    """A chunk as large as the tokens (30) or larger needs no accumulator: one matmul makes
    the weight's gradient; chunks of 8 make the first share and add three more into it."""
    hidden, weight, labels = _data()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestVocabTemporary() as seen:
        chunked_cross_entropy(h, w, labels, chunk_size).backward()
    assert seen.weight_matmuls == matmuls
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    _plain(h2, w2, labels).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-6, atol=1e-6)


def test_inductor_writes_the_gradient_over_the_logits() -> None:
    """Compiled by inductor (as the trainer compiles it), the chunk's gradient lands in the
    logits' own buffer, equal to the eager blocks' result."""
    from torchtitan.components.chunked_loss import _chunk_loss_and_grad, compiled_chunk_fn

    hidden, weight, labels = _data(ignore=True)
    h, w, y = hidden.flatten(0, 1), weight, labels.flatten()
    loss, grad = compiled_chunk_fn("inductor")(h, w, y)
    ref_loss, ref_grad = _chunk_loss_and_grad(h, w, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert grad.sum(-1).abs().max() < 1e-4  # softmax minus one-hot: rows sum to zero, not logits
