"""An OTLP/HTTP trace receiver for tests: accepts POST /v1/traces (protobuf
ExportTraceServiceRequest) on 127.0.0.1 and keeps every span it gets."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, Any]
    links: list[str] = field(default_factory=list)  # trace ids linked to


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class Receiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceRequest, ExportTraceServiceResponse)

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ok = self.path == "/v1/traces"
                if ok:
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver._record(request)
                self.send_response(200 if ok else 404)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _record(self, request: Any) -> None:
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    span = Span(resource.get("service.name", ""), s.trace_id.hex(), s.span_id.hex(),
                                s.parent_span_id.hex(), s.name, {a.key: _value(a.value) for a in s.attributes},
                                [link.trace_id.hex() for link in s.links])
                    with self.lock:
                        self.spans.append(span)

    def env(self) -> dict[str, str]:
        """The variables that make a process export its spans here, flushed within 100 ms."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_BSP_SCHEDULE_DELAY": "100"}

    def about(self, instance_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.attributes.get("workflow.id") == instance_id]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
