"""Context parallel pieces that need no second process: the head-tail permutation, sharding
and its inverse, rotary positions under sharding, validation, and the CPU registration."""

from __future__ import annotations

import pytest
import torch

from torchtitan.config import ConfigError
from torchtitan.distributed.context_parallel import (
    head_tail_indices,
    prepare_model_for_cp,
    register_cpu_flash_attention,
    shard_sequence,
    unshard_sequence,
    validate_cp,
)
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.rope import apply_rotary_emb, precompute_freqs_cis


def test_head_tail_example() -> None:
    # 8 positions, 2 ranks, chunks of 2: rank 0 gets chunks 0 and 3, rank 1 chunks 1 and 2.
    assert head_tail_indices(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    # cp 4, chunks of 1: rank r holds positions r and 7 - r.
    assert head_tail_indices(8, 4).tolist() == [0, 7, 1, 6, 2, 5, 3, 4]


@pytest.mark.parametrize("seq_len,cp", [(8, 2), (24, 3), (32, 4)])
def test_head_tail_is_a_permutation_balancing_causal_work(seq_len: int, cp: int) -> None:
    perm = head_tail_indices(seq_len, cp)
    assert sorted(perm.tolist()) == list(range(seq_len))
    # Causal work of a query at position p is p + 1 keys: balanced shards do equal work,
    # contiguous ones do not.
    work = lambda positions: [int((c + 1).sum()) for c in positions.chunk(cp)]
    assert len(set(work(perm))) == 1
    assert len(set(work(torch.arange(seq_len)))) == cp


def test_head_tail_matches_torch_balancer() -> None:
    try:
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
            _HeadTailLoadBalancer,
        )
    except ImportError:
        pytest.skip("torch has no _HeadTailLoadBalancer here")
    for seq_len, cp in ((8, 2), (32, 4), (48, 3)):
        theirs = _HeadTailLoadBalancer(seq_len, cp, "cpu")._generate_indices()
        assert theirs.flatten().tolist() == head_tail_indices(seq_len, cp).tolist()


def test_head_tail_rejects_indivisible() -> None:
    with pytest.raises(ValueError, match="divisible"):
        head_tail_indices(10, 3)


@pytest.mark.parametrize("load_balance", [True, False])
@pytest.mark.parametrize("cp", [2, 4])
def test_shard_then_unshard_is_identity(cp: int, load_balance: bool) -> None:
    x = torch.randn(3, 16, 5)
    shards = [shard_sequence(x, 1, r, cp, load_balance) for r in range(cp)]
    assert all(s.shape == (3, 16 // cp, 5) for s in shards)
    assert torch.equal(unshard_sequence(shards, 1, load_balance), x)
    # Every token lands on exactly one rank.
    tokens = torch.arange(16)
    held = torch.cat([shard_sequence(tokens, 0, r, cp, load_balance) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(16))


@pytest.mark.parametrize("load_balance", [True, False])
def test_rotary_positions_follow_the_tokens(load_balance: bool) -> None:
    """Sharding q/k and the rotary table alike gives each token its global position's
    rotation: equal to rotating the whole sequence, then sharding."""
    cp, seq, heads, head_dim = 4, 16, 2, 8
    table = precompute_freqs_cis(head_dim, seq)
    q, k = torch.randn(2, seq, heads, head_dim), torch.randn(2, seq, heads, head_dim)
    full_q, full_k = apply_rotary_emb(q, k, table)
    for r in range(cp):
        local_q, local_k = apply_rotary_emb(
            shard_sequence(q, 1, r, cp, load_balance),
            shard_sequence(k, 1, r, cp, load_balance),
            shard_sequence(table, 0, r, cp, load_balance),
        )
        torch.testing.assert_close(local_q, shard_sequence(full_q, 1, r, cp, load_balance))
        torch.testing.assert_close(local_k, shard_sequence(full_k, 1, r, cp, load_balance))
    # Not sharding the table (positions 0.. on every rank) would be wrong on rank 1.
    wrong_q, _ = apply_rotary_emb(shard_sequence(q, 1, 1, cp, load_balance), k[:, : seq // cp], table)
    assert not torch.allclose(wrong_q, shard_sequence(full_q, 1, 1, cp, load_balance))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cp=2, seq_len=6, load_balance=True, rotate_method="allgather"), "divisible by 4"),
        (dict(cp=4, seq_len=6, load_balance=False, rotate_method="allgather"), "divisible by 4"),
        (dict(cp=2, seq_len=8, load_balance=True, rotate_method="ring"), "rotate_method"),
        (dict(cp=2, seq_len=12, load_balance=True, rotate_method="allgather", tp=4), "multiple of 8"),
    ],
)
def test_validation_names_the_option(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_cp(**kwargs)


def test_validation_accepts_good_settings() -> None:
    validate_cp(cp=1, seq_len=7, load_balance=True, rotate_method="allgather")
    validate_cp(cp=2, seq_len=8, load_balance=True, rotate_method="alltoall")
    validate_cp(cp=3, seq_len=9, load_balance=False, rotate_method="allgather")
    validate_cp(cp=2, seq_len=16, load_balance=True, rotate_method="allgather", tp=2)


def test_cpu_flash_attention_registered_with_the_cp_dispatcher() -> None:
    from torchtitan.distributed.context_parallel import _cp_attention

    _attention = _cp_attention()
    register_cpu_flash_attention()
    register_cpu_flash_attention()  # idempotent
    aten = torch.ops.aten
    for op in (
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    ):
        assert op in _attention.custom_ops
    # Registered in CP's own table only: DTensor's active handlers are untouched outside CP.
    from torch.distributed.tensor import DTensor

    assert aten._scaled_dot_product_flash_attention_for_cpu.default not in (
        DTensor._op_dispatcher._custom_op_handlers
    )


def test_prepare_model_turns_off_native_gqa() -> None:
    model = torch.nn.Sequential(ScaledDotProductAttention(), ScaledDotProductAttention(native_gqa=True))
    prepare_model_for_cp(model)
    assert [m.native_gqa for m in model] == [False, False]
