"""Typed configuration loaded once from TOML into frozen dataclasses.

A configuration class is a frozen dataclass whose fields carry their default and a
help line (:func:`option`). Sections are nested dataclasses. Loading checks every
value against its annotated type and rejects unknown keys, so a typo cannot silently
change behaviour; every error names the file, the dotted key path and what was
expected. Supported field types: ``str``, ``int``, ``bool``, ``Decimal``, ``Path``,
``list[str]``, ``dict[str, str]``, nested dataclasses, lists of dataclasses, and
``X | None``. TOML floats are refused where a ``Decimal`` is expected: write decimal
strings (``"0.5"``) or integers.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

from common.errors import ConfigError

T = TypeVar("T")


class _TomlFloat(str):
    """Marks a TOML float literal, so typed loading can refuse or accept it knowingly."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A configuration field with its default and one help line."""
    metadata = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def load(cls: type[T], path: Path) -> T:
    """Load ``path`` as TOML into ``cls``; :class:`ConfigError` names file, key, expectation."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except PermissionError:
        raise ConfigError(source, "", "permission denied while reading the file") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not UTF-8 text") from None
    return loads(cls, text, source)


def loads(cls: type[T], text: str, source: str = "<config>") -> T:
    try:
        data = tomllib.loads(text, parse_float=_TomlFloat)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML ({exc})") from None
    return from_mapping(cls, data, source)


def from_mapping(cls: type[T], data: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """Build ``cls`` from a parsed mapping, checking types and refusing unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, prefix, "expected a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(prefix, unknown[0])
        raise ConfigError(source, key, f"unknown key; expected one of: {', '.join(sorted(fields))}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            values[name] = _convert(hints[name], data[name], source, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(source, key, "required key is missing")
        elif _is_dataclass_type(hints[name]) and f.default_factory is not dataclasses.MISSING:
            values[name] = from_mapping(hints[name], {}, source, key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(source, prefix or "(top level)", str(exc)) from None


def describe(cls: type[Any], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every option, for generated documentation and --help."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if _is_dataclass_type(hints[f.name]):
            rows.extend(describe(hints[f.name], key))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, default, f.metadata.get("help", "")))
    return rows


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, source, key)
    if _is_dataclass_type(tp):
        return from_mapping(tp, value, source, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {_show(value)}")
        return value
    if tp is Decimal:
        if isinstance(value, _TomlFloat):
            raise ConfigError(
                source, key, f"expected a decimal string such as \"{value}\", got a float"
            )
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(source, key, f"expected a decimal number, got {_show(value)}")
        try:
            result = Decimal(str(value))
        except InvalidOperation:
            raise ConfigError(source, key, f"expected a decimal number, got {value!r}") from None
        if not result.is_finite():
            raise ConfigError(source, key, f"expected a finite decimal number, got {value!r}")
        return result
    if tp is str or tp is Path:
        if not isinstance(value, str) or isinstance(value, _TomlFloat):
            raise ConfigError(source, key, f"expected a string, got {_show(value)}")
        return Path(value) if tp is Path else str(value)
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {_show(value)}")
        item_type = args[0]
        items = [_convert(item_type, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(source, key, f"expected a table, got {_show(value)}")
        return {
            str(k): _convert(args[1], v, source, _join(key, str(k))) for k, v in value.items()
        }
    raise ConfigError(source, key, f"unsupported option type {tp!r}")  # a bug in a schema


def _show(value: Any) -> str:
    if isinstance(value, _TomlFloat):
        return f"the float {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
