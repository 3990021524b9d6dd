"""Fuzzing the config front door: randomly corrupted TOML files and CLI overrides.

Every corruption is invalid by construction (a wrong type, a value outside its choices or
range, an unknown key or section, broken TOML syntax, a malformed command line), drawn with
a fixed seed from the fields JobConfig really has, so new options are fuzzed too. Each must
end in a ``ConfigError`` whose message is one line and, where the fault is one option,
names it. A few go through the real CLI (``python -m torchtitan.train``): exit code 2, one
line on stderr, no traceback.
"""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from torchtitan.config import ConfigError, ConfigManager, JobConfig
from torchtitan.config.job_config import field_types, list_item, optional_inner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
BASE_TOML = REPO / "train_configs" / "debug_model.toml"
SEED = 1234
N_TOML = 150
N_CLI = 100

# Values every option must reject, by "section.key" (range rules beyond type and choices).
OUT_OF_RANGE: dict[str, list[Any]] = {
    "training.steps": [0, -5],
    "training.seq_len": [0, -1],
    "training.local_batch_size": [0, -8],
    "training.global_batch_size": [0, -2, 7],
    "training.gc_freq": [0],
    "training.dataset_shards": [-1],
    "checkpoint.interval": [0, -10],
    "checkpoint.keep_latest_k": [-1],
    "checkpoint.load_step": [-2],
    "lr_scheduler.min_lr_factor": [1.5, -0.1],
    "fault_tolerance.max_consecutive_skips": [-1],
    "fault_tolerance.preemption_grace_seconds": [-1.0],
    "fault_tolerance.preemption_exit_code": [0, 1, 2, 4, 126, 255],
}


def _options() -> list[tuple[str, str, Any, tuple[str, ...]]]:
    """(section, key, type, choices) of every JobConfig option."""
    out = []
    for section_name, section in JobConfig().sections().items():
        hints = field_types(type(section))
        for f in fields(section):
            out.append((section_name, f.name, hints[f.name], tuple(f.metadata.get("choices", ()))))
    return out


OPTIONS = _options()


def _base_kind(tp: Any) -> Any:
    inner = optional_inner(tp)
    return inner if inner is not None else tp


def _wrong_toml_value(tp: Any, rng: random.Random) -> Any:
    """A TOML value of the wrong type for ``tp``."""
    if list_item(tp) is not None:
        return rng.choice([7, 2.5, True])
    kind = _base_kind(tp)
    if kind is bool:
        return rng.choice([3, "maybe", 1.0, [True]])
    if kind is int:
        return rng.choice(["abc", 1.5, True, [1]])
    if kind is float:
        return rng.choice(["fast", True, [0.1]])
    return rng.choice([5, 2.5, True, [1, 2]])  # str


def _wrong_cli_text(tp: Any, rng: random.Random) -> str | None:
    """Command-line text ``tp`` cannot parse, or None when any text parses (plain str)."""
    kind = _base_kind(tp)
    item = list_item(kind)
    if item is int:
        return rng.choice(["1,x", "a,b"])
    if item is not None:
        return None
    if kind is bool:
        return rng.choice(["maybe", "2", "truee"])
    if kind is int:
        return rng.choice(["abc", "1.5", "1e3", "0x"])
    if kind is float:
        return rng.choice(["fast", "1,5", "--"]).replace("--", "abc")
    return None


def _toml_text(data: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def _random_word(rng: random.Random) -> str:
    return "zq" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(3, 9)))


def toml_cases(rng: random.Random, n: int) -> list[tuple[str, str, str | None]]:
    """(kind, TOML text, text the error must contain) for ``n`` corrupted files."""
    base_text = BASE_TOML.read_text()
    base = tomllib.loads(base_text)
    choice_options = [o for o in OPTIONS if o[3]]
    cases = []
    for _ in range(n):
        kind = rng.choice(["wrong_type", "bad_choice", "unknown_key", "unknown_section", "range", "syntax"])
        data = {s: dict(t) for s, t in base.items()}
        must = None
        if kind == "wrong_type":
            section, key, tp, _ = rng.choice(OPTIONS)
            data.setdefault(section, {})[key] = _wrong_toml_value(tp, rng)
            must = f"{section}.{key}"
        elif kind == "bad_choice":
            section, key, tp, _ = rng.choice(choice_options)
            bogus = _random_word(rng)
            data.setdefault(section, {})[key] = [bogus] if list_item(tp) is not None else bogus
            must = f"{section}.{key}"
        elif kind == "unknown_key":
            section = rng.choice(list(JobConfig().sections()))
            key = _random_word(rng)
            data.setdefault(section, {})[key] = rng.choice([1, "x", True])
            must = key
        elif kind == "unknown_section":
            section = _random_word(rng)
            data[section] = {"key": 1}
            must = section
        elif kind == "range":
            dotted = rng.choice(sorted(OUT_OF_RANGE))
            section, key = dotted.split(".")
            data.setdefault(section, {})[key] = rng.choice(OUT_OF_RANGE[dotted])
            must = dotted
        text = _toml_text(data)
        if kind == "syntax":
            lines = text.splitlines()
            at = rng.randrange(len(lines) + 1)
            broken = rng.choice(['x = "unterminated', "[[[", "a = = 1", "= 5", "key = 1 2", "[job", "k = [1, 2"])
            if rng.random() < 0.3:  # a repeated key is a TOML error too
                keyed = [i for i, line in enumerate(lines) if " = " in line]
                at = rng.choice(keyed)
                broken = lines[at]
            lines.insert(at + 1 if broken in lines else at, broken)
            text = "\n".join(lines)
            must = "invalid TOML"
        cases.append((kind, text, must))
    return cases


def cli_cases(rng: random.Random, n: int) -> list[tuple[str, list[str], str | None]]:
    """(kind, argv, text the error must contain) for ``n`` corrupted command lines."""
    typed = [(s, k, tp) for s, k, tp, _ in OPTIONS if _wrong_cli_text(tp, random.Random(0)) is not None]
    choice_options = [o for o in OPTIONS if o[3] and list_item(o[2]) is None]
    cases = []
    for _ in range(n):
        kind = rng.choice(
            ["wrong_type", "bad_choice", "unknown", "missing_value", "bare", "range", "no_file", "alias"]
        )
        if kind == "wrong_type":
            section, key, tp = rng.choice(typed)
            text = _wrong_cli_text(tp, rng)
            argv = [f"--{section}.{key}={text}"] if rng.random() < 0.5 else [f"--{section}.{key}", text]
            must = f"{section}.{key}"
        elif kind == "bad_choice":
            section, key, _, _ = rng.choice(choice_options)
            argv, must = [f"--{section}.{key}", _random_word(rng)], f"{section}.{key}"
        elif kind == "unknown":
            section = rng.choice(list(JobConfig().sections()) + [_random_word(rng)])
            word = _random_word(rng)
            argv, must = [f"--{section}.{word}", "1"], word
        elif kind == "missing_value":
            section, key, tp = rng.choice([o for o in typed if _base_kind(o[2]) is not bool])
            argv, must = [f"--{section}.{key}"], f"{section}.{key}"
        elif kind == "bare":
            argv, must = [_random_word(rng)], "unexpected argument"
        elif kind == "range":
            dotted = rng.choice(sorted(OUT_OF_RANGE))
            argv, must = [f"--{dotted}", str(rng.choice(OUT_OF_RANGE[dotted]))], dotted
        elif kind == "no_file":
            path = f"/nonexistent/{_random_word(rng)}.toml"
            argv, must = ["--job.config_file", path], path
        else:  # old and new names of one option that disagree
            argv, must = ["--training.batch_size", "2", "--training.local_batch_size", "4"], "training.batch_size"
        # Valid options around the bad one must not hide it.
        if rng.random() < 0.5:
            argv = ["--training.steps", str(rng.randint(1, 100))] + argv
        cases.append((kind, argv, must))
    return cases


def _check(error: ConfigError, must: str | None) -> str | None:
    message = str(error)
    if not message or "\n" in message:
        return f"not one line: {message!r}"
    if must is not None and must not in message:
        return f"does not name {must!r}: {message!r}"
    return None


def test_corrupted_toml_files_fail_with_one_line(tmp_path):
    rng = random.Random(SEED)
    problems = []
    for i, (kind, text, must) in enumerate(toml_cases(rng, N_TOML)):
        path = tmp_path / f"case_{i}.toml"
        path.write_text(text)
        try:
            ConfigManager().parse_args(["--job.config_file", str(path)])
        except ConfigError as e:
            problem = _check(e, must)
        except Exception as e:  # anything else would be a traceback for the user
            problem = f"raised {type(e).__name__}: {e}"
        else:
            problem = "was accepted"
        if problem:
            problems.append(f"case {i} ({kind}): {problem}\n{text}")
    assert not problems, f"{len(problems)} of {N_TOML} bad:\n" + "\n\n".join(problems[:5])


def test_corrupted_cli_overrides_fail_with_one_line():
    rng = random.Random(SEED + 1)
    problems = []
    for i, (kind, argv, must) in enumerate(cli_cases(rng, N_CLI)):
        try:
            ConfigManager().parse_args(["--job.config_file", str(BASE_TOML), *argv])
        except ConfigError as e:
            problem = _check(e, must)
        except Exception as e:
            problem = f"raised {type(e).__name__}: {e}"
        else:
            problem = "was accepted"
        if problem:
            problems.append(f"case {i} ({kind}) {argv}: {problem}")
    assert not problems, f"{len(problems)} of {N_CLI} bad:\n" + "\n".join(problems[:10])


def test_fuzz_cases_are_many_and_varied():
    toml = toml_cases(random.Random(SEED), N_TOML)
    cli = cli_cases(random.Random(SEED + 1), N_CLI)
    assert len(toml) + len(cli) >= 200
    assert len({k for k, _, _ in toml}) == 6 and len({k for k, _, _ in cli}) == 8


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_real_cli_exits_2_without_traceback(tmp_path, index):
    """A few of the fuzz cases through ``python -m torchtitan.train``."""
    rng = random.Random(SEED + 2)
    toml = [c for c in toml_cases(rng, 40) if c[0] in ("syntax", "wrong_type")][:2]
    cli = [c for c in cli_cases(rng, 40) if c[0] in ("range", "unknown")][:2]
    if index < 2:
        kind, text, must = toml[index]
        path = tmp_path / "bad.toml"
        path.write_text(text)
        argv = ["--job.config_file", str(path)]
    else:
        kind, extra, must = cli[index - 2]
        argv = ["--job.config_file", str(BASE_TOML), *extra]
    argv += ["--job.dump_folder", str(tmp_path / "out")]
    out = subprocess.run(
        [sys.executable, "-m", "torchtitan.train", *argv],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, (kind, out.stderr[-2000:])
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("torchtitan: error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert must is None or must in errors[0]
    assert not (tmp_path / "out").exists()  # nothing written for a rejected config
