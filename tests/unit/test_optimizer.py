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
