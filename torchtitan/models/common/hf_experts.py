"""Routed experts between our stacked weights and Hugging Face's layouts.

Every MoE family stores its experts the same way and so does Hugging Face, so the families'
state-dict adapters share this and keep only their own names. Ours are stacked,
``layers.{i}.moe.experts.w1``/``w3`` ``[E, hidden, dim]`` and ``w2`` ``[E, dim, hidden]``. The
checkpoints on the Hub hold one tensor per expert, ``model.layers.{i}.mlp.experts.{j}.gate_proj.weight``
(w1), ``up_proj`` (w3), ``down_proj`` (w2). transformers 5 fuses them when it loads:
``mlp.experts.gate_up_proj`` ``[E, 2*hidden, dim]``, gate rows first, and
``mlp.experts.down_proj`` ``[E, dim, hidden]``. :func:`experts_to_hf` writes either layout;
:func:`experts_from_hf` reads either, then :func:`stack_experts` stacks the per-expert ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["EXPERT_KEYS", "PerExpert", "experts_to_hf", "experts_from_hf", "stack_experts", "add_zero_expert_bias"]

# our stacked name -> Hugging Face's per-expert name, inside a layer
EXPERT_KEYS = {"moe.experts.w1": "gate_proj", "moe.experts.w3": "up_proj", "moe.experts.w2": "down_proj"}
_OURS_BY_HF = {hf: ours for ours, hf in EXPERT_KEYS.items()}
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# (layer, our stacked name) -> expert index -> that expert's tensor
PerExpert = dict[tuple[str, str], dict[int, torch.Tensor]]


def experts_to_hf(
    state: Mapping[str, torch.Tensor], layer: str, name: str, value: torch.Tensor, fused: bool
) -> dict[str, torch.Tensor]:
    """Hugging Face's tensors for ``value``, our ``name`` (a key of :data:`EXPERT_KEYS`) of
    ``layer``: one per expert, or with ``fused`` ``gate_up_proj`` (from ``w1``, which takes
    ``w3`` from ``state``, so ``w3`` gives nothing) and ``down_proj``."""
    prefix = f"model.layers.{layer}."
    if not fused:
        return {
            f"{prefix}mlp.experts.{j}.{EXPERT_KEYS[name]}.weight": expert.contiguous()
            for j, expert in enumerate(value.unbind(0))
        }
    if name == "moe.experts.w2":
        return {f"{prefix}mlp.experts.down_proj": value.contiguous()}
    if name == "moe.experts.w1":
        w3 = state[f"layers.{layer}.moe.experts.w3"]
        return {f"{prefix}mlp.experts.gate_up_proj": torch.cat([value, w3], dim=1)}
    return {}


def experts_from_hf(
    layer: str, name: str, value: torch.Tensor, per_expert: PerExpert
) -> dict[str, torch.Tensor] | None:
    """Our tensors for Hugging Face's ``name`` (inside ``layer``), None if it is no routed
    expert's. A fused tensor converts at once; a per-expert one waits in ``per_expert`` for
    :func:`stack_experts` (so ``{}``): the caller may hand over a layer's experts key by key."""
    expert = _HF_EXPERT.match(name)
    if expert is not None:
        per_expert.setdefault((layer, _OURS_BY_HF[expert.group(2)]), {})[int(expert.group(1))] = value
        return {}
    prefix = f"layers.{layer}."
    if name == "mlp.experts.gate_up_proj":
        w1, w3 = value.chunk(2, dim=1)
        return {prefix + "moe.experts.w1": w1.contiguous(), prefix + "moe.experts.w3": w3.contiguous()}
    if name == "mlp.experts.down_proj":
        return {prefix + "moe.experts.w2": value.contiguous()}
    return None


def stack_experts(per_expert: PerExpert) -> dict[str, torch.Tensor]:
    """Our stacked weights from the per-expert tensors :func:`experts_from_hf` gathered;
    ValueError unless each weight has exactly the experts ``0..n-1``."""
    out: dict[str, torch.Tensor] = {}
    for (layer, name), tensors in per_expert.items():
        n = len(tensors)
        if sorted(tensors) != list(range(n)):
            raise ValueError(f"layer {layer} {name}: experts {sorted(tensors)} are not 0..{n - 1}")
        out[f"layers.{layer}.{name}"] = torch.stack([tensors[j] for j in range(n)])
    return out


def add_zero_expert_bias(out: dict[str, torch.Tensor], num_experts: int, first_moe_layer: int = 0) -> None:
    """A zero ``expert_bias`` (the MoE's persistent load-balancing buffer, which Hugging Face's
    checkpoints may lack) for every layer from ``first_moe_layer`` on that ``out`` has a
    tensor of and no bias. Cheap: the checkpoint code calls ``from_hf`` key by key."""
    layers = {int(m.group(1)) for k in out if (m := _OURS_LAYER.match(k))}
    for layer in layers:
        if layer >= first_moe_layer:
            out.setdefault(f"layers.{layer}.moe.expert_bias", torch.zeros(num_experts, dtype=torch.float32))
