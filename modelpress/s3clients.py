"""The boto3 clients of an S3 object store (``modelpress.objectstore.S3Objects``), configured once here."""

from __future__ import annotations

import functools
from typing import Any

from modelpress.config import Settings, boto3_endpoint_url


def s3_clients(settings: Settings) -> tuple[Any, Any]:
    """The client for transfers (five tries with back-off) and one for readiness probes (one quick try)."""
    import boto3
    from botocore.config import Config

    # Unset overrides leave boto3's own chain: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, the key
    # variables, AWS_PROFILE and ~/.aws, instance roles.
    session = boto3.session.Session(profile_name=settings.s3_profile or None)
    # SigV4 everywhere: presigned URLs otherwise fall back to SigV2, which AWS refuses in newer
    # regions and SeaweedFS refuses once response-content-disposition is signed.
    # Checksums only where the API requires them: the SHA-256 is ours already (computed as the
    # upload arrives, stored as metadata and in the record), and a CRC32 of every part costs CPU.
    # No payload signatures either (botocore signs every body over http, a second SHA-256 of
    # every byte: 1 CPU-second per GB on the API host): integrity is end to end instead, the
    # worker checks each staged input against the record's digest, clients the download's.
    s3 = {"payload_signing_enabled": False}
    if settings.s3_endpoint_url or boto3_endpoint_url():
        s3["addressing_style"] = "path"
    config = Config(
        signature_version="s3v4",
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3=s3,
    )
    client = functools.partial(
        session.client,
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region or None,
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=settings.s3_secret_access_key or None,
    )
    return client(config=config), client(
        config=config.merge(Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=5))
    )
