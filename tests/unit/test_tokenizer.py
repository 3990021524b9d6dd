"""Tokenizers: both kinds against independent references (the BPE file, the JSON vocab)."""

import base64
import json
import shutil
import time
from pathlib import Path

import pytest
import regex

from torchtitan.components.tokenizer import (
    LLAMA3_PATTERN,
    HuggingFaceTokenizer,
    TikTokenizer,
    TokenizerError,
    TokenizerNotFoundError,
    build_tokenizer,
    llama3_special_tokens,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TIKTOKEN = ASSETS / "test_tiktoken.model"
HF_JSON = ASSETS / "test_tokenizer.json"

SAMPLES = [
    "Once upon a time, there was a little cat named Zoë.",
    "12 + 345 = 357\n\nDon't you're I'll  tabs\there\r\nend",
    "Unicode: café, 北京, emoji 😀, math ∑ x².",
    "   leading and trailing spaces   ",
]


@pytest.fixture(params=[TIKTOKEN, HF_JSON], ids=["tiktoken", "hf"])
def tok(request):
    return build_tokenizer(request.param)


def test_build_picks_kind_from_path():
    assert isinstance(build_tokenizer(TIKTOKEN), TikTokenizer)
    assert isinstance(build_tokenizer(str(HF_JSON)), HuggingFaceTokenizer)


def test_round_trip_and_bos_eos_placement(tok):
    for text in SAMPLES:
        plain = tok.encode(text, bos=False, eos=False)
        assert tok.bos_id not in plain and tok.eos_id not in plain
        assert tok.decode(plain) == text
        assert tok.encode(text, bos=True, eos=False) == [tok.bos_id] + plain
        assert tok.encode(text, bos=False, eos=True) == plain + [tok.eos_id]
        assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + plain + [tok.eos_id]
        assert all(0 <= i < tok.vocab_size for i in plain)
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]


def test_special_token_text_in_documents_is_plain_text(tok):
    text = "a <|begin_of_text|> b <|end_of_text|> c <|eot_id|>"
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert len(ids) > 6  # spelled out in ordinary tokens, not collapsed to one id each
    assert tok.decode(ids) == text


def _reference_bpe(text: str, ranks: dict[bytes, int]) -> list[int]:
    """Textbook byte-level BPE: merge the adjacent pair whose union has the lowest rank."""
    out = []
    for piece in regex.findall(LLAMA3_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            merged = [(ranks.get(a + b, 1 << 60), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(merged)
            if best == 1 << 60:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


def test_tiktoken_matches_reference_bpe_and_llama3_specials():
    lines = TIKTOKEN.read_text().split()
    ranks = {base64.b64decode(t): int(r) for t, r in zip(lines[::2], lines[1::2])}
    tok = build_tokenizer(TIKTOKEN)
    for text in SAMPLES:
        assert tok.encode(text, bos=False, eos=False) == _reference_bpe(text, ranks)

    n = len(ranks)
    assert tok.vocab_size == n + 256
    specials = llama3_special_tokens()
    assert len(specials) == len(set(specials)) == 256
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|reserved_special_token_0|>": 2,
        "<|reserved_special_token_3|>": 5,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|reserved_special_token_4|>": 8,
        "<|eot_id|>": 9,
        "<|reserved_special_token_5|>": 10,
        "<|reserved_special_token_250|>": 255,
    }
    for name, offset in expected.items():
        assert tok.special_tokens[name] == n + offset
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)


def test_hf_vocab_size_and_specials_from_json():
    data = json.loads(HF_JSON.read_text())
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data["added_tokens"]]
    tok = build_tokenizer(HF_JSON)
    assert tok.vocab_size == max(ids) + 1
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    assert tok.bos_id == added["<|begin_of_text|>"] and tok.eos_id == added["<|end_of_text|>"]


def test_hf_tokenizer_config_chooses_bos_eos(tmp_path):
    shutil.copy(HF_JSON, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|end_of_text|>"}, "eos_token": "<|begin_of_text|>"})
    )
    tok = build_tokenizer(tmp_path)  # a folder holding a tokenizer.json
    default = build_tokenizer(HF_JSON)
    assert isinstance(tok, HuggingFaceTokenizer)
    assert (tok.bos_id, tok.eos_id) == (default.eos_id, default.bos_id)


def test_folder_with_tiktoken_model(tmp_path):
    (tmp_path / "original").mkdir()
    shutil.copy(TIKTOKEN, tmp_path / "original" / "tokenizer.model")
    tok = build_tokenizer(tmp_path)
    assert isinstance(tok, TikTokenizer) and tok.vocab_size == build_tokenizer(TIKTOKEN).vocab_size


def test_very_long_runs_are_fast_and_exact():
    tok = build_tokenizer(TIKTOKEN)
    text = "word " * 1000 + " " * 120_000 + "x" * 60_000 + "\n" * 30_000 + "end"
    start = time.perf_counter()
    ids = tok.encode(text, bos=False, eos=False)
    assert time.perf_counter() - start < 10
    assert tok.decode(ids) == text


def test_missing_path_names_it_and_the_download_script(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError) as e:
        build_tokenizer(missing)
    assert isinstance(e.value, TokenizerNotFoundError)
    msg = str(e.value)
    assert str(missing) in msg and "scripts/download_tokenizer.py" in msg and "\n" not in msg
    with pytest.raises(TokenizerNotFoundError, match="holds no tokenizer"):
        build_tokenizer(tmp_path)


def test_malformed_bpe_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nnot-a-pair\n")
    with pytest.raises(TokenizerError, match=r"bad\.model:2"):
        build_tokenizer(bad)
    bad.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(255)))
    with pytest.raises(TokenizerError, match="single bytes"):
        build_tokenizer(bad)


def test_hf_assets_folder_and_its_download_command(tmp_path):
    """model.hf_assets_path names a folder: the test one reads its tokenizer.json with the
    BOS/EOS of its tokenizer_config.json; a missing one names the command that fetches it."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tok = build_tokenizer(Path(__file__).resolve().parents[1] / "assets" / "tokenizer")
    assert isinstance(tok, HuggingFaceTokenizer) and (tok.bos_id, tok.eos_id) == (0, 1)
    folder = tmp_path / "hf" / "Llama-3.1-70B"
    with pytest.raises(TokenizerNotFoundError) as e:
        build_tokenizer(folder)
    msg = str(e.value)
    assert f"tokenizer folder {folder} not found" in msg and "\n" not in msg
    assert f"download_tokenizer.py --repo_id meta-llama/Llama-3.1-70B --local_dir {folder}" in msg


def test_a_vocabulary_far_larger_than_the_tokenizer_stops_unless_allowed():
    from torchtitan.components.tokenizer import TokenizerError, check_tokenizer_fits

    tok = build_tokenizer(TIKTOKEN)  # 2,256 tokens
    kw = dict(family="llama3", flavor="8B", path=str(TIKTOKEN))
    with pytest.raises(TokenizerError) as e:
        check_tokenizer_fits(tok, 128_256, allow_small=False, **kw)
    msg = str(e.value)
    assert "128,256-token vocabulary" in msg and "2,256" in msg and "\n" not in msg
    assert 'model.hf_assets_path = "./assets/hf/Llama-3.1-8B"' in msg
    assert "--repo_id meta-llama/Llama-3.1-8B --local_dir ./assets/hf/Llama-3.1-8B" in msg
    assert "model.allow_small_tokenizer" in msg
    check_tokenizer_fits(tok, 128_256, allow_small=True, **kw)  # the benchmarks' deliberate choice
    check_tokenizer_fits(tok, 4_000, allow_small=False, **kw)  # within 2x: fine
