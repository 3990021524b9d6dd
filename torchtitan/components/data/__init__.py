"""The data pipeline: registered datasets -> shards -> packed windows -> checkpointable loader.

See docs/datasets.md. ``datasets`` (Hugging Face) is imported only when a loader needs it.
"""

from torchtitan.components.data.datasets import (
    DataConfigError,
    DataFileNotFoundError,
    get_dataset_spec,
    register_dataset,
    registered_datasets,
)
from torchtitan.components.data.loader import PackedDataLoader, build_dataloader
from torchtitan.components.data.packing import EmptyShardError
from torchtitan.components.data.sources import ShardableSource, ShardReader, TextFiles

__all__ = [
    "DataConfigError",
    "DataFileNotFoundError",
    "EmptyShardError",
    "PackedDataLoader",
    "ShardReader",
    "ShardableSource",
    "TextFiles",
    "build_dataloader",
    "get_dataset_spec",
    "register_dataset",
    "registered_datasets",
]
