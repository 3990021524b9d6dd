"""Fuzzing the whole front door, valid and invalid alike: generated configs (values, types,
encodings, parallel layouts against the world size) each end in one line + exit 2 or a
successful start, and nothing is written outside the dump folder.

Each case goes through ``torchtitan.train.main`` (what ``python -m torchtitan.train`` calls)
in a fresh working folder, with the Trainer replaced by a stub: "a successful start" is
everything the CLI does before it would spend device time (parse, validate, the output
folders, custom import, compile backend, ``validate_layout`` for $WORLD_SIZE, the family's
checks, the saved config). A sample of the started configs then trains one real step on the CPU.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from small_trainer import DEBUG_TOML, TOKENIZER
from test_config_fuzz import OPTIONS, _toml_text, _wrong_toml_value

import torchtitan.train as entry
from torchtitan.config import ConfigError, ConfigManager
from torchtitan.config.job_config import list_item, optional_inner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SEED = 2027
N_CASES = 240
KINDS = ("value", "type", "encoding", "layout")
# Options whose legal values start other programs (the planner, its dry run) or pick the
# file being read: they have their own tests.
SKIPPED = {"comm.mode", "memory_estimation.enable", "activation_checkpoint.mode", "job.config_file"}
ODD_TEXT = [
    "", "x", "ünïcödé", "emoji 🚀", "rtl \u202eabc", "tab\there", "zero\u200bwidth", "e\u0301", "  ", "日本語",
]
SMALL = ["--training.seq_len", "32", "--training.local_batch_size", "2", "--training.steps", "1"]


@dataclass
class Case:
    kind: str
    argv: list[str]
    toml: bytes | None  # the config file's bytes, or None for the debug TOML
    world: int

    def describe(self) -> str:
        head = (self.toml or b"")[:200]
        return f"{self.kind} world={self.world} argv={self.argv!r} toml={head!r}"


def _value(tp: Any, choices: tuple[str, ...], rng: random.Random) -> Any:
    """A value of the right type for ``tp``: ordinary, at an edge, or past one."""
    inner = optional_inner(tp)
    if inner is not None:
        return None if rng.random() < 0.2 else _value(inner, choices, rng)
    item = list_item(tp)
    if item is not None:
        pool = list(choices) or ODD_TEXT[1:]
        return rng.sample(pool, rng.randint(0, min(2, len(pool)))) if item is str else [rng.randint(-1, 4)]
    if tp is bool:
        return rng.random() < 0.5
    if tp is int:
        return rng.choice([0, 1, 2, 3, -1, 64, 1000, 2**31, 2**63 - 1, 2**63, -(2**64), 10**30])
    if tp is float:
        return rng.choice([0.0, 1e-3, 0.5, 1.0, 2.0, -1.0, 1e308, float("inf"), float("nan")])
    if choices and rng.random() < 0.7:
        return rng.choice([c for c in choices if c != "auto"] or choices)
    return rng.choice(ODD_TEXT)


def _cli_text(value: Any, rng: random.Random) -> str:
    """``value`` as a person might type it, sometimes in a spelling the parser must refuse."""
    if isinstance(value, bool):
        return rng.choice(["true", "false", "yes", "0", "TRUE"]) if rng.random() < 0.3 else str(value).lower()
    if isinstance(value, int) and rng.random() < 0.3:
        arabic = "".join(chr(0x660 + int(d)) for d in str(abs(value)))  # ARABIC-INDIC digits
        return rng.choice([f"{value:_}", f"+{value}", f" {value}", arabic])
    if isinstance(value, float) and rng.random() < 0.3:
        return rng.choice(["1,5", ".5", "1e-3", "inf", "-0"])
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _base() -> dict[str, dict[str, Any]]:
    return tomllib.loads(Path(DEBUG_TOML).read_text())


def _value_case(rng: random.Random) -> Case:
    section, key, tp, choices = rng.choice([o for o in OPTIONS if f"{o[0]}.{o[1]}" not in SKIPPED])
    value = _value(tp, choices, rng)
    if rng.random() < 0.5:
        return Case("value", [f"--{section}.{key}", _cli_text(value, rng)], None, 1)
    data = _base()
    if value is None or (isinstance(value, float) and value != value):  # TOML spelling of none / nan
        value = "none" if value is None else value
    data.setdefault(section, {})[key] = value
    return Case("value", [], _toml_text(data).encode(), 1)


def _type_case(rng: random.Random) -> Case:
    section, key, tp, _ = rng.choice([o for o in OPTIONS if f"{o[0]}.{o[1]}" not in SKIPPED])
    data = _base()
    data.setdefault(section, {})[key] = _wrong_toml_value(tp, rng)
    return Case("type", [], _toml_text(data).encode(), 1)


def _encoding_case(rng: random.Random) -> Case:
    text = Path(DEBUG_TOML).read_text()
    how = rng.choice(["bom", "utf16", "latin1", "flip", "truncate", "crlf", "nul", "odd_text", "odd_key", "cli_bytes"])
    argv: list[str] = []
    if how == "bom":
        raw = b"\xef\xbb\xbf" + text.encode()
    elif how == "utf16":
        raw = text.encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))
    elif how == "latin1":
        raw = text.replace("Llama 3 debug training", "caf\xe9 \xb5").encode("latin-1")
    elif how == "flip":
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    elif how == "truncate":
        raw = text.encode()[: rng.randrange(len(text))]
    elif how == "crlf":
        raw = text.replace("\n", "\r\n").encode()
    elif how == "nul":
        at = rng.randrange(len(text))
        raw = (text[:at] + "\x00" + text[at:]).encode()
    elif how == "odd_text":
        raw = text.replace("Llama 3 debug training", rng.choice(ODD_TEXT[1:]) + " \\u00e9 \\U0001F600").encode()
    elif how == "odd_key":
        raw = (text + f'\n[training]\n"{rng.choice(ODD_TEXT)}" = 1\n').encode()
    else:
        raw = text.encode()
        junk = os.fsdecode(bytes(rng.randrange(128, 256) for _ in range(3)))
        argv = [rng.choice(["--job.description", "--model.flavor", "--training.dataset"]), junk]
    return Case("encoding", argv, raw, 1)


def _layout_case(rng: random.Random) -> Case:
    world = rng.choice([1, 2, 3, 4, 6, 8, 16])
    degrees = {
        "data_parallel_replicate_degree": rng.choice([1, 1, 2, 3]),
        "data_parallel_shard_degree": rng.choice([-1, -1, 1, 2, 4, 8]),
        "tensor_parallel_degree": rng.choice([1, 1, 2, 4]),
        "pipeline_parallel_degree": rng.choice([1, 1, 2, 3]),
        "context_parallel_degree": rng.choice([1, 1, 2]),
        "expert_parallel_degree": rng.choice([1, 1, 1, 2]),
    }
    argv = [f"--parallelism.{k}={v}" for k, v in degrees.items() if v != 1 or rng.random() < 0.3]
    argv += ["--training.seq_len", str(rng.choice([32, 33, 64, 96, 256, 1000]))]
    argv += ["--training.local_batch_size", str(rng.choice([1, 2, 3, 8]))]
    argv += ["--training.global_batch_size", str(rng.choice([-1, -1, 8, 12, 16, 48]))]
    if rng.random() < 0.3:
        argv += ["--model.name", "qwen3", "--model.flavor", rng.choice(["debugmodel", "debugmodel_moe", "nope"])]
    return Case("layout", argv, None, world)


def cases(n: int = N_CASES, seed: int = SEED) -> list[Case]:
    rng = random.Random(seed)
    makers = {"value": _value_case, "type": _type_case, "encoding": _encoding_case, "layout": _layout_case}
    return [makers[KINDS[i % len(KINDS)]](rng) for i in range(n)]


class _Started(BaseException):
    """Raised by the stub Trainer: the launch got past every check to the build."""


class _StubTrainer:
    def __init__(self, cfg):
        raise _Started(cfg)


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _dump_folder(argv: list[str]) -> str | None:
    try:
        return ConfigManager().parse_args(argv).job.dump_folder
    except ConfigError:
        return None


def _launch(case: Case, root: Path, monkeypatch, capsys) -> tuple[str, Any]:
    """Run ``case`` in its own folder under ``root``: ("started", cfg) at the stubbed build,
    ("error", line) for one line + exit 2, ("trained", None) when a real run finished;
    anything else is ("problem", text)."""
    from torchtitan.tools.logging import init_logger, logger

    work = root / f"case_{len(list(root.iterdir()))}"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("WORLD_SIZE", str(case.world))
    argv = ["--job.config_file", DEBUG_TOML, *case.argv]
    if case.toml is not None:
        config = root / f"{work.name}.toml"
        config.write_bytes(case.toml)
        argv = ["--job.config_file", str(config), *case.argv]
    init_logger()
    capsys.readouterr()
    # the log handler was made once, on an earlier test's (now closed) captured stderr
    # (set, not setStream: that flushes the old stream, which may be closed)
    streams = [(h, h.stream) for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    for handler, _ in streams:
        handler.stream = sys.stderr
    try:
        entry.main(argv)
        outcome: tuple[str, Any] = ("trained", None)  # only without the stub
    except _Started as s:
        outcome = ("started", s.args[0])
    except SystemExit as e:
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("torchtitan: error:")]
        if e.code == 2 and len(errors) == 1 and "Traceback" not in err:
            outcome = ("error", errors[0])
        else:
            outcome = ("problem", f"exit {e.code}: {errors or err[-800:]!r}")
    except BaseException as e:  # a traceback for the user
        outcome = ("problem", f"raised {type(e).__name__}: {e}")
    finally:
        for handler, stream in streams:
            handler.stream = stream
    dump = _dump_folder(argv) if outcome[0] != "problem" else None
    allowed = (work / dump).resolve() if dump else None
    stray = [p for p in _tree(work)
             if allowed is None or not (p.resolve() == allowed or allowed in p.resolve().parents)]
    if stray and outcome[0] != "problem":
        outcome = ("problem", f"wrote outside the dump folder {dump!r}: {sorted(str(p) for p in stray)[:3]}")
    return outcome


@pytest.fixture
def stub_build(monkeypatch):
    import torchtitan.trainer

    monkeypatch.setattr(torchtitan.trainer, "Trainer", _StubTrainer)
    monkeypatch.setenv("RANK", "0")


def test_generated_configs_start_or_fail_with_one_line(tmp_path, monkeypatch, capsys, stub_build):
    outcomes: dict[str, list[str]] = {"started": [], "error": []}
    problems = []
    for case in cases():
        kind, detail = _launch(case, tmp_path, monkeypatch, capsys)
        if kind not in outcomes:
            problems.append(f"{case.describe()}\n    {detail}")
        else:
            outcomes[kind].append(case.kind)
    assert not problems, f"{len(problems)} of {N_CASES}:\n" + "\n".join(problems[:8])
    # Both verdicts occur (the fuzz is neither all-bad nor all-good); a wrong type never starts.
    for kind in ("value", "encoding", "layout"):
        assert kind in outcomes["started"] and kind in outcomes["error"], (kind, outcomes)
    assert "type" in outcomes["error"] and "type" not in outcomes["started"]


def test_fuzz_is_large_and_deterministic():
    assert len(cases()) >= 200
    assert [c.describe() for c in cases(40)] == [c.describe() for c in cases(40)]


def _cheap_to_train(cfg, base: dict) -> bool:
    """Whether ``cfg`` differs from the small trainer only where one CPU step stays cheap and
    offline (the optimizer, the schedule, the description; not the data, model or outputs)."""
    changed = {(s, k) for s, table in cfg.to_dict().items() for k, v in table.items() if base[s][k] != v}
    return all(s in ("optimizer", "lr_scheduler") or (s, k) in {("job", "description"), ("job", "config_file")}
               for s, k in changed)


def test_a_sample_of_started_configs_trains_a_real_step(tmp_path, monkeypatch, capsys):
    """A sample of the generated configs that started (the first re-encoded file that is cheap to
    train), shrunk to the small trainer's size, trains one real step on the CPU; one, as a real
    start costs seconds."""
    small = [*SMALL, "--model.tokenizer_path", TOKENIZER, "--training.mixed_precision_param", "float32"]
    base = ConfigManager().parse_args(["--job.config_file", DEBUG_TOML, *small]).to_dict()
    started = []
    with monkeypatch.context() as m:
        import torchtitan.trainer

        m.setattr(torchtitan.trainer, "Trainer", _StubTrainer)
        m.setenv("RANK", "0")
        for case in cases():
            if case.kind == "encoding":
                probe = Case(case.kind, [*case.argv, *small], case.toml, 1)
                kind, cfg = _launch(probe, _mkdir(tmp_path / "probe"), m, capsys)
                if kind == "started" and _cheap_to_train(cfg, base):
                    started.append(probe)
            if started:
                break
    assert started
    created = not dist.is_initialized()
    try:
        for case in started:
            kind, detail = _launch(case, _mkdir(tmp_path / f"real_{case.kind}"), monkeypatch, capsys)
            assert kind == "trained", (case.describe(), detail)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
