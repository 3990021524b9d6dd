"""Time and size the output projection + cross-entropy, plain and in chunks, on this GPU.

    python scripts/benchmark_chunked_loss.py [--tokens 16384] [--dim 3072] [--vocab 128256]

Prints one markdown row per variant: milliseconds per forward + backward (median of
``--iters``), the peak memory above the inputs (the hidden states and the bf16 weight; their
gradients count), and from the chunked variants' peaks the bytes per element of one chunk's logits
(the slope of peak against chunk x vocab, over the sizes below ``--tokens``) and what does not
grow with the chunk (the fp32 weight-gradient accumulator and the gradients kept for
backward): the figures behind the planner's loss terms (``planner/memory.py``,
``planner/cost.py``). A chunk of ``--tokens`` or more is one chunk (no accumulator). Every
variant is compiled as the trainer compiles it (``compile.components`` with ``loss``), and
``--eager`` adds the uncompiled chunks (the logits overwritten a block of rows at a time).
``--profile`` then prints each variant's GPU kernels (one forward + backward, the longest
first): where a variant's time goes beside the three GEMMs.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from torchtitan.components.chunked_loss import _chunk_loss_and_grad, chunked_cross_entropy, compiled_chunk_fn

GIB = 1024**3


def _plain(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), y)


def _measure(fn, h, w, y, iters: int) -> tuple[float, float]:
    """Median milliseconds of forward + backward and the peak bytes above the inputs."""
    times = []
    for i in range(iters + 2):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(h, w, y).backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # compiled, warm
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak  # the inputs were allocated before ``base``


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (3B, local batch 2, seq 8192)")
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunks", default="1024,2048,4096,8192,16384")
    ap.add_argument("--eager", default="4096", help="chunk sizes to run uncompiled too ('' for none)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="print each variant's GPU kernel times")
    ap.add_argument("--inductor_option", action="append", default=[], metavar="KEY=VALUE",
                    help="also run the chunks compiled with this inductor option (repeatable; "
                         "e.g. triton.prefer_nd_tiling=True)")
    args = ap.parse_args()
    torch.manual_seed(0)
    h = (torch.randn(args.tokens, args.dim, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(args.vocab, args.dim, device="cuda") * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    chunk_fn = compiled_chunk_fn()
    variants = {"plain (compiled)": torch.compile(_plain)}
    for c in (int(x) for x in args.chunks.split(",")):
        variants[f"chunks of {c}"] = (lambda c: lambda h, w, y: chunked_cross_entropy(h, w, y, c, chunk_fn))(c)
    if args.inductor_option:
        options = dict(_parse_option(o) for o in args.inductor_option)
        tuned_fn = compiled_chunk_fn(options=options)
        for c in (int(x) for x in args.chunks.split(",")):
            variants[f"{', '.join(args.inductor_option)}: chunks of {c}"] = (
                lambda c: lambda h, w, y: chunked_cross_entropy(h, w, y, c, tuned_fn))(c)
    for c in (int(x) for x in args.eager.split(",") if x):
        variants[f"eager chunks of {c}"] = (
            lambda c: lambda h, w, y: chunked_cross_entropy(h, w, y, c, _chunk_loss_and_grad))(c)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.tokens} tokens, dim {args.dim}, "
          f"vocab {args.vocab}, bf16\n")
    print("| variant | ms (fwd + bwd) | peak above inputs (GiB) |")
    print("|---|---|---|")
    peaks = {}
    for name, fn in variants.items():
        ms, peak = _measure(fn, h, w, y, args.iters)
        if name.startswith("chunks") and int(name.split()[-1]) < args.tokens:
            peaks[int(name.split()[-1])] = peak
        print(f"| {name} | {ms:.2f} | {peak / GIB:.2f} |", flush=True)
    if len(peaks) > 1:
        lo, hi = min(peaks), max(peaks)
        per = (peaks[hi] - peaks[lo]) / ((hi - lo) * args.vocab)
        fixed = peaks[lo] - per * lo * args.vocab
        print(f"\nchunked: {per:.1f} bytes per chunk x vocab element; {fixed / GIB:.2f} GiB besides "
              f"({fixed / (args.vocab * args.dim):.1f} bytes per vocab x dim element)")
    if args.profile:
        for name, fn in variants.items():
            _print_kernels(name, fn, h, w, y)


def _parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE a Python literal (True, 2, 'x') or else a string."""
    import ast

    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--inductor_option {text!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _print_kernels(name: str, fn, h, w, y) -> None:
    """One warm forward + backward of ``fn`` under the profiler: its GPU kernels, longest first."""
    from torch.profiler import ProfilerActivity, profile

    h.grad = w.grad = None
    fn(h, w, y).backward()
    h.grad = w.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(h, w, y).backward()
        torch.cuda.synchronize()
    print(f"\n{name}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
