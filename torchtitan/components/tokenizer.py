"""Tokenizers: Llama 3's tiktoken format and Hugging Face ``tokenizer.json``.

Both kinds offer the same small interface (``encode``, ``decode``, ``vocab_size``,
``bos_id``, ``eos_id``) so the data pipeline and the model never care which one is in use.
Text that looks like a special token (``<|eot_id|>`` inside a web page) is always encoded
as plain text: special ids only ever come from ``bos=True`` / ``eos=True``.
"""

from __future__ import annotations

import base64
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "HuggingFaceTokenizer",
    "LLAMA3_PATTERN",
    "TikTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TokenizerNotFoundError",
    "build_tokenizer",
    "check_tokenizer_fits",
    "download_command",
    "llama3_special_tokens",
]

# Llama 3's pre-tokenizer: contractions, words with one leading non-letter, numbers in
# groups of at most three digits, punctuation runs, newlines, and whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RESERVED_SPECIAL_TOKENS = 256

# tiktoken's regex engine gets very slow on long runs of whitespace (or of non-whitespace),
# so long documents are cut into pieces first; the cuts change at most a token or two there.
_MAX_PIECE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")

# Hugging Face repository of a model family's flavor, for the download hint: a pattern, or
# one repository per flavor where the names do not follow the flavors'.
_HF_REPOS: dict[str, str | dict[str, str]] = {
    "llama3": "meta-llama/Llama-3.1-{flavor}",
    "qwen3": "Qwen/Qwen3-{flavor}",
    "deepseek_v3": {"16B": "deepseek-ai/DeepSeek-V2-Lite", "671B": "deepseek-ai/DeepSeek-V3"},
}
_ORGS = {"llama": "meta-llama", "qwen": "Qwen", "mistral": "mistralai", "gemma": "google"}


def download_command(folder: str | Path, repo_id: str | None = None) -> str:
    """The command that fetches a Hugging Face tokenizer folder (the hint of every
    missing-tokenizer error); the repository is guessed from the folder name when not given."""
    name = Path(folder).name or "Llama-3.1-8B"
    if repo_id is None:
        org = next((o for prefix, o in _ORGS.items() if name.lower().startswith(prefix)), "<org>")
        repo_id = f"{org}/{name}"
    return f"python scripts/download_tokenizer.py --repo_id {repo_id} --local_dir {folder} --hf_token <token>"


_DOWNLOAD_HINT = (
    "set model.hf_assets_path (or model.tokenizer_path) to an existing tokenizer folder or file, or fetch "
    "one with `" + download_command("./assets/hf/Llama-3.1-8B", "meta-llama/Llama-3.1-8B") + "`"
)


class TokenizerError(ValueError):
    """A tokenizer file exists but cannot be used."""


class TokenizerNotFoundError(FileNotFoundError):
    """The tokenizer path does not exist or holds no tokenizer file."""


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens Llama 3 appends after its base vocabulary, in Meta's order."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    rest = [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)]
    return named + rest


class Tokenizer(ABC):
    """What the data pipeline and the model need from a tokenizer."""

    bos_id: int
    eos_id: int

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model must embed (largest id + 1)."""

    @abstractmethod
    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``text``, with BOS first / EOS last when asked."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; bytes that do not form valid UTF-8 become U+FFFD."""

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one ``base64(token bytes) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(
                    f"{path}:{lineno}: expected 'base64_token rank' (tiktoken BPE format), got {line[:60]!r}"
                ) from None
    if not ranks:
        raise TokenizerError(f"{path}: the vocabulary is empty (no 'base64_token rank' lines)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: BPE ranks must be the integers 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: the 256 single bytes must all be tokens; {len(missing)} are missing")
    return ranks


def _pieces_for_tiktoken(text: str) -> Iterator[str]:
    """Cut ``text`` so no piece is much longer than 400k chars or holds a run of more than
    25k whitespace or non-whitespace characters (tiktoken is quadratic-ish on those)."""
    if len(text) <= _MAX_RUN_CHARS:
        yield text
        return
    start = 0
    for match in _RUNS.finditer(text):
        run_start, run_end = match.span()
        if run_start - start >= _MAX_PIECE_CHARS:
            yield text[start:run_start]
            start = run_start
        for cut in range(run_start + _MAX_RUN_CHARS, run_end, _MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


class TikTokenizer(Tokenizer):
    """Llama 3's tokenizer: byte-level BPE ranks from ``tokenizer.model`` + 256 specials."""

    def __init__(self, path: str | Path):
        import tiktoken

        self.path = Path(path)
        ranks = _read_bpe_ranks(self.path)
        self.num_base_tokens = len(ranks)
        self.special_tokens = {
            token: self.num_base_tokens + i for i, token in enumerate(llama3_special_tokens())
        }
        self._model = tiktoken.Encoding(
            name=self.path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]

    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + len(self.special_tokens)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids: list[int] = []
        for piece in _pieces_for_tiktoken(text):
            # allowed_special=set() + disallowed_special=(): special-token text is plain text.
            ids.extend(self._model.encode(piece, allowed_special=set(), disallowed_special=()))
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.decode(list(ids))


# Names tried, in order, when no tokenizer_config.json says which tokens are BOS / EOS.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


def _configured_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", ...} in older configs
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` run through the ``tokenizers`` library.

    BOS / EOS come from a ``tokenizer_config.json`` beside the file when there is one,
    else from the usual token names (``<|begin_of_text|>``, ``<s>``, ...).
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        try:
            self._model = RustTokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise TokenizerError(f"{self.path}: not a valid Hugging Face tokenizer.json ({e})") from None
        # Do not split special-token text out of documents: encode it as plain text.
        self._model.encode_special_tokens = True
        vocab = self._model.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"{self.path}: the vocabulary is empty; is this the model's tokenizer.json?")
        self._vocab_size = max(vocab.values()) + 1
        config = self._read_config()
        self.bos_id = self._find_special(vocab, config, "bos_token", _BOS_CANDIDATES)
        self.eos_id = self._find_special(vocab, config, "eos_token", _EOS_CANDIDATES)

    def _read_config(self) -> dict:
        """The ``tokenizer_config.json`` beside the file ({} when there is none)."""
        config_path = self.path.parent / "tokenizer_config.json"
        if not config_path.is_file():
            return {}
        try:
            config = json.loads(config_path.read_bytes())
        except ValueError as e:  # also not UTF-8
            raise TokenizerError(f"{config_path}: not valid JSON ({e}); fix or remove it") from None
        if not isinstance(config, dict):
            raise TokenizerError(
                f"{config_path}: expected a JSON object, got {type(config).__name__}; fix or remove it"
            )
        return config

    def _find_special(self, vocab: dict[str, int], config: dict, key: str, candidates: tuple[str, ...]) -> int:
        name = _configured_token(config, key)
        if name is not None and name in vocab:
            return vocab[name]
        for name in candidates:
            if name in vocab:
                return vocab[name]
        raise TokenizerError(
            f"{self.path}: cannot tell which token is the {key[:3].upper()}; add a tokenizer_config.json "
            f"beside it with \"{key}\" set, or add one of {list(candidates)} to the vocabulary"
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self._model.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.decode(list(ids), skip_special_tokens=False)


def build_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at ``path``: a ``tokenizer.json`` (or a folder holding one) is read with
    Hugging Face ``tokenizers``; anything else is a Llama 3 tiktoken BPE file."""
    given, path = str(path), Path(path)  # messages keep the path as the config spells it
    if path.is_dir():
        for candidate in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
            if (path / candidate).is_file():
                return build_tokenizer(path / candidate)
        raise TokenizerNotFoundError(
            f"tokenizer folder {path} holds no tokenizer.json or tokenizer.model; fetch it with "
            f"`{download_command(path)}`"
        )
    if not path.exists() and path.suffix not in (".model", ".json", ".tiktoken"):  # a folder not fetched yet
        raise TokenizerNotFoundError(
            f"tokenizer folder {given} not found; fetch it with `{download_command(given)}`"
        )
    if not path.is_file():
        raise TokenizerNotFoundError(f"tokenizer file not found: {path}; {_DOWNLOAD_HINT}")
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path)
    return TikTokenizer(path)


def check_tokenizer_fits(
    tokenizer: Tokenizer, model_vocab_size: int, *, family: str, flavor: str, path: str, allow_small: bool
) -> None:
    """Stop (TokenizerError, one line) when the model's vocabulary is far (> 2x) larger than
    the tokenizer's: a big flavor trained with a toy tokenizer (most often the 2,256-token test
    tokenizer, the default ``model.tokenizer_path``) is almost always a missing download, not a
    choice. ``allow_small`` (model.allow_small_tokenizer) is the deliberate opt-in."""
    if allow_small or model_vocab_size <= 2 * tokenizer.vocab_size:
        return
    repos = _HF_REPOS.get(family, "")
    repo = (repos.get(flavor, "") if isinstance(repos, dict) else repos.format(flavor=flavor)) or None
    folder = f"./assets/hf/{repo.split('/')[1]}" if repo else "./assets/hf/<model>"
    raise TokenizerError(
        f"model {family} {flavor} has a {model_vocab_size:,}-token vocabulary but the tokenizer {path} has "
        f"{tokenizer.vocab_size:,}: set model.hf_assets_path = \"{folder}\" after fetching it with "
        f"`{download_command(folder, repo)}` (or set model.allow_small_tokenizer = true to train with this one)"
    )
