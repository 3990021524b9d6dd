"""Build a validated JobConfig from defaults, a TOML file and command-line overrides.

Precedence is CLI > TOML > default. Both sources go through the same steps: each key is
resolved (canonical name, old v0.1 spelling from ``ALIASES``, or an unknown key with a
"did you mean" suggestion), its value is coerced to the field's type, and the source's
settings are applied in one go. ``JobConfig.validate()`` then checks every value, so
bad input fails here with one line, before anything is built.

Importing this module must not import torch (``--help`` is instant).
"""

from __future__ import annotations

import difflib
import logging
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from torchtitan.config.job_config import (
    ConfigError,
    JobConfig,
    field_types,
    list_item,
    optional_inner,
    type_name,
)

logger = logging.getLogger(__name__)

# Keys renamed since TorchTitan v0.1: old "section.key" -> new "section.key".
ALIASES: dict[str, str] = {
    "job.print_args": "job.print_config",
    "training.batch_size": "training.local_batch_size",
    "training.data_parallel_replicate_degree": "parallelism.data_parallel_replicate_degree",
    "training.data_parallel_shard_degree": "parallelism.data_parallel_shard_degree",
    "training.tensor_parallel_degree": "parallelism.tensor_parallel_degree",
    "training.disable_loss_parallel": "parallelism.disable_loss_parallel",
    "training.fsdp_reshard_after_forward": "parallelism.fsdp_reshard_after_forward",
    "training.compile": "compile.enable",
    "training.warmup_steps": "lr_scheduler.warmup_steps",
    "training.enable_fsdp_float8_all_gather": "float8.enable_fsdp_float8_all_gather",
    "training.precompute_float8_dynamic_scale_for_fsdp": (
        "float8.precompute_float8_dynamic_scale_for_fsdp"
    ),
    "experimental.pipeline_parallel_degree": "parallelism.pipeline_parallel_degree",
    "experimental.pipeline_parallel_split_points": "parallelism.pipeline_parallel_split_points",
    "experimental.pipeline_parallel_schedule": "parallelism.pipeline_parallel_schedule",
    "experimental.pipeline_parallel_schedule_csv": "parallelism.pipeline_parallel_schedule_csv",
    "experimental.pipeline_parallel_microbatches": "parallelism.pipeline_parallel_microbatches",
    "experimental.context_parallel_degree": "parallelism.context_parallel_degree",
    "experimental.context_parallel_rotate_method": "parallelism.context_parallel_rotate_method",
    "experimental.enable_async_tensor_parallel": "parallelism.enable_async_tensor_parallel",
    "experimental.enable_compiled_autograd": "parallelism.enable_compiled_autograd",
    "checkpoint.enable_checkpoint": "checkpoint.enable",
    "checkpoint.last_save_model_only": "checkpoint.model_weights_only",  # TorchTitan v0.2's name
    "lr_scheduler.lr_min": "lr_scheduler.min_lr_factor",
    "memory_estimation.enabled": "memory_estimation.enable",
    # Special cases (boolean old keys, see _Option.kind):
    "metrics.disable_color_printing": "metrics.enable_color_printing",  # inverted
    "training.enable_float8_linear": "model.converters",  # true -> append "float8"
    "float8.enable_float8_linear": "model.converters",  # same, from a later v0.1
}
_INVERTED = {"metrics.disable_color_printing"}
_ADD_FLOAT8 = {"training.enable_float8_linear", "float8.enable_float8_linear"}
# Old keys whose setting no longer has any effect; accepted so old files still load.
IGNORED: set[str] = {
    "model.norm_type",
    "job.use_for_integration_test",
    "memory_estimation.disable_fake_mode",  # the estimate is always a meta-device dry run
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


class _BadValue(Exception):
    """A value that does not convert to the option's type; carries what was expected."""


@dataclass(frozen=True)
class _Option:
    """What a spelled key means: its canonical name, the type its value has, and how to apply."""

    canonical: str  # "section.key"
    tp: Any  # type of the value as the user gives it (None: any, for IGNORED keys)
    kind: str = "set"  # set | invert | add_float8 | ignore


@dataclass
class _Setting:
    option: _Option
    spelled: str  # as the user wrote it, e.g. "--training.batch_size" or "training.batch_size"
    value: Any


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
        try:
            return int(text)
        except ValueError:
            raise _BadValue(_expected(tp)) from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise _BadValue(_expected(tp)) from None
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


class ConfigManager:
    """Parses TOML + CLI into a validated ``JobConfig`` (or a subclass with more sections)."""

    def __init__(self, config_cls: type[JobConfig] = JobConfig) -> None:
        self.config_cls = config_cls
        defaults = config_cls()
        self._sections: dict[str, type] = {
            name: type(section) for name, section in defaults.sections().items()
        }
        self._options: dict[str, _Option] = {}
        for section_name, cls in self._sections.items():
            for key, tp in self._field_types(cls).items():
                canonical = f"{section_name}.{key}"
                self._options[canonical] = _Option(canonical, tp)
        self._aliases: dict[str, _Option] = {}
        for old, new in ALIASES.items():
            if old in _INVERTED:
                self._aliases[old] = _Option(new, bool, "invert")
            elif old in _ADD_FLOAT8:
                self._aliases[old] = _Option(new, bool, "add_float8")
            else:
                self._aliases[old] = _Option(new, self._options[new].tp)
        for old in IGNORED:
            self._aliases[old] = _Option(old, None, "ignore")

    @staticmethod
    def _field_types(cls: type) -> dict[str, Any]:
        hints = field_types(cls)
        return {f.name: hints[f.name] for f in fields(cls)}

    # public API

    def parse_args(self, argv: list[str] | None = None) -> JobConfig:
        """Defaults, then ``--job.config_file``, then the other CLI options; validated.

        ``--help`` / ``-h`` prints ``format_help()`` and raises ``SystemExit(0)``.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        if "--help" in argv or "-h" in argv:
            print(self.format_help())
            raise SystemExit(0)
        cli = self._parse_cli(argv)
        config = self.config_cls()
        config_file = None
        for setting in cli:
            if setting.option.canonical == "job.config_file":
                config_file = setting.value
        if config_file is not None:
            self._apply(config, self._load_toml(config_file), origin=f"config file {config_file}: ")
        self._apply(config, cli, origin="")
        config.validate()
        return config

    def format_help(self) -> str:
        """Every option, grouped by section, with type, default and help."""
        lines = [
            "usage: python -m torchtitan.train [--job.config_file FILE.toml] "
            "[--section.key VALUE ...]",
            "",
            "Options come from the defaults, then the TOML file, then the command line.",
            "  --section.key VALUE or --section.key=VALUE; lists are comma-separated (a,b);",
            "  booleans: --section.flag, --section.no-flag or --section.flag true|false;",
            "  options typed '| None' accept the value none. Old (v0.1) key names are accepted.",
        ]
        defaults = self.config_cls()
        for section_name, section in defaults.sections().items():
            doc = (type(section).__doc__ or "").strip().splitlines()
            lines += ["", f"[{section_name}]" + (f"  {doc[0]}" if doc else "")]
            types_ = self._field_types(type(section))
            for f in fields(section):  # type: ignore[arg-type]
                tp = types_[f.name]
                flag = f"--{section_name}.{f.name}"
                if tp is bool:
                    flag += f" / --{section_name}.no-{f.name}"
                default = getattr(section, f.name)
                if default is None:
                    shown = "none"
                elif isinstance(default, list):
                    shown = ",".join(str(v) for v in default) or "(empty)"
                else:
                    shown = str(default).lower() if isinstance(default, bool) else repr(default)
                lines.append(f"  {flag}  {type_name(tp)}  (default: {shown})")
                text = f.metadata.get("help", "")
                choices = f.metadata.get("choices")
                if choices and not all(c in text for c in choices):
                    text += f" [choices: {', '.join(choices)}]"
                lines.append(f"      {text}")
        return "\n".join(lines)

    # resolving keys

    def _resolve(self, dotted: str) -> _Option | None:
        option = self._options.get(dotted) or self._aliases.get(dotted)
        if option is not None and option.canonical != dotted and option.kind != "ignore":
            logger.debug("config: %s is the old name of %s", dotted, option.canonical)
        return option

    def _unknown(self, dotted: str, shown: str, origin: str) -> ConfigError:
        """The error for an unknown key, with the nearest valid name when there is one."""
        prefix = "--" if shown.startswith("--") else ""
        section, _, key = dotted.partition(".")
        keys_by_section: dict[str, list[str]] = {}
        for name in list(self._options) + list(self._aliases):
            sec, _, k = name.partition(".")
            keys_by_section.setdefault(sec, []).append(k)
        guess: str | None = None
        if not key:  # "--steps": no section given
            section, key = "", section
            what = f"unknown option {shown} (options are --section.key)"
        elif section in self._sections:
            close = difflib.get_close_matches(key, keys_by_section[section], n=1)
            guess = f"{section}.{close[0]}" if close else None
            what = f"unknown option {shown}"
        else:
            close = difflib.get_close_matches(section, list(self._sections), n=1)
            if close and key in keys_by_section[close[0]]:
                guess = f"{close[0]}.{key}"
            what = f"unknown section '{section}' in {shown}"
        if guess is None:  # the key may sit in the wrong section
            homes = [sec for sec, keys in keys_by_section.items() if key in keys]
            if homes:
                guess = f"{homes[0]}.{key}"
        if guess is not None:
            if guess in self._aliases and self._aliases[guess].kind == "set":
                guess = self._aliases[guess].canonical
            return ConfigError(f"{origin}{what}; did you mean {prefix}{guess}?")
        if section and section not in self._sections:
            return ConfigError(f"{origin}{what}; valid sections: {', '.join(self._sections)}")
        return ConfigError(f"{origin}{what}; see --help for the valid options")

    # reading the two sources

    def _parse_cli(self, argv: list[str]) -> list[_Setting]:
        settings: list[_Setting] = []
        i = 0
        while i < len(argv):
            token = argv[i]
            i += 1
            if not token.startswith("--") or token == "--":
                raise ConfigError(
                    f"unexpected argument {token!r}; options look like --section.key VALUE"
                )
            name, has_inline, inline = token[2:].partition("=")
            dotted = name.replace("-", "_")
            shown = f"--{name}"
            if "." not in dotted:
                raise self._unknown(dotted, shown, "")
            option = self._resolve(dotted)
            negated = False
            if option is None:
                section, _, key = dotted.partition(".")
                if key.startswith("no_"):
                    option = self._resolve(f"{section}.{key[3:]}")
                    if option is not None and option.tp is not bool:
                        raise ConfigError(
                            f"{shown}: {section}.{key[3:]} is not a boolean; "
                            f"give it a value: --{section}.{key[3:]} VALUE"
                        )
                    if option is not None and has_inline:
                        raise ConfigError(f"{shown} takes no value; use it alone to set false")
                    negated = True
            if option is None:
                raise self._unknown(dotted, shown, "")
            spelled = "--" + (dotted if not negated else dotted.replace(".no_", ".", 1))
            if negated:
                settings.append(_Setting(option, spelled, False))
                continue
            if option.tp is bool and not has_inline:
                # a bare flag means true; an explicit true/false may follow
                if i < len(argv) and not argv[i].startswith("--"):
                    text = argv[i]
                    i += 1
                else:
                    settings.append(_Setting(option, spelled, True))
                    continue
            elif has_inline:
                text = inline
            elif i < len(argv) and not argv[i].startswith("--"):
                text = argv[i]
                i += 1
            else:
                raise ConfigError(f"missing value after {shown}; give it as {shown} VALUE")
            try:
                value = text if option.tp is None else _from_string(text, option.tp)
            except _BadValue as err:
                raise ConfigError(f"{shown} {text}: expected {err}") from None
            settings.append(_Setting(option, spelled, value))
        return settings

    def _load_toml(self, path: str) -> list[_Setting]:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"config file {path} not found; pass an existing file to --job.config_file"
            )
        try:
            with open(file, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path}: invalid TOML: {err}") from None
        origin = f"config file {path}: "
        settings: list[_Setting] = []
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{origin}top-level key '{section}' must be inside a [section] table"
                )
            if section not in self._sections:
                first = next(iter(table), "")
                raise self._unknown(f"{section}.{first}", f"[{section}]", origin)
            for key, raw in table.items():
                dotted = f"{section}.{key}"
                option = self._resolve(dotted)
                if option is None:
                    raise self._unknown(dotted, dotted, origin)
                try:
                    value = raw if option.tp is None else _from_toml(raw, option.tp)
                except _BadValue as err:
                    raise ConfigError(f"{origin}{dotted} = {raw!r}: expected {err}") from None
                settings.append(_Setting(option, dotted, value))
        return settings

    # applying one source

    def _apply(self, config: JobConfig, settings: list[_Setting], origin: str) -> None:
        """Set the source's values; old and new spelling of one key must agree."""
        chosen: dict[str, _Setting] = {}  # canonical -> setting (value already canonical)
        add_float8 = False
        for setting in settings:
            option = setting.option
            if option.kind == "ignore":
                logger.debug("config: ignoring %s (no longer used)", setting.spelled)
                continue
            if option.kind == "add_float8":
                add_float8 = add_float8 or setting.value
                continue
            value = (not setting.value) if option.kind == "invert" else setting.value
            setting = _Setting(option, setting.spelled, value)
            earlier = chosen.get(option.canonical)
            if earlier is not None and earlier.spelled != setting.spelled:
                if earlier.value != value:
                    raise ConfigError(
                        f"{origin}{earlier.spelled} and {setting.spelled} are the old and new "
                        f"names of one option and disagree ({option.canonical} = "
                        f"{earlier.value!r} vs {value!r}); keep only "
                        f"{'--' if origin == '' else ''}{option.canonical}"
                    )
            chosen[option.canonical] = setting
        for canonical, setting in chosen.items():
            section, _, key = canonical.partition(".")
            value = list(setting.value) if isinstance(setting.value, list) else setting.value
            setattr(getattr(config, section), key, value)
        if add_float8 and "float8" not in config.model.converters:
            config.model.converters = config.model.converters + ["float8"]
