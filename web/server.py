"""The API's gunicorn worker: gunicorn's threaded worker, whose answers to requests it cannot
parse (a request line or header that is not HTTP, raw non-ASCII bytes in the path or query, a
request line over 4094 bytes, a broken chunked body) are the API's JSON error
`{"error": "invalid_input", "message", "field"}` instead of an HTML page.

`orchestrator api` runs it (worker class `web.server.ThreadWorker`)."""
from __future__ import annotations

import json
from typing import Any

from gunicorn import util
from gunicorn.http.errors import (ChunkMissingTerminator, InvalidChunkExtension, InvalidChunkSize, InvalidHeader,
                                  InvalidHeaderName, InvalidHTTPVersion, InvalidRequestLine, InvalidRequestMethod,
                                  LimitRequestHeaders, LimitRequestLine, ObsoleteFolding,
                                  UnsupportedTransferCoding)
from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker

#: (exception types, status, reason phrase, the part of the request at fault)
MALFORMED: tuple[tuple[tuple[type[BaseException], ...], int, str, str], ...] = (
    ((LimitRequestLine,), 414, "URI Too Long", "request line"),
    ((InvalidRequestLine, InvalidRequestMethod, InvalidHTTPVersion), 400, "Bad Request", "request line"),
    ((LimitRequestHeaders,), 431, "Request Header Fields Too Large", "headers"),
    ((InvalidHeader, InvalidHeaderName, ObsoleteFolding), 400, "Bad Request", "headers"),
    ((InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension), 400, "Bad Request", "body"),
    # RFC 9112 asks for 501 here: the one 5xx, answered before the app runs, about the request
    ((UnsupportedTransferCoding,), 501, "Not Implemented", "Transfer-Encoding"),
)


def malformed_answer(exc: BaseException) -> bytes | None:
    """The raw HTTP answer to a request gunicorn could not parse; None for any other error."""
    for types, status, reason, field in MALFORMED:
        if isinstance(exc, types):
            body = json.dumps({"error": "invalid_input", "message": f"{field}: {str(exc)[:300]}",
                               "field": field}).encode()
            head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n")
            return head.encode("latin-1") + body
    return None


class ThreadWorker(_GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's `gthread` worker answering unparsable requests with the API's JSON errors."""

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
