"""Fault injection for the fault tests: one hook, ``fault_point``, at a few named moments of production code.

A fault test needs a process held (or failing) at an exact moment, say after the API recorded a
job and before it sent the job's message, so it can kill something there. Production code marks
each such moment with ``fault_point(<name>, job_id, data_dir)``; every name is listed in
``FAULT_POINTS`` below, and a name not listed fails at once (``UnknownFaultPoint``), so a typo
fails the tests instead of silently never pausing.

``MODELPRESS_TEST_PAUSE=<point>:<seconds>[,<point>:<seconds>...]`` names the points a process
honours (``<point>:raise`` raises ``InjectedFault`` there instead of sleeping). A point acts only
when armed: a test calls ``arm(data_dir, point)``, which creates ``<data_dir>/pauses/<point>.armed``;
the first process to reach the point renames it to ``<point>.<job_id>`` (so the test learns which
job, and that the moment has come) and pauses. Unset (production), a point costs one environment
lookup and does nothing.

``MODELPRESS_TEST_PAUSE`` is the one variable read outside ``modelpress/config.py``, on purpose: it
is no setting of the service (no operator sets it, ``Settings`` and its documentation do not list
it), tests set it in their own environment for the processes they start to inherit, and it is read
here only (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TEST_VARIABLE = "MODELPRESS_TEST_PAUSE"
# Every fault point, where it is and what has happened when a process stops there.
FAULT_POINTS = (
    "before-record",  # API (service/submission.py): the upload's files are kept, the job not yet recorded
    "after-record",  # API (service/submission.py): the job is recorded, its message not yet sent
    "before-claim",  # worker (workers/supervisor.py): a delivery arrived, the job is not yet claimed
    "mid-publish",  # worker, object storage (modelpress/objectstore.py): the model is up, the report not yet
)


class InjectedFault(RuntimeError):
    """Raised at a fault point set to ``raise``."""


class UnknownFaultPoint(ValueError):
    """A fault point name that ``FAULT_POINTS`` does not list: a typo in the code or in a test."""


def fault_point(point: str, job_id: str, data_dir: Path) -> None:
    """Pause (or raise) here if ``MODELPRESS_TEST_PAUSE`` names ``point`` and a test armed it in ``data_dir``."""
    _known(point)
    setting = os.environ.get(TEST_VARIABLE)
    if not setting:
        return
    for entry in setting.split(","):
        name, _, action = entry.partition(":")
        if _known(name.strip()) != point:
            continue
        folder = Path(data_dir) / "pauses"
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
    (folder / f"{_known(point)}.armed").touch()
    return folder


def _known(point: str) -> str:
    if point not in FAULT_POINTS:
        raise UnknownFaultPoint(f"{point!r} is not a fault point; the points are {', '.join(FAULT_POINTS)}")
    return point
