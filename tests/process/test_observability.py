"""Traces and structured logs over real processes: an OTLP/HTTP receiver here (decoding the
real protobuf with opentelemetry-proto) gets what a worker exports; every line a server writes
in json mode parses as one JSON object."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.harness import Server, jpeg_of, serve, wait_until


@dataclass(frozen=True)
class SpanRecord:
    """One exported span, decoded."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    status_code: int


@dataclass
class Receiver:
    """What the test collector has received."""

    url: str
    spans: list[SpanRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[SpanRecord]:
        with self.lock:
            return list(self.spans)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _decode(body: bytes) -> list[SpanRecord]:
    request = ExportTraceServiceRequest.FromString(body)
    return [
        SpanRecord(
            name=span.name,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            kind=span.kind,
            attributes={a.key: _value(a.value) for a in span.attributes},
            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
            status_code=span.status.code,
        )
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (``POST /v1/traces``, protobuf)."""
    collected = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            spans = _decode(body) if self.path == "/v1/traces" else []
            with collected.lock:
                collected.spans.extend(spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    collected.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield collected
    finally:
        server.shutdown()
        server.server_close()


def model_args(weights_file: Path, cache: Path) -> list[str]:
    return ["--weights", str(weights_file), "--cache-dir", str(cache), "--offline"]


def traced_env(receiver: Receiver) -> dict[str, str]:
    return {
        "RESNET_SERVICE_TRACING": "true",
        "RESNET_SERVICE_LOG_FORMAT": "json",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the default 5 s
        "OTEL_SERVICE_NAME": "resnet-service-test",
    }


def new_traceparent() -> tuple[str, str, str]:
    """A caller's W3C context: (header, trace id, parent span id), sampled."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def request_spans(spans: list[SpanRecord], trace_id: str) -> list[SpanRecord]:
    return [s for s in spans if s.trace_id == trace_id and s.kind == 2]  # SPAN_KIND_SERVER


def test_sixteen_traced_requests_and_the_batches_that_served_them(
    receiver: Receiver, weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    env = traced_env(receiver)
    with serve(tmp_path, *model_args(weights_file, model_cache), env=env) as server:
        callers = [new_traceparent() for _ in range(16)]
        photo = jpeg_of("chelsea")

        async def send_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            "/classify", files={"image": photo}, headers={"traceparent": header}
                        )
                        for header, _, _ in callers
                    )
                )

        responses = asyncio.run(send_all())
        assert [r.status_code for r in responses] == [200] * 16
        wanted = {trace_id for _, trace_id, _ in callers}

        def all_exported() -> bool:
            spans = receiver.snapshot()
            linked = {link for s in spans if s.name == "batch" for link in s.links}
            return all(request_spans(spans, t) for t in wanted) and len(linked) >= 16

        wait_until(all_exported, 30, "16 request spans and their batches", server)
        spans = receiver.snapshot()
        request_ids: dict[str, str] = {}
        for _header, trace_id, parent in callers:
            found = request_spans(spans, trace_id)
            assert len(found) == 1, [
                (s.name, s.kind, s.span_id, s.parent_span_id)
                for s in spans
                if s.trace_id == trace_id
            ]
            (request,) = found
            assert request.parent_span_id == parent, "the caller's trace is continued"
            assert request.name == "POST /classify"
            assert request.attributes["http.response.status_code"] == 200
            children = {s.name for s in spans if s.parent_span_id == request.span_id}
            assert {"admission", "read upload", "decode", "queue wait"} <= children, children
            request_ids[request.span_id] = trace_id
        batches = [s for s in spans if s.name == "batch"]
        links = [span_id for b in batches for _, span_id in b.links]
        # Every request is linked from exactly one batch, and batches link nothing else.
        assert sorted(links) == sorted(request_ids)
        for batch in batches:
            assert batch.attributes["batch.size"] == len(batch.links)
            assert batch.attributes["model.version"] == "1"
            assert batch.attributes["runtime"] == "openvino"
            assert batch.trace_id not in wanted  # its own trace: linked, not a made-up parent
        assert max(b.attributes["batch.size"] for b in batches) > 1  # requests shared passes
        for line in server.output().splitlines():
            record = json.loads(line)
            if record.get("event") == "request" and record.get("route") == "/classify":
                assert record["trace_id"] in wanted


def test_an_error_is_on_its_span_and_its_problem_names_the_trace(
    receiver: Receiver, weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    env = traced_env(receiver)
    with serve(tmp_path, *model_args(weights_file, model_cache), env=env) as server:
        header, trace_id, _ = new_traceparent()
        response = httpx.post(
            f"{server.url}/classify",
            files={"image": ("x.jpg", b"not an image", "image/jpeg")},
            headers={"traceparent": header},
        )
        assert response.status_code == 415
        assert response.json()["trace_id"] == trace_id
        wait_until(lambda: request_spans(receiver.snapshot(), trace_id), 30, "its span", server)
        (span,) = request_spans(receiver.snapshot(), trace_id)
        assert span.attributes["error.type"] == "unsupported_image_format"
        assert span.status_code != 2  # STATUS_CODE_ERROR is for the service's faults (5xx)


def test_a_refusal_is_an_error_on_its_span_with_its_admission_decision(
    receiver: Receiver, weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    """A worker that refuses while one upload is in progress (a 1 ms deadline bound), held
    there by a stalled upload: the refused request's span is an ERROR with its code."""
    env = {
        **traced_env(receiver),
        "RESNET_SERVICE_QUEUE_BUDGET_MS": "1",
        "RESNET_SERVICE_BODY_TIMEOUT_S": "60",
    }
    photo = jpeg_of("coffee")
    with (
        serve(tmp_path, *model_args(weights_file, model_cache), env=env) as server,
        socket.create_connection(("127.0.0.1", server.port)) as stalled,
    ):
        stalled.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )  # admitted, never finished

        def refused() -> tuple[httpx.Response, str]:
            header, trace_id, _ = new_traceparent()
            response = httpx.post(
                f"{server.url}/classify", files={"image": photo}, headers={"traceparent": header}
            )
            return response, trace_id

        wait_until(lambda: refused()[0].status_code == 503, 10, "a refusal", server)
        response, trace_id = refused()
        assert response.status_code == 503
        assert response.json()["trace_id"] == trace_id  # the caller's trace, in the body
        wait_until(lambda: request_spans(receiver.snapshot(), trace_id), 30, "its span", server)
        spans = receiver.snapshot()
        (span,) = request_spans(spans, trace_id)
        assert span.attributes["error.type"] == "overloaded"
        assert span.attributes["http.response.status_code"] == 503
        assert span.status_code == 2  # STATUS_CODE_ERROR: the service refused it
        (admission,) = [s for s in spans if s.parent_span_id == span.span_id]
        assert admission.name == "admission"
        assert admission.attributes["admission.decision"] == "refused"


def test_oip_rest_and_grpc_continue_the_callers_trace(
    receiver: Receiver, weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    env = traced_env(receiver)
    with serve(tmp_path, *model_args(weights_file, model_cache), env=env) as server:
        grpc_port = httpx.get(f"{server.url}/model").json()["settings"]["grpc_port"]
        name = httpx.get(f"{server.url}/model").json()["name"]
        image = np.array([jpeg_of("coffee")], dtype=object)
        traces = {}
        for protocol, module, client in (
            ("rest", thttp, thttp.InferenceServerClient(f"127.0.0.1:{server.port}")),
            ("grpc", tgrpc, tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")),
        ):
            tensor = module.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(image)
            header, trace_id, parent = new_traceparent()
            client.infer(name, [tensor], headers={"traceparent": header})
            traces[protocol] = (trace_id, parent)

        def exported() -> bool:
            spans = receiver.snapshot()
            return all(request_spans(spans, t) for t, _ in traces.values())

        wait_until(exported, 30, "the OIP requests' spans", server)
        spans = receiver.snapshot()
        for protocol, (trace_id, parent) in traces.items():
            (request,) = request_spans(spans, trace_id)
            assert request.parent_span_id == parent, protocol
            children = {s.name for s in spans if s.parent_span_id == request.span_id}
            assert {"admission", "queue wait"} <= children, (protocol, children)
            linked = {span_id for s in spans if s.name == "batch" for _, span_id in s.links}
            assert request.span_id in linked, protocol


# --- structured logs ------------------------------------------------------------------------
def assert_every_line_is_json(server: Server) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(server.output().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        for key in ("timestamp", "level", "logger", "message", "worker"):
            assert key in record, (key, line)
        records.append(record)
    return records


def test_every_line_is_json_through_start_traffic_a_killed_worker_and_sigterm(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    env = {"RESNET_SERVICE_LOG_FORMAT": "json"}
    args = [*model_args(weights_file, model_cache), "--workers", "2"]
    with serve(tmp_path, *args, env=env) as server:
        assert httpx.post(f"{server.url}/classify", files={"image": jpeg_of("rocket")}).is_success
        bad = httpx.post(f"{server.url}/classify", files={"image": b"nope"})
        assert bad.status_code == 415
        assert (
            httpx.post(f"{server.url}/classify?top_k=0", files={"image": b"x"}).status_code == 422
        )
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids(),
            60,
            "a replacement worker",
            server,
        )
        wait_until(lambda: "ready (pid" in server.output().split("died")[-1], 60, "ready", server)
        server.terminate()
        assert server.process.wait(60) == 0
    records = assert_every_line_is_json(server)
    access = [r for r in records if r.get("event") == "request"]
    assert {r["status"] for r in access} >= {200, 415, 422}
    assert all(r["request_id"] for r in access)
    served = [r for r in access if r["status"] == 200]
    assert served[0]["model"]
    assert served[0]["version"] == "1"
    assert {r["worker"] for r in records} >= {"supervisor", "0", "1"}
    assert any("died" in r["message"] for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)
