"""The API's gunicorn worker: gunicorn's threaded worker, whose answers to requests it cannot
parse (a request line or header that is not HTTP, raw non-ASCII bytes in the path or query, a
request line over 4094 bytes, a broken chunked body) are the API's JSON error
`{"error": "invalid_input", "message", "field"}` instead of an HTML page, and whose reads of a
request give up after `read_timeout` seconds without a byte (API_READ_TIMEOUT_SECONDS): a client
that stalls in its request line, headers or body gets a 408 and its connection is closed, instead
of holding one of the worker's threads for as long as it likes. An error answer to a request with
a body closes the connection (`closing_after_errors`): the body may be unread.

`orchestrator api` runs it (worker class `web.server.ThreadWorker`)."""
from __future__ import annotations

import errno
import json
from typing import Any

from gunicorn import util
from gunicorn.glogging import Logger as _GunicornLogger
from gunicorn.http.errors import (ChunkMissingTerminator, ExpectationFailed, InvalidChunkExtension, InvalidChunkSize,
                                  InvalidHeader, InvalidHeaderName, InvalidHTTPVersion, InvalidRequestLine,
                                  InvalidRequestMethod, LimitRequestHeaders, LimitRequestLine, ObsoleteFolding,
                                  ParseException, UnsupportedTransferCoding)
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import TConn
from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker

from . import streams
from .settings import HttpSettings


class GunicornLogger(_GunicornLogger):  # type: ignore[misc]
    """gunicorn's logger, but its lines (`gunicorn.error`: start, workers booting and exiting,
    signals; `gunicorn.access` with `--access-log`) go to the process's root handler
    (orchestrator.logs.configure), so they are written in LOG_FORMAT like every other line, with
    secrets masked, instead of gunicorn's own `[date] [pid] [INFO] ...` text."""

    def setup(self, cfg: Any) -> None:
        """gunicorn's setup (levels, access log on or off), then its handlers dropped."""
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True


class ReadTimeout(ParseException):
    """The client sent no byte of its request for `seconds`: answered 408 (here before the app
    runs, by the app's error handler once it reads the body)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds

    def __str__(self) -> str:
        return f"no data within {self.seconds:g} seconds (API_READ_TIMEOUT_SECONDS)"


#: (exception types, status, reason phrase, the part of the request at fault)
MALFORMED: tuple[tuple[tuple[type[BaseException], ...], int, str, str], ...] = (
    ((ReadTimeout,), 408, "Request Timeout", "headers"),  # the app answers a stalled body itself
    ((LimitRequestLine,), 414, "URI Too Long", "request line"),
    ((InvalidRequestLine, InvalidRequestMethod, InvalidHTTPVersion), 400, "Bad Request", "request line"),
    ((LimitRequestHeaders,), 431, "Request Header Fields Too Large", "headers"),
    ((InvalidHeader, InvalidHeaderName, ObsoleteFolding), 400, "Bad Request", "headers"),
    ((InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension), 400, "Bad Request", "body"),
    ((ExpectationFailed,), 417, "Expectation Failed", "Expect"),  # anything but 100-continue
    # RFC 9112 asks for 501 here: the one 5xx, answered before the app runs, about the request
    ((UnsupportedTransferCoding,), 501, "Not Implemented", "Transfer-Encoding"),
)


def malformed_answer(exc: BaseException) -> bytes | None:
    """The raw HTTP answer to a request gunicorn could not parse; None for any other error."""
    for types, status, reason, field in MALFORMED:
        if isinstance(exc, types):
            problem = str(exc)[:300]  # the shape of the app's InvalidInput answers
            body = json.dumps({"error": "invalid_input", "message": f"{field}: {problem}", "field": field,
                               "problem": problem}, separators=(",", ":")).encode()
            head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n")
            return head.encode("latin-1") + body
    return None


def closing_after_errors(app: Any) -> Any:
    """`app` (WSGI), but an error answer to a request with a body closes the connection.

    The app may answer before reading the body (413 over API_MAX_BODY_BYTES, 415 for a content
    type it does not take, 401 before a body is looked at), and gunicorn, to reuse a kept-alive
    connection, reads at most 64 KiB of a body left unread and otherwise drops the connection it
    had just announced as kept alive: the client's next request on it failed. gunicorn drops
    hop-by-hop headers the app sets, so the close goes through its response (`force_close`,
    which makes it answer `Connection: close`)."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        has_body = (environ.get("CONTENT_LENGTH") or "0") != "0" or "chunked" in environ.get(
            "HTTP_TRANSFER_ENCODING", "").lower()

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            response = getattr(start_response, "__self__", None)  # gunicorn's Response
            if has_body and status[:1] in "45" and hasattr(response, "force_close"):
                response.force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wsgi


class TimedSocketUnreader(SocketUnreader):  # type: ignore[misc]
    """gunicorn's reader of a request off its socket, each read bounded by `limit` seconds.

    Only the reads of the request have the limit: the socket's own timeout stays as it was, so
    answers are written without one and a WebSocket taken over from the request waits as long as
    it likes. A shorter timeout already on the socket (gunicorn's bounded drain of an unread body)
    is kept, and so is its TimeoutError."""

    def __init__(self, sock: Any, limit: float, max_chunk: int = 8192) -> None:
        super().__init__(sock, max_chunk)
        self.limit = limit

    def chunk(self, size_hint: int | None = None) -> bytes:
        prior = self.sock.gettimeout()
        self.sock.settimeout(self.limit if prior is None else min(prior, self.limit))
        try:
            return super().chunk(size_hint)  # type: ignore[no-any-return]
        except TimeoutError:
            if prior is not None:  # gunicorn's own bounded read (its drain of an unread body) handles it
                raise
            raise ReadTimeout(self.limit) from None
        finally:
            self.sock.settimeout(prior)


class TimedConn(TConn):  # type: ignore[misc]
    """A connection whose HTTP/1 request parser reads with a time limit (TimedSocketUnreader)."""

    def __init__(self, cfg: Any, sock: Any, client: Any, server: Any, limit: float) -> None:
        super().__init__(cfg, sock, client, server)
        self.limit = limit

    def init(self) -> None:
        super().init()
        unreader = getattr(self.parser, "unreader", None)
        if type(unreader) is SocketUnreader:  # not HTTP/2; bytes already read stay with the new reader
            timed = TimedSocketUnreader(unreader.sock, self.limit, unreader.mxchunk)
            timed.buf = unreader.buf
            self.parser.unreader = timed


class ThreadWorker(_GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's `gthread` worker answering unparsable requests with the API's JSON errors, and
    reading requests with a time limit (`orchestrator api` sets it from API_READ_TIMEOUT_SECONDS).

    A connection that sends nothing at all is gunicorn's own concern: it waits a few seconds in a
    thread, then on the poller until the keep-alive timeout, as idle kept-alive connections do."""

    read_timeout: float = HttpSettings.model_fields["read_timeout_seconds"].default

    def init_process(self) -> None:
        streams.bound(self.cfg.threads)  # some threads stay free of chat streams (web.streams)
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = closing_after_errors(self.wsgi)

    def accept(self, listener: Any) -> None:
        # gunicorn's accept, with a TimedConn for the connection
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            conn = TimedConn(self.cfg, client_sock, client_addr, listener.getsockname(), self.read_timeout)
            self.enqueue_req(conn)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        answer = malformed_answer(exc)
        if answer is None:
            super().handle_error(req, client, addr, exc)
            return
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("", -1))[0], exc)
        try:
            util.write_nonblock(client, answer)
        except Exception:  # the client is gone: nothing to answer
            self.log.debug("Failed to send error message.")
