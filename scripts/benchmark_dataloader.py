"""Throughput of the data loader alone (read, tokenize, pack, batch), in tokens per second.

    python scripts/benchmark_dataloader.py                      # bundled data, debug shapes
    python scripts/benchmark_dataloader.py --dataset json --dataset_path 'data/*.jsonl' \
        --tokenizer assets/tokenizer/original/tokenizer.model --seq_len 8192 --batch_size 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torchtitan.components.data import build_dataloader
from torchtitan.components.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="c4_test")
    parser.add_argument("--dataset_path", default=None)
    parser.add_argument("--tokenizer", default=str(ROOT / "tests" / "assets" / "test_tiktoken.model"))
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_shards", type=int, default=0)
    parser.add_argument("--batches", type=int, default=200, help="timed batches (after one warm-up batch)")
    args = parser.parse_args()

    tokenizer = build_tokenizer(args.tokenizer)
    start = time.perf_counter()
    loader = build_dataloader(
        dataset=args.dataset,
        dataset_path=args.dataset_path,
        tokenizer=tokenizer,
        seq_len=args.seq_len,
        local_batch_size=args.batch_size,
        global_batch_size=args.batch_size,
        dp_rank=0,
        dp_world_size=1,
        num_shards=args.num_shards,
    )
    it = iter(loader)
    next(it)
    print(f"built and first batch in {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    tokens = 0
    for _ in range(args.batches):
        inputs, _labels = next(it)
        tokens += inputs.numel()
    elapsed = time.perf_counter() - start
    print(
        f"{args.dataset}: {args.batches} batches of {args.batch_size} x {args.seq_len} in {elapsed:.2f} s "
        f"-> {tokens / elapsed:,.0f} tokens/s ({loader.documents_read} documents read)"
    )


if __name__ == "__main__":
    main()
