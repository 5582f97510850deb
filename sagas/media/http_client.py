"""One HTTP client for the services we call. It maps every failure to UpstreamError:
5xx, timeouts and connection errors are retryable, 4xx are not (and carry the service's message).

It never sleeps: the step's retry policy turns a retryable error into a timer row.
"""
from __future__ import annotations

from typing import Any

import requests

from orchestrator.errors import UpstreamError
from orchestrator.jsonutil import loads, unstorable


def _message(resp: requests.Response) -> str:
    try:
        body = loads(resp.content)  # a too-deep answer is non-JSON too, not a crash
    except ValueError:
        return resp.text[:500] or resp.reason
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if body.get(key):
                return str(body[key])
    return str(body)[:500]


class ServiceClient:
    def __init__(self, name: str, base_url: str, timeout: float, session: requests.Session | None = None) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = session or requests.Session()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        url = f"{self.base_url}{path}"
        try:
            resp = self.http.request(method, url, **kwargs)
        except requests.Timeout:
            raise UpstreamError(self.name, f"{method} {path} timed out after {kwargs['timeout']:g}s") from None
        except requests.ConnectionError as exc:
            raise UpstreamError(self.name, f"{method} {path} connection failed: {exc.__class__.__name__}") from None
        if resp.status_code >= 400:
            raise UpstreamError(self.name, f"{method} {path} -> {resp.status_code}: {_message(resp)}",
                                upstream_status=resp.status_code)
        return resp

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        try:
            body = loads(resp.content)  # a too-deep answer is non-JSON too, not a crash
        except ValueError:
            raise UpstreamError(self.name, f"{method} {path} answered non-JSON") from None
        bad = unstorable(body)
        if bad is not None:  # the same answer again would not help: not retryable
            raise UpstreamError(self.name, f"{method} {path} answered text that cannot be stored: "
                                f"{bad[0]}: {bad[1]}", upstream_status=resp.status_code)
        return body
