"""CRC-32 of every checkpoint file, computed while DCP writes it (no second read).

``ChecksumWriter`` is DCP's ``FileSystemWriter`` with a file system whose write streams
update a CRC-32 as bytes go out. Large writes (a tensor's storage) are checksummed on a
helper thread while the write itself runs (``zlib.crc32`` releases the GIL), so a save
takes about max(write, checksum) per tensor rather than their sum. Each rank's writer
appends its files' checksums to the write results DCP already gathers on rank 0; rank 0's
``finish`` takes them out again (``.metadata`` stays DCP's own) and keeps them in
``checksums`` for the completion marker (folder.finalize).
"""

from __future__ import annotations

import io
import os
import threading
import zlib
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.futures import Future as TorchFuture
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult

__all__ = ["ChecksumWriter"]

_KEY = "__torchtitan_crc32__"  # the extra write result carrying one rank's checksums
_OVERLAP = 1 << 20  # writes at least this large are checksummed on the helper thread
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckpt-crc32")
        return _pool


class _ChecksumStream(io.RawIOBase):
    """A write stream passing bytes through to ``raw`` and keeping their CRC-32."""

    def __init__(self, raw: Any, done: Any):
        self.raw = raw
        self.crc = 0
        self._done = done  # called with the final CRC on close

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if view.nbytes >= _OVERLAP:
            pending: Future = _helper().submit(zlib.crc32, view, self.crc)
            try:
                written = self.raw.write(view)
            finally:
                self.crc = pending.result()
        else:
            written = self.raw.write(view)
            self.crc = zlib.crc32(view, self.crc)
        if written is not None and written != view.nbytes:  # a raw stream's short write
            raise OSError(f"short write: {written} of {view.nbytes} bytes")
        return view.nbytes

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        if self.closed:
            return
        super().close()  # flushes raw
        self.raw.close()
        self._done(self.crc)


class _ChecksumFileSystem(FileSystem):
    """DCP's local file system, with write streams that record each file's CRC-32."""

    def __init__(self) -> None:
        super().__init__()
        self.checksums: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Generator[io.IOBase, None, None]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            name = os.path.basename(str(path))

            def done(crc: int) -> None:
                with self._lock:
                    self.checksums[name] = crc

            wrapped = _ChecksumStream(stream, done)
            yield wrapped  # type: ignore[misc]
            wrapped.close()


class ChecksumWriter(FileSystemWriter):
    """``FileSystemWriter`` that also checksums what it writes. After the save, rank 0's
    instance holds ``checksums`` (file name -> CRC-32) for every rank's data files."""

    def __init__(self, path: str, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = _ChecksumFileSystem()
        self.checksums: dict[str, int] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
        results = super().write_data(plan, planner).wait()  # already done: FileSystemWriter is synchronous
        with self.fs._lock:
            crcs = dict(self.fs.checksums)
        carrier = WriteResult(index=MetadataIndex(_KEY), size_in_bytes=0, storage_data=crcs)
        future: TorchFuture[list[WriteResult]] = TorchFuture()
        future.set_result([*results, carrier])
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.checksums = {}
        kept = []
        for rank_results in results:
            for result in rank_results:
                if result.index.fqn == _KEY:
                    self.checksums.update(result.storage_data)
            kept.append([r for r in rank_results if r.index.fqn != _KEY])
        super().finish(metadata, kept)
