"""Figures as data: one per measured quantity, with both launchers' values pair by pair.

A `Figure` collects, for each pair i, ddp-launch's and torchrun's value (or why there is
none) and summarises them as min/median/max per launcher and the median of the per-pair
ratios ddp-launch/torchrun (only pairs where both runs gave a value count).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from benchmarks.procs import DDP_LAUNCH, LAUNCHERS, TORCHRUN


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    better: str  # "lower" or "higher"
    target: str  # as the issue states it
    target_ratio: float | None = None  # ddp-launch/torchrun must be <= (lower) or >= (higher) this
    target_abs: float | None = None  # ddp-launch's median must be <= (lower) / >= (higher) this
    note: str = ""
    values: dict[str, list[float | None]] = field(default_factory=lambda: {name: [] for name in LAUNCHERS})
    errors: dict[str, list[dict]] = field(default_factory=lambda: {name: [] for name in LAUNCHERS})
    not_detected: dict[str, int] = field(default_factory=lambda: {name: 0 for name in LAUNCHERS})
    bound_s: float | None = None  # for "not detected within the bound"
    exit_codes: dict[str, list[int | None]] = field(default_factory=lambda: {name: [] for name in LAUNCHERS})
    # Where ddp-launch's time went, pair by pair ({stage: seconds}); see figures.recovery_figure.
    breakdown: list[dict[str, float]] = field(default_factory=list)

    def add(self, launcher: str, pair: int, value: float | None, error: str = "", exit_code: int | None = 0) -> None:
        """Record `launcher`'s value for pair `pair` (runs of one pair are added in any order)."""
        values = self.values[launcher]
        while len(values) <= pair:
            values.append(None)
        values[pair] = value
        codes = self.exit_codes[launcher]
        while len(codes) <= pair:
            codes.append(None)
        codes[pair] = exit_code
        if value is None and error:
            self.errors[launcher].append({"pair": pair, "error": error})

    def add_not_detected(self, launcher: str, pair: int, exit_code: int | None) -> None:
        self.add(launcher, pair, None, exit_code=exit_code)
        self.not_detected[launcher] += 1

    def values_of(self, launcher: str) -> list[float]:
        return [v for v in self.values[launcher] if v is not None]

    def ratios(self) -> list[float]:
        a, b = self.values[DDP_LAUNCH], self.values[TORCHRUN]
        return [x / y for x, y in zip(a, b) if x is not None and y is not None and y > 0]

    def met(self) -> bool | None:
        """Whether the target is met, from the medians (None when it cannot be told)."""
        lower = self.better == "lower"
        checks = []
        if self.target_ratio is not None:
            r = median(self.ratios())
            if r is None:
                return None
            checks.append(r <= self.target_ratio if lower else r >= self.target_ratio)
        if self.target_abs is not None:
            m = median([v for v in self.values[DDP_LAUNCH] if v is not None])
            if m is None:
                return None
            checks.append(m <= self.target_abs if lower else m >= self.target_abs)
        return all(checks) if checks else None

    def to_json(self) -> dict:
        launchers = {}
        for name in LAUNCHERS:
            got = [v for v in self.values[name] if v is not None]
            ordered = sorted(got)
            launchers[name] = {
                "values": self.values[name],
                "n": len(got),
                "min": min(got) if got else None,
                "median": median(got),
                "p90": percentile(ordered, 90),
                "p99": percentile(ordered, 99),
                "max": max(got) if got else None,
                "failed": len(self.errors[name]),
                "errors": self.errors[name],
                "exit_codes": self.exit_codes[name],
            }
            if self.bound_s is not None:
                launchers[name]["not_detected"] = self.not_detected[name]
                launchers[name]["bound_s"] = self.bound_s
        ratios = self.ratios()
        extra: dict[str, object] = {}
        if self.breakdown:
            stages = list(self.breakdown[0])
            extra["breakdown_median_s"] = {
                stage: median([b[stage] for b in self.breakdown if stage in b]) for stage in stages
            }
            extra["breakdown"] = self.breakdown
            dl, tr = sorted(v for v in self.values[DDP_LAUNCH] if v), median(self.values_of(TORCHRUN))
            if dl and tr:
                extra["vs_torchrun_median"] = {f"p{q}": round((percentile(dl, q) or 0.0) / tr, 4) for q in (50, 90, 99)}
        return {
            **extra,
            "kind": "pairs",
            "title": self.title,
            "unit": self.unit,
            "better": self.better,
            "target": self.target,
            "target_ratio": self.target_ratio,
            "target_abs": self.target_abs,
            "launchers": launchers,
            "ratios": ratios,
            "ratio_median": median(ratios),
            "met": self.met(),
            "note": self.note,
        }


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of already sorted values, nearest rank."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]
