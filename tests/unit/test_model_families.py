"""What every model family's debug flavor must do, the same test for each (the family
contract, docs/models.md): built from the registry alone, it learns on this CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchtitan.models import get_model_args, get_model_spec


@pytest.mark.parametrize("family, flavor", [("llama3", "debugmodel"), ("qwen3", "debugmodel_moe"),
                                            ("deepseek_v3", "debugmodel")])
def test_debug_flavor_learns_on_cpu(family, flavor):
    """Eight AdamW steps on one fixed batch cut the loss by more than one nat."""
    args = get_model_args(family, flavor)
    args.vocab_size, args.max_seq_len = 256, 64
    torch.manual_seed(0)
    model = get_model_spec(family).model_cls(args)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
