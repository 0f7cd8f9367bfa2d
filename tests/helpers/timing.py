"""Every timeout and wait of the suite, scaled by one factor a busy machine can raise.

``POEGEN_TEST_TIME_SCALE`` (default 1) multiplies each time limit the tests set: deadlines of
RPCs and subprocesses, waits for a condition, pytest-timeout's per-test limit (``conftest.py``).
Only limits scale: a test never sleeps longer on a fast machine because a slow one exists, and
no assertion depends on how long something took.
"""

from __future__ import annotations

import os


def _time_scale() -> float:
    raw = os.environ.get("POEGEN_TEST_TIME_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"POEGEN_TEST_TIME_SCALE must be a number, got {raw!r}") from None
    if not scale >= 1.0:
        raise ValueError(f"POEGEN_TEST_TIME_SCALE must be >= 1, got {raw!r}")
    return scale


TIME_SCALE = _time_scale()


def scaled(seconds: float) -> float:
    """A time limit of ``seconds`` on an idle machine, stretched by ``POEGEN_TEST_TIME_SCALE``."""
    return seconds * TIME_SCALE
