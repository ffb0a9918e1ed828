"""Webhooks: one attempt at delivering a job's event, and the dispatcher that drains the outbox."""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time

import redis

from modelpress.config import Settings
from modelpress.jobs import JobStore, public_view
from modelpress.webhooks import CallbackRefused, send_pinned, sign, tenant_secret

log = logging.getLogger("modelpress.webhooks")
TIMEOUT_S = 10


class DeliveryFailed(Exception):
    """This attempt failed in a way worth retrying."""


def deliver(settings: Settings, store: JobStore, job_id: str, attempt: int) -> int | None:
    """POST the job resource; return the receiver's status, or None when there is nothing to send."""
    job = store.get(job_id)
    if job is None or not job.get("callback_url"):
        return None
    url = job["callback_url"]
    body = json.dumps({"type": f"job.{job['state']}", "data": public_view(job)}, sort_keys=True).encode()
    message_id = f"msg_{job_id}_{job['state']}"  # the same across retries, so receivers can deduplicate
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "ModelPress-Webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(tenant_secret(settings, job.get("tenant", "public")), message_id, timestamp, body),
    }
    try:
        # Checked again (DNS may have changed since submit) and sent to the very address checked.
        status = send_pinned(url, body, headers, settings.webhook_allow_private, TIMEOUT_S)
    except CallbackRefused as refused:
        log.warning("job %s: webhook to %s refused: %s", job_id, url, refused, extra={"job_id": job_id})
        return None
    except (OSError, http.client.HTTPException) as error:
        log.warning("job %s: webhook attempt %d failed: %s", job_id, attempt, error, extra={"job_id": job_id})
        raise DeliveryFailed(str(error)) from None
    if not 200 <= status < 300:
        log.warning("job %s: webhook attempt %d answered %d", job_id, attempt, status, extra={"job_id": job_id})
        raise DeliveryFailed(f"receiver answered {status}")
    log.info("job %s: webhook delivered (attempt %d)", job_id, attempt, extra={"job_id": job_id, "event": "webhook"})
    return status


# ---------------------------------------------------------------------------- the outbox dispatcher

MAX_ATTEMPTS = 8
LEASE_S = 3 * TIMEOUT_S  # longer than one try; a dispatcher that dies mid-try loses its lease


class Dispatcher:
    """Delivers the webhook outbox at least once, in every worker's main process.

    The script that writes a final state appends the event; a dispatcher leases it, sends it
    (the same ``webhook-id`` on every try), and removes it only after a 2xx answer, after the
    tries are spent, or when there is nothing to send (no callback, job deleted).
    """

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="modelpress-webhooks", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def dispatch_one(self) -> bool:
        """Try the next due event; False when none is due."""
        leased = self.store.lease_event(LEASE_S)
        if leased is None:
            return False
        event_id, event = leased
        tries = int(event.get("tries", 0))
        try:
            deliver(self.settings, self.store, event["job_id"], attempt=tries + 1)
        except DeliveryFailed:
            delay = self.settings.webhook_backoff_s * (2**tries) * random.uniform(1.0, 1.5)
            if self.store.event_failed(event_id, delay, MAX_ATTEMPTS) >= MAX_ATTEMPTS:
                log.error(
                    "job %s: webhook %s given up after %d tries",
                    event["job_id"],
                    event_id,
                    MAX_ATTEMPTS,
                    extra={"job_id": event["job_id"]},
                )
            return True
        self.store.event_done(event_id)
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.dispatch_one():
                    self._stop.wait(0.5)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                log.warning("webhooks: Redis unreachable (%s); trying again", error)
                self._stop.wait(1.0)
            except Exception:
                log.exception("webhooks: dispatch failed; trying again")
                self._stop.wait(1.0)
