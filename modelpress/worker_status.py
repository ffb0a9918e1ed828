"""What each worker publishes about itself in Redis, for the API's ``/readyz`` to read.

At start-up a worker tries its job sandbox once (``workers.sandbox.self_test``) and publishes the
result here; the API reads it back by worker hostname. The record lives in the shared library so
that the API asks the workers through Redis without importing the sandbox (or anything else of
the worker package).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

STATUS_KEY = "modelpress:sandbox"  # Redis hash: worker hostname -> JSON of its SandboxStatus


@dataclass(frozen=True)
class SandboxStatus:
    """Whether a worker can confine its jobs, as its own probe found at start-up."""

    state: str  # "confined", "unavailable" or "off"
    detail: str
    checked_at: float

    @property
    def ready(self) -> bool:
        return self.state != "unavailable"


def publish(redis_client: Any, hostname: str, status: SandboxStatus) -> None:
    """Record ``status`` as worker ``hostname``'s, replacing what it published before."""
    redis_client.hset(STATUS_KEY, hostname, json.dumps(asdict(status)))


def published(redis_client: Any, hostnames: list[str]) -> dict[str, SandboxStatus | None]:
    """The status each worker published at start-up (``None``: it published none)."""
    if not hostnames:
        return {}
    raw = redis_client.hmget(STATUS_KEY, hostnames)
    return {name: SandboxStatus(**json.loads(value)) if value else None for name, value in zip(hostnames, raw)}
