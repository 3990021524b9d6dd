"""Packing: one shard's documents -> tokens (BOS ... EOS) -> windows of ``seq_len + 1``.

Documents are tokenized and appended to a token buffer; each window is the next
``seq_len + 1`` tokens of that buffer (inputs = window[:-1], labels = window[1:]), so the
windows concatenated are exactly the concatenated documents: no padding, nothing lost
between windows, the tail of one document starting the next window.

Documents whose text is empty, not a string, or not valid UTF-8 are skipped and counted.
A ``PackedShard``'s state (source position, token buffer, counters, passes) is small and
restores the stream exactly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from torchtitan.components.data.sources import ShardReader

__all__ = ["SKIP_REASONS", "PackedShard", "EmptyShardError", "document_text"]

logger = logging.getLogger(__name__)

SKIP_REASONS = ("empty", "not_text", "invalid_utf8")


class EmptyShardError(ValueError):
    """A whole pass over a shard produced no usable document (infinite mode would spin)."""


def document_text(value: Any) -> tuple[str | None, str | None]:
    """``(text, None)`` for a usable document, ``(None, reason)`` for one to skip."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(value, str):
        return None, "not_text"
    if not value.isascii():
        try:
            value.encode("utf-8")  # lone surrogates (e.g. from "\ud800" in JSON) cannot be
        except UnicodeEncodeError:
            return None, "invalid_utf8"
    if not value.strip():
        return None, "empty"
    return value, None


class PackedShard:
    """The packed token stream of one virtual shard."""

    def __init__(
        self,
        reader: ShardReader,
        tokenizer: Any,
        seq_len: int,
        text_fn: Callable[[Any], Any],
        *,
        infinite: bool,
        label: str,
    ):
        self.reader = reader
        self.tokenizer = tokenizer
        self.window = seq_len + 1
        self.text_fn = text_fn
        self.infinite = infinite
        self.label = label
        self.tokens: list[int] = []  # tokenized but not yet emitted
        self.samples = 0  # windows emitted
        self.documents = 0  # documents tokenized
        self.passes = 0  # completed passes over the shard (infinite mode)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self._records: Iterator[Any] | None = None
        self._empty_pass = False  # rewound and not a single usable document since

    def _next_record(self) -> tuple[bool, Any]:
        while True:
            if self._records is None:
                self._records = iter(self.reader)
            for record in self._records:
                return True, record
            self._records = None
            if not self.infinite:
                return False, None
            if self._empty_pass:
                raise EmptyShardError(
                    f"{self.label}: a whole pass produced no usable document; give more data "
                    "or fewer shards (training.dataset_shards / data parallel degree)"
                )
            self.passes += 1
            self._empty_pass = True
            logger.warning(f"{self.label}: reached the end of the data, starting pass {self.passes + 1}")
            self.reader.rewind()

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        total = sum(self.skipped.values())
        if total & (total - 1) == 0:  # at 1, 2, 4, 8, ... skips: rare but never silent
            counts = ", ".join(f"{k}: {v}" for k, v in self.skipped.items())
            logger.warning(f"{self.label}: skipped {total} unusable documents so far ({counts})")

    def next_window(self) -> list[int] | None:
        """The next ``seq_len + 1`` tokens, or None once a finite shard is used up."""
        while len(self.tokens) < self.window:
            found, record = self._next_record()
            if not found:
                return None
            text, reason = document_text(self.text_fn(record))
            if text is None:
                self._skip(reason)
                continue
            self._empty_pass = False
            self.documents += 1
            self.tokens.extend(self.tokenizer.encode(text, bos=True, eos=True))
        window = self.tokens[: self.window]
        del self.tokens[: self.window]
        self.samples += 1
        return window

    def state_dict(self) -> dict[str, Any]:
        """Flat and small: ints, one string (the reader's state as JSON), one list of ints."""
        return {
            "reader": json.dumps(self.reader.state_dict()),
            "tokens": list(self.tokens),
            "samples": self.samples,
            "documents": self.documents,
            "passes": self.passes,
            **{f"skipped_{k}": v for k, v in self.skipped.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(json.loads(state["reader"]))
        self.tokens = [int(t) for t in state["tokens"]]
        self.samples = int(state["samples"])
        self.documents = int(state["documents"])
        self.passes = int(state["passes"])
        self.skipped = {k: int(state[f"skipped_{k}"]) for k in SKIP_REASONS}
        self._records = None
        self._empty_pass = False
