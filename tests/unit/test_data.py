"""Data pipeline: packing, sharding, exact resume (also across dp degrees), bad input."""

import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from torchtitan.components.data import (
    DataConfigError,
    DataFileNotFoundError,
    EmptyShardError,
    build_dataloader,
    register_dataset,
    registered_datasets,
)
from torchtitan.components.data.datasets import _looks_like_hub_id
from torchtitan.components.tokenizer import build_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOKENIZER = build_tokenizer(ASSETS / "test_tiktoken.model")
NUM_DOCS = 60


class IdTokenizer:
    """Reads a document as space-separated token ids: lets tests place tokens exactly."""

    bos_id, eos_id, vocab_size = 0, 1, 100_000

    def encode(self, text, bos, eos):
        return [0] * bos + [int(w) for w in text.split()] + [1] * eos


def _bundled_docs(n):
    with open(ASSETS / "bundled" / "part-00000.jsonl") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same documents as jsonl (two files), parquet and text (one line per document)."""
    root = tmp_path_factory.mktemp("data")
    docs = [d.replace("\n", " ") for d in _bundled_docs(NUM_DOCS)]
    (root / "jsonl").mkdir()
    for part in range(2):
        chunk = docs[part * NUM_DOCS // 2 : (part + 1) * NUM_DOCS // 2]
        (root / "jsonl" / f"p{part}.jsonl").write_text("".join(json.dumps({"text": d, "id": 1}) + "\n" for d in chunk))
    pq.write_table(pa.table({"text": docs}), root / "docs.parquet")
    (root / "docs.txt").write_text("".join(d + "\n" for d in docs))
    register_dataset("test_stream", str(root / "jsonl"), _stream_loader)
    return {"root": root, "docs": docs}


def _stream_loader(path):
    import datasets

    return datasets.load_dataset("json", data_files=f"{path}/*.jsonl", split="train", streaming=True)


def _source(files, kind):
    root = files["root"]
    return {
        "json": ("json", str(root / "jsonl")),
        "parquet": ("parquet", str(root / "docs.parquet")),
        "text": ("text", str(root / "docs.txt")),
        "stream": ("test_stream", None),
    }[kind]


def _loader(dataset, path, *, tokenizer=TOKENIZER, seq_len=32, local=2, global_=0, rank=0, dp=1, **kw):
    return build_dataloader(
        dataset=dataset,
        dataset_path=path,
        tokenizer=tokenizer,
        seq_len=seq_len,
        local_batch_size=local,
        global_batch_size=global_,
        dp_rank=rank,
        dp_world_size=dp,
        **kw,
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _windows(batches):
    """Each sample's full window: inputs plus the last label."""
    return [torch.cat([x, y[-1:]]).tolist() for inputs, labels in batches for x, y in zip(inputs, labels)]


def _stream(docs, tokenizer=TOKENIZER):
    return [t for d in docs for t in tokenizer.encode(d, bos=True, eos=True)]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------- packing


@pytest.mark.parametrize("kind", ["json", "parquet", "text", "stream"])
def test_packing_is_the_concatenated_documents(files, kind):
    batches = list(_loader(*_source(files, kind), infinite=False))
    for inputs, labels in batches:
        assert inputs.shape == labels.shape == (2, 32) and inputs.dtype == labels.dtype == torch.int64
        assert torch.equal(labels[:, :-1], inputs[:, 1:])
    flat = [t for w in _windows(batches) for t in w]
    expected = _stream(files["docs"])
    full_batches = len(expected) // 33 // 2
    assert len(batches) == full_batches and len(flat) == full_batches * 2 * 33
    assert flat == expected[: len(flat)]


def test_bundled_dataset_and_alias(files):
    assert {"c4", "c4_validation", "c4_test", "bundled", "json", "parquet", "text"} <= set(registered_datasets())
    a = next(iter(_loader("c4_test", None, seq_len=64)))
    b = next(iter(_loader("bundled", None, seq_len=64)))
    assert torch.equal(a[0], b[0])
    assert a[0][0].tolist() == _stream(_bundled_docs(3))[:64]


def test_custom_dataset_with_text_fn(files):
    register_dataset("test_custom", "unused", lambda path: [{"body": f"{i} {i}"} for i in range(8)], lambda r: r["body"])
    batches = list(_loader("test_custom", None, tokenizer=IdTokenizer(), seq_len=3, local=1, infinite=False))
    assert [w[1] for w in _windows(batches)] == list(range(8))


# ----------------------------------------------------------------- distribution


@pytest.mark.parametrize("num_shards", [0, 4])
@pytest.mark.parametrize("kind", ["json", "stream"])
def test_dp_ranks_get_disjoint_data_covering_everything(tmp_path, num_shards, kind):
    seq_len = 6
    ids = list(range(100, 124))  # each document fills exactly one window: BOS + 5 ids + EOS
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join([str(i)] * 5)}) + "\n" for i in ids))
    register_dataset("test_ids_stream", str(path), lambda p: _stream_loader(str(Path(p).parent)))
    dataset, dpath = ("json", str(path)) if kind == "json" else ("test_ids_stream", None)
    seen = []
    for rank in range(2):
        dl = _loader(dataset, dpath, tokenizer=IdTokenizer(), seq_len=seq_len, local=2, global_=4, rank=rank, dp=2,
                     num_shards=num_shards, infinite=False)
        seen.append([w[1] for w in _windows(list(dl))])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == ids


class Numbers:
    """A re-iterable that is not a sequence: read by striding, resumed by skipping."""

    def __iter__(self):
        return ({"text": f"{i} {i}"} for i in range(100, 140))


def test_plain_iterable_is_sharded_and_resumed():
    register_dataset("test_numbers", "unused", lambda path: Numbers())
    kw = dict(tokenizer=IdTokenizer(), seq_len=3, local=2, global_=4, dp=2, infinite=False)
    per_rank = [[w[1] for w in _windows(list(_loader("test_numbers", None, rank=r, **kw)))] for r in range(2)]
    assert per_rank == [list(range(100, 140, 2)), list(range(101, 140, 2))]
    first = _loader("test_numbers", None, rank=1, **kw)
    it = iter(first)
    _take(it, 3)
    resumed = _loader("test_numbers", None, rank=1, **kw)
    resumed.load_state_dict(first.state_dict())
    assert [w[1] for w in _windows(list(resumed))] == per_rank[1][6:]
    with pytest.raises(TypeError, match="one-shot iterator"):
        register_dataset("test_once", "unused", lambda path: iter([{"text": "1"}]), lambda r: r["text"])
        next(iter(_loader("test_once", None, **{**kw, "dp": 1, "global_": 2})))


# ----------------------------------------------------------------- resume


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("kind", ["json", "parquet", "text", "stream"])
def test_resume_is_exact(files, kind, dp):
    n, m = 30, 50  # more than one pass over a rank's shard: the wrap-around is resumed too
    for rank in range(dp):
        reference = _take(iter(_loader(*_source(files, kind), seq_len=64, rank=rank, dp=dp)), n + m)
        first = _loader(*_source(files, kind), seq_len=64, rank=rank, dp=dp)
        it = iter(first)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(_take(it, n), reference[:n]))
        state = _roundtrip(first.state_dict())
        assert set(state) == {f"shard_{rank}"}
        resumed = _loader(*_source(files, kind), seq_len=64, rank=rank, dp=dp)
        resumed.load_state_dict(state)
        rest = _take(iter(resumed), m)
        for (x, y), (rx, ry) in zip(rest, reference[n:]):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        assert resumed.state_dict()[f"shard_{rank}"]["passes"] >= 1


def _global_batches(files, kind, dp, steps, states=None, local=2, global_=8, num_shards=4):
    """Each step's global batch (ranks in order, microbatches in order), and final states."""
    loaders = [_loader(*_source(files, kind), local=local, global_=global_, rank=r, dp=dp, num_shards=num_shards)
               for r in range(dp)]
    if states is not None:
        for dl in loaders:
            dl.load_state_dict(states)
    its = [iter(dl) for dl in loaders]
    accum = global_ // (local * dp)
    batches = [torch.cat([torch.cat([next(it)[0] for _ in range(accum)]) for it in its]) for _ in range(steps)]
    merged = {}
    for dl in loaders:
        merged.update(_roundtrip(dl.state_dict()))
    return batches, merged


@pytest.mark.parametrize("kind", ["json", "stream"])
def test_global_batch_is_independent_of_dp_degree(files, kind):
    reference, _ = _global_batches(files, kind, dp=1, steps=4)
    for dp in (2, 4):
        batches, states = _global_batches(files, kind, dp=dp, steps=4)
        assert all(torch.equal(a, b) for a, b in zip(batches, reference))
        assert sorted(states) == [f"shard_{s}" for s in range(4)]


@pytest.mark.parametrize("kind", ["json", "stream"])
def test_state_saved_at_dp2_resumes_at_dp1_and_dp4(files, kind):
    reference, _ = _global_batches(files, kind, dp=1, steps=6)
    _, merged = _global_batches(files, kind, dp=2, steps=3)
    for dp in (1, 4):
        rest, _ = _global_batches(files, kind, dp=dp, steps=3, states=merged)
        assert all(torch.equal(a, b) for a, b in zip(rest, reference[3:]))


def test_state_is_small_flat_and_keyed_by_shard(files):
    dl = _loader("json", str(files["root"] / "jsonl"), local=2, global_=8, rank=1, dp=2, num_shards=4)
    next(iter(dl))
    state = dl.state_dict()
    assert sorted(state) == ["shard_2", "shard_3"]
    for shard in state.values():
        for value in shard.values():
            assert isinstance(value, (int, str)) or all(isinstance(t, int) for t in value)
        assert len(shard["tokens"]) < 33 + 500
    assert len(json.dumps(state)) < 20_000


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_state_round_trips_through_dcp_and_reshards(files, tmp_path):
    """What the checkpoint manager does: save the state with DCP, load it into a fresh
    loader's state_dict as the template; a dp-2 rank then finds exactly its shards."""
    import torch.distributed.checkpoint as dcp

    path = str(files["root"] / "jsonl")
    saved = _loader("json", path, local=2, global_=8, dp=1, num_shards=4)
    it = iter(saved)
    _take(it, 12)  # three steps
    dcp.save({"data": saved.state_dict()}, checkpoint_id=str(tmp_path), no_dist=True)
    expected = [next(it)[0] for _ in range(4)][2:]  # next step: shards 2 and 3 are rank 1's
    resumed = _loader("json", path, local=2, global_=8, rank=1, dp=2, num_shards=4)
    template = {"data": resumed.state_dict()}
    dcp.load(template, checkpoint_id=str(tmp_path), no_dist=True)
    resumed.load_state_dict(template["data"])
    got = _take(iter(resumed), 2)
    assert torch.equal(torch.cat([x for x, _ in got]), torch.cat(expected))


def test_mid_step_state_or_other_layout_is_refused(files):
    path = str(files["root"] / "jsonl")
    dl = _loader(path=path, dataset="json", local=2, global_=8, dp=1, num_shards=4)
    next(iter(dl))  # a quarter of a step
    merged = dl.state_dict()
    with pytest.raises(DataConfigError, match="middle of an optimizer step"):
        _loader("json", path, local=2, global_=8, rank=0, dp=2, num_shards=4).load_state_dict(merged)
    same = _loader("json", path, local=2, global_=8, dp=1, num_shards=4)
    same.load_state_dict(merged)  # the same layout resumes mid-step fine
    with pytest.raises(DataConfigError, match="saved with 4 data shards"):
        _loader("json", path, local=2, global_=8, dp=1, num_shards=0).load_state_dict({"shard_0": merged["shard_0"]})
    with pytest.raises(DataConfigError, match=r"lacks \['shard_1'\]"):
        _loader("json", path, local=2, global_=4, rank=1, dp=2).load_state_dict({"shard_0": merged["shard_0"]})


# ----------------------------------------------------------------- infinite mode, skipping


def test_infinite_mode_wraps_with_a_warning(tmp_path, caplog):
    docs = [f"{i} {i} {i}" for i in range(10, 17)]  # 7 documents of 5 tokens
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = IdTokenizer()
    assert len(list(_loader("json", str(path), tokenizer=tok, seq_len=3, local=2, infinite=False))) == 4
    dl = _loader("json", str(path), tokenizer=tok, seq_len=3, local=2, infinite=True)
    with caplog.at_level(logging.WARNING):
        flat = [t for w in _windows(_take(iter(dl), 12)) for t in w]
    assert flat == (_stream(docs, tok) * 3)[: len(flat)]
    assert any("starting pass 2" in r.getMessage() for r in caplog.records)
    assert dl.state_dict()["shard_0"]["passes"] == 2


def test_skipped_documents_are_counted_not_fatal(tmp_path, caplog):
    good = ["7 7", "8 8 8", "9"]
    records = [{"text": ""}, {"text": good[0]}, {"text": 5}, {"text": None}, {"text": "a \ud800 b"},
               {"text": good[1]}, {"other": "x"}, {"text": b"\xff\xfe"}, {"text": "   "}, {"text": good[2]}]
    register_dataset("test_bad_docs", "unused", lambda path: records)
    tok = IdTokenizer()
    with caplog.at_level(logging.WARNING):
        dl = _loader("test_bad_docs", None, tokenizer=tok, seq_len=1, local=1, infinite=False)
        flat = [t for w in _windows(list(dl)) for t in w]
    assert flat == _stream(good, tok)[: len(flat)] and len(flat) == 12
    assert dl.skipped_documents == {"empty": 2, "not_text": 3, "invalid_utf8": 2}
    assert dl.documents_read == 3
    assert any("skipped 4 unusable documents" in r.getMessage() for r in caplog.records)


def test_text_files_skip_undecodable_lines(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"1 2\n\xff\xfe 3\n\n4 5 6\r\n")
    dl = _loader("text", str(path), tokenizer=IdTokenizer(), seq_len=1, local=1, infinite=False)
    flat = [t for w in _windows(list(dl)) for t in w]
    assert flat == [0, 1, 2, 1, 0, 4, 5, 6]
    assert dl.skipped_documents == {"empty": 1, "not_text": 0, "invalid_utf8": 1}


def test_json_that_arrow_rejects_is_read_line_by_line(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "1 2"}\n{"text": "bad \\ud800 x"}\nnot json\n{"text": "3 4"}\n')
    dl = _loader("json", str(path), tokenizer=IdTokenizer(), seq_len=3, local=1, infinite=False)
    assert _windows(list(dl)) == [[0, 1, 2, 1], [0, 3, 4, 1]]
    assert dl.skipped_documents == {"empty": 0, "not_text": 1, "invalid_utf8": 1}


def test_a_shard_without_documents_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text('{"text": "1"}\n{"text": "2"}\n')
    dl = _loader("json", str(path), tokenizer=IdTokenizer(), seq_len=3, local=1, global_=4, rank=3, dp=4)
    with pytest.raises(EmptyShardError, match="no usable document"):
        next(iter(dl))


# ----------------------------------------------------------------- bad input


def test_bad_input_errors_are_one_line_and_name_the_option(files, tmp_path):
    root = files["root"]
    cases = [
        (dict(dataset="c5"), DataConfigError, r"unknown dataset 'c5'.*c4_test.*formats.*json, parquet, text"),
        (dict(dataset="json"), DataConfigError, "training.dataset_path is required"),
        (dict(dataset="json", dataset_path=str(tmp_path / "no.jsonl")), DataFileNotFoundError, "does not exist"),
        (dict(dataset="json", dataset_path=str(tmp_path / "*.jsonl")), DataFileNotFoundError, "no files match"),
        (dict(dataset="parquet", dataset_path=str(root / "jsonl")), DataFileNotFoundError, "holds no .parquet"),
        (dict(dataset="json", dataset_path=str(root / "jsonl"), text_field="content"), DataConfigError,
         r"no field 'content'; its fields are \['text', 'id'\]"),
        (dict(dataset="test_stream", text_field="body"), DataConfigError, "no field 'body'"),
        (dict(dataset="text", dataset_path=str(root / "docs.txt"), text_field="body"), DataConfigError,
         r"no field 'body'; its fields are \['text'\]"),
        (dict(dataset="bundled", num_shards=3, global_=12, local=2), DataConfigError,
         r"training.dataset_shards \(3\) must be a multiple of the data parallel degree"),
        (dict(dataset="bundled", num_shards=4, global_=6, local=3, dp=2), DataConfigError,
         r"training.dataset_shards \(4\) must divide training.global_batch_size \(6\)"),
        (dict(dataset="bundled", global_=6, local=4), DataConfigError, "training.global_batch_size"),
    ]
    for kwargs, error, pattern in cases:
        kwargs = {"dataset_path": None, "dp": kwargs.pop("dp", 2 if "num_shards" in kwargs else 1), **kwargs}
        with pytest.raises(error, match=pattern) as e:
            _loader(kwargs.pop("dataset"), kwargs.pop("dataset_path"), **kwargs)
        assert "\n" not in str(e.value)


def test_hub_ids_are_told_apart_from_paths(files):
    assert _looks_like_hub_id("allenai/c4") and _looks_like_hub_id("HuggingFaceFW/fineweb-edu")
    assert not _looks_like_hub_id("data/my.jsonl")
    assert not _looks_like_hub_id(str(files["root"] / "jsonl"))
    assert not _looks_like_hub_id("data/*.parquet") and not _looks_like_hub_id("https://x.org/a.jsonl")


@pytest.mark.parametrize("workers, persistent, prefetch", [(1, False, None), (2, True, 3)])
def test_worker_processes_give_the_same_batches_and_exact_resumable_state(files, workers, persistent, prefetch):
    """training.dataloader_*: batches and state do not depend on the workers; a state taken
    with workers (batches prefetched past it) resumes exactly, with or without workers."""
    kw = dict(num_workers=workers, persistent_workers=persistent, prefetch_factor=prefetch, pin_memory=False)
    n, m = 7, 9
    reference = _take(iter(_loader(*_source(files, "json"), seq_len=64)), n + m)
    first = _loader(*_source(files, "json"), seq_len=64, **kw)
    it = iter(first)
    got = _take(it, n)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, reference[:n]))
    state = _roundtrip(first.state_dict())
    assert set(state) == {"shard_0"} and state["shard_0"]["samples"] == n * 2
    assert first.documents_read > 0
    del it
    for resume_kw in (kw, {}):
        resumed = _loader(*_source(files, "json"), seq_len=64, **resume_kw)
        resumed.load_state_dict(state)
        rest = _take(iter(resumed), m)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, reference[n:]))
