"""Billing units and their exact relation to the metric base units.

A usage record carries its quantity in a base unit (``bytes``, ``seconds``,
``byte_seconds``, ``count`` or ``requests``); a metered price names the unit it is
billed in. Each billing unit is one base unit times an exact rational factor:
``GB`` is 10^9 bytes, ``GiB`` is 2^30 bytes, ``hour`` is 3600 seconds.

Rate units (``Mbit/s`` and friends) describe bandwidth for burstable billing: a
sample of ``n`` bytes over a window of ``w`` seconds is ``8 n / w`` bit/s, so turning
bytes into a rate needs the window length.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True, slots=True)
class Unit:
    """A billing unit: ``name`` is ``per_base`` base units of ``base``.

    For a rate unit, ``per_base`` is the number of bytes per second in one unit.
    """

    name: str
    base: str
    per_base: Fraction
    rate: bool = False


def _units() -> dict[str, Unit]:
    table: list[Unit] = [
        Unit("byte", "bytes", Fraction(1)),
        Unit("count", "count", Fraction(1)),
        Unit("request", "requests", Fraction(1)),
        Unit("second", "seconds", Fraction(1)),
        Unit("minute", "seconds", Fraction(60)),
        Unit("hour", "seconds", Fraction(3600)),
        Unit("day", "seconds", Fraction(86_400)),
    ]
    for power, prefix in enumerate(("k", "M", "G", "T", "P"), start=1):
        table.append(Unit(f"{prefix}B", "bytes", Fraction(10 ** (3 * power))))
        binary = "K" if prefix == "k" else prefix
        table.append(Unit(f"{binary}iB", "bytes", Fraction(2 ** (10 * power))))
    for prefix, size in (("GB", 10**9), ("GiB", 2**30)):
        table.append(Unit(f"{prefix}-second", "byte_seconds", Fraction(size)))
        table.append(Unit(f"{prefix}-hour", "byte_seconds", Fraction(size * 3600)))
        table.append(Unit(f"{prefix}-day", "byte_seconds", Fraction(size * 86_400)))
    for power, prefix in enumerate(("", "k", "M", "G")):
        # one bit per second is 1/8 byte per second
        table.append(Unit(f"{prefix}bit/s", "bytes", Fraction(10 ** (3 * power), 8), rate=True))
    return {unit.name: unit for unit in table}


UNITS: dict[str, Unit] = _units()
BASE_UNITS = frozenset(unit.base for unit in UNITS.values())


def unit(name: str) -> Unit:
    """The billing unit called ``name``; :class:`KeyError` if there is none."""
    return UNITS[name]
