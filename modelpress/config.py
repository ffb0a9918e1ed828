"""All configuration, read from environment variables in this one place.

``Settings`` is the service's (API, worker, stack); ``ClientSettings`` the ``modelpress`` command's
and ``Client``'s; ``boto3_endpoint_url`` peeks at one of boto3's own variables. The one variable read
elsewhere is the fault tests' ``MODELPRESS_TEST_PAUSE`` (``modelpress.fault_injection``; why: docs/architecture.md, "Layers").
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Service settings. Every field has a ``MODELPRESS_<NAME>`` variable (``REDIS_URL`` for Redis)."""

    redis_url: str | None = None  # unset: `make run` and the tests start an embedded redis-server
    data_dir: Path = Path("var")
    host: str = "127.0.0.1"
    port: int = 8000
    redis_port: int = 6390  # port of the embedded redis-server
    max_upload_mb: int = 2048
    # A job's wall-clock limit: the default and the most a spec's ``time_limit_s`` may ask for.
    job_timeout_s: int = 1200
    job_memory_mb: int = 8192  # resident memory of a job's processes (the supervisor stops the job above it)
    job_threads: int = 2  # from the environment: default cores / worker concurrency (see from_env)
    max_deliveries: int = 3  # deliveries of one job before it is failed instead of retried
    worker_concurrency: int = 1
    api_workers: int = 2
    # Requests each API process serves at once (gunicorn gthread): a slow upload or download holds a
    # thread, not the process. Each upload streaming to S3 holds up to 5 parts (80 MB) in memory.
    api_threads: int = 4
    # The API's server model (docs/architecture.md, "Slow clients"): "gevent", one greenlet per
    # connection, so slow clients hold no thread; "gthread" is the former model, kept to measure against.
    api_server: str = "gevent"
    header_timeout_s: int = 20  # a request's line and headers must arrive within this, or 408 and close
    body_timeout_s: int = 60  # a read or write of a request that moves no byte this long ends it
    api_connections: int = 1000  # connections each API process serves at once (gevent); more wait in the backlog
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object per line
    api_keys_file: Path | None = None  # unset: open service, loopback only
    allow_open_network: bool = False  # let an open service bind beyond loopback (a container behind a proxy)
    max_active_jobs: int = 20  # queued + running jobs per tenant
    # Running jobs per tenant, over all workers; a tenant's further jobs wait queued. Default: the
    # worker concurrency (see from_env), so one tenant alone still fills one worker.
    max_running_jobs: int = 1
    heartbeat_stale_s: int = 30  # a running job whose supervisor is silent this long is taken over
    retention_hours: float = 168.0  # finished jobs and their files are removed after this
    # The files of an upload that no job record names and that has been idle this long (its API
    # process was killed mid-request) are removed; longer than the checks of the largest upload take.
    orphan_after_s: int = 3600
    webhook_allow_private: bool = False  # allow callbacks to private, loopback and link-local addresses
    webhook_backoff_s: float = 5.0  # first retry delay; doubles each attempt, with jitter
    webhook_secret: str | None = None  # master secret; unset: one is made and kept in the data directory
    secret_key: str | None = None  # signs the console's session cookie; unset: made once, kept in the data directory
    sandbox: str = "on"  # "on": every job runs confined by bubblewrap, or fails; "off": unconfined (explicit only)
    bwrap: str = "bwrap"  # the bubblewrap binary (a name on PATH or a path)
    # The next job's confined process started while the worker waits (torch imported), used once
    # (docs/architecture.md, "A pre-warmed sandbox"); off: each job starts its own when it arrives.
    warm_sandbox: bool = True
    # Operator checks: "on" (at submit and in the job), "job" (in the job only), "off". The last two
    # exist so the tests can prove each layer alone (the sandbox without any op check); never in production.
    op_check: str = "on"
    metrics_token: str | None = None  # bearer token for /metrics and /readyz details besides the API keys
    # Object storage (docs/architecture.md, "Object storage"): unset keeps every job file in data_dir.
    # "s3://bucket/prefix": inputs and outputs live in the bucket, each host's data_dir is private.
    storage_url: str | None = None
    # MODELPRESS_S3_* override boto3's own chain (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, keys, profile).
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_profile: str | None = None
    s3_presign_s: int = 0  # >0: model downloads redirect to a presigned URL valid this long
    s3_part_mb: int = 16  # uploads stream to the bucket in parts of this size (S3's minimum is 5)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def number(name: str, default: int) -> int:
            raw = env.get(f"MODELPRESS_{name}")
            if raw is None or raw == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"MODELPRESS_{name} must be a whole number, got {raw!r}") from None
            if value <= 0:
                raise ValueError(f"MODELPRESS_{name} must be positive, got {value}")
            return value

        return cls(
            redis_url=env.get("REDIS_URL") or env.get("MODELPRESS_REDIS_URL") or None,
            data_dir=Path(env.get("MODELPRESS_DATA_DIR") or defaults.data_dir).absolute(),
            host=env.get("MODELPRESS_HOST") or defaults.host,
            port=number("PORT", defaults.port),
            redis_port=number("REDIS_PORT", defaults.redis_port),
            max_upload_mb=number("MAX_UPLOAD_MB", defaults.max_upload_mb),
            job_timeout_s=number("JOB_TIMEOUT_S", defaults.job_timeout_s),
            job_memory_mb=number("JOB_MEMORY_MB", defaults.job_memory_mb),
            # Jobs running side by side must not oversubscribe the cores: OpenMP threads that spin on
            # barriers slow small ops down tenfold when there are more threads than cores.
            job_threads=number("JOB_THREADS", max(1, (os.cpu_count() or 2) // number("WORKER_CONCURRENCY", 1))),
            max_deliveries=number("MAX_DELIVERIES", defaults.max_deliveries),
            worker_concurrency=number("WORKER_CONCURRENCY", defaults.worker_concurrency),
            api_workers=number("API_WORKERS", defaults.api_workers),
            api_threads=number("API_THREADS", defaults.api_threads),
            api_server=_choice(
                "API_SERVER", env.get("MODELPRESS_API_SERVER") or defaults.api_server, ("gevent", "gthread")
            ),
            header_timeout_s=number("HEADER_TIMEOUT_S", defaults.header_timeout_s),
            body_timeout_s=number("BODY_TIMEOUT_S", defaults.body_timeout_s),
            api_connections=number("API_CONNECTIONS", defaults.api_connections),
            log_level=(env.get("MODELPRESS_LOG_LEVEL") or defaults.log_level).upper(),
            log_format=(env.get("MODELPRESS_LOG_FORMAT") or defaults.log_format).lower(),
            api_keys_file=Path(env["MODELPRESS_API_KEYS_FILE"]).absolute()
            if env.get("MODELPRESS_API_KEYS_FILE")
            else None,
            allow_open_network=env.get("MODELPRESS_ALLOW_OPEN_NETWORK", "").lower() in ("1", "true", "yes"),
            max_active_jobs=number("MAX_ACTIVE_JOBS", defaults.max_active_jobs),
            max_running_jobs=number("MAX_RUNNING_JOBS", number("WORKER_CONCURRENCY", defaults.worker_concurrency)),
            heartbeat_stale_s=number("HEARTBEAT_STALE_S", defaults.heartbeat_stale_s),
            retention_hours=float(env.get("MODELPRESS_RETENTION_HOURS") or defaults.retention_hours),
            orphan_after_s=_at_least("ORPHAN_AFTER_S", number("ORPHAN_AFTER_S", defaults.orphan_after_s), 900),
            webhook_allow_private=env.get("MODELPRESS_WEBHOOK_ALLOW_PRIVATE", "").lower() in ("1", "true", "yes"),
            webhook_backoff_s=float(env.get("MODELPRESS_WEBHOOK_BACKOFF_S") or defaults.webhook_backoff_s),
            webhook_secret=env.get("MODELPRESS_WEBHOOK_SECRET") or None,
            secret_key=env.get("MODELPRESS_SECRET_KEY") or None,
            # Only the exact word "off" turns confinement off: a typo must not run jobs unconfined.
            sandbox=_choice("SANDBOX", env.get("MODELPRESS_SANDBOX") or defaults.sandbox, ("on", "off")),
            bwrap=env.get("MODELPRESS_BWRAP") or defaults.bwrap,
            warm_sandbox=env.get("MODELPRESS_WARM_SANDBOX", "1").strip().lower() not in ("0", "false", "no", "off"),
            op_check=_choice("OP_CHECK", env.get("MODELPRESS_OP_CHECK") or defaults.op_check, ("on", "job", "off")),
            metrics_token=env.get("MODELPRESS_METRICS_TOKEN") or None,
            storage_url=env.get("MODELPRESS_STORAGE_URL") or None,
            s3_endpoint_url=env.get("MODELPRESS_S3_ENDPOINT_URL") or None,
            s3_region=env.get("MODELPRESS_S3_REGION") or None,
            s3_access_key_id=env.get("MODELPRESS_S3_ACCESS_KEY_ID") or None,
            s3_secret_access_key=env.get("MODELPRESS_S3_SECRET_ACCESS_KEY") or None,
            s3_profile=env.get("MODELPRESS_S3_PROFILE") or None,
            s3_presign_s=number("S3_PRESIGN_S", 1) if env.get("MODELPRESS_S3_PRESIGN_S", "0") not in ("", "0") else 0,
            s3_part_mb=_at_least("S3_PART_MB", number("S3_PART_MB", defaults.s3_part_mb), 5),
        )

    def with_changes(self, **changes: object) -> Settings:
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The variables that reproduce these settings in a child process."""
        env = {
            "MODELPRESS_DATA_DIR": str(self.data_dir),
            "MODELPRESS_HOST": self.host,
            "MODELPRESS_PORT": str(self.port),
            "MODELPRESS_REDIS_PORT": str(self.redis_port),
            "MODELPRESS_MAX_UPLOAD_MB": str(self.max_upload_mb),
            "MODELPRESS_JOB_TIMEOUT_S": str(self.job_timeout_s),
            "MODELPRESS_JOB_MEMORY_MB": str(self.job_memory_mb),
            "MODELPRESS_JOB_THREADS": str(self.job_threads),
            "MODELPRESS_MAX_DELIVERIES": str(self.max_deliveries),
            "MODELPRESS_WORKER_CONCURRENCY": str(self.worker_concurrency),
            "MODELPRESS_API_WORKERS": str(self.api_workers),
            "MODELPRESS_API_THREADS": str(self.api_threads),
            "MODELPRESS_API_SERVER": self.api_server,
            "MODELPRESS_HEADER_TIMEOUT_S": str(self.header_timeout_s),
            "MODELPRESS_BODY_TIMEOUT_S": str(self.body_timeout_s),
            "MODELPRESS_API_CONNECTIONS": str(self.api_connections),
            "MODELPRESS_LOG_LEVEL": self.log_level,
            "MODELPRESS_LOG_FORMAT": self.log_format,
            "MODELPRESS_ALLOW_OPEN_NETWORK": "1" if self.allow_open_network else "",
            "MODELPRESS_MAX_ACTIVE_JOBS": str(self.max_active_jobs),
            "MODELPRESS_MAX_RUNNING_JOBS": str(self.max_running_jobs),
            "MODELPRESS_HEARTBEAT_STALE_S": str(self.heartbeat_stale_s),
            "MODELPRESS_RETENTION_HOURS": str(self.retention_hours),
            "MODELPRESS_ORPHAN_AFTER_S": str(self.orphan_after_s),
            "MODELPRESS_WEBHOOK_ALLOW_PRIVATE": "1" if self.webhook_allow_private else "",
            "MODELPRESS_WEBHOOK_BACKOFF_S": str(self.webhook_backoff_s),
            "MODELPRESS_SANDBOX": self.sandbox,
            "MODELPRESS_BWRAP": self.bwrap,
            "MODELPRESS_WARM_SANDBOX": "1" if self.warm_sandbox else "0",
            "MODELPRESS_OP_CHECK": self.op_check,
        }
        env["MODELPRESS_API_KEYS_FILE"] = str(self.api_keys_file) if self.api_keys_file else ""
        if self.webhook_secret:
            env["MODELPRESS_WEBHOOK_SECRET"] = self.webhook_secret
        if self.secret_key:
            env["MODELPRESS_SECRET_KEY"] = self.secret_key
        if self.metrics_token:
            env["MODELPRESS_METRICS_TOKEN"] = self.metrics_token
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        for name in (
            "storage_url",
            "s3_endpoint_url",
            "s3_region",
            "s3_access_key_id",
            "s3_secret_access_key",
            "s3_profile",
        ):
            if getattr(self, name):
                env[f"MODELPRESS_{name.upper()}"] = getattr(self, name)
        if self.s3_presign_s:
            env["MODELPRESS_S3_PRESIGN_S"] = str(self.s3_presign_s)
        env["MODELPRESS_S3_PART_MB"] = str(self.s3_part_mb)
        return env

    @property
    def bind_host(self) -> str:
        """Where the API listens: an open service (no keys) stays on loopback unless explicitly allowed."""
        if (
            self.api_keys_file is None
            and not self.allow_open_network
            and self.host not in ("127.0.0.1", "localhost", "::1")
        ):
            return "127.0.0.1"
        return self.host

    @property
    def job_address_space_mb(self) -> int:
        """The job process's address-space cap: a backstop above the resident limit, not the limit.

        Importing torch maps about 3.3 GB it never touches and OpenBLAS aborts under 3 GB, so the
        cap leaves that much room besides twice the resident limit (allocator slack, thread stacks).
        """
        return 2 * self.job_memory_mb + 4096

    @property
    def visibility_timeout_s(self) -> int:
        """How long Redis keeps a delivered, unacknowledged job before redelivering it.

        Longer than the longest job, so a job still running is never handed to a second worker.
        """
        return self.job_timeout_s + 600


@dataclass(frozen=True)
class ClientSettings:
    """Where the ``modelpress`` command and ``Client`` find the service, when not told explicitly."""

    url: str = "http://127.0.0.1:8000"  # MODELPRESS_URL
    api_key: str | None = None  # MODELPRESS_API_KEY; unset: no Authorization header

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if environ is None else environ
        return cls(url=env.get("MODELPRESS_URL") or cls.url, api_key=env.get("MODELPRESS_API_KEY") or None)


def boto3_endpoint_url(environ: Mapping[str, str] | None = None) -> str | None:
    """The S3 endpoint boto3 takes from its own variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``).

    Not a setting of ours: boto3 reads these itself. The object store only asks whether one is set
    (a store other than AWS, addressed by path), so it is read when the store is opened, as boto3 does.
    """
    env = os.environ if environ is None else environ
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")


def persistent_secret(data_dir: Path, filename: str) -> str:
    """A random secret made once and kept in the data directory, so every process reads the same one.

    The file is its owner's alone from its creation (``mkstemp`` makes it 0600 before a byte is
    written, and it is linked into place complete); one an older version left wider is narrowed.
    """
    path = Path(data_dir) / filename
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".secret-")  # mode 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(temp_name, path)  # first writer wins; every process then reads the same secret
        except FileExistsError:
            pass
        finally:
            os.unlink(temp_name)
    status = path.stat()
    if status.st_mode & 0o077 and status.st_uid == os.getuid():
        os.chmod(path, 0o600)
    return path.read_text().strip()


def _choice(name: str, raw: str, allowed: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in allowed:
        raise ValueError(f"MODELPRESS_{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return value


def _at_least(name: str, value: int, least: int) -> int:
    if value < least:
        raise ValueError(f"MODELPRESS_{name} must be at least {least}, got {value}")
    return value
