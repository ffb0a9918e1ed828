"""The job's child process is an untrusted client of its supervisor.

A real ``Supervisor`` runs in this test process with a real ``JobStore`` on a real Redis and real
``Storage``; only its child command is replaced, by small hostile Python programs that run inside
the same bubblewrap sandbox as a job (what a model that escaped into Python could do there). Each
test asserts that the fault struck, that the job failed with the right problem, that this process
(the supervisor) and Redis stayed within bounds, and the same harness with a well-behaved child
succeeds. No production switch runs such code: the child command is a constructor argument.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from modelpress.jobs import JobStore, connect, new_job_id, utc_now
from modelpress.spec import dump_spec, parse_spec
from modelpress.stack import Stack
from modelpress.storage import JobFiles, Storage
from tests.conftest import make_settings
from tests.models import SmallConvNet, save_scripted
from workers import job_protocol as protocol
from workers.supervisor import Supervisor

JOB_MEMORY_MB = 1024  # a real job process with torch holds about 600 MB
QUICK = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
SUPERVISOR_GROWTH_MB = 40  # what the supervisor may grow by while one hostile child runs
REDIS_GROWTH_BYTES = 256 << 10

# Every hostile child starts like this: the pipe to its supervisor, and stdout into process.log.
PRELUDE = """
import json, os, shutil, sys, time
job = sys.argv[1]
pipe = os.fdopen(int(os.environ["MODELPRESS_PROGRESS_FD"]), "wb", buffering=0)
def send(**message):
    pipe.write(json.dumps(message).encode() + b"\\n")
def say(text):
    print(text, flush=True)
def report(**changes):
    shutil.copy(job + "/input/model.pt", job + "/output/model.pt")
    figures = {"format": {"input": "torchscript", "output": "torchscript"},
               "size": {"bytes_before": 1, "bytes_after": 1, "ratio": 1.0},
               "latency": {"ratio": 0.9}, "fidelity": {"cosine_similarity": 0.999, "top1_agreement": 1.0},
               "warnings": ["one honest warning"]}
    figures.update(changes)
    with open(job + "/output/report.json", "w") as handle:
        json.dump(figures, handle)
send(event="started")
"""
WELL_BEHAVED = """
send(event="progress", stage="quantizing", progress=0.5)
report()
send(event="succeeded")
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp("untrusted-child")
    stack = Stack(
        make_settings(root / "data", redis_url=None, job_memory_mb=JOB_MEMORY_MB, job_timeout_s=120, job_threads=1),
        log_dir=root / "logs",
    )
    try:
        stack.start(api=False, worker=False)  # Redis only: the supervisor runs here
        yield Harness(stack, root)
    finally:
        stack.stop()


class Harness:
    def __init__(self, stack: Stack, root: Path) -> None:
        self.settings = stack.settings
        self.store = JobStore(connect(self.settings.redis_url))
        self.storage = Storage(self.settings.data_dir)
        self.storage.ensure()
        self.model = save_scripted(SmallConvNet(), root / "quick.pt")

    def submit(self, tenant: str = "alpha") -> JobFiles:
        """A queued job as the API records it: its upload and spec on disk, its record in Redis."""
        job_id = new_job_id()
        files = self.storage.job(job_id)
        files.input_model.parent.mkdir(parents=True)
        shutil.copy(self.model, files.input_model)
        spec = parse_spec(QUICK)
        files.spec.write_text(json.dumps(dump_spec(spec)))
        body = files.input_model.read_bytes()
        self.store.create(
            {
                "id": job_id,
                "tenant": tenant,
                "state": "queued",
                "progress": 0.0,
                "stage": "queued",
                "created_at": utc_now(),
                "started_at": None,
                "finished_at": None,
                "spec": dump_spec(spec),
                "input": {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(), "format": "torchscript"},
                "data": None,
                "student": None,
                "result": None,
                "error": None,
                "warnings": [],
                "callback_url": None,
            }
        )
        return files

    def run(self, program: str | None, store: JobStore | None = None) -> tuple[dict[str, Any], JobFiles, Bounds]:
        """Run one job under a real supervisor whose child is ``program`` (None: the real job process)."""
        files = self.submit()
        command = (sys.executable, "-c", PRELUDE + textwrap.dedent(program)) if program is not None else None
        supervisor = Supervisor(
            self.settings, store or self.store, self.storage, **({"child_command": command} if command else {})
        )
        with Bounds(self.store.redis) as bounds:
            supervisor.run(files.root.name)
        return self.store.get(files.root.name), files, bounds


class Bounds:
    """This process's peak resident memory and Redis' memory, measured around one job."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Bounds:
        self.resident_before = self._me.memory_info().rss
        self.resident_peak = self.resident_before
        self.redis_before = int(self._redis.info("memory")["used_memory"])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.redis_after = int(self._redis.info("memory")["used_memory"])

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.resident_peak = max(self.resident_peak, self._me.memory_info().rss)

    def assert_held(self) -> None:
        assert self.resident_peak - self.resident_before < SUPERVISOR_GROWTH_MB << 20, (
            f"the supervisor grew by {(self.resident_peak - self.resident_before) >> 20} MB"
        )
        assert self.redis_after - self.redis_before < REDIS_GROWTH_BYTES, (
            f"Redis grew by {(self.redis_after - self.redis_before) >> 10} KB"
        )


def job_processes(files: JobFiles) -> list[psutil.Process]:
    """Processes still running for the job (its hostile child names the job directory on its command line)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(files.root.name in arg for arg in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def printed(files: JobFiles) -> str:
    return files.process_log.read_text(errors="replace")


# ----------------------------------------------------------------------------- positive controls


def test_well_behaved_child_succeeds_with_the_same_harness(harness: Harness) -> None:
    job, _files, bounds = harness.run(WELL_BEHAVED)
    assert job["state"] == "succeeded", job["error"]
    assert job["warnings"] == ["one honest warning"]
    assert job["result"]["size_ratio"] == 1.0 and job["result"]["cosine_similarity"] == 0.999
    bounds.assert_held()


def test_real_job_process_succeeds_with_the_same_harness(harness: Harness) -> None:
    job, files, _ = harness.run(None)
    assert job["state"] == "succeeded", job["error"]
    report = json.loads(files.published_report(job["attempt"]).read_text())
    assert (
        job["result"]["size_ratio"]
        == report["size"]["ratio"]
        == float(f"{files.output_model.stat().st_size / files.input_model.stat().st_size:.5g}")
    )


# ----------------------------------------------------------------------------- the pipe


def test_endless_line_is_cut_at_64_kb_and_fails_the_job(harness: Harness) -> None:
    job, files, bounds = harness.run("""
        say("sending a 400 MB line without newline")
        chunk = b"x" * (1 << 20)
        sent = 0
        try:
            for _ in range(400):
                pipe.write(chunk)
                sent += len(chunk)
        except BrokenPipeError:
            say(f"pipe closed after {sent} bytes")
        time.sleep(600)
    """)
    assert "sending a 400 MB line" in printed(files)  # the fault struck: the child began the line
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/protocol-violation")
    assert f"longer than {protocol.MAX_LINE_BYTES} bytes" in job["error"]["detail"]
    assert len(job["error"]["detail"]) < 300  # the payload is not echoed
    assert job_processes(files) == []  # the child's whole group was stopped
    bounds.assert_held()


@pytest.mark.parametrize(
    "message, wrong",
    [
        ('{"event": "progress", "progress": 0.5}', "has no 'stage'"),
        ('{"event": "failed", "title": "t", "detail": "d"}', "has no 'slug'"),
        ('{"event": "failed", "slug": "../../etc", "title": "t", "detail": "d"}', "'slug' does not match"),
        ('{"event": "progress", "stage": "s", "progress": 7}', "'progress' is not a number from 0 to 1"),
        ('{"event": "progress", "stage": "s", "progress": 0.1, "extra": 1}', "1 unknown field"),
        ('{"event": "pwned"}', "unknown event"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_message_breaking_the_schema_stops_the_child_and_fails_the_job(
    harness: Harness, message: str, wrong: str
) -> None:
    job, files, bounds = harness.run(f"""
        say("sending the message")
        pipe.write({message!r}.encode() + b"\\n")
        time.sleep(600)
    """)
    assert "sending the message" in printed(files)
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/protocol-violation")
    assert wrong in job["error"]["detail"]
    assert job_processes(files) == []
    bounds.assert_held()


class FailingStore(JobStore):
    """A JobStore whose progress write fails once a progress message arrived: a bug in the supervisor's loop."""

    def beat(self, job_id: str, attempt: int, **fields: Any) -> bool:
        if "stage" in fields:
            raise KeyError("stage")
        return super().beat(job_id, attempt, **fields)


def test_error_in_the_supervisors_loop_stops_the_child_and_fails_the_job(harness: Harness) -> None:
    job, files, _bounds = harness.run(
        """
        send(event="progress", stage="quantizing", progress=0.5)
        say("progress sent")
        time.sleep(600)
    """,
        store=FailingStore(harness.store.redis),
    )
    assert "progress sent" in printed(files)
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/internal-error")
    assert job_processes(files) == []


# ----------------------------------------------------------------------------- the report


def test_report_of_30_mb_of_warnings_fails_the_job_and_stays_out_of_redis(harness: Harness) -> None:
    job, files, bounds = harness.run("""
        report(warnings=["w" * 1000] * 30000)
        send(event="succeeded")
    """)
    assert files.report.stat().st_size > 30_000_000  # the fault struck: the child wrote it
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/invalid-report")
    assert f"larger than {protocol.MAX_REPORT_BYTES >> 10} KB" in job["error"]["detail"]
    assert job["warnings"] == [] and job["result"] is None
    bounds.assert_held()


@pytest.mark.parametrize(
    "changes, wrong",
    [
        ('warnings=["w"] * 1000', "'warnings' is not a list of at most"),
        ('warnings=["w" * 100000]', "a warning is not a string"),
        ('latency={"ratio": "fast"}', "'latency.ratio' is not a finite number"),
        ('fidelity={"cosine_similarity": float("nan"), "top1_agreement": 1.0}', "not JSON"),
        ("size=[1]", "'size' is not an object"),
        ('format={"output": "../../x"}', "'format.output' is not a known format"),
    ],
)
def test_report_breaking_its_types_fails_the_job(harness: Harness, changes: str, wrong: str) -> None:
    job, files, bounds = harness.run(f"""
        report({changes})
        send(event="succeeded")
    """)
    assert files.report.exists()
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/invalid-report")
    assert wrong in job["error"]["detail"]
    bounds.assert_held()


def test_forged_size_is_replaced_by_the_measured_one(harness: Harness) -> None:
    job, files, _ = harness.run("""
        report(size={"bytes_before": 1000000, "bytes_after": 1000, "ratio": 0.001})
        send(event="succeeded")
    """)
    assert json.loads(files.report.read_text())["size"]["ratio"] == 0.001  # the fault struck: the child claimed it
    assert job["state"] == "succeeded"
    assert job["result"]["size_ratio"] == 1.0  # the output is a copy of the input
    assert job["result"]["bytes"] == files.input_model.stat().st_size
    published = json.loads(files.published_report(job["attempt"]).read_text())["size"]
    assert published == {
        "bytes_before": files.input_model.stat().st_size,
        "bytes_after": files.input_model.stat().st_size,
        "ratio": 1.0,
    }


# ----------------------------------------------------------------------------- memory outside the process


@pytest.mark.parametrize("where", ["/tmp", "memfd"])
def test_memory_in_files_counts_into_the_job_limit(harness: Harness, where: str) -> None:
    job, files, bounds = harness.run(f"""
        target = os.fdopen(os.memfd_create("hoard"), "wb") if {where!r} == "memfd" else open("/tmp/hoard", "wb")
        chunk = b"x" * (16 << 20)
        written = 0
        try:
            while written < (2 << 30):
                target.write(chunk)
                target.flush()
                written += len(chunk)
                if written % (128 << 20) == 0:
                    say(f"held {{written >> 20}} MB")
        except OSError as error:
            say(f"stopped at {{written >> 20}} MB: {{error}}")
        time.sleep(600)
    """)
    assert f"held {JOB_MEMORY_MB // 2} MB" in printed(files)  # the fault struck: half the limit outside the heap
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/out-of-memory")
    assert job_processes(files) == []
    bounds.assert_held()


# ----------------------------------------------------------------------------- output/


def test_300_mb_under_output_fails_the_job_and_is_removed(harness: Harness) -> None:
    job, files, bounds = harness.run("""
        chunk = b"x" * (8 << 20)
        with open(job + "/output/junk.bin", "wb") as junk:
            for step in range(1, 38):
                junk.write(chunk)
                junk.flush()
                if step % 4 == 0:
                    say(f"wrote {step * 8} MB")
        time.sleep(600)
    """)
    assert "wrote 32 MB" in printed(files)  # the fault struck
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/output-too-large")
    assert f"at most {protocol.output_limit_bytes(files) >> 20} MB" in job["error"]["detail"]
    assert not files.output_model.parent.exists() or not any(files.output_model.parent.iterdir())
    assert job_processes(files) == []
    bounds.assert_held()


def test_thousands_of_files_under_output_fail_the_job(harness: Harness) -> None:
    job, files, _ = harness.run("""
        for number in range(5000):
            open(f"{job}/output/f{number}", "w").close()
        say("made 5000 files")
        time.sleep(600)
    """)
    assert job["state"] == "failed"
    assert job["error"]["type"].endswith("/output-too-large")
    assert f"at most {protocol.MAX_OUTPUT_ENTRIES})" in job["error"]["detail"]
    assert not files.output_model.parent.exists() or not any(files.output_model.parent.iterdir())


def test_a_child_of_the_job_process_that_left_its_process_group_is_stopped_with_it() -> None:
    """The supervisor's kill reaches the job process's children even out of its process group: under
    bubblewrap that child is the sandbox's PID 1, which a job with native code could move out of the group
    (red team), and whose death from outside ends the whole sandbox."""
    from workers.child_watch import kill_group

    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\n    os._exit(0)\ntime.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while True:  # the fault struck: the grandchild is out of the group a group kill reaches
        children = psutil.Process(child.pid).children()
        if children and os.getpgid(children[0].pid) != child.pid:
            break
        assert time.monotonic() < deadline, "the child never left its group"
        time.sleep(0.05)
    escaped = children[0]

    kill_group(child)

    assert child.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while escaped.is_running() and escaped.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "a child that left the process group outlived the kill"
        time.sleep(0.05)
