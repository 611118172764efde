"""``Retry-After`` for a budget held by whole requests: when will enough of them be answered?

A request holds its share of a budget (body bytes: :class:`embedkit.serve.app.Budget`; decoded
image bytes: :class:`embedkit.serve.image_budget.ImageBudget`) from when it is admitted until it is
answered, and gives all of it back at once then. So the wait for ``excess`` bytes is the time until
enough *whole* requests in flight finish, not ``excess`` over a rate as if bytes freed continuously.

:class:`Holds` keeps the requests in flight (when each started, how many bytes it holds) and the
measured durations of those answered: a moving average (EWMA, weight 0.3 to the latest, kept for
the life of the server, not a window that forgets them when a burst lasts longer than it) per size
class (sizes within a factor of 2). Each holder's expected remaining time is:

* its expected duration (the nearest measured class's average, scaled by size when the class
  differs; before any request was answered, the caller's ``fallback`` estimate) minus its age;
* when it has already run longer than that (or nothing is measured and there is no fallback): its
  age again, i.e. a request that has run ``a`` s without finishing is expected to need about ``a``
  s more (a request overdue says the server is slower now than it measured).

The holders are taken in order of expected finish until their bytes cover the excess; that
holder's finish is the wait. ``Retry-After`` is that wait in whole seconds, rounded up, at least 1.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Callable

ALPHA = 0.3  # EWMA weight of the latest answered request's duration


def size_class(size: int) -> int:
    """Sizes within a factor of 2 share a class (their durations are averaged together)."""
    return max(0, int(size)).bit_length()


class Holds:
    """The requests holding a budget now and the measured durations of those answered (event loop only)."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[float, int]] = {}  # token -> (started, bytes held)
        self.measured: dict[int, tuple[float, float]] = {}  # size class -> (EWMA seconds, EWMA bytes)
        self._tokens = itertools.count()

    def start(self, size: int, now: float | None = None) -> int:
        token = next(self._tokens)
        self.live[token] = (time.monotonic() if now is None else now, size)
        return token

    def drop(self, token: int) -> None:
        """Forget a holder without measuring it."""
        self.live.pop(token, None)

    def finish(self, token: int, now: float | None = None, size: int | None = None) -> None:
        """The holder ``token`` was answered: its duration is measured (for ``size`` bytes if given)."""
        started, held = self.live.pop(token)
        size = held if size is None else size
        if size <= 0:
            return
        seconds = (time.monotonic() if now is None else now) - started
        c = size_class(size)
        old = self.measured.get(c)
        self.measured[c] = (seconds, float(size)) if old is None else (
            (1 - ALPHA) * old[0] + ALPHA * seconds, (1 - ALPHA) * old[1] + ALPHA * size)

    def expected(self, size: int) -> float | None:
        """The measured duration of a request of ``size`` bytes (None: none answered yet)."""
        if not self.measured:
            return None
        c = size_class(size)
        nearest = min(self.measured, key=lambda k: (abs(k - c), -k))
        seconds, mean = self.measured[nearest]
        return seconds if nearest == c else seconds * size / max(mean, 1.0)

    def wait(self, excess: int, fallback: Callable[[int], float] | None = None, now: float | None = None) -> float:
        """Seconds until the holders answered hold at least ``excess`` bytes (module docstring)."""
        now = time.monotonic() if now is None else now
        ends = []
        for started, size in self.live.values():
            age = max(0.0, now - started)
            expected = self.expected(size)
            if expected is None and fallback is not None:
                expected = fallback(size)
            left = expected - age if expected is not None and expected > age else age
            ends.append((left, size))
        freed, seconds = 0, 0.0
        for left, size in sorted(ends):
            freed, seconds = freed + size, left
            if freed >= excess:
                break
        return seconds

    def retry_after(self, excess: int, fallback: Callable[[int], float] | None = None) -> int:
        """:meth:`wait` as a ``Retry-After`` value: whole seconds, rounded up, at least 1."""
        return max(1, math.ceil(self.wait(excess, fallback)))
