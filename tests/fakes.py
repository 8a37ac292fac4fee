"""Fakes shared by the tests."""

from __future__ import annotations


class FakeClock:
    """A clock that moves only when the test says so.

    Call it for the time (it stands in for `time.monotonic` or `time.time`); move it with
    `advance(seconds)`, `set(now)`, or by assigning `now`.
    """

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, now: float) -> None:
        self.now = now
