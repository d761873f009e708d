"""Cron schedules as EAS's CronHPA writes them: 5 fields, or 6 with seconds first.

One place reads schedules (croniter underneath: a maintained parser with day-of-week, ranges,
steps and time zones done right, rather than one of berth's own). The spec validates with
`check`; the agent's scheduler and `berth render k8s` use the rest.
"""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter


def _fields(schedule: str) -> tuple[str, bool]:
    """The expression croniter takes, and whether it has a seconds field (first, as CronHPA)."""
    parts = schedule.split()
    if len(parts) not in (5, 6):
        raise ValueError(
            f"{schedule!r} has {len(parts)} fields; give 5 (minute hour day month weekday) "
            "or 6 with seconds first, as CronHPA writes them (e.g. '0 0 9 * * 1-5')"
        )
    return " ".join(parts), len(parts) == 6


def check(schedule: str) -> str:
    """The schedule unchanged, or ValueError saying what is wrong with it."""
    expression, seconds = _fields(schedule)
    if not croniter.is_valid(expression, second_at_beginning=seconds):
        raise ValueError(f"{schedule!r} is not a valid cron schedule")
    return schedule


def zone(name: str | None) -> ZoneInfo | timezone:
    """A time zone by its IANA name (UTC when none is given)."""
    if not name:
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a known time zone; use an IANA name like 'Asia/Shanghai' or 'UTC'") from None


def next_fire(schedule: str, after: datetime, time_zone: str | None = None) -> datetime:
    """The first time strictly after `after` that the schedule fires, in the schedule's zone."""
    expression, seconds = _fields(schedule)
    start = after.astimezone(zone(time_zone))
    return croniter(expression, start, second_at_beginning=seconds).get_next(datetime)


def last_fire(schedule: str, at: datetime, time_zone: str | None = None) -> datetime:
    """The latest time at or before `at` that the schedule fired."""
    expression, seconds = _fields(schedule)
    start = at.astimezone(zone(time_zone))
    if croniter.match(expression, start, second_at_beginning=seconds):
        return start
    return croniter(expression, start, second_at_beginning=seconds).get_prev(datetime)


def matches(schedule: str, at: datetime, time_zone: str | None = None) -> bool:
    """Whether `at` falls on the schedule (at its resolution: the minute, or the second)."""
    expression, seconds = _fields(schedule)
    return croniter.match(expression, at.astimezone(zone(time_zone)), second_at_beginning=seconds)


def five_fields(schedule: str) -> str:
    """The schedule without a seconds field (KEDA's cron trigger takes 5 fields)."""
    parts = schedule.split()
    return " ".join(parts[1:] if len(parts) == 6 else parts)
