"""The API's HTTP server: gunicorn's gevent worker, with a deadline for a request's head and an idle
limit for every read and write after it (docs/architecture.md, "Slow clients").

With gthread every accepted connection took one of a few pool threads, which then sat blocked
reading the headers: thirty clients sending their headers a byte at a time held every thread, and
``/healthz`` went unanswered. Here a connection is a greenlet (a few kilobytes), so a slow client
holds nothing the others need; the body still streams into the app as it arrives (to the spool
file and, in S3 mode, to the bucket part by part). What bounds a slow client:

- its request line and headers must be complete within ``MODELPRESS_HEADER_TIMEOUT_S`` of the
  accept, or it gets a 408 and the connection is closed;
- after that, any read or write that waits ``MODELPRESS_BODY_TIMEOUT_S`` without a byte moving
  ends the request: a stalled upload surfaces in the app as a 408 (``RequestTimeout``), so the
  request's usual teardown rolls back its spool file and aborts its multipart upload;
- each process serves at most ``MODELPRESS_API_CONNECTIONS`` connections at once (gunicorn's
  ``worker_connections``); past that, new ones wait in the listen backlog.

This module lives outside ``service`` on purpose: gunicorn's master imports the worker class,
and importing ``service`` would load Redis and Flask before the worker process monkey-patches.
"""

from __future__ import annotations

import errno
import resource
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from gunicorn import http, util
from gunicorn.workers.ggevent import GeventWorker
from werkzeug.exceptions import RequestTimeout

from modelpress.config import Settings

# Sent to a client whose request head did not arrive in time; nothing of the app has run.
_HEAD_TIMEOUT_BODY = b"the request head did not arrive in time\n"
HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_HEAD_TIMEOUT_BODY), _HEAD_TIMEOUT_BODY)
)


class HeadTimeout(Exception):
    """The request line and headers were not complete within the header timeout."""


class DeadlineWorker(GeventWorker):
    """``gunicorn -k modelpress.apiserver.DeadlineWorker``: one greenlet per connection, deadlines
    on the head and on every idle read or write (one request per connection: keep-alive is off)."""

    def init_process(self) -> None:
        settings = Settings.from_env()
        self.header_timeout_s = float(settings.header_timeout_s)
        self.body_timeout_s = float(settings.body_timeout_s)
        _allow_open_files(self.worker_connections)
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _stalls_as_request_timeout(self.wsgi)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        # The idle limit of every read and write from now on, the body's and the response's.
        client.settimeout(self.body_timeout_s)
        request = None
        try:
            parser = http.get_parser(self.cfg, client, addr)
            try:
                with gevent.Timeout(self.header_timeout_s, HeadTimeout):
                    request = next(parser)
            except HeadTimeout:
                self.log.info(
                    "%s: request head not complete within %.0f s; answered 408 and closed",
                    _peer(addr),
                    self.header_timeout_s,
                )
                util.write(client, HEAD_TIMEOUT_RESPONSE)
                return
            self.handle_request(listener.getsockname(), request, client, addr)
        except (http.errors.NoMoreData, StopIteration):
            pass  # the client went away, or the response is complete
        except TimeoutError:
            self.log.info("%s: no byte moved for %.0f s; connection closed", _peer(addr), self.body_timeout_s)
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as error:  # a malformed head: gunicorn answers it (400, 431...)
            self.handle_error(request, client, addr, error)
        finally:
            util.close(client)


class _DeadlineInput:
    """``wsgi.input`` whose reads turn a stalled client (the socket's idle timeout) into a 408 the
    app answers like any HTTP error, after its request teardown has rolled the upload back."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def read(self, *args: Any) -> bytes:
        return self._guarded(self._stream.read, *args)

    def readline(self, *args: Any) -> bytes:
        return self._guarded(self._stream.readline, *args)

    def readlines(self, *args: Any) -> list[bytes]:
        return self._guarded(self._stream.readlines, *args)

    def __iter__(self) -> Any:
        return iter(self.readline, b"")

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._stream, attribute)

    @staticmethod
    def _guarded(read: Callable[..., Any], *args: Any) -> Any:
        try:
            return read(*args)
        except TimeoutError:
            raise RequestTimeout("the request body stalled (no bytes for MODELPRESS_BODY_TIMEOUT_S)") from None


def _stalls_as_request_timeout(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.input"] = _DeadlineInput(environ["wsgi.input"])
        return app(environ, start_response)

    return application


def _allow_open_files(connections: int) -> None:
    """Raise the soft open-file limit towards the hard one: each connection is a descriptor, and an
    upload adds its spool file (and in S3 mode a connection to the store)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard)
        )


def _peer(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)
