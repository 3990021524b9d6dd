"""How fast host memory can be made ready for checkpoint staging, and what it costs training.

    python scripts/benchmark_host_memory.py [--gib 12]

A background thread prepares ``--gib`` GiB of host memory in 1 GiB pieces, one way per row,
while the main thread runs bf16 matmuls (standing in for training) and times each batch of
ten. Prints one markdown row per way: GiB/s of preparation, the matmul batch time before
and during it (a stalled main thread shows up here), and the device-to-host copy bandwidth
into the prepared memory afterwards. This is the measurement behind
``torchtitan/components/checkpoint/staging.py`` allocating its arena with
``cudaHostRegister`` instead of torch's pinned allocator. Needs CUDA.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

GIB = 1 << 30


def _prepare(way: str, pieces: int, out: list[torch.Tensor]) -> None:
    for _ in range(pieces):
        if way == "cudaHostAlloc (pin_memory=True)":
            out.append(torch.empty(GIB, dtype=torch.uint8, pin_memory=True))
            continue
        x = torch.empty(GIB, dtype=torch.uint8)
        x.zero_()  # fault the pages in
        if way == "touch + cudaHostRegister":
            err = torch.cuda.cudart().cudaHostRegister(x.data_ptr(), x.numel(), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister: {err}")
        out.append(x)


def _matmul_batches(a: torch.Tensor, until: threading.Thread | None, seconds: float) -> list[float]:
    times: list[float] = []
    end = time.perf_counter() + seconds
    while (until.is_alive() if until is not None else time.perf_counter() < end):
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=int, default=12, help="GiB to prepare per way")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_host_memory.py needs a CUDA device")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    before = sorted(_matmul_batches(a, None, 2.0))
    base = before[len(before) // 2]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.gib} GiB per way\n")
    print("| way | GiB/s | matmul batch before | during: median / max | D2H into it GB/s |")
    print("|---|---|---|---|---|")
    src = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    for way in ("cudaHostAlloc (pin_memory=True)", "touch (pageable)", "touch + cudaHostRegister"):
        buffers: list[torch.Tensor] = []
        started = time.perf_counter()
        worker = threading.Thread(target=_prepare, args=(way, args.gib, buffers))
        worker.start()
        during = sorted(_matmul_batches(a, worker, 0.0)) or [float("nan")]
        worker.join()
        rate = args.gib / (time.perf_counter() - started)
        pinned = buffers[0].is_pinned()
        t = time.perf_counter()
        for b in buffers[:4]:
            b.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        d2h = min(4, args.gib) * GIB / 1e9 / (time.perf_counter() - t)
        print(
            f"| {way} | {rate:.2f} | {base * 1e3:.1f} ms | {during[len(during) // 2] * 1e3:.1f} / "
            f"{during[-1] * 1e3:.1f} ms | {d2h:.1f} |"
        )
        if way == "touch + cudaHostRegister":
            for b in buffers:
                torch.cuda.cudart().cudaHostUnregister(b.data_ptr())
        del buffers


if __name__ == "__main__":
    main()
