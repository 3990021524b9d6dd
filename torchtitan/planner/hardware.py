"""The machines the planner plans for: one GPU's memory and speed, and its links.

These are *assumptions*, stated once here and printed with every plan, not measurements of
the machine the planner runs on. Peak FLOP/s are the vendors' dense (no sparsity) figures;
memory is what ``torch.cuda.get_device_properties().total_memory`` reports for the card;
link bandwidths are per GPU and per direction. Every value can be overridden from the
command line (``scripts/plan.py --help``). Achieved rates are the peak times an efficiency:

- compute: hardware-FLOP efficiencies fitted (least squares on step time) to ten measured
  runs on 2x H200 (= H100 compute): the standard suite A, B, D, E at 8k tokens and the 3B
  flavor with full AC at 16k (CP 1 and 2), 65k (CP 2, eager and compiled), 131k (CP 1) and
  262k (CP 2) (docs/performance.md, docs/context_parallel.md); every run is predicted within
  10%. Dense work (matmuls, norms, elementwise): 0.523 compiled, 0.461 eager; causal
  attention (cuDNN, counted as FlashAttention counts it): 0.545;
- an MoE's memory-bound work (the idle experts' optimizer step, clipping and casts; the
  permutation of the routed copies): bytes / (HBM bandwidth x 0.71), the rate fused AdamW
  reached in a profiled MoE step (docs/planning.md);
- FSDP CPU offload: the host link at ``host_link_gbps`` per direction (PCIe 5.0 x16 is 64 GB/s
  nominal; 50 assumed achieved with pinned memory) and the optimizer step on the host at
  ``host_optimizer_gbps`` of AdamW traffic (28 bytes a parameter): 30 GB/s, fitted to the one
  offloaded run measured (one H200 with 16 host cores, 3B at 131k tokens: 4,833 tokens/s, a
  27.1 s step; the compute taken 7% faster than predicted, as the same model's 65k run was);
  the two rates are not told apart by that run;
- communication: 0.8 of the link rate (NCCL ring all-gather / reduce-scatter bus bandwidth on
  NVLink and InfiniBand typically reaches 75-85% of the nominal rate for large messages).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torchtitan.config import ConfigError

__all__ = ["GpuSpec", "GPUS", "get_gpu", "GIB", "CONTEXT_GIB", "NCCL_GIB", "headroom_gib"]

GIB = 1024**3
CONTEXT_GIB = 0.6  # CUDA context and library handles (measured ~0.5 GiB on an H100 / H200)
NCCL_GIB = 1.4  # NCCL's communicator buffers, with more than one rank


def headroom_gib(world_size: int, capped: bool) -> float:
    """Device memory outside PyTorch's caching allocator: the CUDA context, except under a
    ``training.device_memory_limit_gib`` cap (which limits the allocator itself and names a
    card's usable memory, e.g. 79.1 GiB for an 80 GB H100), and NCCL's buffers with more than
    one rank."""
    return (0.0 if capped else CONTEXT_GIB) + (NCCL_GIB if world_size > 1 else 0.0)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model and the node it sits in."""

    name: str
    memory_gib: float  # total device memory as torch reports it
    bf16_tflops: float  # dense bf16 tensor-core peak
    fp8_tflops: float  # dense float8 peak (0: no float8 matmuls)
    capability: tuple[int, int]  # CUDA compute capability (float8 needs >= 8.9)
    gpus_per_node: int
    intra_node_gbps: float  # GB/s per GPU per direction inside a node (NVLink)
    inter_node_gbps: float  # GB/s per GPU per direction between nodes (NICs / GPUs per node)
    compute_efficiency_compiled: float = 0.523  # dense work, compiled blocks
    compute_efficiency_eager: float = 0.461  # dense work, eager
    attention_efficiency: float = 0.545  # causal attention kernels
    comm_efficiency: float = 0.8
    hbm_tbps: float = 3.35  # device memory bandwidth, TB/s
    # share of it memory-bound kernels reach: fused AdamW over 4.36 B fp32 parameters took
    # 36 ms in the profile of a 30B-A3B-6L step on one H200 (28 bytes a parameter: 3.4 TB/s)
    hbm_efficiency: float = 0.71
    host_link_gbps: float = 50.0  # host <-> device copies, per direction (FSDP CPU offload)
    host_optimizer_gbps: float = 30.0  # AdamW on the host, bytes of traffic per second

    def peak_flops(self, float8: bool = False) -> float:
        if float8 and self.fp8_tflops > 0:
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12

    def with_overrides(self, **changes: float | int | None) -> GpuSpec:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# H100/H200 SXM: NVLink 4 at 900 GB/s bidirectional = 450 GB/s per direction; 8 x 400 Gb/s
# InfiniBand NDR per 8-GPU node = 50 GB/s per GPU per direction. A100 SXM: NVLink 3 at
# 600 GB/s bidirectional; 8 x 200 Gb/s HDR per node.
GPUS: dict[str, GpuSpec] = {
    "H100": GpuSpec("H100 80GB HBM3 (SXM)", 79.2, 989.5, 1979.0, (9, 0), 8, 450.0, 50.0, hbm_tbps=3.35),
    "H200": GpuSpec("H200 141GB HBM3e (SXM)", 139.8, 989.5, 1979.0, (9, 0), 8, 450.0, 50.0, hbm_tbps=4.8),
    "A100": GpuSpec("A100 80GB (SXM)", 79.2, 312.0, 0.0, (8, 0), 8, 300.0, 25.0, hbm_tbps=2.039),
}


def get_gpu(name: str) -> GpuSpec:
    """The table entry for ``name`` (case-insensitive, e.g. ``h100``)."""
    key = name.upper()
    if key not in GPUS:
        raise ConfigError(f"--gpu {name!r} is not in the planner's table; choose one of {', '.join(GPUS)}")
    return GPUS[key]
