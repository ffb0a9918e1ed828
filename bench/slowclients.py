"""Slow clients against the API: /healthz and another tenant's poll, without and under attack.

    .venv/bin/python bench/slowclients.py [--servers gthread,gevent] [--attack-s 60] [--baseline-s 15]
                                          [--slow-headers 100] [--slow-uploads 30] [--upload-mb 512]

For each API server model (``MODELPRESS_API_SERVER``: ``gthread``, today's former model, and
``gevent``, the default), in the same run and on the same machine, a stack like the tests' (real
Redis, a real worker, the real API with its default 2 processes; two tenants with API keys):

1. tenant ``beta`` submits a small job and waits for it to succeed;
2. baseline: for ``--baseline-s``, one prober loops on ``GET /healthz`` and another on beta's
   ``GET /v1/jobs/<id>`` (each request bounded by ``--probe-timeout-s``; a request that fails or
   times out counts as an error, and its elapsed time counts in the latencies);
3. attack: ``--slow-headers`` connections send a request head a byte every ``--byte-every-s``
   (no key needed), and ``--slow-uploads`` connections send tenant ``alpha``'s POST /v1/jobs with a
   1 MB multipart body a few bytes per second; each reconnects when the server closes it. Once
   they are all open, the same probers run for ``--attack-s``, then everything stops;
4. one ``--upload-mb`` upload at full speed (random bytes, refused with 422 once read: the time is
   the body's streaming), to show that the deadlines do not slow a big upload down.

Everything is on 127.0.0.1 and bounded in time. Prints a table and writes
``bench/results/slowclients.json``. The acceptance (issue 23): under attack, /healthz p99 and the
other tenant's poll p99 under 1 s.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bench.common import arguments, machine, prepare, write_results  # noqa: E402
from modelpress.config import Settings  # noqa: E402
from modelpress.keys import hash_key  # noqa: E402
from modelpress.stack import Stack, free_port  # noqa: E402
from tests.models import SmallConvNet, save_scripted  # noqa: E402

SPEC = {"method": "quantize", "input_shape": [1, 3, 8, 8], "evaluation": {"runs": 1, "warmup": 0}}
KEYS = {"alpha": "mp_alpha-bench-key", "beta": "mp_beta-bench-key"}


def main() -> int:
    parser = arguments(__doc__, "slowclients")
    parser.add_argument("--servers", default="gthread,gevent")
    parser.add_argument("--baseline-s", type=float, default=15.0)
    parser.add_argument("--attack-s", type=float, default=60.0)
    parser.add_argument("--slow-headers", type=int, default=100)
    parser.add_argument("--slow-uploads", type=int, default=30)
    parser.add_argument("--byte-every-s", type=float, default=1.0)
    parser.add_argument("--probe-timeout-s", type=float, default=10.0)
    parser.add_argument("--upload-mb", type=int, default=512)
    args = parser.parse_args()
    prepare(args)
    root = Path(tempfile.mkdtemp(prefix="bench-slowclients-"))
    model = save_scripted(SmallConvNet(), root / "conv.pt").read_bytes()
    runs = []
    for server in args.servers.split(","):
        runs.append(measure(server, args, root / server, model))
    print_table(runs)
    write_results(
        args, {"machine": machine(args), "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs}
    )
    return 0


def measure(server: str, args: Any, root: Path, model: bytes) -> dict[str, Any]:
    root.mkdir(parents=True)
    (root / "keys").write_text("".join(f"{tenant} sha256:{hash_key(key)}\n" for tenant, key in KEYS.items()))
    settings = Settings.from_env({}).with_changes(
        data_dir=root / "data",
        port=free_port(),
        redis_port=free_port(),
        api_keys_file=root / "keys",
        api_server=server,
        max_upload_mb=max(2048, args.upload_mb + 16),
        log_level="WARNING",
    )
    stack = Stack(settings, log_dir=root / "logs")
    try:
        stack.start()
        base = stack.base_url
        beta = {"Authorization": f"Bearer {KEYS['beta']}"}
        job = requests.post(
            f"{base}/v1/jobs",
            headers=beta,
            files={"model": ("conv.pt", model)},
            data={"spec": json.dumps(SPEC)},
            timeout=60,
        ).json()
        deadline = time.monotonic() + 300
        while requests.get(f"{base}/v1/jobs/{job['id']}", headers=beta, timeout=30).json()["state"] != "succeeded":
            assert time.monotonic() < deadline, f"beta's job {job['id']} did not succeed within 300 s"
            time.sleep(0.5)
        probes = {
            "healthz": (f"{base}/healthz", {}, lambda body: body.get("status") == "ok"),
            "poll": (f"{base}/v1/jobs/{job['id']}", beta, lambda body: body.get("state") == "succeeded"),
        }
        print(f"[{server}] baseline {args.baseline_s:.0f} s", flush=True)
        baseline = probe_for(probes, args.baseline_s, args.probe_timeout_s)
        print(
            f"[{server}] attack: {args.slow_headers} slow heads + {args.slow_uploads} slow uploads, "
            f"{args.attack_s:.0f} s",
            flush=True,
        )
        attack = Attack(stack.settings.port, args.slow_headers, args.slow_uploads, args.byte_every_s)
        attack.start()
        try:
            attacked = probe_for(probes, args.attack_s, args.probe_timeout_s)
        finally:
            attack.stop()
        upload = big_upload(base, {"Authorization": f"Bearer {KEYS['alpha']}"}, args.upload_mb)
        return {
            "server": server,
            "baseline": baseline,
            "attack": attacked,
            "attackers": attack.summary(),
            "big_upload": upload,
        }
    finally:
        stack.stop()


def probe_for(probes: dict[str, tuple[str, dict[str, str], Any]], seconds: float, timeout: float) -> dict[str, Any]:
    """Each probe in its own thread, one request after another (0.1 s apart) for ``seconds``."""
    results: dict[str, dict[str, Any]] = {}
    stop_at = time.monotonic() + seconds

    def loop(name: str, url: str, headers: dict[str, str], correct: Any) -> None:
        latencies, errors = [], 0
        while time.monotonic() < stop_at:
            start = time.monotonic()
            try:
                response = requests.get(url, headers=headers, timeout=timeout)
                if response.status_code != 200 or not correct(response.json()):
                    errors += 1
            except (requests.RequestException, ValueError):
                errors += 1
            latencies.append(time.monotonic() - start)
            time.sleep(0.1)
        results[name] = summarize(latencies, errors)

    threads = [threading.Thread(target=loop, args=(name, *probe), daemon=True) for name, probe in probes.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout + 30)
    return results


def summarize(latencies: list[float], errors: int) -> dict[str, Any]:
    ordered = sorted(latencies)

    def percentile(p: float) -> float | None:
        return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)] * 1000, 1) if ordered else None

    return {
        "count": len(ordered),
        "errors": errors,
        "p50_ms": percentile(0.5),
        "p99_ms": percentile(0.99),
        "max_ms": round(ordered[-1] * 1000, 1) if ordered else None,
    }


class Attack:
    """Slow clients in threads, each reconnecting when the server closes it, until ``stop``."""

    def __init__(self, port: int, slow_headers: int, slow_uploads: int, byte_every_s: float) -> None:
        self.port, self.byte_every_s = port, byte_every_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.counts = {"connections": 0, "closed_by_server": 0, "answered_408": 0, "upload_bytes_sent": 0}
        self._threads = [threading.Thread(target=self._slow_head, daemon=True) for _ in range(slow_headers)] + [
            threading.Thread(target=self._slow_upload, daemon=True) for _ in range(slow_uploads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        time.sleep(2 * self.byte_every_s)  # every connection is open and has started sending

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def summary(self) -> dict[str, Any]:
        return {"clients": len(self._threads), **self.counts}

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[name] += amount

    def _slow_head(self) -> None:
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow-head\r\nX-Padding: " + b"a" * 4000
        self._trickle([head])

    def _slow_upload(self) -> None:
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{json.dumps(SPEC)}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m.pt"\r\n\r\n'
        ).encode() + os.urandom(1 << 20)
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS['alpha']}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body) + 64}\r\n\r\n"
        ).encode()
        self._trickle([head, body], fast_first=True, step=8)

    def _trickle(self, pieces: list[bytes], fast_first: bool = False, step: int = 1) -> None:
        """Send ``pieces`` (the first at once if ``fast_first``) ``step`` bytes every ``byte_every_s``."""
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
                    self._count("connections")
                    connection.settimeout(0.001)
                    rest = b"".join(pieces[1:] if fast_first else pieces)
                    if fast_first:
                        connection.sendall(pieces[0])
                    for offset in range(0, len(rest), step):
                        if self._stop.wait(self.byte_every_s):
                            return
                        if self._answered(connection):
                            break
                        connection.sendall(rest[offset : offset + step])
                        if fast_first:
                            self._count("upload_bytes_sent", step)
            except OSError:
                self._count("closed_by_server")
                self._stop.wait(0.2)

    def _answered(self, connection: socket.socket) -> bool:
        try:
            answer = connection.recv(64)
        except (TimeoutError, BlockingIOError):
            return False
        if answer.startswith(b"HTTP/1.1 408"):
            self._count("answered_408")
        self._count("closed_by_server")
        return True


def big_upload(base: str, headers: dict[str, str], megabytes: int) -> dict[str, Any]:
    """One POST of ``megabytes`` of random bytes streamed from a generator at full speed."""
    boundary = uuid.uuid4().hex
    chunk = os.urandom(1 << 20)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{json.dumps(SPEC)}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="big.pt"\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    length = len(head) + megabytes * len(chunk) + len(tail)
    start = time.monotonic()
    response = requests.post(
        f"{base}/v1/jobs",
        data=_SizedBody(head, chunk, megabytes, tail, length),
        timeout=600,
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    seconds = time.monotonic() - start
    return {
        "megabytes": megabytes,
        "status": response.status_code,
        "seconds": round(seconds, 2),
        "mb_per_s": round(megabytes / seconds, 1),
    }


class _SizedBody:
    """An iterable body with a length: requests sends it with Content-Length, not chunked."""

    def __init__(self, head: bytes, chunk: bytes, count: int, tail: bytes, length: int) -> None:
        self.head, self.chunk, self.count, self.tail, self.length = head, chunk, count, tail, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        yield self.head
        for _ in range(self.count):
            yield self.chunk
        yield self.tail


def print_table(runs: list[dict[str, Any]]) -> None:
    print(
        f"\n{'server':8} {'phase':9} {'probe':8} {'count':>6} {'errors':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}"
    )
    for run in runs:
        for phase in ("baseline", "attack"):
            for probe, row in run[phase].items():
                print(
                    f"{run['server']:8} {phase:9} {probe:8} {row['count']:6d} {row['errors']:6d} "
                    f"{_ms(row['p50_ms'])} {_ms(row['p99_ms'])} {_ms(row['max_ms'])}"
                )
    for run in runs:
        upload, attackers = run["big_upload"], run["attackers"]
        print(
            f"{run['server']}: attackers {attackers}; {upload['megabytes']} MB upload in {upload['seconds']} s "
            f"({upload['mb_per_s']} MB/s, answered {upload['status']})"
        )


def _ms(value: float | None) -> str:
    return f"{value:9.1f}" if value is not None else f"{'-':>9}"


if __name__ == "__main__":
    sys.exit(main())
