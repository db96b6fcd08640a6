"""Crontab lines as APScheduler triggers: the one parser that both config validation and the
scheduler use, so ``mailtriage check`` refuses exactly the schedules ``mailtriage serve`` refuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import tzinfo

    from apscheduler.triggers.cron import CronTrigger

_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_weekdays(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday) as an explicit list of day names.

    APScheduler 3.x numbers weekdays from Monday = 0 even in ``from_crontab`` (agronholm/apscheduler
    #286, fixed only in 4.x), so "0 3 * * 0" would run on Monday. Names mean the same in both.
    """
    days: set[int] = set()
    for part in field.lower().split(","):
        rng, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if rng == "*":
            lo, hi = 0, 6
        else:
            ends = [int(x) if x.isdigit() else _CRON_DAYS.index(x[:3]) for x in rng.split("-")]
            lo, hi = (ends[0], ends[0] if not step_text else 6) if len(ends) == 1 else (ends[0], ends[1])
            if not (0 <= lo <= 7 and 0 <= hi <= 7) or len(ends) > 2:
                raise ValueError(f"day of week {part!r} is outside 0-7")
        days.update(d % 7 for d in range(lo, hi + 1, step))
    if days == set(range(7)):
        return "*"
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def crontab_trigger(expr: str, timezone: str | tzinfo | None = None) -> CronTrigger:
    """A CronTrigger for a standard 5-field crontab line, with crontab's weekday numbering.

    Raises ValueError naming the bad field. ``timezone`` None means the host's local zone (what
    the scheduler runs in); validation passes "UTC" so it never depends on the host's zone setup.
    """
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(fields)}")
    minute, hour, day, month, weekday = fields
    try:
        weekday = _cron_weekdays(weekday)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"bad day-of-week field {fields[4]!r}: {exc}") from exc
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=weekday, timezone=timezone)
