"""The project's training loss against first principles.

The parity tests compare every layout with a reference that writes cross-entropy out by
hand, so a wrong ``torchtitan.components.loss`` shows there as a mismatch; these tests pin
the loss itself: what it must be for logits whose answer is known, and how the trainer's
per-microbatch losses add up to the per-token mean of the whole global batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from torchtitan.components.loss import build_loss_fn, cross_entropy_loss

VOCAB = 50


def _by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(label), p = exp(logit) / sum(exp(logits)), in float64, averaged over every token
    whose label is not -100."""
    z = logits.double().flatten(0, 1)
    y = labels.flatten()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for row, label in zip(z, y.tolist()):
        if label == -100:
            continue
        total += torch.log(torch.exp(row - row.max()).sum()) + row.max() - row[label]
        count += 1
    return total / count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_logits_give_log_vocab(dtype):
    """Every token equally likely: the loss is ln(vocab) per token, whatever the batch shape
    (a sum per sequence, or a mean over sequences only, would scale it with the length)."""
    for batch, seq in ((1, 1), (3, 7), (2, 64)):
        logits = torch.full((batch, seq, VOCAB), 0.25, dtype=dtype)
        labels = torch.randint(0, VOCAB, (batch, seq))
        assert cross_entropy_loss(logits, labels).item() == pytest.approx(math.log(VOCAB), rel=1e-6)
        assert build_loss_fn()(logits, labels).item() == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_equals_per_token_mean_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (3, 11), generator=g)
    loss = cross_entropy_loss(logits, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_by_hand(logits, labels).item(), rel=1e-6)


def test_ignored_tokens_leave_the_mean():
    """Labels -100 count neither in the sum nor in the denominator (rows of unequal length)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (3, 9), generator=g)
    labels[0, 2:] = -100
    labels[2, 5:] = -100
    assert cross_entropy_loss(logits, labels).item() == pytest.approx(_by_hand(logits, labels).item(), rel=1e-6)


def test_microbatches_and_ranks_add_up_to_the_global_token_mean():
    """The trainer scales each microbatch's loss by 1 / microbatches, sums them, and averages
    over the data-parallel ranks (every microbatch holds the same number of tokens): that
    must be the per-token mean over all tokens of the global batch."""
    g = torch.Generator().manual_seed(2)
    ranks, microbatches, rows, seq = 2, 3, 2, 5
    logits = torch.randn(ranks * microbatches * rows, seq, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, logits.shape[:2], generator=g)
    per_rank = []
    for r in range(ranks):
        mine = slice(r * microbatches * rows, (r + 1) * microbatches * rows)
        chunks = zip(logits[mine].split(rows), labels[mine].split(rows))
        per_rank.append(sum(cross_entropy_loss(x, y) / microbatches for x, y in chunks))
    trainer_loss = torch.stack(per_rank).mean()
    assert trainer_loss.item() == pytest.approx(_by_hand(logits, labels).item(), rel=1e-6)


def test_gradient_is_softmax_minus_one_hot_over_tokens():
    """d loss / d logits = (softmax - one_hot(label)) / tokens: the scale the optimizer sees."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, VOCAB, generator=g, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 4), generator=g)
    cross_entropy_loss(logits, labels).backward()
    z = logits.detach().double()
    expected = (torch.exp(z) / torch.exp(z).sum(-1, keepdim=True) - torch.eye(VOCAB, dtype=torch.float64)[labels]) / 8
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-8)
