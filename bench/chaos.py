"""Chaos run: small jobs through `make run`'s stack while a random child (worker, Redis, API) is
SIGKILLed at random moments; counts what a correct lifecycle must never do.

Starts ``python -m modelpress.stack`` (what ``make run`` runs, which restarts dead children),
submits ``--jobs`` small quantization jobs with a webhook each over the first part of
``--minutes``, kills a random child every ``--kill-every`` seconds (with jitter), then waits for
every job to end (a job counts as lost if it is not final after the queue drained and nothing
finished for five minutes). Prints jobs submitted, succeeded, lost (not final at the end: must be 0), run to
completion more than once (compression completed by two attempts: must be 0), webhooks missing (no
2xx for a final job: must be 0), and p50/p99 time from submission to final state, with the same
figures for a baseline run without kills when ``--baseline`` is given. Writes bench/results/chaos.json.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.stack import free_port  # noqa: E402
from tests.models import SmallConvNet, save_scripted  # noqa: E402
from tests.webhooks import WebhookReceiver  # noqa: E402

SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 2, "warmup": 0}}
FINAL = {"succeeded", "failed", "cancelled"}
ROLES = {"worker": "celery", "redis": "redis-server", "api": "gunicorn"}
STALL_S = 300


def run(jobs: int, minutes: float, kill_every: float, seed: int, workdir: Path, kills: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    model = save_scripted(SmallConvNet(), workdir / "model.pt").read_bytes()
    receiver = WebhookReceiver()
    port = free_port()
    env = {
        **os.environ,
        "MODELPRESS_DATA_DIR": str(workdir / "data"),
        "MODELPRESS_PORT": str(port),
        "MODELPRESS_REDIS_PORT": str(free_port()),
        "MODELPRESS_HEARTBEAT_STALE_S": "10",
        "MODELPRESS_WEBHOOK_ALLOW_PRIVATE": "1",
        "MODELPRESS_WEBHOOK_BACKOFF_S": "1",
        "MODELPRESS_MAX_ACTIVE_JOBS": str(jobs + 10),
        "MODELPRESS_LOG_FORMAT": "json",
        "MODELPRESS_JOB_THREADS": "1",
    }
    env.pop("REDIS_URL", None)
    log_path = workdir / "stack.log"
    with open(log_path, "wb") as log_file:
        stack = subprocess.Popen(
            [sys.executable, "-m", "modelpress.stack"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    _wait(lambda: _answers(session, base + "/healthz"), 120, "the stack did not start")

    submitted: dict[str, float] = {}
    killed: list[tuple[float, str]] = []
    start = time.monotonic()
    end = start + minutes * 60
    done = threading.Event()

    def submit_all() -> None:
        spacing = minutes * 60 * 0.7 / max(jobs, 1)  # all submitted in the first 70 % of the run
        for _ in range(jobs):
            key = uuid.uuid4().hex  # the same key on every retry: a retry after a kill never doubles a job
            while time.monotonic() < end + 300:
                try:
                    answer = session.post(
                        base + "/v1/jobs",
                        headers={"Idempotency-Key": key},
                        timeout=30,
                        files={"model": ("m.pt", model)},
                        data={"spec": json.dumps(SPEC), "callback_url": receiver.url},
                    )
                    if answer.status_code == 202:
                        submitted.setdefault(answer.json()["id"], time.time())
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.5)
            time.sleep(spacing)
        done.set()

    def kill_randomly() -> None:
        bag: list[str] = []  # every role in a shuffled round, so a short run still kills each kind
        while kills:
            pause = kill_every * rng.uniform(0.5, 1.5)
            if time.monotonic() + pause >= end:  # no kill after the end: the drain starts on time
                break
            time.sleep(pause)
            if not bag:
                bag = rng.sample(sorted(ROLES), len(ROLES))
            role = bag.pop()
            for child in psutil.Process(stack.pid).children():
                if ROLES[role] in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGKILL)
                    killed.append((time.monotonic() - start, role))
                    break

    threads = [threading.Thread(target=submit_all, daemon=True), threading.Thread(target=kill_randomly, daemon=True)]
    for thread in threads:
        thread.start()
    threads[1].join()
    done.wait(timeout=max(0.0, end + 300 - time.monotonic()))
    final: dict[str, dict[str, Any]] = {}
    last_seen: dict[str, Any] = {}
    stalled_since = time.monotonic()  # lost means: not final although nothing has finished for STALL_S
    while len(final) < len(submitted) and time.monotonic() - stalled_since < STALL_S:
        for job_id in list(submitted):
            if job_id in final:
                continue
            try:
                job = session.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
            except (requests.RequestException, ValueError):
                continue
            last_seen[job_id] = {key: job.get(key) for key in ("state", "stage", "deliveries")}
            if job.get("state") in FINAL:
                final[job_id] = job
                stalled_since = time.monotonic()
        time.sleep(1)
    time.sleep(5)  # let the last webhooks arrive
    stack.send_signal(signal.SIGTERM)
    stack.wait(timeout=60)

    completions: dict[str, int] = {}
    transitions: dict[str, int] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("job_id") not in submitted:
            continue
        if entry.get("event") == "completed":
            completions[entry["job_id"]] = completions.get(entry["job_id"], 0) + 1
        if entry.get("event") == "transition" and entry.get("state") in FINAL:
            transitions[entry["job_id"]] = transitions.get(entry["job_id"], 0) + 1
    receiver.close()
    accepted = receiver.accepted()
    durations = sorted(_seconds(job["finished_at"]) - _seconds(job["created_at"]) for job in final.values())
    missing = [job_id for job_id, job in final.items() if not accepted.get(f"msg_{job_id}_{job['state']}")]
    return {
        "kills": len(killed),
        "killed": killed,
        "submitted": len(submitted),
        "succeeded": sum(job["state"] == "succeeded" for job in final.values()),
        "failed": sum(job["state"] == "failed" for job in final.values()),
        "lost": len(submitted) - len(final),
        "lost_jobs": {job_id: last_seen.get(job_id) for job_id in submitted if job_id not in final},
        "run_twice": sum(count > 1 for count in completions.values()),
        "final_state_written_twice": sum(count > 1 for count in transitions.values()),
        "taken_over": sum(job.get("deliveries", 0) > 1 for job in final.values()),
        "webhooks_missing": len(missing),
        "webhooks_duplicated": sum(n > 1 for n in accepted.values()),
        "p50_s": round(statistics.median(durations), 2) if durations else None,
        "p99_s": round(durations[min(len(durations) - 1, int(len(durations) * 0.99))], 2) if durations else None,
    }


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _answers(session: requests.Session, url: str) -> bool:
    try:
        return session.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _wait(ready, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(message)
        time.sleep(0.5)


def main() -> None:
    parser = arguments(__doc__, "chaos")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also run the same load without kills first")
    args = parser.parse_args()
    prepare(args)
    runs = {}
    for name, kills in ([("baseline", False)] if args.baseline else []) + [("chaos", True)]:
        with tempfile.TemporaryDirectory(prefix=f"modelpress-{name}-") as workdir:
            runs[name] = run(args.jobs, args.minutes, args.kill_every, args.seed, Path(workdir), kills)
    print(
        f"{'run':<9} {'kills':>5} {'submitted':>9} {'succeeded':>9} {'lost':>4} {'run twice':>9} "
        f"{'webhooks missing':>16} {'p50 s':>7} {'p99 s':>7}"
    )
    for name, row in runs.items():
        print(
            f"{name:<9} {row['kills']:>5} {row['submitted']:>9} {row['succeeded']:>9} {row['lost']:>4} "
            f"{row['run_twice']:>9} {row['webhooks_missing']:>16} {row['p50_s']!s:>7} {row['p99_s']!s:>7}"
        )
    write_results(
        args,
        {
            "machine": machine(
                args, jobs=args.jobs, minutes=args.minutes, kill_every_s=args.kill_every, seed=args.seed
            ),
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
