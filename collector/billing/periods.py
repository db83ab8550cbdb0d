"""An account's billing periods, computed in its time zone and on its cycle. Pure.

Cycles:

- ``monthly``: from ``anchor_day`` (1 to 28, so every month has it) at midnight, local
  time, to the same day of the next month. A month in Europe/Berlin that contains a
  daylight-saving change has its true length: March 2026 is 743 hours, October 745.
- ``hourly``: each hour of the local clock (real hours: the hour repeated when the
  clocks go back is two periods).
- ``custom``: periods of ``interval_days`` calendar days (local midnight to local
  midnight, so 167 or 169 hours across a change) or ``interval_hours`` real hours,
  counted from ``anchor``, an instant on which a period starts.

A period is half open, ``[start, end)``. It is identified by its start and end
instants (microseconds since the epoch, UTC); its ``start`` and ``end`` datetimes carry
the account's zone, so their wall-clock time is what the rating engine reads to count
calendar months and days. A local midnight that does not exist (a zone that changes
its clocks at midnight) is kept as that wall-clock time with the offset in force
before the change, which is the instant the day really starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from collector.rating.proration import Window
from common.errors import ValidationError
from common.records import from_us, to_us

CYCLES = ("monthly", "hourly", "custom")
MAX_ANCHOR_DAY = 28
HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; :class:`ValidationError` if there is none."""
    try:
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            f"unknown time zone {name!r}: expected an IANA name such as 'Europe/Berlin'"
        ) from None


@functools.lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    if not name or name != name.strip():
        raise ValueError(name)
    return ZoneInfo(name)


@dataclass(frozen=True, slots=True, order=True)
class Period:
    """One billing period ``[start, end)``; equal periods have equal instants."""

    start_us: int
    end_us: int
    start: datetime = field(compare=False, hash=False, repr=False)
    end: datetime = field(compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.end_us <= self.start_us:
            raise ValidationError("a billing period must end after it starts")

    @property
    def window(self) -> Window:
        """The period as the rating engine's window (wall clock in the account's zone)."""
        return Window(self.start, self.end)

    def contains(self, at_us: int) -> bool:
        return self.start_us <= at_us < self.end_us

    @property
    def label(self) -> str:
        """``start/end`` in RFC 3339 with the local offsets, e.g.
        ``2026-03-01T00:00:00+01:00/2026-04-01T00:00:00+02:00``."""
        return f"{self.start.isoformat()}/{self.end.isoformat()}"

    @property
    def hours(self) -> int:
        return (self.end_us - self.start_us) // HOUR_US


def _period(start: datetime, end: datetime) -> Period:
    return Period(to_us(start), to_us(end), start, end)


@dataclass(frozen=True, slots=True)
class Cycle:
    """How an account's time is cut into billing periods (see the module docstring)."""

    kind: str = "monthly"
    time_zone: str = "UTC"
    anchor_day: int = 1
    interval_days: int = 0
    interval_hours: int = 0
    anchor_us: int = 0

    def __post_init__(self) -> None:
        zone(self.time_zone)
        if self.kind not in CYCLES:
            raise ValidationError(f"unknown cycle {self.kind!r}: expected one of {CYCLES}")
        if not 1 <= self.anchor_day <= MAX_ANCHOR_DAY:
            raise ValidationError(
                f"anchor_day must be within 1..{MAX_ANCHOR_DAY} (every month has those days)"
            )
        if self.kind == "custom":
            if (self.interval_days > 0) == (self.interval_hours > 0):
                raise ValidationError("a custom cycle needs a length in days or in hours")
        elif self.interval_days or self.interval_hours:
            raise ValidationError(f"a {self.kind} cycle takes no interval")

    @property
    def zone(self) -> ZoneInfo:
        return zone(self.time_zone)

    def describe(self) -> str:
        if self.kind == "monthly":
            return f"monthly from day {self.anchor_day}, {self.time_zone}"
        if self.kind == "hourly":
            return f"hourly, {self.time_zone}"
        length = (
            f"{self.interval_days} days" if self.interval_days else f"{self.interval_hours} hours"
        )
        anchor = from_us(self.anchor_us).astimezone(self.zone).isoformat()
        return f"every {length} from {anchor}, {self.time_zone}"

    def period_of(self, at_us: int) -> Period:
        """The period that holds the instant ``at_us``."""
        return _period_of(self, at_us)

    def period_start(self, at_us: int) -> int:
        return _period_of(self, at_us).start_us

    def after(self, period: Period) -> Period:
        return _period_of(self, period.end_us)

    def before(self, period: Period) -> Period:
        return _period_of(self, period.start_us - 1)

    def periods(self, from_us: int, to_us: int) -> list[Period]:
        """The periods that start within ``[from_us, to_us)``, plus the one holding
        ``from_us``, in order."""
        found: list[Period] = []
        period = _period_of(self, from_us)
        while period.start_us < to_us:
            found.append(period)
            period = self.after(period)
        return found


MONTHLY_UTC = Cycle()


@functools.lru_cache(maxsize=65_536)
def _period_of(cycle: Cycle, at_us: int) -> Period:
    if cycle.kind == "monthly":
        return _monthly(cycle, at_us)
    if cycle.kind == "hourly":
        return _hourly(cycle, at_us)
    if cycle.interval_days:
        return _custom_days(cycle, at_us)
    return _custom_hours(cycle, at_us)


def _month_start(cycle: Cycle, year: int, month: int) -> datetime:
    return datetime(year, month, cycle.anchor_day, tzinfo=cycle.zone)


def _shift_month(year: int, month: int, months: int) -> tuple[int, int]:
    index = year * 12 + month - 1 + months
    return index // 12, index % 12 + 1


def _monthly(cycle: Cycle, at_us: int) -> Period:
    local = from_us(at_us).astimezone(cycle.zone)
    year, month = local.year, local.month
    start = _month_start(cycle, year, month)
    if to_us(start) > at_us:
        year, month = _shift_month(year, month, -1)
        start = _month_start(cycle, year, month)
    end = _month_start(cycle, *_shift_month(year, month, 1))
    return _period(start, end)


def _hourly(cycle: Cycle, at_us: int) -> Period:
    local = from_us(at_us).astimezone(cycle.zone)
    start = local.replace(minute=0, second=0, microsecond=0)  # keeps ``fold``
    start_us = to_us(start)
    end = from_us(start_us + HOUR_US).astimezone(cycle.zone)
    return _period(start, end)


def _custom_days(cycle: Cycle, at_us: int) -> Period:
    zone_ = cycle.zone
    anchor_wall = from_us(cycle.anchor_us).astimezone(zone_).replace(tzinfo=None)
    step = timedelta(days=cycle.interval_days)

    def start_of(k: int) -> datetime:
        return (anchor_wall + k * step).replace(tzinfo=zone_)

    k = (at_us - cycle.anchor_us) // (cycle.interval_days * DAY_US)
    while to_us(start_of(k)) > at_us:
        k -= 1
    while to_us(start_of(k + 1)) <= at_us:
        k += 1
    return _period(start_of(k), start_of(k + 1))


def _custom_hours(cycle: Cycle, at_us: int) -> Period:
    length = cycle.interval_hours * HOUR_US
    k = (at_us - cycle.anchor_us) // length
    start_us = cycle.anchor_us + k * length
    zone_ = cycle.zone
    return _period(
        from_us(start_us).astimezone(zone_), from_us(start_us + length).astimezone(zone_)
    )


def period_from_text(cycle: Cycle, text: str) -> Period:
    """The period holding an RFC 3339 instant, or a date (``2026-03-15``: its local
    midnight in the cycle's zone); :class:`ValidationError` otherwise."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(
            f"expected an RFC 3339 instant or a date such as 2026-03-01, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=cycle.zone)
    return cycle.period_of(to_us(moment.astimezone(UTC)))
