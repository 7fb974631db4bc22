"""Business days: Monday to Friday, less the holidays a configuration names.

CMS counts Transitional Care Management's "2 business days following the
date of discharge" this way: Monday through Friday except holidays, whatever
a practice's own hours; the day of discharge itself does not count. Herald's
default holidays are the US federal holidays as observed (a Saturday holiday
on the Friday before, a Sunday one on the Monday after), listed in
``mappings/worklist.toml`` so a site can add its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta

__all__ = ["BusinessCalendar", "WEEKDAYS"]

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass(frozen=True)
class BusinessCalendar:
    """Which days are business days."""

    holidays: frozenset[date] = field(default_factory=frozenset)
    weekend: frozenset[int] = frozenset({5, 6})  # date.weekday(): Saturday, Sunday

    @classmethod
    def of(cls, holidays: Iterable[str | date] = (), weekend: Iterable[str] = ("Sat", "Sun")) -> BusinessCalendar:
        days = frozenset(d if isinstance(d, date) else date.fromisoformat(d) for d in holidays)
        return cls(days, frozenset(WEEKDAYS.index(w) for w in weekend))

    def is_business_day(self, day: date) -> bool:
        return day.weekday() not in self.weekend and day not in self.holidays

    def add_business_days(self, start: date, count: int) -> date:
        """The ``count``-th business day after ``start`` (``start`` itself never counts)."""
        day = start
        left = count
        while left > 0:
            day += timedelta(days=1)
            if self.is_business_day(day):
                left -= 1
        return day

    def business_days_between(self, start: date, end: date) -> int:
        """Business days after ``start`` up to and including ``end`` (0 when ``end`` is not after ``start``)."""
        n, day = 0, start
        while day < end:
            day += timedelta(days=1)
            n += self.is_business_day(day)
        return n
