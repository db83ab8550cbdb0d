"""How many intervals of a licensed price a billing period charges.

Durations are measured between real instants, in UTC, so a month that contains a
daylight-saving change has its true length (March in Europe/Berlin is 743 hours).
How many calendar intervals a period spans is read from its wall-clock start and
end, each in its own UTC offset: 2026-03-01T00:00+01:00 to 2026-04-01T00:00+02:00 is
one month.
"""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction

from collector.rating.model import Price, RatingError

_MICROSECOND = timedelta(microseconds=1)
_DAY = timedelta(days=1)


def seconds_between(start: datetime, end: datetime) -> Fraction:
    """Elapsed seconds from ``start`` to ``end`` (aware), exact to the microsecond.

    Both are converted to UTC first: Python subtracts two datetimes that share a
    ``tzinfo`` by wall clock, which would lose or gain the hour of a DST change.
    """
    if start.utcoffset() is None or end.utcoffset() is None:
        raise RatingError("instants must carry a UTC offset")
    elapsed = end.astimezone(UTC) - start.astimezone(UTC)
    return Fraction(elapsed // _MICROSECOND, 1_000_000)


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open span of time ``[start, end)`` between aware instants."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.utcoffset() is None or self.end.utcoffset() is None:
            raise RatingError("a window's start and end must carry a UTC offset")
        if self.end.astimezone(UTC) <= self.start.astimezone(UTC):
            raise RatingError(
                f"a window must end after it starts ({self.start.isoformat()} to "
                f"{self.end.isoformat()})"
            )

    @property
    def seconds(self) -> Fraction:
        return seconds_between(self.start, self.end)

    def overlap(self, other: Window) -> Window | None:
        """The part of this window inside ``other``, or ``None`` if they do not meet."""
        start = max(self.start, other.start, key=lambda moment: moment.astimezone(UTC))
        end = min(self.end, other.end, key=lambda moment: moment.astimezone(UTC))
        if end.astimezone(UTC) <= start.astimezone(UTC):
            return None
        return Window(start, end)


def add_months(moment: datetime, months: int) -> datetime:
    """``moment`` moved by whole calendar months on its wall clock; the day is clamped
    to the end of a shorter month (31 January + 1 month is 28 or 29 February)."""
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def calendar_length(period: Window, interval: str) -> Fraction:
    """How many ``interval`` units (day, week, month, year) ``period`` spans on its wall
    calendar; :class:`RatingError` if it is not a whole number of days or months."""
    start = period.start.replace(tzinfo=None)
    end = period.end.replace(tzinfo=None)
    if interval in ("day", "week"):
        wall = end - start
        if wall % _DAY:
            raise RatingError(
                f"the period {period.start.isoformat()} to {period.end.isoformat()} is not "
                f"a whole number of days, so a price per {interval} cannot be prorated over it"
            )
        return Fraction(wall.days, 7 if interval == "week" else 1)
    if interval in ("month", "year"):
        months = (end.year - start.year) * 12 + end.month - start.month
        if add_months(start, months) != end:
            raise RatingError(
                f"the period {period.start.isoformat()} to {period.end.isoformat()} is not "
                f"a whole number of months, so a price per {interval} cannot be prorated over it"
            )
        return Fraction(months, 12 if interval == "year" else 1)
    raise RatingError(f"no calendar length for interval {interval!r}")


def billed_intervals(price: Price, period: Window, active: Window | None = None) -> Fraction:
    """How many of ``price``'s intervals the billing ``period`` charges for a licensed
    item active during ``active`` (the whole period when ``None``).

    Hourly prices count the active seconds: per second, ``seconds / 3600``; per
    started interval, that rounded up. Prices per day, week, month or year charge
    ``N * active seconds / period seconds``, where ``N`` is how many intervals the
    period spans on the calendar; per started interval, that rounded up.
    """
    recurring = price.recurring
    if recurring is None or recurring.usage_type != "licensed":
        raise RatingError(f"price {price.id!r} is not a licensed recurring price")
    window = period if active is None else active.overlap(period)
    if window is None:
        return Fraction(0)
    started = recurring.billed_per == "started_interval"
    if recurring.interval == "hour":
        hours = window.seconds / (3600 * recurring.interval_count)
        return Fraction(math.ceil(hours)) if started else hours
    intervals = calendar_length(period, recurring.interval) / recurring.interval_count
    share = intervals * window.seconds / period.seconds
    if not started:
        return share
    if intervals.denominator != 1:
        raise RatingError(
            f"price {price.id!r} is billed per started {recurring.interval_count} "
            f"{recurring.interval}, but the period is {intervals} of those"
        )
    return Fraction(math.ceil(share))
