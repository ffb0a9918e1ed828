"""One attempt at delivering a job's webhook."""
from __future__ import annotations

import http.client
import json
import logging
import time

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
