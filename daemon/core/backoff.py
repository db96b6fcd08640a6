"""The one exponential backoff: reconnects, supervisor restarts and retries of refused actions all
wait the same way, so a change to how we back off is made once."""

from __future__ import annotations


def delay(attempt: int, start: float, cap: float) -> float:
    """Seconds to wait before try ``attempt`` + 1 (``attempt`` 0 is the first retry): ``start``,
    doubling, never more than ``cap``."""
    if attempt > 64:  # 2**attempt would overflow a float long after the cap is reached
        return cap
    return min(cap, start * 2 ** max(attempt, 0))
