"""Option values: from command-line strings and TOML into typed values, and back to TOML.

Torch-free, like all of config/.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from torchtitan.config.job_config import JobConfig, list_item, optional_inner, type_name

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
# Numbers as a person types them: ASCII digits only. Python's int()/float() also take
# "1_000", "+5", " 5 " and other scripts' digits ("١٢"), which a typo should not reach.
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?|-?inf|nan")


class _BadValue(Exception):
    """A value that does not convert to the option's type; carries what was expected."""


# --- value conversion ------------------------------------------------------------------------


def _expected(tp: Any) -> str:
    inner = optional_inner(tp)
    if inner is not None:
        return f"{_expected(inner)} or none"
    item = list_item(tp)
    if item is not None:
        return f"comma-separated list of {type_name(item)}"
    if tp is bool:
        return "true or false"
    return type_name(tp)


def _from_string(text: str, tp: Any) -> Any:
    """Convert a command-line string to ``tp``; raises _BadValue."""
    inner = optional_inner(tp)
    if inner is not None:
        if text.strip().lower() in _NONE:
            return None
        try:
            return _from_string(text, inner)
        except _BadValue:
            raise _BadValue(_expected(tp)) from None
    item = list_item(tp)
    if item is not None:
        if not text.strip():
            return []
        try:
            return [_from_string(part.strip(), item) for part in text.split(",")]
        except _BadValue:
            raise _BadValue(_expected(tp)) from None
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise _BadValue(_expected(tp))
    if tp is int:
        if not _INT.fullmatch(text):
            raise _BadValue(f"{_expected(tp)} (plain decimal digits)")
        return int(text)
    if tp is float:
        if not _FLOAT.fullmatch(text.lower()):
            raise _BadValue(_expected(tp))
        return float(text)
    return text


def _from_toml(value: Any, tp: Any) -> Any:
    """Check/convert a parsed TOML value to ``tp``; a string is also accepted for a list."""
    inner = optional_inner(tp)
    if inner is not None:
        if isinstance(value, str) and value.strip().lower() in _NONE:
            return None  # TOML has no null
        try:
            return _from_toml(value, inner)
        except _BadValue:
            raise _BadValue(f'{type_name(inner)} or "none"') from None
    item = list_item(tp)
    if item is not None:
        if isinstance(value, str):
            return _from_string(value, tp)
        try:
            if not isinstance(value, list):
                raise _BadValue()
            return [_from_toml(v, item) for v in value]
        except _BadValue:
            raise _BadValue(type_name(tp)) from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise _BadValue("int")
    if not isinstance(value, tp):
        raise _BadValue(type_name(tp))
    return value


# --- TOML writing ----------------------------------------------------------------------------

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in _ESCAPES:
                out.append(_ESCAPES[ch])
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(job_config: JobConfig) -> str:
    """The config as TOML text; ``parse_args`` reads it back to an equal config.

    TOML has no null: a None value is written as a comment when None is the default (so the
    key keeps its default on reading) and as the string "none" otherwise.
    """
    lines: list[str] = []
    for name, section in job_config.sections().items():
        lines.append(f"[{name}]")
        defaults = type(section)()
        for f in fields(section):  # type: ignore[arg-type]
            value = getattr(section, f.name)
            if value is None:
                if getattr(defaults, f.name) is None:
                    lines.append(f"# {f.name} = none")
                else:
                    lines.append(f'{f.name} = "none"')
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def dump_toml(job_config: JobConfig, path: str | Path) -> None:
    """Write the final config to ``path`` so the run can be repeated with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(job_config), encoding="utf-8")


def format_config(job_config: JobConfig) -> str:
    """Multi-line listing for the start-of-run log; values changed from defaults are marked."""
    lines: list[str] = []
    for name, section in job_config.sections().items():
        lines.append(f"[{name}]")
        defaults = type(section)()
        for f in fields(section):  # type: ignore[arg-type]
            value = getattr(section, f.name)
            default = getattr(defaults, f.name)
            shown = "none" if value is None else _toml_value(value)
            note = ""
            if value != default:
                note = f"  # default: {'none' if default is None else _toml_value(default)}"
            lines.append(f"  {f.name} = {shown}{note}")
    return "\n".join(lines)


# --- the manager -----------------------------------------------------------------------------
