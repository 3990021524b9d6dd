"""The checkpointable, data-parallel loader: shards -> per-step blocks -> microbatches.

The data is cut into ``num_shards`` disjoint virtual shards, each its own packed stream
(``PackedShard``). Data-parallel rank ``r`` owns the contiguous block of shards
``[r * S / dp, (r + 1) * S / dp)``. Every optimizer step, each shard contributes
``global_batch_size / S`` consecutive samples, shard by shard; a rank's part of the step
is therefore a contiguous slice of the global batch, which is cut into microbatches of
``local_batch_size`` (gradient accumulation).

- ``num_shards > 0`` (training.dataset_shards): the shards do not depend on the dp degree,
  so each step's global batch is the same at any dp degree, and a checkpoint taken at one
  degree resumes exactly at another.
- ``num_shards == 0`` (TorchTitan's behaviour): one shard per dp rank.

The loader's state is a dict keyed by shard id (``"shard_3"``), so the states of all ranks
merge with ``dict.update`` and a rank loads just the shards it owns.

By default loading happens in the main process (``num_workers=0``): packing is cheap next
to a training step. With ``num_workers > 0`` (training.dataloader_num_workers) worker 0
tokenizes and packs the same stream in the background and the other workers yield nothing
(the packed stream is sequential, so more workers add no throughput); the batches are the
same. Its position comes back with each batch (StatefulDataLoader's per-batch worker
snapshot), so ``state_dict`` is exact for the batches delivered, and a loaded state is set
in the main process's dataset before the next ``iter()`` forks the workers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan.components.data.datasets import DataConfigError, load_dataset_records
from torchtitan.components.data.packing import SKIP_REASONS, PackedShard
from torchtitan.components.data.sources import make_shard_reader

__all__ = ["PackedDataLoader", "PackedShardsDataset", "ShardLayout", "build_dataloader"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardLayout:
    """Which shards a dp rank owns and how many samples each gives per optimizer step."""

    num_shards: int  # total, over all dp ranks
    owned: tuple[int, ...]  # this rank's shards, in global-batch order
    per_shard_step: int  # samples each shard contributes to one step
    dp_world_size: int

    @classmethod
    def create(
        cls,
        *,
        num_shards: int,
        dp_rank: int,
        dp_world_size: int,
        local_batch_size: int,
        global_batch_size: int,
    ) -> ShardLayout:
        if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
            raise DataConfigError(f"dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})")
        if local_batch_size < 1:
            raise DataConfigError(f"training.local_batch_size must be >= 1, got {local_batch_size}")
        if global_batch_size <= 0:  # TorchTitan's default: no gradient accumulation
            global_batch_size = local_batch_size * dp_world_size
        if global_batch_size % (local_batch_size * dp_world_size):
            raise DataConfigError(
                f"training.global_batch_size ({global_batch_size}) must be a multiple of "
                f"local_batch_size x dp degree ({local_batch_size} x {dp_world_size})"
            )
        if num_shards < 0:
            raise DataConfigError(f"training.dataset_shards must be >= 0, got {num_shards}")
        if num_shards == 0:
            return cls(dp_world_size, (dp_rank,), local_batch_size, dp_world_size)
        if global_batch_size % num_shards:
            raise DataConfigError(
                f"training.dataset_shards ({num_shards}) must divide training.global_batch_size "
                f"({global_batch_size}); pick a divisor of it"
            )
        if num_shards % dp_world_size:
            raise DataConfigError(
                f"training.dataset_shards ({num_shards}) must be a multiple of the data parallel "
                f"degree ({dp_world_size})"
            )
        per_rank = num_shards // dp_world_size
        owned = tuple(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        return cls(num_shards, owned, global_batch_size // num_shards, dp_world_size)


def _key(shard_id: int) -> str:
    return f"shard_{shard_id}"


class PackedShardsDataset(IterableDataset):
    """Yields ``(inputs, labels)`` samples: per step, ``per_shard_step`` from each owned shard
    in turn. Which shard comes next is derived from the shards' sample counts, so a loaded
    state (or a stale iterator) always continues at the right place."""

    def __init__(self, shards: dict[int, PackedShard], layout: ShardLayout):
        super().__init__()
        self.shards = shards
        self.layout = layout

    def _next_shard(self) -> PackedShard:
        taken = sum(self.shards[s].samples for s in self.layout.owned)
        turn = (taken // self.layout.per_shard_step) % len(self.layout.owned)
        return self.shards[self.layout.owned[turn]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.id > 0:
            return  # worker 0 produces the one sequential stream
        while True:
            window = self._next_shard().next_window()
            if window is None:
                return
            tokens = torch.tensor(window, dtype=torch.int64)
            yield tokens[:-1], tokens[1:]

    def state_dict(self) -> dict[str, Any]:
        return {
            _key(s): {
                "num_shards": self.layout.num_shards,
                "dp_world_size": self.layout.dp_world_size,
                **self.shards[s].state_dict(),
            }
            for s in self.layout.owned
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            logger.warning("dataloader state is empty: starting the data from the beginning")
            return
        missing = [_key(s) for s in self.layout.owned if _key(s) not in state]
        if missing:
            raise DataConfigError(
                f"dataloader state lacks {missing} (it has {sorted(state)}); "
                "merge the states of all data parallel ranks before loading"
            )
        for s in self.layout.owned:
            saved = state[_key(s)]["num_shards"]
            if saved != self.layout.num_shards:
                raise DataConfigError(
                    f"dataloader state was saved with {saved} data shards, this run has "
                    f"{self.layout.num_shards}; keep training.dataset_shards (and, when it is 0, "
                    "the data parallel degree) unchanged to resume"
                )
        self._check_step_boundary(state)
        for s in self.layout.owned:
            self.shards[s].load_state_dict(state[_key(s)])

    def _check_step_boundary(self, state: dict[str, Any]) -> None:
        """A state saved at another dp degree must be from between two optimizer steps: only
        then do all shards hold the same number of samples, whichever rank owned them."""
        saved = [state[_key(s)] for s in self.layout.owned]
        if all(shard["dp_world_size"] == self.layout.dp_world_size for shard in saved):
            return
        counts = {shard["samples"] for shard in saved}
        if len(counts) > 1 or counts.pop() % self.layout.per_shard_step:
            raise DataConfigError(
                "dataloader state was taken in the middle of an optimizer step; resume it with the "
                f"same data parallel degree ({saved[0]['dp_world_size']}), or from a checkpoint "
                "taken between steps"
            )


class PackedDataLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state is the shards' state, keyed by shard id."""

    dataset: PackedShardsDataset

    def state_dict(self) -> dict[str, Any]:
        if self.num_workers > 0 and self._iterator is not None:
            # The worker's dataset state as of the last batch delivered (not prefetched).
            snapshot = super().state_dict()["_snapshot"]
            worker_0 = snapshot["_worker_snapshots"]["worker_0"]
            if worker_0.get("dataset_state"):
                return worker_0["dataset_state"]
        return self.dataset.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state_dict)
        self._iterator = None  # the next iter() starts (and forks its workers) from the loaded state

    @property
    def skipped_documents(self) -> dict[str, int]:
        """Documents skipped so far on this rank, by reason (empty, not_text, invalid_utf8)."""
        shards = self.state_dict().values()
        return {reason: sum(int(s[f"skipped_{reason}"]) for s in shards) for reason in SKIP_REASONS}

    @property
    def documents_read(self) -> int:
        """Documents tokenized so far on this rank."""
        return sum(int(s["documents"]) for s in self.state_dict().values())


def build_dataloader(
    *,
    dataset: str,
    dataset_path: str | None,
    tokenizer: Any,
    seq_len: int,
    local_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    text_field: str = "text",
    num_shards: int = 0,
    infinite: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> PackedDataLoader:
    """A loader yielding ``(inputs, labels)``: int64 CPU tensors ``[local_batch_size, seq_len]``.

    ``global_batch_size <= 0`` means ``local_batch_size * dp_world_size``. In finite mode the
    loader stops when a shard runs out (the last partial batch is dropped). The data order
    is the order of the files; ``seed`` only seeds the loader's own generator, so building a
    loader never draws from torch's global random state. ``num_workers``,
    ``persistent_workers``, ``pin_memory`` and ``prefetch_factor`` go to the StatefulDataLoader
    (training.dataloader_*); the batches and the resumable state do not depend on them.
    """
    if seq_len < 1:
        raise DataConfigError(f"training.seq_len must be >= 1, got {seq_len}")
    layout = ShardLayout.create(
        num_shards=num_shards,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        local_batch_size=local_batch_size,
        global_batch_size=global_batch_size,
    )
    loaded = load_dataset_records(dataset, dataset_path, text_field)
    shards = {
        s: PackedShard(
            make_shard_reader(loaded.records, s, layout.num_shards),
            tokenizer,
            seq_len,
            loaded.text_fn,
            infinite=infinite,
            label=f"dataset {loaded.label} shard {s}/{layout.num_shards}",
        )
        for s in layout.owned
    }
    with warnings.catch_warnings():  # torchdata 0.11 calls an API torch 2.12+ deprecates
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return PackedDataLoader(
            PackedShardsDataset(shards, layout),
            batch_size=local_batch_size,
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
            snapshot_every_n_steps=1,
        )
