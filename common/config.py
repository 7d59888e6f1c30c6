"""Loading the host's one configuration: defaults < file < environment < flags.

- File: YAML (`.yaml`, `.yml`) or JSON (`.json`), nested by section. A relative path in
  a path-like key is taken relative to the file's directory.
- Environment: `ORCHESTRATOR_<SECTION>__<KEY>` (`ORCHESTRATOR_SESSION__TIMEOUT=45m`); a
  top-level key has no section (`ORCHESTRATOR_DATA_DIR`).
- Flags: dotted keys (`{"session.timeout": "45m"}`); a value of None means "not given".

Durations (`30s`, `5m`, `1h`) and sizes (`512MB`, `16MiB`, `1G`) are read by baaaht.common.units.

Nothing is ignored quietly: an unknown key, a malformed value or a value out of range
is refused at start, naming the key, the value, what is expected and where it came
from. Every key is validated whichever source set it, so a partial file can never turn
a safety default (a boolean, say) into its zero value.
"""

from __future__ import annotations

import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import orjson

from baaaht.common.config_rules import problems_in
from baaaht.common.units import dec_hook, enc_hook, is_number, parse_duration, parse_size
from baaaht.schemas.config import Config, Duration, Size

ENV_PREFIX = "ORCHESTRATOR_"
# Keys holding a filesystem path: `~` is expanded and relative paths made absolute,
# because the children that read the effective config run in another directory.
PATH_KEYS = frozenset(
    {
        "data_dir",
        "bus.run_dir",
        "bus.key_dir",
        "bus.tcp_key_file",
        "policy.path",
        "docker.tls_ca_cert",
        "docker.tls_cert",
        "docker.tls_key",
        "credentials.master_key_file",
        "credentials.passphrase_file",
        "egress.ca_file",
        "assistant.dev_source",
    }
)
EFFECTIVE_CONFIG_NAME = "config.json"
EFFECTIVE_SOURCES_NAME = "config-sources.json"
FILE_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(ValueError):
    """Every problem found in the configuration, one per line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# --- one value of one key --------------------------------------------------------------------

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_INT_TEXT = re.compile(r"[+-]?\d+")


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError("is not a boolean (expected true or false)")


def _to_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value)
    raise ValueError("is not an integer (expected e.g. 10)")


def _to_float(value: object) -> float:
    if is_number(value) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise ValueError("is not a number (expected e.g. 0.5)")


def _to_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("is not a string (quote it)")


_CONVERTERS: dict[type, Callable[[object], object]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Duration: parse_duration,
    Size: parse_size,
}


def _convert(value: object, type_: Any) -> object:
    """One value for a key of type `type_`, from a file's native value or from text."""
    if value is None:
        raise ValueError("has no value")
    base = typing.get_args(type_)[0] if typing.get_origin(type_) is typing.Annotated else type_
    if converter := _CONVERTERS.get(base):
        return converter(value)
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value in choices:
            return value
        raise ValueError(f"is not one of {', '.join(map(str, choices))}")
    # Anything richer (a list, a mapping) is written as JSON in the environment or a flag.
    if isinstance(value, str) and base is not str:
        try:
            value = msgspec.json.decode(value)
        except msgspec.DecodeError:
            raise ValueError("is not valid JSON for this key") from None
    try:
        return msgspec.convert(value, type_, dec_hook=dec_hook)
    except msgspec.ValidationError as error:
        raise ValueError(f"is not valid ({error})") from None


# --- the shape of the config -----------------------------------------------------------------


def _is_section(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, msgspec.Struct)


def _walk(cls: type[msgspec.Struct], prefix: str = "") -> tuple[dict[str, Any], set[str]]:
    """Every leaf key with its type, and every section key, as dotted keys."""
    leaves: dict[str, Any] = {}
    sections: set[str] = set()
    for field in msgspec.structs.fields(cls):
        key = prefix + field.encode_name
        if _is_section(field.type):
            sections.add(key)
            sub_leaves, sub_sections = _walk(field.type, key + ".")
            leaves.update(sub_leaves)
            sections.update(sub_sections)
        else:
            leaves[key] = field.type
    return leaves, sections


LEAF_TYPES, SECTION_KEYS = _walk(Config)


def flatten(config: msgspec.Struct) -> dict[str, Any]:
    """Dotted key -> value, for every leaf of a config struct."""
    flat: dict[str, Any] = {}
    for field in msgspec.structs.fields(config):
        value = getattr(config, field.name)
        if _is_section(field.type):
            flat.update({f"{field.encode_name}.{key}": inner for key, inner in flatten(value).items()})
        else:
            flat[field.encode_name] = value
    return flat


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    return nested


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "__").upper()


# --- sources ---------------------------------------------------------------------------------


class _Setting(msgspec.Struct, frozen=True):
    value: object
    source: str  # default | file:PATH | env:NAME | flag
    base_dir: Path  # what a relative path is relative to


def _read_file(path: Path) -> Any:
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ConfigError([f"config file {path} has an unknown extension (expected .yaml, .yml or .json)"])
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError([f"config file {path} cannot be read: {error.strerror}"]) from None
    if not raw.strip():
        raise ConfigError([f"config file {path} is empty (expected a mapping of sections)"])
    is_json = path.suffix.lower() == ".json"
    try:
        return msgspec.json.decode(raw) if is_json else msgspec.yaml.decode(raw)
    except msgspec.DecodeError as error:
        kind = "JSON" if is_json else "YAML"
        raise ConfigError([f"config file {path} is not valid {kind}: {error}"]) from None


def _file_settings(path: Path, problems: list[str]) -> dict[str, _Setting]:
    document = _read_file(path)
    if not isinstance(document, dict):
        raise ConfigError(
            [f"config file {path} must hold a mapping of sections, not {type(document).__name__}"]
        )
    settings: dict[str, _Setting] = {}
    source = f"file:{path}"

    def visit(mapping: dict[str, Any], prefix: str) -> None:
        for name, value in mapping.items():
            key = f"{prefix}{name}"
            if key in SECTION_KEYS:
                if isinstance(value, dict):
                    visit(value, key + ".")
                else:
                    problems.append(
                        f"{key}: {value!r} is a section (expected a mapping of its keys); from {source}"
                    )
            elif key in LEAF_TYPES:
                settings[key] = _Setting(value, source, path.parent)
            else:
                problems.append(f"{key}: unknown key; from {source}")

    visit(document, "")
    return settings


def _env_settings(env: Mapping[str, str], cwd: Path, problems: list[str]) -> dict[str, _Setting]:
    settings: dict[str, _Setting] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if key in LEAF_TYPES:
            settings[key] = _Setting(value, f"env:{name}", cwd)
        elif key in SECTION_KEYS:
            problems.append(f"{name}: names the section {key} (expected {env_name(key)}__<KEY>)")
        else:
            hint = _env_hint(key)
            problems.append(f"{name}: unknown setting{hint}")
    return settings


def _env_hint(key: str) -> str:
    """`ORCHESTRATOR_SESSION_TIMEOUT` most likely meant `ORCHESTRATOR_SESSION__TIMEOUT`."""
    for section in SECTION_KEYS:
        if key.startswith(section + "_") and (guess := f"{section}.{key[len(section) + 1 :]}") in LEAF_TYPES:
            return f" (did you mean {env_name(guess)}?)"
    return f" (expected {ENV_PREFIX}<SECTION>__<KEY>, e.g. {env_name('session.timeout')})"


def _flag_settings(flags: Mapping[str, object], cwd: Path, problems: list[str]) -> dict[str, _Setting]:
    settings: dict[str, _Setting] = {}
    for key, value in flags.items():
        if value is None:
            continue
        if key in LEAF_TYPES:
            settings[key] = _Setting(value, "flag", cwd)
        else:
            problems.append(f"{key}: unknown setting (given as a flag)")
    return settings


def _expand_path(value: str, base_dir: Path, env: Mapping[str, str]) -> str:
    if not value:
        return value
    if value == "~" or value.startswith("~/"):
        home = env.get("HOME") or os.path.expanduser("~")
        value = home + value[1:]
    else:
        value = os.path.expanduser(value)  # ~user/...
    return os.path.normpath(base_dir / value)


# --- loading ---------------------------------------------------------------------------------


def load_config(
    path: str | None = None,
    env: Mapping[str, str] = os.environ,
    flags: Mapping[str, object] | None = None,
) -> tuple[Config, dict[str, str]]:
    """The effective config, and where each dotted key's value came from.

    Raises ConfigError listing every problem found (not just the first).
    """
    problems: list[str] = []
    cwd = Path.cwd()
    settings: dict[str, _Setting] = {
        key: _Setting(value, "default", cwd) for key, value in flatten(Config()).items()
    }
    if path is not None:
        file_path = Path(_expand_path(path, cwd, env))
        settings.update(_file_settings(file_path, problems))
    settings.update(_env_settings(env, cwd, problems))
    settings.update(_flag_settings(flags or {}, cwd, problems))

    values: dict[str, Any] = {}
    for key, setting in settings.items():
        try:
            value = _convert(setting.value, LEAF_TYPES[key])
        except ValueError as error:
            problems.append(f"{key}: {setting.value!r} {error}; from {setting.source}")
            continue
        values[key] = _expand_path(value, setting.base_dir, env) if key in PATH_KEYS else value
    for key, problem in problems_in(values, LEAF_TYPES):
        problems.append(f"{key}: {settings[key].value!r} {problem}; from {settings[key].source}")
    if problems:
        raise ConfigError(problems)
    try:
        config = msgspec.convert(_nest(values), Config, dec_hook=dec_hook)
    except msgspec.ValidationError as error:  # a constraint declared on the schema itself
        raise ConfigError([str(error)]) from None
    return config, {key: setting.source for key, setting in settings.items()}


def dump_config(config: Config) -> dict[str, Any]:
    """The config as JSON-able data, written the way it is read (`30s`, `512MB`)."""
    return msgspec.to_builtins(config, enc_hook=enc_hook)


def dump_flat(config: Config) -> dict[str, Any]:
    """Dotted key -> value written the way it is read, e.g. `{"session.timeout": "30m"}`."""
    return {key: msgspec.to_builtins(value, enc_hook=enc_hook) for key, value in flatten(config).items()}


def write_private_file(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, atomically (a reader never sees half of it)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(partial, 0o600)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_effective_config(config: Config, sources: Mapping[str, str], directory: str | Path) -> Path:
    """Write the config a child loads with `--config`, and where its values came from.

    Returns the config file's path; the sources sit beside it for `baaaht-ctl config show`.
    """
    directory = Path(directory)
    config_path = directory / EFFECTIVE_CONFIG_NAME
    write_private_file(config_path, orjson.dumps(dump_config(config), option=orjson.OPT_INDENT_2))
    write_private_file(
        directory / EFFECTIVE_SOURCES_NAME, orjson.dumps(dict(sources), option=orjson.OPT_INDENT_2)
    )
    return config_path


def read_effective_sources(directory: str | Path) -> dict[str, str] | None:
    """The sources written beside an effective config, or None when there are none."""
    try:
        return orjson.loads(Path(directory, EFFECTIVE_SOURCES_NAME).read_bytes())
    except FileNotFoundError:
        return None
