"""API keys: one per tenant, stored only as SHA-256 hashes.

File format (``MODELPRESS_API_KEYS_FILE``), one tenant per line, ``#`` starts a comment::

    acme sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

``python -m modelpress.keys TENANT`` prints a new random key and the line to add. Keys are
random 256-bit tokens, so a plain SHA-256 is enough (no password-hashing needed).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from pathlib import Path

TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class KeysFileError(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: Path) -> dict[str, str]:
    """Map key hash -> tenant; refuse a malformed file rather than run open by mistake."""
    hashes: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("sha256:") or len(parts[1]) != 71:
            raise KeysFileError(f"{path}:{number}: expected 'TENANT sha256:<64 hex digits>'")
        tenant, digest = parts[0], parts[1][7:].lower()
        if not TENANT_PATTERN.match(tenant):
            raise KeysFileError(f"{path}:{number}: tenant names are lowercase letters, digits, '-' and '_'")
        hashes[digest] = tenant
    if not hashes:
        raise KeysFileError(f"{path}: no keys")
    return hashes


def tenant_for(key: str, hashes: dict[str, str]) -> str | None:
    """The key's tenant, compared in constant time against every known hash."""
    digest = hash_key(key)
    found = None
    for known, tenant in hashes.items():
        if hmac.compare_digest(digest, known):
            found = tenant
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not TENANT_PATTERN.match(argv[1]):
        print("usage: python -m modelpress.keys TENANT  (lowercase letters, digits, '-', '_')", file=sys.stderr)
        return 2
    key = "mp_" + secrets.token_urlsafe(32)
    print(f"key for {argv[1]} (give it to the tenant; it is not stored): {key}")
    print(f"line for MODELPRESS_API_KEYS_FILE: {argv[1]} sha256:{hash_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
