"""Waits that grow: every "try again later" of the project, in one place."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from mailqueue.config import QueueSettings


class Backoff:
    """A wait that starts at `first` seconds and doubles up to `longest`, each
    one stretched by up to `jitter` (0.5: up to half again), so that processes
    that failed together do not all try again together. reset() after a success."""

    def __init__(
        self,
        first: float = 0.5,
        longest: float = 30.0,
        jitter: float = 0.5,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.first, self.longest, self.jitter, self.rand = first, longest, jitter, rand
        self.current = first

    def next(self) -> float:
        """Seconds to wait now; the next wait is twice as long (up to `longest`)."""
        wait = self.current * (1 + self.jitter * self.rand())
        self.current = min(self.current * 2, self.longest)
        return wait

    def reset(self) -> None:
        self.current = self.first


def retry_delay(
    attempts: int, queue_settings: QueueSettings, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt (or deferral) number `attempts` (1, 2,
    ...): queue.retry_delay doubled for each earlier one, up to max_retry_delay,
    plus up to 25% jitter so that jobs failed together do not retry together."""
    base = queue_settings.retry_delay * 2 ** min(max(attempts, 1) - 1, 32)
    base = min(base, queue_settings.max_retry_delay)
    return min(base * (1 + 0.25 * rand()), queue_settings.max_retry_delay)
