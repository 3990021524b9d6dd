"""What each activation-checkpointing setting recomputes, counted on a real backward.

A 4-layer Llama (fp32, CPU, one process): the matmuls and attention forwards that run during
backward are the recomputation. Per block: full AC reruns 6 matmuls (w2's output is never
needed again) and the attention forward; op AC saving every other matmul reruns 3 (wk, wo,
w3) and no attention; saving every matmul reruns none; saving none (attention's output only)
reruns full AC's 6 and no attention. ``op_ac_layers = N`` gives layers
0..N-1 op AC and the others full AC (``later_layers = "attention"``: attention-only op AC).
Gradients must not change.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan.config import ConfigError
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

N_LAYERS = 4
SDPA = "_scaled_dot_product_flash_attention_for_cpu"


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward(*ac_args) -> tuple[Counter, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    args = TransformerModelArgs(dim=64, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)
    model = Transformer(args)
    model.init_weights()
    if ac_args:
        apply_ac(model, *ac_args)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(tokens).float().logsumexp(-1).mean()
    with _Count() as counter:
        loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return counter.ops, grads


@pytest.fixture(scope="module")
def plain() -> tuple[Counter, dict[str, torch.Tensor]]:
    return _backward()


@pytest.mark.parametrize(
    "ac_args,extra_mm,sdpa",
    [
        (("full",), 6 * N_LAYERS, N_LAYERS),
        (("selective", "op"), 3 * N_LAYERS, 0),
        (("selective", "op", "all"), 0, 0),
        (("selective", "op", "none"), 6 * N_LAYERS, 0),  # full AC's matmul reruns, no attention
        (("selective", "op", "every_other", 1), 3 + 6 * 3, 3),  # layer 0 op, 1-3 full
        (("selective", "op", "all", 3), 0 + 6, 1),  # layers 0-2 op (all saved), 3 full
        (("selective", "op", "every_other", 0), 6 * N_LAYERS, N_LAYERS),  # = full
        (("selective", "op", "every_other", 10), 3 * N_LAYERS, 0),  # more than the model has = op
        (("selective", "op", "all", 1, "attention"), 0 + 6 * 3, 0),  # layer 0 op (all), 1-3 attention only
    ],
)
def test_recomputation_and_gradients(plain, ac_args, extra_mm, sdpa):
    ops, grads = _backward(*ac_args)
    base_ops, base_grads = plain
    assert ops["mm"] - base_ops["mm"] == extra_mm, (ops["mm"], base_ops["mm"])
    assert ops[SDPA] - base_ops.get(SDPA, 0) == sdpa
    assert grads.keys() == base_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, base_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_saved_matmuls_is_refused():
    args = TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)
    with pytest.raises(ConfigError, match="op_saved_matmuls"):
        apply_ac(Transformer(args), "selective", "op", "some")


def test_op_ac_saves_float8_amax():
    """Float8 linears scale each cast by max(|x|); op AC keeps that scalar, so the recompute
    before backward does not reduce over the activations again (torchao's CPU float8 path)."""
    pytest.importorskip("torchao.float8")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def backward_ops(*ac_args) -> Counter:
        torch.manual_seed(0)
        args = TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32)
        model = Transformer(args)
        model.init_weights()
        convert_to_float8_training(
            model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
            module_filter_fn=lambda _, fqn: fqn != "output",
        )
        if ac_args:
            apply_ac(model, *ac_args)
        loss = model(torch.randint(0, 128, (2, 32))).float().logsumexp(-1).mean()
        with _Count() as counter:
            loss.backward()
        return counter.ops

    plain, op, full = backward_ops(), backward_ops("selective", "op", "all"), backward_ops("full")
    assert full["max"] > plain["max"] > 0  # recomputing the forward casts does rerun amax
    assert op["max"] == plain["max"]  # op AC keeps them
    assert op["mm"] == plain["mm"]
