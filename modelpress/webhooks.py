"""Webhooks signed per the Standard Webhooks scheme, and the checks on where they may go.

Signature: ``webhook-signature: v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>``,
with headers ``webhook-id`` and ``webhook-timestamp``. Each tenant has its own secret, derived
from the service's master secret, which ``GET /v1/webhook-secret`` tells the tenant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urlparse

from modelpress.config import Settings, persistent_secret


class CallbackRefused(ValueError):
    """The callback URL may not be used; ``str()`` says why."""


def check_callback_url(url: str, allow_private: bool) -> list[str]:
    """http(s) only, no credentials; every address the host resolves to must be global unicast.

    Returns the checked addresses: ``send_pinned`` connects to one of them, so a second DNS answer
    (rebinding to an internal address between check and connection) is never used.
    """
    if len(url) > 2000:
        raise CallbackRefused("at most 2000 characters")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise CallbackRefused("must be an http:// or https:// URL with a host")
    if parsed.username or parsed.password:
        raise CallbackRefused("must not carry credentials")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        infos = socket.getaddrinfo(parsed.hostname, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError):
        raise CallbackRefused(f"the host {parsed.hostname!r} does not resolve") from None
    addresses = sorted({info[4][0] for info in infos})
    if not allow_private:
        for address in addresses:
            why = not_global_unicast(ipaddress.ip_address(address.split("%", 1)[0]))
            if why:
                raise CallbackRefused(
                    f"the host resolves to {address}, {why}, not a global unicast address "
                    "(set MODELPRESS_WEBHOOK_ALLOW_PRIVATE to allow it)"
                )
    return addresses


def not_global_unicast(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address, or None.

    ``is_global`` already excludes private, loopback, link-local, shared (100.64/10), documentation,
    benchmarking, reserved and 0.0.0.0/8 ranges; multicast and addresses that embed an IPv4 address
    (IPv4-mapped, NAT64 64:ff9b::/96, 6to4) are refused here too, since they reach that IPv4 host.
    """
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped address"
        if ip in _NAT64 or ip in _NAT64_LOCAL:
            return "a NAT64 address"
        if ip.sixtofour is not None:
            return "a 6to4 address"
        if ip.teredo is not None:
            return "a Teredo address"
    if not ip.is_global:
        return "a private, loopback or link-local address (or a shared, documentation or reserved one)"
    return None


def send_pinned(url: str, body: bytes, headers: dict[str, str], allow_private: bool, timeout: float) -> int:
    """POST ``body`` to ``url`` at an address that ``check_callback_url`` accepted; return the status.

    The connection goes to that IP; the URL's host still goes in the Host header and, for https, in
    SNI and the certificate check. http.client follows no redirect: a 3xx is a failed attempt.
    """
    address = check_callback_url(url, allow_private)[0]
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if parsed.scheme == "https":
        connection: http.client.HTTPConnection = _PinnedHTTPS(address, port, host, timeout)
    else:
        connection = http.client.HTTPConnection(address, port, timeout=timeout)
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    host_header = host if parsed.port is None else f"{host}:{parsed.port}"
    if ":" in host:
        host_header = f"[{host}]" if parsed.port is None else f"[{host}]:{parsed.port}"
    try:
        connection.request("POST", path, body=body, headers={**headers, "Host": host_header})
        return connection.getresponse().status
    finally:
        connection.close()


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to a fixed IP, with SNI and certificate verification for the URL's host name."""

    def __init__(self, address: str, port: int, server_name: str, timeout: float) -> None:
        super().__init__(address, port, timeout=timeout, context=ssl.create_default_context())
        self._server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


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
