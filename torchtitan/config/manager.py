"""Build a validated JobConfig from defaults, a TOML file and command-line overrides.

Precedence is CLI > TOML > default. Both sources go through the same steps: each key is
resolved (canonical name, old v0.1 spelling from ``ALIASES``, or an unknown key with a
"did you mean" suggestion), its value is coerced to the field's type, and the source's
settings are applied in one go. ``JobConfig.validate()`` then checks every value, so
bad input fails here with one line, before anything is built.

Importing this module must not import torch (``--help`` is instant).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from torchtitan.config.job_config import ConfigError, JobConfig, Section, field_types, type_name
from torchtitan.config.torchtitan_names import (
    _ADD_FLOAT8,
    _CONVERTER_NAMES,
    _CP_BALANCER,
    _INVERTED,
    _MODULE_FQNS,
    _REFUSED_CONVERTERS,
    _REFUSED_VALUES,
    ALIASES,
    IGNORED,
    TORCHTITAN_NAMES,
    UNSUPPORTED,
    _split_points_from_fqns,
)
from torchtitan.config.values import (
    _BadValue,
    _from_string,
    _from_toml,
    _toml_value,
)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Option:
    """What a spelled key means: its canonical name, the type its value has, and how to apply."""

    canonical: str  # "section.key"
    tp: Any  # type of the value as the user gives it (None: any, for IGNORED keys)
    kind: str = "set"  # set | invert | add_float8 | ignore | unsupported | cp_balancer | module_fqns


@dataclass
class _Setting:
    option: _Option
    spelled: str  # as the user wrote it, e.g. "--training.batch_size" or "training.batch_size"
    value: Any


def _unsupported_type(default: Any) -> Any:
    """The type a value of an unsupported option is read as (None: any value, all refused)."""
    if default is None:
        return None
    if isinstance(default, list):
        return list[str]
    return type(default)


def _words(name: str) -> set[str]:
    return {w for w in re.split(r"[._]", name.lower()) if w}


def extend_config_class(base: type[JobConfig], module_name: str) -> type[JobConfig]:
    """``base`` extended by the ``JobConfig`` dataclass of a user's module
    (``job.custom_config_module``, TorchTitan's mechanism): each of its fields is either a new
    section (a dataclass; made a ``Section`` if it is not one) or an existing section's name,
    whose dataclass then adds fields to that section. Raises ConfigError, one line."""
    where = f"job.custom_config_module = {module_name!r}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import it ({e}); is it on PYTHONPATH?") from None
    except SyntaxError as e:
        raise ConfigError(f"{where}: {e.filename}:{e.lineno}: {e.msg}") from None
    custom = getattr(module, "JobConfig", None)
    if custom is None or not dataclasses.is_dataclass(custom):
        raise ConfigError(f"{where}: the module must define a dataclass named JobConfig")
    if isinstance(custom, type) and issubclass(custom, base):
        return custom
    base_sections = {f.name: f for f in fields(base)}
    hints = field_types(custom)
    new_fields: list[tuple[str, Any, Any]] = []
    for f in fields(custom):
        user_cls = hints[f.name]
        if not (isinstance(user_cls, type) and dataclasses.is_dataclass(user_cls)):
            raise ConfigError(f"{where}: JobConfig.{f.name} must be a dataclass (a [{f.name}] section)")
        bases: tuple[type, ...]
        if f.name in base_sections:  # fields added to an existing section
            own = field_types(base)[f.name]
            bases = (user_cls, own) if not issubclass(user_cls, own) else (user_cls,)
        else:
            bases = (user_cls,) if issubclass(user_cls, Section) else (user_cls, Section)
        section_cls = dataclasses.dataclass(
            type(user_cls.__name__, bases, {"_section": f.name, "__module__": user_cls.__module__})
        )
        new_fields.append((f.name, section_cls, dataclasses.field(default_factory=section_cls)))
    extended = dataclasses.make_dataclass("JobConfig", new_fields, bases=(base,))
    extended.__module__ = module_name
    extended.__doc__ = base.__doc__
    return extended


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
            if new not in self._options and old not in _ADD_FLOAT8:
                continue  # a config class without that section
            if old in _INVERTED:
                self._aliases[old] = _Option(new, bool, "invert")
            elif old in _ADD_FLOAT8:
                self._aliases[old] = _Option(new, bool, "add_float8")
            elif old == _CP_BALANCER:
                self._aliases[old] = _Option(new, str | None, "cp_balancer")
            elif old == _MODULE_FQNS:
                self._aliases[old] = _Option(new, list[list[str]] | None, "module_fqns")
            else:
                self._aliases[old] = _Option(new, self._options[new].tp)
        for old in IGNORED:
            self._aliases[old] = _Option(old, None, "ignore")
        for name, (default, _) in UNSUPPORTED.items():
            if name not in self._options:
                self._aliases[name] = _Option(name, _unsupported_type(default), "unsupported")
        # Top-level names a key may start with: sections, and TorchTitan's alias-only tables.
        self._prefixes = set(self._sections) | {name.partition(".")[0] for name in self._aliases}

    @staticmethod
    def _field_types(cls: type) -> dict[str, Any]:
        hints = field_types(cls)
        return {f.name: hints[f.name] for f in fields(cls)}

    # public API

    def parse_args(self, argv: list[str] | None = None) -> JobConfig:
        """Defaults, then ``--job.config_file``, then the other CLI options; validated.

        ``--help`` / ``-h`` prints ``format_help()`` and raises ``SystemExit(0)``. A
        ``job.custom_config_module`` (file or command line) extends the config class first.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        module = _raw_cli_value(argv, ("job.custom_config_module", "experimental.custom_args_module"))
        if "--help" in argv or "-h" in argv:  # before reading any file
            manager = ConfigManager(extend_config_class(self.config_cls, module)) if module else self
            print(manager.format_help())
            raise SystemExit(0)
        config_file = _raw_cli_value(argv, ("job.config_file",))
        data = self._read_toml(config_file) if config_file is not None else None
        if module is None and data is not None:
            job, experimental = data.get("job"), data.get("experimental")
            module = (job.get("custom_config_module") if isinstance(job, dict) else None) or (
                experimental.get("custom_args_module") if isinstance(experimental, dict) else None
            )
        if module and isinstance(module, str):
            manager = ConfigManager(extend_config_class(self.config_cls, module))
            return manager._parse(argv, config_file, data)
        return self._parse(argv, config_file, data)

    def _parse(self, argv: list[str], config_file: str | None, data: dict | None) -> JobConfig:
        cli = self._parse_cli(argv)
        config = self.config_cls()
        given: set[str] = set()
        if config_file is not None and data is not None:
            origin = f"config file {config_file}: "
            given |= self._apply(config, self._toml_settings(data, origin), origin=origin)
        given |= self._apply(config, cli, origin="")
        model = config.model
        if model.hf_assets_path is not None and "model.tokenizer_path" not in given:
            model.tokenizer_path = model.hf_assets_path
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
            "  options typed '| None' accept the value none. Old (v0.1) key names and TorchTitan",
            "  v0.2's names (e.g. --quantize.linear.float8.recipe_name) are accepted (docs/config.md).",
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
                    text += f" [choices: {', '.join(c for c in choices if c)}]"
                lines.append(f"      {text}")
        return "\n".join(lines)

    # resolving keys

    def _resolve(self, dotted: str) -> _Option | None:
        option = self._options.get(dotted) or self._aliases.get(dotted)
        if option is not None and option.canonical != dotted and option.kind != "ignore":
            logger.debug("config: %s is another name of %s", dotted, option.canonical)
        return option

    def _suggest(self, dotted: str) -> str | None:
        """The valid name a mistyped one most likely meant, or None when no name is close
        enough to be a safe hint. Prefers a key of the same section, then shared words."""
        section, _, key = dotted.rpartition(".")
        names = [
            n for n in list(self._options) + list(self._aliases)
            if self._aliases.get(n, _Option("", None)).kind != "ignore"
        ]
        if not section:  # "--steps": only a key; the first section that has it
            homes = [n for n in self._options if n.rpartition(".")[2] == key]
            return homes[0] if homes else None
        same_section: list[tuple[float, str]] = []
        elsewhere: list[tuple[float, str]] = []
        for name in names:
            n_section, _, n_key = name.rpartition(".")
            ratio = difflib.SequenceMatcher(None, key, n_key).ratio()
            words, n_words = _words(key), _words(n_key)
            overlap = len(words & n_words) / max(len(words | n_words), 1)
            section_ratio = difflib.SequenceMatcher(None, section, n_section).ratio()
            score = ratio + 0.5 * overlap + 0.3 * section_ratio
            if n_section == section:
                if ratio >= 0.7 or (overlap >= 0.3 and ratio >= 0.5):
                    same_section.append((score, name))
            elif n_key == key:
                # the key in the wrong (or a misspelt) section: only when that is unambiguous
                if section_ratio >= 0.75 or sum(1 for n in names if n.rpartition(".")[2] == key) == 1:
                    elsewhere.append((score + 0.5, name))
            elif section_ratio >= 0.75 and (ratio >= 0.8 or overlap >= 0.6):
                elsewhere.append((score, name))
        for candidates in (same_section, elsewhere):
            if candidates:
                return max(candidates)[1]
        return None

    def _unknown(self, dotted: str, shown: str, origin: str) -> ConfigError:
        """The error for an unknown key, with the nearest valid name when there is one."""
        prefix = "--" if shown.startswith("--") else ""
        section = dotted.rpartition(".")[0]
        top = dotted.partition(".")[0]
        if not section:  # "--steps": no section given
            what = f"unknown option {shown} (options are --section.key)"
        elif top in self._prefixes:
            what = f"unknown option {shown}"
        else:
            what = f"unknown section '{top}' in {shown}"
        guess = self._suggest(dotted)
        if guess is not None:
            if guess in self._aliases and self._aliases[guess].kind == "set" and guess not in TORCHTITAN_NAMES:
                guess = self._aliases[guess].canonical  # an old (v0.1) name: suggest the current one
            return ConfigError(f"{origin}{what}; did you mean {prefix}{guess}?")
        if section and top not in self._prefixes:
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
                section, _, key = dotted.rpartition(".")
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
            spelled = "--" + (dotted if not negated else _strip_no(dotted))
            if negated:
                settings.append(self._setting(option, spelled, False, ""))
                continue
            if option.tp is bool and not has_inline:
                # a bare flag means true; an explicit true/false may follow
                if i < len(argv) and not argv[i].startswith("--"):
                    text = argv[i]
                    i += 1
                else:
                    settings.append(self._setting(option, spelled, True, ""))
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
            settings.append(self._setting(option, spelled, value, ""))
        return settings

    @staticmethod
    def _read_toml(path: str) -> dict[str, Any]:
        """The parsed file; every way a file can be unusable is one line (ConfigError)."""
        file = Path(path)
        where = f"config file {path}"
        if file.is_dir():
            raise ConfigError(f"{where} is a directory; pass a .toml file to --job.config_file")
        if not file.exists():
            raise ConfigError(f"{where} not found; pass an existing file to --job.config_file")
        if not file.is_file():
            raise ConfigError(f"{where} is not a regular file; pass a .toml file to --job.config_file")
        try:
            raw = file.read_bytes()
        except OSError as e:
            raise ConfigError(f"{where} cannot be read: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                "save it as UTF-8"
            ) from None
        text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{where}: invalid TOML: {err}") from None
        if not data:
            raise ConfigError(
                f"{where} is empty (no [section]); give it at least one section, or leave out "
                "--job.config_file to run on the defaults"
            )
        return data

    def _toml_settings(self, data: dict[str, Any], origin: str) -> list[_Setting]:
        settings: list[_Setting] = []
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{origin}top-level key '{section}' must be inside a [section] table"
                )
            if not table and section not in self._prefixes:
                raise self._unknown(f"{section}.", f"[{section}]", origin)
            for dotted, raw in _flatten(table, section):
                option = self._resolve(dotted)
                if option is None:
                    shown = f"[{section}]" if section not in self._prefixes else dotted
                    raise self._unknown(dotted, shown, origin)
                try:
                    value = raw if option.tp is None else _from_toml(raw, option.tp)
                except _BadValue as err:
                    raise ConfigError(f"{origin}{dotted} = {raw!r}: expected {err}") from None
                settings.append(self._setting(option, dotted, value, origin))
        return settings

    def _setting(self, option: _Option, spelled: str, value: Any, origin: str) -> _Setting:
        """A setting with its value in the canonical option's terms; refuses (one line) a
        TorchTitan option or value whose feature is not built here."""
        shown = f"{spelled} = {_shown(value)}"
        if option.kind == "unsupported":
            default, reason = UNSUPPORTED[option.canonical]
            if value != default:
                keep = "" if default is None else f" (or set it to {_shown(default)})"
                raise ConfigError(f"{origin}{shown}: {reason}; remove it{keep}")
        elif option.kind == "cp_balancer":
            choice = "none" if value is None else value.strip().lower()
            if choice == "ptrr":
                raise ConfigError(
                    f"{origin}{shown}: PTRR load balancing (for FlexAttention) is not built here; "
                    'use "headtail" (parallelism.context_parallel_load_balance = true) or "none"'
                )
            if choice not in ("headtail", "none", "null"):
                raise ConfigError(f'{origin}{shown}: expected "headtail" or "none"')
            value = choice == "headtail"
        elif option.kind == "module_fqns":
            value = [] if value is None else _split_points_from_fqns(value, f"{origin}{shown}")
        canonical = option.canonical
        refused = _REFUSED_VALUES.get((canonical, value)) if isinstance(value, (str, bool, int)) else None
        if refused:
            raise ConfigError(f"{origin}{shown}: {refused}")
        if canonical == "model.converters" and isinstance(value, list):
            for name in value:
                if name in _REFUSED_CONVERTERS:
                    raise ConfigError(f"{origin}{shown}: converter {name!r}: {_REFUSED_CONVERTERS[name]}")
            value = [_CONVERTER_NAMES.get(name, name) for name in value]
        return _Setting(option, spelled, value)

    # applying one source

    def _apply(self, config: JobConfig, settings: list[_Setting], origin: str) -> set[str]:
        """Set the source's values (old and new spelling of one key must agree); return the
        canonical names it set."""
        chosen: dict[str, _Setting] = {}  # canonical -> setting (value already canonical)
        add_float8 = False
        for setting in settings:
            option = setting.option
            if option.kind == "ignore":
                logger.debug("config: ignoring %s (no longer used)", setting.spelled)
                continue
            if option.kind == "unsupported":
                logger.debug("config: %s has its default, which asks for nothing", setting.spelled)
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
                        f"{origin}{earlier.spelled} and {setting.spelled} are two names of one "
                        f"option and disagree ({option.canonical} = "
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
        return set(chosen)


def _shown(value: Any) -> str:
    """A value as the TOML file would spell it (for error messages)."""
    return "none" if value is None else _toml_value(value)


def _strip_no(dotted: str) -> str:
    head, _, key = dotted.rpartition(".")
    return f"{head}.{key[3:]}"


def _flatten(table: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """``[quantize.linear.float8]`` tables (nested dicts) as dotted keys."""
    out: list[tuple[str, Any]] = []
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, dict):
            out += _flatten(value, dotted)
        else:
            out.append((dotted, value))
    return out


def _raw_cli_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The last value given on the command line to any of ``names`` (before full parsing,
    which needs to know the config class and the file first)."""
    found = None
    for i, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        name, has_inline, inline = token[2:].partition("=")
        if name.replace("-", "_") in names:
            if has_inline:
                found = inline
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                found = argv[i + 1]
    return found
