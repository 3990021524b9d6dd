import pytest
import torch

from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for-loop"])
def test_implementations_agree_with_torch_adamw(implementation):
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    ours = torch.nn.Linear(8, 4)
    ours.load_state_dict(ref.state_dict())
    settings = OptimizerConfig(lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.05,
                                 implementation=implementation)
    opt = build_optimizers([ours], settings)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.8, 0.9), eps=1e-6,
                                weight_decay=0.05, foreach=False)
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, o in ((ref, ref_opt), (ours, opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="optimizer.name"):
        build_optimizers([torch.nn.Linear(2, 2)], OptimizerConfig(name="Lion"))


def test_state_dict_round_trip_uses_fqn_keys():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = build_optimizers([m], OptimizerConfig(implementation="foreach"))
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    assert any(k.startswith("state.0.weight") for k in sd), sorted(sd)[:5]

    m2 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    m2.load_state_dict(m.state_dict())
    opt2 = build_optimizers([m2], OptimizerConfig(implementation="foreach"))
    opt2.load_state_dict(sd)
    for k, v in opt2.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, sd[k])


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
@pytest.mark.parametrize("implementation", ["fused", "foreach", "for-loop"])
def test_state_created_before_the_first_step_trains_bit_for_bit_the_same(name, implementation):
    """``init_state`` makes the moments exist (zeros, step 0) and changes no weight; the
    steps after it equal, bit for bit, those of an optimizer that made them lazily, with
    weight decay, a warmup schedule and the fused kernels' gradient scale."""
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.config import LRScheduler

    torch.manual_seed(0)
    lazy, early = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    early.load_state_dict(lazy.state_dict())
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    early.register_parameter("frozen", frozen)
    settings = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1, implementation=implementation)
    opts = {id(m): build_optimizers([m], settings) for m in (lazy, early)}
    scheds = {k: build_lr_schedulers(o, 5, LRScheduler(warmup_steps=2)) for k, o in opts.items()}
    before = {k: v.clone() for k, v in early.state_dict().items()}
    opts[id(early)].init_state()
    inner = opts[id(early)].optimizers[0]
    assert {k: v for k, v in early.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in early.state_dict().items())
    assert all(p.grad is None for p in early.parameters())
    assert len(inner.state) == 2 and frozen not in inner.state
    for state in inner.state.values():
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert inner.param_groups[0]["lr"] == opts[id(lazy)].optimizers[0].param_groups[0]["lr"] > 0
    fused = opts[id(lazy)].supports_found_inf
    x = torch.randn(16, 8)
    for _ in range(4):
        for m in (lazy, early):
            opts[id(m)].zero_grad()
            m(x).pow(2).sum().backward()
            scale = torch.tensor(2.0) if fused else None
            opts[id(m)].step(grad_scale=scale)
            scheds[id(m)].step()
    for a, b in zip(lazy.parameters(), [early.weight, early.bias]):
        assert torch.equal(a, b)
    for (pa, a), (pb, b) in zip(opts[id(lazy)].optimizers[0].state.items(), inner.state.items()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    opts[id(early)].init_state()  # holds state now: left alone
    assert float(next(iter(inner.state.values()))["step"]) == 4
