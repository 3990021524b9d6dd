"""Shard readers: one virtual shard of a dataset's records, resumable at any record.

``make_shard_reader(records, shard_id, num_shards)`` gives the records of shard
``shard_id`` out of ``num_shards`` disjoint shards whose union is the whole dataset:

- a Hugging Face ``Dataset`` or any sized, indexable sequence: records
  ``shard_id, shard_id + num_shards, ...`` (index striding); state = records read;
- a Hugging Face ``IterableDataset`` (a stream): ``split_dataset_by_node``; state = the
  stream's own ``state_dict()``, which resumes at the next record without re-reading the
  files before it;
- any other re-iterable: every ``num_shards``-th record; state = records read, skipped
  over on resume;
- a ``ShardableSource`` (an object with ``shard_reader(shard_id, num_shards)``), such as
  ``TextFiles``: whatever reader it returns (for line files: a byte offset, so resuming
  seeks). Line files are read while training runs, so a file deleted or truncated under
  a running job raises ``DataFileChangedError`` (a ``FileNotFoundError``: one line and
  exit code 2 from the trainer) instead of quietly training on other data.

A reader's ``state_dict()`` is a flat dict of ints and strings (small, picklable, and
stable in shape, so distributed checkpointing can load it into a fresh reader's state).
"""

from __future__ import annotations

import itertools
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DataConfigError",
    "DataFileChangedError",
    "IndexedShardReader",
    "IterableShardReader",
    "JsonLinesFiles",
    "LineFiles",
    "LinesShardReader",
    "ShardReader",
    "ShardableSource",
    "StreamShardReader",
    "TextFiles",
    "is_hf_dataset",
    "is_hf_iterable",
    "make_shard_reader",
]


class DataConfigError(ValueError):
    """The data options (training.dataset*) are inconsistent or name something unusable
    (a file that cannot be read as its format, with the file named)."""


class DataFileChangedError(FileNotFoundError):
    """A data file was deleted or shrank while a run read it (or since the checkpoint
    whose data position is being resumed). The data at that position is gone, so this
    is missing input, like a FileNotFoundError: the message names the file."""


def is_hf_dataset(obj: Any) -> bool:
    """A map-style Hugging Face ``datasets.Dataset`` (checked without importing datasets)."""
    return "datasets" in sys.modules and isinstance(obj, sys.modules["datasets"].Dataset)


def is_hf_iterable(obj: Any) -> bool:
    """A streamed Hugging Face ``datasets.IterableDataset``."""
    return "datasets" in sys.modules and isinstance(obj, sys.modules["datasets"].IterableDataset)


class ShardReader(ABC):
    """Iterating yields the shard's records from the current position, advancing it."""

    @abstractmethod
    def __iter__(self) -> Iterator[Any]: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def rewind(self) -> None:
        """Go back to the shard's first record (the next pass of infinite mode)."""


@runtime_checkable
class ShardableSource(Protocol):
    """Records that know how to cut themselves into shards."""

    def shard_reader(self, shard_id: int, num_shards: int) -> ShardReader: ...


class IndexedShardReader(ShardReader):
    """Records ``shard_id::num_shards`` of a sized, indexable collection, read in chunks."""

    CHUNK = 128

    def __init__(self, records: Any, shard_id: int, num_shards: int):
        self.records = records
        self.indices = range(shard_id, len(records), num_shards)
        self.position = 0
        self._batched = is_hf_dataset(records)

    def _fetch(self, start: int, stop: int) -> list[Any]:
        idx = list(self.indices[start:stop])
        if not self._batched:
            return [self.records[i] for i in idx]
        columns = self.records[idx]  # one Arrow gather: {column: [values]}
        names = list(columns)
        return [dict(zip(names, row)) for row in zip(*columns.values())]

    def __iter__(self) -> Iterator[Any]:
        while self.position < len(self.indices):
            chunk = self._fetch(self.position, self.position + self.CHUNK)
            for record in chunk:
                self.position += 1
                yield record

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def rewind(self) -> None:
        self.position = 0


class StreamShardReader(ShardReader):
    """One node's part of a Hugging Face stream, resumed through the stream's own state."""

    def __init__(self, stream: Any, shard_id: int, num_shards: int):
        from datasets.distributed import split_dataset_by_node

        self._make = lambda: split_dataset_by_node(stream, rank=shard_id, world_size=num_shards)
        self._stream = self._make()
        self._iterating = False
        self._state: dict | None = None  # the state to start from when not iterating
        self.records_read = 0

    def __iter__(self) -> Iterator[Any]:
        self._stream.load_state_dict(self._state)  # None: from the beginning
        self._iterating = True
        for record in self._stream:
            self.records_read += 1
            yield record
        self._iterating = False
        self._state = self._stream.state_dict()

    def state_dict(self) -> dict[str, Any]:
        state = self._stream.state_dict() if self._iterating else self._state
        return {"stream": json.dumps(state), "records_read": self.records_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = json.loads(state["stream"])
        self.records_read = int(state["records_read"])
        self._iterating = False

    def rewind(self) -> None:
        self._stream = self._make()
        self._state = None
        self._iterating = False
        self.records_read = 0


class IterableShardReader(ShardReader):
    """Every ``num_shards``-th record of a re-iterable; resumes by skipping what was read."""

    def __init__(self, records: Any, shard_id: int, num_shards: int):
        self.records = records
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.position = 0

    def __iter__(self) -> Iterator[Any]:
        mine = itertools.islice(self.records, self.shard_id, None, self.num_shards)
        for record in itertools.islice(mine, self.position, None):
            self.position += 1
            yield record

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def rewind(self) -> None:
        self.position = 0


class LineFiles:
    """Files read line by line (local or remote, through fsspec), one record per line.

    ``parse_line`` turns a line's raw bytes into a record. Reading raw bytes keeps decoding
    in our hands: a line that is not valid UTF-8 (or not valid JSON) becomes a record that
    is skipped and counted instead of an exception that stops the run.
    """

    column_names: list[str] | None = None

    def __init__(self, files: list[str]):
        self.files = list(files)

    def parse_line(self, raw: bytes) -> Any:
        raise NotImplementedError

    def shard_reader(self, shard_id: int, num_shards: int) -> ShardReader:
        return LinesShardReader(self, shard_id, num_shards)

    def __iter__(self) -> Iterator[Any]:
        return iter(LinesShardReader(self, 0, 1))


class TextFiles(LineFiles):
    """Plain text: the record of a line is ``{"text": line_bytes}`` (line ending removed)."""

    column_names = ["text"]

    def parse_line(self, raw: bytes) -> dict[str, bytes]:
        return {"text": raw.rstrip(b"\r\n")}


class JsonLinesFiles(LineFiles):
    """JSON Lines read without Arrow: the record of a line is its parsed object, or None
    when the line is not valid JSON. Used when ``datasets`` cannot read the files."""

    def parse_line(self, raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except ValueError:  # includes UnicodeDecodeError
            return None


class LinesShardReader(ShardReader):
    """Lines ``shard_id::num_shards`` (counted across all files in order); the state is a
    byte offset, so resuming seeks instead of re-reading."""

    def __init__(self, source: LineFiles, shard_id: int, num_shards: int):
        self.source = source
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.rewind()

    def rewind(self) -> None:
        self.file_index = 0
        self.offset = 0  # byte offset of the next line to read in files[file_index]
        self.line = 0  # global number of that line

    def __iter__(self) -> Iterator[Any]:
        import fsspec

        files = self.source.files
        while self.file_index < len(files):
            path = files[self.file_index]
            size = self._size(path)
            try:
                with fsspec.open(path, "rb", compression="infer") as f:
                    f.seek(self.offset)
                    for raw in f:
                        mine = self.line % self.num_shards == self.shard_id
                        self.offset += len(raw)
                        self.line += 1
                        if mine:
                            yield self.source.parse_line(raw)
            except FileNotFoundError:
                raise DataFileChangedError(f"training.dataset_path: data file {path} no longer exists") from None
            except (EOFError, OSError) as e:  # a truncated or corrupt compressed file
                raise DataConfigError(f"training.dataset_path: cannot read {path}: {e}") from None
            # An open file reads to its end even when deleted or truncated meanwhile: only
            # its size now, against what was read, shows that the data changed under us.
            self._size(path, at_least=max(size, self.offset))
            self.file_index += 1
            self.offset = 0

    def _size(self, path: str, at_least: int | None = None) -> int:
        """The size of ``path``; DataFileChangedError if it is gone, or smaller than
        ``at_least`` (by default the current offset: a resumed position past its end)."""
        import fsspec
        from fsspec.utils import infer_compression

        fs, local = fsspec.core.url_to_fs(path)
        try:
            size = fs.size(local)
        except FileNotFoundError:
            raise DataFileChangedError(f"training.dataset_path: data file {path} no longer exists") from None
        wanted = self.offset if at_least is None else at_least
        # (offsets in compressed files count uncompressed bytes: no size check there)
        if infer_compression(path) is None and size is not None and size < wanted:
            raise DataFileChangedError(
                f"training.dataset_path: data file {path} shrank to {size} bytes, below the "
                f"{wanted} bytes this run has read from it"
            )
        return size or 0

    def state_dict(self) -> dict[str, Any]:
        return {"file_index": self.file_index, "offset": self.offset, "line": self.line}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.file_index = int(state["file_index"])
        self.offset = int(state["offset"])
        self.line = int(state["line"])


def make_shard_reader(records: Any, shard_id: int, num_shards: int) -> ShardReader:
    """The reader of shard ``shard_id`` of ``num_shards`` for any supported records."""
    if isinstance(records, ShardableSource):
        return records.shard_reader(shard_id, num_shards)
    if is_hf_iterable(records):
        return StreamShardReader(records, shard_id, num_shards)
    if is_hf_dataset(records) or (hasattr(records, "__getitem__") and hasattr(records, "__len__")):
        return IndexedShardReader(records, shard_id, num_shards)
    if not hasattr(records, "__iter__"):
        raise TypeError(f"cannot read records from {type(records).__name__}: give a sequence or an iterable")
    if iter(records) is records:
        raise TypeError(
            f"{type(records).__name__} is a one-shot iterator; a dataset loader must return records that can "
            "be iterated again (a list, a datasets.IterableDataset, an object whose __iter__ starts over)"
        )
    return IterableShardReader(records, shard_id, num_shards)
