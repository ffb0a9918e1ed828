"""Pause points for fault tests: hold a process at a chosen moment so a test can strike there.

``MODELPRESS_TEST_PAUSE=<point>:<seconds>[,<point>:<seconds>...]`` makes ``pause_point(point, job_id)``
sleep that long, after writing ``<MODELPRESS_DATA_DIR>/pauses/<point>.<job_id>`` so the test knows
the process reached it; ``<point>:raise`` raises ``InjectedFault`` there instead. Each point pauses once per job (a re-run goes straight through). Unset (production), a pause point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


class InjectedFault(RuntimeError):
    """Raised at a pause point set to ``raise``."""


def pause_point(point: str, job_id: str) -> None:
    setting = os.environ.get("MODELPRESS_TEST_PAUSE")
    if not setting:
        return
    for entry in setting.split(","):
        name, _, seconds = entry.partition(":")
        if name.strip() == point:
            marker = Path(os.environ.get("MODELPRESS_DATA_DIR", "var")) / "pauses" / f"{point}.{job_id}"
            if marker.exists():
                return
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
            if seconds == "raise":
                raise InjectedFault(f"injected fault at {point} for job {job_id}")
            time.sleep(float(seconds or 30))
