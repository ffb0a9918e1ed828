"""Webhooks signed per the Standard Webhooks scheme, and the checks on where they may go.

Signature: ``webhook-signature: v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>``,
with headers ``webhook-id`` and ``webhook-timestamp``. Each tenant has its own secret, derived
from the service's master secret, which ``GET /v1/webhook-secret`` tells the tenant.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
from urllib.parse import urlparse

from modelpress.config import Settings, persistent_secret


class CallbackRefused(ValueError):
    """The callback URL may not be used; ``str()`` says why."""


def check_callback_url(url: str, allow_private: bool) -> None:
    """http(s) only; refuse targets that resolve to private, loopback, link-local or reserved addresses."""
    if len(url) > 2000:
        raise CallbackRefused("at most 2000 characters")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise CallbackRefused("must be an http:// or https:// URL with a host")
    if parsed.username or parsed.password:
        raise CallbackRefused("must not carry credentials")
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, parsed.port or 443, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        raise CallbackRefused(f"the host {parsed.hostname!r} does not resolve") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
            raise CallbackRefused(f"the host resolves to {ip}, a private, loopback or link-local address "
                                  "(set MODELPRESS_WEBHOOK_ALLOW_PRIVATE to allow it)")


def tenant_secret(settings: Settings, tenant: str) -> str:
    """The tenant's signing secret, ``whsec_<base64 of 32 bytes>``."""
    derived = hmac.new(_master_secret(settings), f"webhook:{tenant}".encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(derived).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _master_secret(settings: Settings) -> bytes:
    if settings.webhook_secret:
        return settings.webhook_secret.encode()
    return persistent_secret(settings.data_dir, "webhook-master.key").encode()
