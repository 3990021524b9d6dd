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


_COMMON = ("--training.seq_len", "256", "--training.max_norm", "1.0", "--activation_checkpoint.mode", "none",
           "--training.mixed_precision_param", "float32")


def _run(tmp_path, *extra):
    import gc

    from torch.distributed.tensor import DTensor

    from torchtitan.trainer import Trainer

    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()  # an earlier run's leftovers, if any
    trainer = Trainer(small_trainer_config(tmp_path, *_COMMON, *extra))
    try:
        losses = trainer.train()
        params = {k: v for k, v in trainer.model_parts[0].named_parameters()}
        devices = {(v.to_local() if isinstance(v, DTensor) else v).device.type for v in params.values()}
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu() for k, v in params.items()}
        kept = torch.cuda.memory_allocated() - before  # between steps: what the run keeps on the device
    finally:
        trainer.close()
    return losses, full, devices, kept


def test_offload_on_one_gpu_trains_like_the_device_run_with_its_state_on_the_host(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # one seed checkpoint for both (an offloaded model is initialised on the host, whose
    # random numbers differ from the device's)
    _run(tmp_path / "seed", "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
    seed = ("--checkpoint.enable", "--checkpoint.initial_load_path", str(tmp_path / "seed" / "checkpoint" / "step-0"),
            "--checkpoint.interval", "1000", "--training.steps", "3")
    base_losses, base, base_devices, base_kept = _run(tmp_path / "a", *seed)
    off_losses, off, off_devices, off_kept = _run(tmp_path / "b", *seed, "--training.enable_cpu_offload")
    assert base_devices == {"cuda"} and off_devices == {"cpu"}
    # the fp32 weights, gradients and AdamW moments stay on the host between steps (the
    # debug model's activations dwarf them, so the peaks alone would not tell)
    assert off_kept < base_kept / 2, (off_kept, base_kept)
    # fp32 both ways; the host's AdamW and clipping sum in another order: rounding apart
    assert off_losses == pytest.approx(base_losses, rel=1e-5)
    for k in base:
        torch.testing.assert_close(off[k], base[k], rtol=1e-4, atol=1e-6, msg=k)
