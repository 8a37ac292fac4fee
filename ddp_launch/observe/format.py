"""How every number reaches the user: the one formatter per kind of number, shared by the
live view, the end-of-run summary, the status table and the HTML report, so the same
figure reads the same everywhere.

Memory is in decimal units (1 MB = 10**6 bytes) everywhere, the units labelled as what they
are: the status table once printed MiB labelled "MB" beside the live view's real MB.
"""

from __future__ import annotations

import math


def format_rate(steps_per_s: float) -> str:
    """Format a step rate the way tqdm users read it.

    Args:
        steps_per_s: steps per second; 0 means no progress, negative or non-finite unknown.

    Returns:
        ``"43.1 it/s"``, ``"1234 it/s"``, ``"0.52 it/s"``, or ``"12.5 s/it"`` below 0.1 it/s
        (where seconds per step is the number people can picture); ``"? it/s"`` when unknown.
    """
    if not math.isfinite(steps_per_s) or steps_per_s < 0:
        return "? it/s"
    if steps_per_s == 0:
        return "0.0 it/s"
    if steps_per_s < 0.1:
        return f"{1.0 / steps_per_s:.1f} s/it"
    return f"{rate_number(steps_per_s)} it/s"


def rate_number(steps_per_s: float) -> str:
    if steps_per_s >= 1000:
        return f"{steps_per_s:.0f}"
    if steps_per_s >= 1:
        return f"{steps_per_s:.1f}"
    return f"{steps_per_s:.2f}"


def format_duration(seconds: float) -> str:
    """Format a duration compactly: ``"4s"``, ``"1m05s"``, ``"2h03m"``.

    Args:
        seconds: a non-negative duration; negative values count as 0.

    Returns:
        The duration; tenths of a second only below one second.
    """
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n_bytes: int) -> str:
    """Format a memory size in decimal units (``"312 MB"``, ``"1.2 GB"``); ``"-"`` when 0 (unknown)."""
    if n_bytes <= 0:
        return "-"
    if n_bytes >= 10**9:
        return f"{n_bytes / 1e9:.1f} GB"
    if n_bytes >= 10**6:
        return f"{n_bytes / 1e6:.0f} MB"
    return f"{n_bytes / 1e3:.0f} kB"


def format_loss(loss: float | None) -> str:
    """Four significant digits (``"0.231"``, ``"2.346"``, ``"1.235e+04"``); ``"-"`` when unknown."""
    return "-" if loss is None else f"{loss:.4g}"
