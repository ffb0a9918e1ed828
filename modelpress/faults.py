"""Pause points for fault tests: hold a process at a chosen moment so a test can strike there.

``MODELPRESS_TEST_PAUSE=<point>:<seconds>[,<point>:<seconds>...]`` names the points a process
honours (``<point>:raise`` raises ``InjectedFault`` there instead of sleeping). A point acts only
when armed: a test creates ``<MODELPRESS_DATA_DIR>/pauses/<point>.armed``; the first process to
reach the point renames it to ``<point>.<job_id>`` (so the test learns which job, and that the
moment has come) and pauses. Unset (production), a pause point costs one environment lookup.
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
        name, _, action = entry.partition(":")
        if name.strip() != point:
            continue
        folder = Path(os.environ.get("MODELPRESS_DATA_DIR", "var")) / "pauses"
        try:
            os.rename(folder / f"{point}.armed", folder / f"{point}.{job_id}")  # one process wins the arm
        except FileNotFoundError:
            return
        if action == "raise":
            raise InjectedFault(f"injected fault at {point} for job {job_id}")
        time.sleep(float(action or 30))


def arm(data_dir: Path, point: str) -> Path:
    """Arm ``point`` once; returns the folder where the struck marker ``<point>.<job_id>`` will appear."""
    folder = Path(data_dir) / "pauses"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{point}.armed").touch()
    return folder
