"""Facts about the accelerator: dense bf16 peak FLOP/s (for MFU) and memory use."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from torchtitan.tools.logging import logger, warn_once

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets.
# Order matters: more specific names first (e.g. "H100 NVL" before "H100").
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989.5e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),  # SXM (HBM3), the common case; also "H100 80GB HBM3"
    ("H800", 989.5e12),
    ("H20", 148e12),
    ("GH200", 989.5e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("MI355X", 2.5e15),
    ("MI325X", 1307.4e12),
    ("MI300X", 1307.4e12),
    ("MI300A", 980.6e12),
    ("MI250X", 191.5e12),  # per GCD, as each GCD appears as one device
]


def lookup_peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s for a device name as torch reports it, or None if unknown."""
    name = device_name.upper()
    for key, flops in PEAK_BF16_FLOPS:
        if key.upper() in name:
            if key == "H100" and "PCIE" in name:
                return dict(PEAK_BF16_FLOPS)["H100 PCIe"]
            return flops
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s for MFU: the override when set, else the table; None (no MFU) if unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = device_name(device)
    flops = lookup_peak_flops(name)
    if flops is None:
        warn_once(
            f"unknown GPU {name!r}: MFU is not reported; set metrics.peak_tflops to its dense bf16 peak"
        )
    return flops


class DeviceMemoryMonitor:
    """Peak memory since the last reset, in GiB and as a share of the device's capacity."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.capacity = torch.cuda.get_device_properties(device).total_memory
            get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
            if get_fraction is not None:  # a limit_device_memory cap is the capacity that counts
                self.capacity = int(self.capacity * get_fraction(device))
            torch.cuda.reset_peak_memory_stats(device)
        else:
            import os

            self.capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def peak(self) -> tuple[float, float, float, float]:
        """(max active GiB, % of capacity, max reserved GiB, % of capacity)."""
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            active = stats.get("active_bytes.all.peak", 0)
            reserved = stats.get("reserved_bytes.all.peak", 0)
        else:  # process peak RSS: the best the CPU offers
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            active = reserved = rss * (1 if sys.platform == "darwin" else 1024)
        gib = 1024**3
        return (
            active / gib,
            100 * active / self.capacity,
            reserved / gib,
            100 * reserved / self.capacity,
        )

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def limit_device_memory(device: torch.device, limit_gib: float) -> None:
    """Cap this process's CUDA caching allocator at ``limit_gib`` GiB (0: no cap), so a run
    sized for a smaller card (an 80 GB H100 on a 141 GB H200) fails or fits as it would there."""
    if limit_gib <= 0:
        return
    if device.type != "cuda":
        warn_once(f"training.device_memory_limit_gib applies to CUDA devices only; ignored on {device.type}")
        return
    total = torch.cuda.get_device_properties(device).total_memory
    limit = limit_gib * 1024**3
    if limit > total:
        from torchtitan.config import ConfigError

        raise ConfigError(
            f"training.device_memory_limit_gib = {limit_gib} exceeds this device's "
            f"{total / 1024**3:.1f} GiB; lower it or set 0"
        )
    torch.cuda.set_per_process_memory_fraction(limit / total, device)


def resolve_cpu_precision(device: torch.device, training: Any) -> None:
    """bf16 matmuls on a CPU without native bf16 support run ~10x slower than fp32: set
    ``training.mixed_precision_param`` to float32 there, and say so, rather than crawl."""
    if device.type != "cpu" or training.mixed_precision_param == "float32":
        return
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return
    logger.warning(
        "this CPU has no native bf16 matmul: training.mixed_precision_param "
        f"{training.mixed_precision_param} -> float32 for this run (bf16 is used on GPUs)"
    )
    training.mixed_precision_param = "float32"
