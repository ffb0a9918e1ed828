"""A real webhook receiver for the tests and bench/chaos.py: an HTTP server on a free loopback port
that records every try (headers, body, the status it answered) and answers what ``answer`` says."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from modelpress.stack import free_port


@dataclass(frozen=True)
class Try:
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class WebhookReceiver:
    """``answer(tries_so_far)`` gives the status for the next try (200 by default); it may be swapped
    while the server runs, e.g. to bring a receiver that answered 503 back up."""

    def __init__(self, answer: Callable[[list[Try]], int] = lambda tries: 200) -> None:
        self.answer = answer
        self.tries: list[Try] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    status = receiver.answer(receiver.tries)
                    receiver.tries.append(Try({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> dict[str, int]:
        """How many tries of each webhook-id got a 2xx answer."""
        with self.lock:
            counts: dict[str, int] = {}
            for one in self.tries:
                if 200 <= one.status < 300:
                    counts[one.webhook_id] = counts.get(one.webhook_id, 0) + 1
            return counts

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
