"""The HTTP layer in-process (httpx ASGITransport, lifespan on): every route and error code."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from resnet_service.config import Settings
from resnet_service.cpus import ISA_LEVELS
from resnet_service.runtimes.registry import runtime_version
from resnet_service.server.app import create_app
from resnet_service.service.state import ServiceState
from tests.harness import DEFAULT_RUNTIME, encode, jpeg_of, make_settings, photo, until

Client = httpx.AsyncClient


@asynccontextmanager
async def running(
    settings: Settings, wait_ready: bool = True
) -> AsyncIterator[tuple[Client, FastAPI]]:
    """The app with its lifespan running, and a client bound to it in-process."""
    app = create_app(settings, exit_on_startup_failure=False)
    state: ServiceState = app.state.service
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if wait_ready:
                loaded = lambda: state.readiness_problem() is None or state.startup_error  # noqa: E731
                await until(loaded, 30, "the model to load")
                assert state.readiness_problem() is None, state.startup_error
            yield client, app


@pytest.fixture
def settings_for(weights_file: Path, model_cache: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        return make_settings(weights_file, model_cache, DEFAULT_RUNTIME, **overrides)

    return build


@pytest.fixture
async def client(settings_for: Callable[..., Settings]) -> AsyncIterator[Client]:
    async with running(settings_for()) as (c, _):
        yield c


def image_file(data: bytes, name: str = "photo.jpg", field: str = "image") -> dict[str, Any]:
    return {field: (name, data, "image/jpeg")}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["detail"]
    assert body["title"]
    return body


# --- happy paths ---------------------------------------------------------------------------
async def test_classify_returns_top5_with_provenance_and_timings(client: Client) -> None:
    response = await client.post("/classify", files=image_file(jpeg_of("chelsea")))
    assert response.status_code == 200
    body = response.json()
    preds = body["predictions"]
    assert len(preds) == 5
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    assert body["model"]["precision"] == "int8"
    assert len(body["model"]["weights_sha256"]) == 12
    assert body["model"]["random_weights"] is False
    assert set(body["timings"]) == {"decode_ms", "queue_ms", "inference_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["decode_ms"] > 0
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{20}", request_id)
    again = await client.post("/classify", files=image_file(jpeg_of("chelsea")))
    assert again.headers["x-request-id"] != request_id


async def test_request_id_is_echoed(client: Client) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    odd = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert odd.headers["x-request-id"] != "bad id\twith spaces"


async def test_top_k_query(client: Client) -> None:
    response = await client.post("/classify?top_k=3", files=image_file(jpeg_of("coffee")))
    assert len(response.json()["predictions"]) == 3


async def test_batch_keeps_order_and_isolates_errors(client: Client) -> None:
    files = [
        ("images", ("a.jpg", jpeg_of("coffee"), "image/jpeg")),
        ("images", ("b.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 32, "image/heic")),
        ("images", ("c.png", encode(photo("rocket").resize((300, 200)), "PNG"), "image/png")),
        ("images", ("d.jpg", b"", "image/jpeg")),
    ]
    response = await client.post("/classify/batch?top_k=2", files=files)
    assert response.status_code == 200
    body = response.json()
    assert [r["filename"] for r in body["results"]] == ["a.jpg", "b.heic", "c.png", "d.jpg"]
    assert [r["index"] for r in body["results"]] == [0, 1, 2, 3]
    assert body["succeeded"] == 2
    assert body["failed"] == 2
    ok, heic, png, empty = body["results"]
    assert len(ok["predictions"]) == 2
    assert ok["error"] is None
    assert heic["predictions"] is None
    assert heic["error"]["code"] == "unsupported_image_format"
    assert heic["error"]["status"] == 415
    assert "HEIC" in heic["error"]["detail"]
    assert len(png["predictions"]) == 2
    assert empty["error"]["code"] == "empty_upload"
    single = await client.post("/classify?top_k=2", files=image_file(jpeg_of("coffee")))
    assert [p["index"] for p in single.json()["predictions"]] == [
        p["index"] for p in ok["predictions"]
    ]
    # Each image counted once, ok or error, whichever route and however it failed.
    await client.post("/embed", files=image_file(b"nope"))
    assert images_counted((await client.get("/metrics")).text) == {"ok": 3, "error": 3}


def images_counted(metrics: str) -> dict[str, float]:
    family = next(
        f for f in text_string_to_metric_families(metrics) if f.name == "resnet_service_images"
    )
    return {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}


async def test_model_route(client: Client) -> None:
    body = (await client.get("/model")).json()
    assert body["architecture"] == "resnet18"
    assert body["num_classes"] == 1000
    assert list(body)[:7] == [
        "name",
        "version",
        "architecture",
        "num_classes",
        "precision",
        "runtime",
        "settings",
    ]  # what a person reads first; the 1,000 labels only when asked
    assert body["labels"] is None
    assert len((await client.get("/model?labels=true")).json()["labels"]) == 1000
    assert body["precision"] == "int8"
    assert body["runtime"] == DEFAULT_RUNTIME
    # Built runtimes report fidelity against torch fp32; torch's own int8 in its quantization.
    fidelity = body["fidelity"] or body["quantization"]["fidelity"]
    assert fidelity["images"] == 16
    # Measured on this host: the level it names is the one /model says this host runs at.
    assert fidelity["measured_on"] == body["host"]
    assert body["host"]["isa"] in ISA_LEVELS
    assert body["runtime_version"] == runtime_version(DEFAULT_RUNTIME)
    assert body["settings"]["inference_threads"] == 1
    assert body["settings"]["max_top_k"] == 1000
    assert body["settings"]["queue_budget_ms"] == 15_000  # half the 30 s deadline
    assert "weights_path" not in body


async def test_probes(client: Client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


async def test_metrics_parse_and_count(client: Client) -> None:
    await client.post("/classify", files=image_file(jpeg_of("coffee")))
    await client.post("/classify", files=image_file(b"nope"))
    text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "resnet_service_requests",
        "resnet_service_request_duration_seconds",
        "resnet_service_decode_duration_seconds",
        "resnet_service_queue_wait_seconds",
        "resnet_service_inference_duration_seconds",
        "resnet_service_batch_size",
        "resnet_service_queue_depth",
        "resnet_service_in_flight_requests",
        "resnet_service_rejections",
        "resnet_service_model_info",
        "resnet_service_ready",
    ):
        assert name in families, name
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["resnet_service_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("/classify", "200")] == 1
    assert requests[("/classify", "415")] == 1
    rejections = {
        s.labels["reason"]: s.value
        for s in families["resnet_service_rejections"].samples
        if s.name.endswith("_total")
    }
    assert rejections["unsupported_image_format"] == 1
    assert images_counted(text) == {"ok": 1, "error": 1}
    info = families["resnet_service_model_info"].samples[0]
    assert info.labels["precision"] == "int8"
    assert info.labels["runtime"] == DEFAULT_RUNTIME
    assert info.value == 1


# --- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-3", "1001", "abc"])
async def test_bad_top_k_is_422_naming_it(client: Client, value: str) -> None:
    response = await client.post(f"/classify?top_k={value}", files=image_file(jpeg_of("coffee")))
    body = assert_problem(response, 422, "invalid_parameter")
    assert "top_k" in body["detail"]


async def test_missing_field(client: Client) -> None:
    response = await client.post("/classify", files={"other": ("x", b"1")}, data={"note": "x"})
    body = assert_problem(response, 422, "missing_field")
    assert "'other'" in body["detail"]
    text_only = await client.post("/classify", data={"note": "no image here"}, files={})
    assert text_only.status_code in (400, 422)


async def test_no_image_at_all(client: Client) -> None:
    response = await client.post("/classify", files={"image": ("", b"", "")})
    assert response.status_code in (400, 422)
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_not_multipart(client: Client) -> None:
    body = assert_problem(
        await client.post(
            "/classify", content=jpeg_of("coffee"), headers={"content-type": "image/jpeg"}
        ),
        400,
        "malformed_request",
    )
    assert "multipart/form-data" in body["detail"]


async def test_malformed_multipart(client: Client) -> None:
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    assert_problem(
        await client.post("/classify", content=b"garbage", headers=headers),
        400,
        "malformed_request",
    )
    no_boundary = {"content-type": "multipart/form-data"}
    assert_problem(
        await client.post("/classify", content=b"--x", headers=no_boundary),
        400,
        "malformed_request",
    )
    truncated = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        + jpeg_of("coffee")[:500]
    )
    assert_problem(
        await client.post("/classify", content=truncated, headers=headers), 400, "malformed_request"
    )


async def test_empty_image(client: Client) -> None:
    assert_problem(await client.post("/classify", files=image_file(b"")), 400, "empty_upload")


async def test_unsupported_and_undecodable(client: Client) -> None:
    assert_problem(
        await client.post("/classify", files=image_file(b"%PDF-1.5")),
        415,
        "unsupported_image_format",
    )
    cut = jpeg_of("astronaut")[:3000]
    assert_problem(await client.post("/classify", files=image_file(cut)), 415, "undecodable_image")


async def test_pixel_cap(settings_for: Callable[..., Settings]) -> None:
    async with running(settings_for(max_pixels=100_000)) as (client, _):
        response = await client.post("/classify", files=image_file(jpeg_of("coffee", (500, 375))))
        body = assert_problem(response, 413, "image_too_large")
        assert "100000" in body["detail"]


async def test_byte_cap_from_content_length_and_while_streaming(
    settings_for: Callable[..., Settings],
) -> None:
    async with running(settings_for(max_upload_bytes=20_000)) as (client, _):
        big = jpeg_of("astronaut", (1200, 900))
        assert len(big) > 20_000 + 64 * 1024 + 1
        declared = await client.post("/classify", files=image_file(big))
        assert_problem(declared, 413, "upload_too_large")

        async def chunks() -> AsyncIterator[bytes]:
            yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]
            yield b"\r\n--b--\r\n"

        streamed = await client.post(
            "/classify",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        body = assert_problem(streamed, 413, "upload_too_large")
        assert "20000" in body["detail"]


async def test_batch_limits(settings_for: Callable[..., Settings]) -> None:
    async with running(settings_for(max_batch_files=2)) as (client, _):
        files = [
            ("images", (f"{i}.jpg", jpeg_of("coffee", (64, 48)), "image/jpeg")) for i in range(3)
        ]
        body = assert_problem(
            await client.post("/classify/batch", files=files), 422, "too_many_files"
        )
        assert "At most 2" in body["detail"]
        assert_problem(
            await client.post("/classify/batch", files={"image": ("a", b"x")}), 422, "missing_field"
        )


async def test_auth_token(settings_for: Callable[..., Settings]) -> None:
    async with running(settings_for(auth_token="s3cret")) as (client, _):
        files = image_file(jpeg_of("coffee"))
        denied = await client.post("/classify", files=files)
        assert_problem(denied, 401, "unauthorized")
        assert denied.headers["www-authenticate"].startswith("Bearer")
        wrong = await client.post(
            "/classify", files=files, headers={"Authorization": "Bearer nope"}
        )
        assert_problem(wrong, 401, "unauthorized")
        ok = await client.post("/classify", files=files, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_overload_gives_503_with_retry_after(settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(queue_capacity=1, decode_threads=1, max_batch_size=1)
    async with running(settings) as (client, _):
        data = jpeg_of("astronaut", (1600, 1200))
        responses = await asyncio.gather(
            *(client.post("/classify", files=image_file(data)) for _ in range(24))
        )
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}
        assert 503 in statuses
        assert 200 in statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert_problem(rejected, 503, "overloaded")
        assert int(rejected.headers["retry-after"]) >= 1


async def test_deadline_gives_504(settings_for: Callable[..., Settings]) -> None:
    async with running(settings_for(request_timeout_s=1e-6)) as (client, _):
        response = await client.post("/classify", files=image_file(jpeg_of("coffee")))
        assert_problem(response, 504, "deadline_exceeded")


async def test_not_ready_during_start_up(
    settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    # A fresh cache: the model must be calibrated, so start-up takes a while.
    async with running(settings_for(model_cache_dir=tmp_path), wait_ready=False) as (client, app):
        ready = await client.get("/readyz")
        body = assert_problem(ready, 503, "not_ready")
        assert "loading" in body["detail"]
        assert int(ready.headers["retry-after"]) >= 1
        assert (await client.get("/healthz")).status_code == 200
        assert_problem(
            await client.post("/classify", files=image_file(jpeg_of("coffee"))), 503, "not_ready"
        )
        state: ServiceState = app.state.service
        await until(lambda: state.readiness_problem() is None, 30, "the model to load")
        assert (await client.get("/readyz")).status_code == 200


async def test_startup_failure_is_reported(tmp_path: Path) -> None:
    from resnet_service.config import load_settings

    settings = load_settings(model_cache_dir=tmp_path, allow_downloads=False)
    async with running(settings, wait_ready=False) as (client, app):
        state: ServiceState = app.state.service
        await until(lambda: state.startup_error, 10, "the start-up to fail")
        body = assert_problem(await client.get("/readyz"), 503, "not_ready")
        assert "RESNET_SERVICE_WEIGHTS_PATH" in body["detail"]


async def test_unknown_route_and_method(client: Client) -> None:
    assert_problem(await client.get("/nope"), 404, "not_found")
    assert_problem(await client.get("/classify"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    "body",
    [
        b"\x00" * 100,
        b"--b\r\n\r\n\r\n--b--",
        b"--b\r\nContent-Disposition: attachment\r\n\r\nx\r\n--b--\r\n",
    ],
)
async def test_garbage_never_gives_500(client: Client, body: bytes) -> None:
    response = await client.post(
        "/classify/batch", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_an_internal_failure_is_a_problem_with_the_request_id(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet_service.core.classifier import Classifier

    async def broken(self: Classifier, data: bytes, top_k: int | None = None) -> None:
        raise RuntimeError("injected fault")

    async with running(settings_for()) as (client, _):
        monkeypatch.setattr(Classifier, "classify", broken)
        response = await client.post(
            "/classify", files=image_file(jpeg_of("coffee")), headers={"X-Request-ID": "req-500"}
        )
        body = assert_problem(response, 500, "internal_error")
        assert response.headers["x-request-id"] == "req-500"
        assert body["request_id"] == "req-500"
        assert "injected" not in body["detail"]  # no internals leak to the caller


async def test_upload_memory_is_bounded_and_given_back(
    settings_for: Callable[..., Settings],
) -> None:
    mib = 1024 * 1024
    settings = settings_for(
        max_upload_bytes=400_000, max_batch_bytes=mib, max_buffered_upload_bytes=mib
    )
    async with running(settings) as (client, app):
        state: ServiceState = app.state.service
        data = jpeg_of("astronaut", (900, 700), quality=97)
        assert 200_000 < len(data) < 400_000
        responses = await asyncio.gather(
            *(client.post("/classify", files=image_file(data)) for _ in range(8))
        )
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}
        assert 503 in statuses  # 8 x >200 KB cannot all be held under 1 MiB
        assert 200 in statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert "Uploads in progress" in assert_problem(rejected, 503, "overloaded")["detail"]
        assert state.upload_budget.used == 0
        assert (await client.post("/classify", files=image_file(data))).status_code == 200


async def test_a_boundary_longer_than_rfc_2046_allows_is_400(client: Client) -> None:
    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="image"\r\n\r\nx\r\n--{boundary}--\r\n'
    response = await client.post(
        "/classify",
        content=body.encode(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "70" in assert_problem(response, 400, "malformed_request")["detail"]


async def test_made_up_methods_share_one_metric_label(client: Client) -> None:
    for index in range(20):
        response = await client.request(f"BREW{index}", "/classify")
        assert response.status_code == 405
    text = (await client.get("/metrics")).text
    family = next(
        f for f in text_string_to_metric_families(text) if f.name == "resnet_service_requests"
    )
    methods = {s.labels["method"] for s in family.samples}
    assert "other" in methods
    assert not any(m.startswith("BREW") for m in methods)


async def test_admission_refuses_before_reading_the_upload(
    settings_for: Callable[..., Settings],
) -> None:
    async with running(settings_for()) as (client, app):
        state: ServiceState = app.state.service
        assert state.classifier is not None
        workload = state.classifier.workload
        workload.processing += 100_000  # as if 100k images were ahead
        try:

            async def never_sent() -> AsyncIterator[bytes]:
                raise AssertionError("the body was read")
                yield b""  # pragma: no cover

            response = await client.post(
                "/classify",
                content=never_sent(),
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
        finally:
            workload.processing -= 100_000
        body = assert_problem(response, 503, "overloaded")
        assert "budget" in body["detail"]
        assert int(response.headers["retry-after"]) >= 1
        assert workload.uploading == 0
        assert (
            await client.post("/classify", files=image_file(jpeg_of("coffee")))
        ).status_code == 200


async def test_response_cache_answers_a_repeated_image_without_the_model(
    settings_for: Callable[..., Settings],
) -> None:
    async with running(settings_for(response_cache_mb=1)) as (client, app):
        state: ServiceState = app.state.service
        assert state.classifier is not None
        engine = state.classifier.engine
        data = jpeg_of("coffee")
        first = await client.post("/classify", files=image_file(data), params={"top_k": 3})
        run_before = engine.items_run
        again = await client.post("/classify", files=image_file(data), params={"top_k": 5})
        other = await client.post("/classify", files=image_file(jpeg_of("chelsea")))
        assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
        assert other.headers["x-cache"] == "miss"
        assert engine.items_run == run_before + 1  # the hit never reached the model
        # The same answer, for any top_k, from the one cached entry.
        assert again.json()["predictions"][:3] == first.json()["predictions"]
        assert again.json()["timings"]["inference_ms"] == 0
        metrics = (await client.get("/metrics")).text
        assert 'resnet_service_response_cache_lookups_total{result="hit"} 1.0' in metrics
        assert 'resnet_service_response_cache_lookups_total{result="miss"} 2.0' in metrics
        batch = await client.post(
            "/classify/batch", files=[("images", ("a.jpg", data)), ("images", ("b.jpg", data))]
        )
        assert [r["predictions"] for r in batch.json()["results"]] == [
            again.json()["predictions"]
        ] * 2


async def test_response_cache_is_never_shared_across_tokens(
    settings_for: Callable[..., Settings],
) -> None:
    async with running(settings_for(response_cache_mb=1, auth_token="s3cret")) as (client, app):
        data = jpeg_of("coffee")
        good = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/classify", files=image_file(data), headers=good)).headers[
            "x-cache"
        ] == "miss"
        assert (await client.post("/classify", files=image_file(data), headers=good)).headers[
            "x-cache"
        ] == "hit"
        # A wrong token is refused before the cache is consulted.
        denied = await client.post(
            "/classify", files=image_file(data), headers={"Authorization": "Bearer other"}
        )
        assert_problem(denied, 401, "unauthorized")
        assert "x-cache" not in denied.headers
        classifier = app.state.service.classifier
        assert classifier.cache is not None
        scopes = {classifier.cache.key(data, s) for s in ("", "a", "b")}
        assert len(scopes) == 3  # one image, three callers: three entries


async def test_no_cache_by_default(client: Client) -> None:
    response = await client.post("/classify", files=image_file(jpeg_of("coffee")))
    assert "x-cache" not in response.headers
