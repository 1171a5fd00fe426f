"""Fault injection for the kill-and-resume tests: ``FLYTUNE_KILL_AT=name:n`` makes the
process SIGKILL itself the n-th time it passes the point ``name`` (never set in use)."""

from __future__ import annotations

import os
import signal
from collections import Counter

_passes: Counter = Counter()


def point(name: str) -> None:
    target = os.environ.get("FLYTUNE_KILL_AT")
    if not target:
        return
    _passes[name] += 1
    where, _, count = target.partition(":")
    if where == name and _passes[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
