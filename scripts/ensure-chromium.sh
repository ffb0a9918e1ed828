#!/bin/sh
# The browser tests (tests/ui) drive Debian's chromium through Playwright. Install it when it is
# missing and we can (root with apt-get); otherwise stop and say how. Never skip silently.
set -eu
if [ -n "${MODELPRESS_CHROMIUM:-}" ] && [ -x "$MODELPRESS_CHROMIUM" ]; then exit 0; fi
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing: installing it with apt-get (for the browser tests in tests/ui)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    command -v chromium >/dev/null 2>&1 && exit 0
    echo "apt-get finished but there is still no 'chromium' command" >&2
    exit 1
fi
cat >&2 <<'MSG'
The browser tests (tests/ui) need Debian's chromium, and it is not installed.
Install it, then run `make test` again:
    sudo apt-get install -y chromium          # Debian, Ubuntu
or set MODELPRESS_CHROMIUM=/path/to/chromium. (Playwright's own browser download is not used.)
MSG
exit 1
