"""Optimizers over one or more model parts (several when pipeline stages live on one rank).

A container keeps one optimizer per model part so that each part's parameters (possibly
DTensors on different meshes) step together, while the trainer and the checkpoint manager
see a single object.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.tools.logging import logger

_OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}


def _implementation_kwargs(implementation: str, params: list[torch.Tensor]) -> dict:
    if implementation == "for-loop":
        return {"foreach": False, "fused": False}
    if implementation == "foreach":
        return {"foreach": True}
    # fused: supported for floating-point params on CUDA and (torch >= 2.4) CPU.
    devices = {p.device.type for p in params}
    if devices <= {"cuda", "cpu"}:
        return {"fused": True}
    return {"foreach": True}


class OptimizersContainer:
    """One optimizer per model part, stepped and checkpointed together."""

    def __init__(self, model_parts: list[nn.Module], settings: OptimizerConfig):
        settings.validate()  # the config section is the one home of the allowed values
        self.model_parts = model_parts
        self.optimizers: list[torch.optim.Optimizer] = []
        cls = _OPTIMIZERS[settings.name]
        for part in model_parts:
            params = [p for p in part.parameters() if p.requires_grad]
            kwargs = dict(
                lr=settings.lr,
                betas=(settings.beta1, settings.beta2),
                eps=settings.eps,
                weight_decay=settings.weight_decay,
                **_implementation_kwargs(settings.implementation, params),
            )
            try:
                opt = cls(params, **kwargs)
            except RuntimeError as e:  # fused kernel unavailable for these params
                logger.warning(f"fused {settings.name} unavailable ({e}); using foreach")
                kwargs.pop("fused", None)
                kwargs["foreach"] = True
                opt = cls(params, **kwargs)
            self.optimizers.append(opt)

    def __iter__(self):
        return iter(self.optimizers)

    def __len__(self) -> int:
        return len(self.optimizers)

    @property
    def supports_found_inf(self) -> bool:
        """Whether every optimizer is a fused kernel, which can skip its update on device
        (``found_inf``): the trainer then checks for non-finite steps without a host sync."""
        return all(g.get("fused") for opt in self.optimizers for g in opt.param_groups)

    def step(self, found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> None:
        """One update of every optimizer. Fused optimizers only (``supports_found_inf``):
        with ``found_inf`` (a 0-dim float tensor) the kernels leave weights, moments and step
        counts untouched where it is 1; with ``grad_scale`` (0-dim) they divide each gradient
        by it as they read it (and store the result back), as for torch's GradScaler: the
        trainer's gradient clipping without a pass of its own over the gradients."""
        for opt in self.optimizers:
            if found_inf is None and grad_scale is None:
                opt.step()
                continue
            # read by torch's fused Adam/AdamW, as GradScaler sets them
            opt.found_inf, opt.grad_scale = found_inf, grad_scale
            try:
                opt.step()
            finally:
                del opt.found_inf, opt.grad_scale

    def init_state(self) -> None:
        """Create every optimizer's moments now, before the first forward, as a resumed run's
        load does: otherwise they arrive at the end of step 1, into memory the activations
        just left, and step 2 has to fit its activations around them (on an 80 GB-capped
        H200, 3B at seq 131,072: step 2's reserved peak was ~2 GiB above every later step's). One step at
        learning rate 0 on zero gradients, then the moments and step counts back to 0, the
        zeros a first step would start from; the weights are untouched, so training is bit
        for bit the same. Optimizers that already hold state (loaded) are left alone."""
        for opt in self.optimizers:
            if opt.state:
                continue
            params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            if any(p.grad is not None for p in params):
                continue  # mid-step: leave it to the step
            lrs = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
            for p in params:
                p.grad = torch.zeros_like(p)
            try:
                opt.step()
            finally:
                for g, lr in zip(opt.param_groups, lrs):
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
            # Adam's L2 decay adds the weights to the zero gradients: zero the moments too.
            for state in opt.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
                    else:
                        state[key] = type(value)(0)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Flattened, layout-independent keys (FQN based), merged over model parts."""
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        merged: dict[str, Any] = {}
        for part, opt in zip(self.model_parts, self.optimizers):
            merged.update(get_optimizer_state_dict(part, opt, options=options))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for part, opt in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(part, opt, optim_state_dict=state_dict, options=options)


def build_optimizers(model_parts: list[nn.Module], settings: OptimizerConfig) -> OptimizersContainer:
    """One optimizer per model part, from the ``[optimizer]`` section."""
    return OptimizersContainer(model_parts, settings)
