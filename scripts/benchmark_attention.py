"""Time causal SDPA forward + backward per backend at Llama 3 shapes on this GPU.

    python scripts/benchmark_attention.py [--seq 8192] [--batch 2] [--iters 20]

Prints one markdown row per (shape, backend, grouped-query mode): milliseconds per
forward + backward and the achieved TFLOP/s (causal: half of 4·b·h·s²·d forward, 3.5× that
for forward + backward, FlashAttention's count: the backward's five matmuls include the
recomputed scores; before 2026-12-01 this script used 2.5×, so older figures read 5/7 of
these), and the largest difference of the output and of dq from the flash
backend's. This is the measurement behind ``model.attention_backend = "auto"``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: (query heads, kv heads, head_dim)
    "1B": (32, 8, 64),
    "3B": (24, 8, 128),
    "8B": (32, 8, 128),
    "70B/TP8": (8, 1, 128),
}
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _run(q, k, v, grad, backend, gqa: bool):
    if not gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    out.backward(grad)
    return out


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, seq {args.seq}, batch {args.batch}")
    print("| shape | backend | gqa | ms fwd+bwd | TFLOP/s | max|out-flash| | max|dq-flash| |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (h, kvh, d) in SHAPES.items():
        b, s = args.batch, args.seq

        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

        q, k, v = rand(b, h, s, d), rand(b, kvh, s, d), rand(b, kvh, s, d)
        grad = rand(b, h, s, d)
        flops = 3.5 * 0.5 * 4 * b * h * s * s * d
        ref = None
        for bname, backend in BACKENDS.items():
            for gqa in (True, False):
                qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
                try:
                    out = _run(qq, kk, vv, grad, backend, gqa)
                    ms = _time(lambda: _run(qq, kk, vv, grad, backend, gqa), args.iters)
                except RuntimeError as e:
                    print(f"| {name} | {bname} | {gqa} | unsupported: {str(e).splitlines()[0][:80]} | | | |")
                    continue
                qq.grad = None
                out = _run(qq, kk, vv, grad, backend, gqa)
                if ref is None:
                    ref = (out.detach().float(), qq.grad.float())
                dout = (out.float() - ref[0]).abs().max().item()
                dq = (qq.grad.float() - ref[1]).abs().max().item()
                print(f"| {name} | {bname} | {gqa} | {ms:.2f} | {flops / ms / 1e9:.0f} | {dout:.2e} | {dq:.2e} |")


if __name__ == "__main__":
    main()
