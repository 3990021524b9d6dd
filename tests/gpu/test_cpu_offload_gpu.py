"""FSDP CPU offload on one CUDA GPU, as ``training.enable_cpu_offload`` (and the ``auto``
memory policy's last resort) runs it: parameters, gradients and optimizer state on the host,
each FSDP unit copied to the device for its forward and backward.

    python -m pytest tests/gpu/test_cpu_offload_gpu.py -q      # on a machine with a GPU

Before the fix a one-GPU run stopped at the first step (no FSDP on one data rank: the
embedding's weight stayed on the host while its input was on the device).
"""

from __future__ import annotations

import pytest
import torch

from small_trainer import small_trainer_config

pytestmark = pytest.mark.gpu


def _run(tmp_path, *extra):
    from torch.distributed.tensor import DTensor

    from torchtitan.trainer import Trainer

    cfg = small_trainer_config(tmp_path, "--training.seq_len", "256", "--training.steps", "3",
                               "--training.max_norm", "1.0", "--activation_checkpoint.mode", "none", *extra)
    trainer = Trainer(cfg)
    try:
        losses = trainer.train()
        params = {k: v for k, v in trainer.model_parts[0].named_parameters()}
        devices = {(v.to_local() if isinstance(v, DTensor) else v).device.type for v in params.values()}
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu() for k, v in params.items()}
        peak = torch.cuda.max_memory_allocated()
    finally:
        trainer.close()
    return losses, full, devices, peak


def test_offload_on_one_gpu_trains_like_the_device_run_with_its_state_on_the_host(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.cuda.reset_peak_memory_stats()
    base_losses, base, base_devices, base_peak = _run(tmp_path / "a")
    torch.cuda.reset_peak_memory_stats()
    off_losses, off, off_devices, off_peak = _run(tmp_path / "b", "--training.enable_cpu_offload")
    assert base_devices == {"cuda"} and off_devices == {"cpu"}
    assert off_peak < base_peak  # the fp32 weights and AdamW moments stayed on the host
    # fp32 both ways; the host's AdamW and clipping sum in another order: rounding apart
    assert off_losses == pytest.approx(base_losses, rel=1e-5)
    for k in base:
        torch.testing.assert_close(off[k], base[k], rtol=1e-4, atol=1e-6, msg=k)
