"""Reading TOML or JSON documents and checking their values with key paths.

:class:`Reader` reads values out of a parsed document and collects every problem as a
:class:`~common.errors.ConfigError` naming the source, the key path
(``prices[2].tiers[1].up_to``) and what was expected; :class:`TariffError` carries
them all. Float literals are parsed into :class:`FloatLiteral` so they can be refused
where a decimal is expected: ``0.1`` has already lost precision.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TypeVar

from common.errors import ConfigError, MoneyError
from common.money import currency_code, to_decimal

T = TypeVar("T")

IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")

SAMPLE_FLOAT_TEXT = '"0.10"'


@dataclass(frozen=True, slots=True)
class FloatLiteral:
    """Stands in for a float literal of the source text, so it can be refused by path."""

    text: str


class TariffError(ConfigError):
    """One or more problems in a tariff or quote file, each a :class:`ConfigError`."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("a TariffError needs at least one error")
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        first = self.errors[0]
        super().__init__(first.source, first.key, first.expected)

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Reader:
    """Collects problems with their key paths while values are read."""

    def __init__(self, source: str, hints: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.hints: Mapping[str, str] = hints or {}
        self.errors: list[ConfigError] = []

    def fail(self, path: str, expected: str) -> None:
        self.errors.append(ConfigError(self.source, path, expected))

    def mark(self) -> int:
        return len(self.errors)

    def clean_since(self, mark: int) -> bool:
        return len(self.errors) == mark

    def raise_errors(self) -> None:
        if self.errors:
            raise TariffError(self.errors)

    # -- containers ------------------------------------------------------------------

    def table(
        self,
        value: object,
        path: str,
        allowed: Collection[str],
        required: Collection[str] = (),
    ) -> Mapping[str, object] | None:
        if not isinstance(value, Mapping):
            self.fail(path or "(top level)", f"expected a table, got {describe(value)}")
            return None
        for key in value:
            if key not in allowed:
                hint = self.hints.get(str(key))
                expected = f"unknown key; expected one of: {', '.join(allowed)}"
                self.fail(join(path, str(key)), f"unknown key; {hint}" if hint else expected)
        for key in required:
            if key not in value:
                self.fail(join(path, key), "required key is missing")
        return value

    def array(self, value: object, path: str) -> list[object] | None:
        if not isinstance(value, list):
            self.fail(path, f"expected an array, got {describe(value)}")
            return None
        return value

    def forbid(self, table: Mapping[str, object], key: str, path: str, reason: str) -> None:
        if key in table:
            self.fail(join(path, key), reason)

    # -- scalars ---------------------------------------------------------------------

    def get(
        self,
        table: Mapping[str, object],
        key: str,
        path: str,
        convert: Callable[[object, str], T | None],
        default: T | None = None,
        *,
        required: bool = False,
    ) -> T | None:
        """``convert(table[key])``, ``default`` when absent (an error if ``required``)."""
        if key not in table:
            if required:
                self.fail(join(path, key), "required key is missing")
            return default
        return convert(table[key], join(path, key))

    def text(self, value: object, path: str) -> str | None:
        if isinstance(value, str) and value.strip():
            return value
        self.fail(path, f"expected a non-empty string, got {describe(value)}")
        return None

    def identifier(self, value: object, path: str) -> str | None:
        if isinstance(value, str) and IDENTIFIER.match(value):
            return value
        self.fail(
            path,
            "expected an id of letters, digits and _.:- (at most 100, starting with a "
            f"letter or digit), got {describe(value)}",
        )
        return None

    def choice(self, options: Sequence[str]) -> Callable[[object, str], str | None]:
        def convert(value: object, path: str) -> str | None:
            if isinstance(value, str) and value in options:
                return value
            wanted = " | ".join(f'"{option}"' for option in options)
            self.fail(path, f"expected one of {wanted}, got {describe(value)}")
            return None

        return convert

    def boolean(self, value: object, path: str) -> bool | None:
        if isinstance(value, bool):
            return value
        self.fail(path, f"expected true or false, got {describe(value)}")
        return None

    def integer(self, value: object, path: str) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        self.fail(path, f"expected a whole number of at least 1, got {describe(value)}")
        return None

    def decimal(self, value: object, path: str) -> Decimal | None:
        """A finite, non-negative decimal from a decimal string or an integer."""
        if isinstance(value, (FloatLiteral, float)):
            text = value.text if isinstance(value, FloatLiteral) else repr(value)
            self.fail(
                path,
                f"a float literal ({text}) has already lost precision; write a decimal "
                f"string such as {SAMPLE_FLOAT_TEXT} or an integer",
            )
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.fail(path, f"expected a decimal string or an integer, got {describe(value)}")
            return None
        try:
            number = to_decimal(value, "value")
        except MoneyError:
            self.fail(path, f"expected a decimal string or an integer, got {describe(value)}")
            return None
        if number < 0:
            self.fail(path, f"must not be negative, got {describe(value)}")
            return None
        return number

    def positive_decimal(self, value: object, path: str) -> Decimal | None:
        number = self.decimal(value, path)
        if number is not None and number <= 0:
            self.fail(path, f"must be greater than zero, got {describe(value)}")
            return None
        return number

    def currency(self, value: object, path: str) -> str | None:
        if not isinstance(value, str):
            self.fail(path, f"expected an ISO 4217 currency code, got {describe(value)}")
            return None
        try:
            return currency_code(value)
        except MoneyError:
            self.fail(path, f"unknown currency {value!r}: expected an ISO 4217 code such as 'eur'")
            return None

    def instant(self, value: object, path: str) -> datetime | None:
        """An aware instant: a TOML offset date-time or an RFC 3339 string."""
        moment: datetime | None = None
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                moment = None
        elif isinstance(value, date):
            moment = None
        if moment is None or moment.utcoffset() is None:
            self.fail(
                path,
                "expected a date-time with a UTC offset such as 2026-01-01T00:00:00+01:00, "
                f"got {describe(value)}",
            )
            return None
        return moment

    def strings(self, value: object, path: str) -> tuple[str, ...] | None:
        items = self.array(value, path)
        if items is None:
            return None
        mark = self.mark()
        found = [self.text(item, f"{path}[{index}]") for index, item in enumerate(items)]
        if not self.clean_since(mark):
            return None
        return tuple(item for item in found if item is not None)

    def metadata(self, value: object, path: str) -> dict[str, str] | None:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a table of strings, got {describe(value)}")
            return None
        found: dict[str, str] = {}
        for key, item in value.items():
            if isinstance(item, str):
                found[str(key)] = item
            else:
                self.fail(join(path, str(key)), f"expected a string, got {describe(item)}")
        return found


def describe(value: object) -> str:
    """A short description of a value for an error message."""
    if isinstance(value, FloatLiteral):
        return f"the float {value.text}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, Decimal, datetime, date)):
        text = repr(value) if isinstance(value, str) else str(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


# -- documents ---------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def load_document(text: str, source: str, fmt: str | None = None) -> Mapping[str, object]:
    """Parse TOML or JSON text into a mapping, with float literals as :class:`FloatLiteral`.

    ``fmt`` is ``"toml"`` or ``"json"``; without it, text that starts with ``{`` is JSON.
    """
    if fmt is None:
        fmt = "json" if text.lstrip().startswith("{") else "toml"
    if fmt == "toml":
        try:
            return tomllib.loads(text, parse_float=FloatLiteral)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "", f"not valid TOML ({exc})") from None
    if fmt != "json":
        raise ValueError(f"unknown format {fmt!r}: expected 'toml' or 'json'")
    try:
        data = json.loads(
            text,
            parse_float=FloatLiteral,
            parse_constant=FloatLiteral,
            object_pairs_hook=_json_object,
        )
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ConfigError(source, "", f"not valid JSON ({exc.msg} at {where})") from None
    except _DuplicateKey as exc:
        raise ConfigError(source, exc.key, "this key appears twice in one object") from None
    if not isinstance(data, dict):
        raise ConfigError(source, "", "expected a JSON object at the top level")
    return data
