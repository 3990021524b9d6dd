"""Dataset registry and loaders: turn ``dataset`` / ``dataset_path`` into records.

A registered dataset is a name, a default location and a loader ``loader_fn(path)`` that
returns the records; ``text_fn(record)`` picks a record's text (default: the configured
text field). Three file formats (``json``, ``parquet``, ``text``) are registered too, with
no default location: ``dataset_path`` must name the files. What a loader may return is
described in ``sources.py``: a Hugging Face ``Dataset`` (map-style, read by index), an
``IterableDataset`` (streamed), a Python sequence or iterable, or a ``ShardableSource``.

``datasets`` is imported lazily: it is slow to import and unused by most of the trainer.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtitan.components.data.sources import (
    DataConfigError,
    JsonLinesFiles,
    LineFiles,
    TextFiles,
    is_hf_dataset,
    is_hf_iterable,
)

__all__ = [
    "DataConfigError",
    "DataFileNotFoundError",
    "DatasetSpec",
    "LoadedDataset",
    "get_dataset_spec",
    "load_dataset_records",
    "register_dataset",
    "registered_datasets",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
BUNDLED_PATH = REPO_ROOT / "tests" / "assets" / "bundled"

_EXTENSIONS = {
    "json": (".json", ".jsonl", ".json.gz", ".jsonl.gz"),
    "parquet": (".parquet",),
    "text": (".txt",),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_GLOB_CHARS = set("*?[")


class DataFileNotFoundError(FileNotFoundError):
    """training.dataset_path names files that do not exist."""


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: ``loader(path)`` returns its records, ``text_fn`` their text."""

    name: str
    path: str | None  # None: a file format, training.dataset_path is required
    loader: Callable[[str], Any]
    text_fn: Callable[[Any], Any] | None = None


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    path: str | None,
    loader_fn: Callable[[str], Any],
    text_fn: Callable[[Any], Any] | None = None,
) -> None:
    """Make ``training.dataset = name`` load ``loader_fn(training.dataset_path or path)``.

    ``text_fn(record)`` returns the text to train on; when None, the record's
    ``training.dataset_text_field`` (default "text") is used. Registering a name again
    replaces the earlier entry.
    """
    _REGISTRY[name] = DatasetSpec(name, path, loader_fn, text_fn)


def registered_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        named = sorted(n for n, s in _REGISTRY.items() if s.path is not None)
        formats = sorted(n for n, s in _REGISTRY.items() if s.path is None)
        raise DataConfigError(
            f"training.dataset: unknown dataset {name!r}; registered datasets: {', '.join(named)}; "
            f"file formats (with training.dataset_path): {', '.join(formats)}"
        )
    return _REGISTRY[name]


# ------------------------------------------------------------------ resolving paths


def _is_remote(path: str) -> bool:
    return "://" in path


def _looks_like_hub_id(path: str) -> bool:
    """``owner/name`` that is not a local path and has no file extension."""
    if Path(path).exists() or _is_remote(path) or _GLOB_CHARS & set(path):
        return False
    known = tuple(ext for exts in _EXTENSIONS.values() for ext in exts)
    return bool(_HUB_ID.match(path)) and not path.endswith(known)


def resolve_files(path: str, fmt: str) -> list[str]:
    """The files of ``fmt`` that ``path`` (a file, folder or glob; local or remote) names."""
    extensions = _EXTENSIONS[fmt]
    if _is_remote(path):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(path)
        found = fs.glob(path) if _GLOB_CHARS & set(path) else [path]
        protocol = path.split("://", 1)[0]
        files = sorted(f if "://" in f else f"{protocol}://{f}" for f in found)
    elif _GLOB_CHARS & set(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if Path(f).is_file())
    elif Path(path).is_dir():
        files = sorted(str(f) for f in Path(path).rglob("*") if f.is_file() and f.name.endswith(extensions))
        if not files:
            raise DataFileNotFoundError(
                f"training.dataset_path: folder {path} holds no {'/'.join(extensions)} files"
            )
    elif Path(path).is_file():
        files = [path]
    else:
        raise DataFileNotFoundError(
            f"training.dataset_path: {path!r} does not exist; give an existing file, folder or glob, "
            "or a Hugging Face dataset id (owner/name)"
        )
    if not files:
        raise DataFileNotFoundError(f"training.dataset_path: no files match {path!r}")
    return files


# ------------------------------------------------------------------ loaders


def _hf():
    import datasets

    return datasets


def load_hub(path: str, split: str = "train", name: str | None = None) -> Any:
    """A Hugging Face Hub dataset (or a local clone of one), streamed."""
    try:
        return _hf().load_dataset(path, name=name, split=split, streaming=True)
    except (FileNotFoundError, ConnectionError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataFileNotFoundError(
            f"training.dataset_path: cannot open Hugging Face dataset {path!r} "
            f"({type(e).__name__}: {first_line}); check the id, the network, or give local files"
        ) from e


def _load_format(fmt: str, path: str) -> Any:
    """Files of one format: local ones map-style (Arrow, memory-mapped), remote ones streamed."""
    if _looks_like_hub_id(path):
        return load_hub(path)
    files = resolve_files(path, fmt)
    local = [f for f in files if not _is_remote(f)]
    if local and len(local) == len(files) and all(Path(f).stat().st_size == 0 for f in local):
        what = files[0] if len(files) == 1 else f"all {len(files)} files of {path}"
        raise DataConfigError(f"training.dataset_path: {what} is empty; give a file with data")
    if fmt == "text":  # read by our own reader, so undecodable lines are skipped, not fatal
        return TextFiles(files)
    datasets = _hf()
    try:
        with _quiet_errors("datasets"):
            return datasets.load_dataset(fmt, data_files=files, split="train", streaming=_is_remote(path))
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError, EOFError, StopIteration) as e:
        reason = _first_line(e.__cause__ or e)
        # Arrow rejects some JSON that Python reads (lone surrogates such as "\ud800"); read
        # JSON Lines ourselves then, so such records are skipped and counted, not fatal.
        if fmt == "json" and all(f.endswith((".jsonl", ".jsonl.gz")) for f in files) and not isinstance(
            e, (OSError, EOFError)
        ):
            logger.warning(f"datasets cannot read {path} ({reason}); reading it line by line instead")
            return JsonLinesFiles(files)
        culprit = _unreadable_file(local, fmt) or path
        raise DataConfigError(f"training.dataset_path: cannot read {culprit} as {fmt}: {reason}") from None


@contextlib.contextmanager
def _quiet_errors(name: str) -> Iterator[None]:
    """Drop the ERROR records of logger ``name`` meanwhile: a failure is raised again below as
    one line naming the file, and ``datasets`` would first log it (some with a traceback)."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    # (a logger's filter does not see its children's records; its handlers do)
    handlers = logging.getLogger(name).handlers + logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(keep)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unreadable_file(files: list[str], fmt: str) -> str | None:
    """The first of ``files`` that does not parse as ``fmt`` (to name it in the error), or
    None; read only after loading failed, so a good run never pays for it."""
    import gzip
    import json

    for name in files:
        try:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                pq.read_metadata(name)
                continue
            opener = gzip.open if name.endswith(".gz") else open
            with opener(name, "rb") as f:
                if name.endswith((".jsonl", ".jsonl.gz")):
                    for line in f:
                        if line.strip():
                            json.loads(line)
                else:
                    json.loads(f.read())
        except (ValueError, OSError, EOFError):  # pyarrow's errors are ValueError / OSError
            return name
    return None


def load_json(path: str) -> Any:
    return _load_format("json", path)


def load_parquet(path: str) -> Any:
    return _load_format("parquet", path)


def load_text(path: str) -> Any:
    """Plain text files, one document per line (like Hugging Face's "text" builder)."""
    return _load_format("text", path)


def load_c4(path: str) -> Any:
    return load_hub(path, split="train", name="en")


def load_c4_validation(path: str) -> Any:
    return load_hub(path, split="validation", name="en")


def load_bundled(path: str) -> Any:
    if not Path(path).exists():
        raise DataFileNotFoundError(
            f"training.dataset_path: bundled data not found at {path}; "
            "regenerate it with `python scripts/make_test_assets.py` in a source checkout"
        )
    return load_json(path)


register_dataset("c4", "allenai/c4", load_c4)
register_dataset("c4_validation", "allenai/c4", load_c4_validation)
register_dataset("c4_test", str(BUNDLED_PATH), load_bundled)
register_dataset("bundled", str(BUNDLED_PATH), load_bundled)
register_dataset("json", None, load_json)
register_dataset("parquet", None, load_parquet)
register_dataset("text", None, load_text)


# ------------------------------------------------------------------ checking the first record


@dataclass(frozen=True)
class LoadedDataset:
    """Records ready to shard, and how to get a record's text."""

    label: str  # for messages: "c4 (allenai/c4)"
    records: Any
    text_fn: Callable[[Any], Any]


def _field_getter(field: str) -> Callable[[Any], Any]:
    def get(record: Any) -> Any:
        return record.get(field) if isinstance(record, Mapping) else None

    return get


def _columns(records: Any) -> list[str] | None:
    """Column names when the container knows them without reading data."""
    if is_hf_dataset(records) or is_hf_iterable(records) or isinstance(records, LineFiles):
        return records.column_names
    return None


def _is_sized(records: Any) -> bool:
    return hasattr(records, "__getitem__") and hasattr(records, "__len__")


def _first_record(records: Any, label: str) -> Any:
    if _is_sized(records):
        if len(records) == 0:
            raise DataConfigError(f"training.dataset: {label} has no records")
        return records[0]
    for record in records:
        return record
    raise DataConfigError(f"training.dataset: {label} has no records")


def _check_first_line(records: LineFiles, label: str) -> None:
    """Line files hold at least one line, and JSON Lines start with an object (a file that
    is not JSON Lines at all would otherwise be skipped line by line, to an empty stream)."""
    reader = records.shard_reader(0, 1)
    first_file = None
    for n, record in enumerate(reader):
        if not isinstance(records, JsonLinesFiles) or isinstance(record, Mapping):
            return  # (a few bad lines among good ones are skipped and counted while packing)
        first_file = first_file or records.files[reader.file_index]
        if n == 99:
            break
    if first_file is not None:
        raise DataConfigError(f"training.dataset_path: {first_file} is not JSON Lines (its lines are not JSON objects)")
    raise DataConfigError(f"training.dataset: {label} has no records")


def load_dataset_records(dataset: str, dataset_path: str | None, text_field: str = "text") -> LoadedDataset:
    """Load ``dataset`` and check, on its first record, that its text can be found."""
    spec = get_dataset_spec(dataset)
    path = dataset_path or spec.path
    if path is None:
        raise DataConfigError(
            f"training.dataset_path is required with training.dataset = {dataset!r} "
            "(a file, folder or glob of such files, or a Hugging Face dataset id)"
        )
    label = f"{dataset} ({path})"
    records = spec.loader(path)

    if spec.text_fn is not None:
        text_fn = spec.text_fn
        try:
            text_fn(_first_record(records, label))
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise DataConfigError(f"training.dataset: the text_fn of {label} fails on its first record: {e!r}") from e
        return LoadedDataset(label, records, text_fn)

    columns = _columns(records)
    if _is_sized(records) and len(records) == 0:
        raise DataConfigError(f"training.dataset: {label} has no records")
    if isinstance(records, LineFiles):
        _check_first_line(records, label)
    if columns is None:
        first = _first_record(records, label)
        if not isinstance(first, Mapping):
            raise DataConfigError(
                f"training.dataset: records of {label} are {type(first).__name__}, not dicts; "
                "register the dataset with a text_fn"
            )
        columns = list(first)
    if text_field not in columns:
        raise DataConfigError(
            f"training.dataset_text_field: {label} has no field {text_field!r}; its fields are {columns}"
        )
    if (is_hf_dataset(records) or is_hf_iterable(records)) and len(columns) > 1:
        records = records.select_columns([text_field])  # read only the text
    return LoadedDataset(label, records, _field_getter(text_field))
