"""Prometheus text for /metrics, from counters kept in Redis.

The counters live in Redis (updated by the job scripts), not in process memory, so every
gunicorn worker answers with the same, complete numbers.
"""

from __future__ import annotations

from collections import defaultdict

DURATION_BOUNDS = ("1", "5", "15", "60", "300", "900", "1800", "3600", "14400")  # as in jobs.py's move script


def render(counters: dict[str, str], queue_depth: int, running: int) -> str:
    submitted, finished = {}, {}
    buckets: dict[str, dict[str, int]] = defaultdict(dict)
    duration_count, duration_sum = {}, {}
    uploaded = 0
    for key, value in counters.items():
        kind, *labels = key.split("|")
        if kind == "submitted":
            submitted[labels[0]] = int(value)
        elif kind == "finished":
            finished[(labels[0], labels[1])] = int(value)
        elif kind == "duration_bucket":
            buckets[labels[0]][labels[1]] = int(value)
        elif kind == "duration_count":
            duration_count[labels[0]] = int(value)
        elif kind == "duration_sum":
            duration_sum[labels[0]] = float(value)
        elif kind == "bytes_uploaded":
            uploaded = int(value)

    lines = [
        "# HELP modelpress_jobs_submitted_total Jobs accepted by the API.",
        "# TYPE modelpress_jobs_submitted_total counter",
        *(f'modelpress_jobs_submitted_total{{method="{m}"}} {n}' for m, n in sorted(submitted.items())),
        "# HELP modelpress_jobs_finished_total Jobs that reached a final state.",
        "# TYPE modelpress_jobs_finished_total counter",
        *(f'modelpress_jobs_finished_total{{state="{s}",method="{m}"}} {n}' for (s, m), n in sorted(finished.items())),
        "# HELP modelpress_job_duration_seconds Time from submission to a final state.",
        "# TYPE modelpress_job_duration_seconds histogram",
    ]
    for method in sorted(duration_count):
        for bound in DURATION_BOUNDS:
            lines.append(
                f'modelpress_job_duration_seconds_bucket{{method="{method}",le="{bound}"}} '
                f"{buckets[method].get(bound, 0)}"
            )
        lines.append(f'modelpress_job_duration_seconds_bucket{{method="{method}",le="+Inf"}} {duration_count[method]}')
        lines.append(f'modelpress_job_duration_seconds_sum{{method="{method}"}} {duration_sum.get(method, 0.0)}')
        lines.append(f'modelpress_job_duration_seconds_count{{method="{method}"}} {duration_count[method]}')
    lines += [
        "# HELP modelpress_queue_depth Jobs waiting in the broker queue.",
        "# TYPE modelpress_queue_depth gauge",
        f"modelpress_queue_depth {queue_depth}",
        "# HELP modelpress_jobs_running Jobs being compressed now.",
        "# TYPE modelpress_jobs_running gauge",
        f"modelpress_jobs_running {running}",
        "# HELP modelpress_uploaded_bytes_total Bytes of models and data accepted.",
        "# TYPE modelpress_uploaded_bytes_total counter",
        f"modelpress_uploaded_bytes_total {uploaded}",
    ]
    return "\n".join(lines) + "\n"
