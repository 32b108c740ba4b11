"""The Open Inference Protocol v2 (REST and gRPC) against a real server, with the ecosystem's
own client (tritonclient): health, metadata, images as BYTES (binary and JSON/base64),
preprocessed FP32, the classification extension agreeing with /classify, bad inputs,
readiness while draining, auth, and the same metrics as the JSON API.

The test process imports tritonclient only: the server's generated gRPC messages share its
protobuf package, so they live in the server's processes alone.
"""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from resnet_bench.servers import metric_sum
from resnet_service.core.images import decode_and_preprocess
from tests.harness import LIMITS, SPEC, Server, jpeg_of, serve, wait_until

Client = Any  # tritonclient's http or grpc InferenceServerClient (same interface)
TOKEN = "oip-s3cret"


def auth() -> dict[str, str]:
    """A fresh header dict each call: tritonclient adds its own headers to the one it gets."""
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, weights_file: Path, model_cache: Path
) -> Iterator[Server]:
    args = ["--weights", str(weights_file), "--cache-dir", str(model_cache), "--offline"]
    env = {"RESNET_SERVICE_AUTH_TOKEN": TOKEN, "RESNET_SERVICE_MAX_BATCH_FILES": "8"}
    with serve(tmp_path_factory.mktemp("oip"), *args, "--runtime", "openvino", env=env) as srv:
        yield srv


def grpc_port(server: Server) -> int:
    port: int = httpx.get(f"{server.url}/model").json()["settings"]["grpc_port"]
    return port


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request: pytest.FixtureRequest, server: Server) -> Iterator[Client]:
    if request.param == "http":
        yield thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    else:
        yield tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port(server)}")


def protocol_module(client: Client) -> Any:
    return thttp if isinstance(client, thttp.InferenceServerClient) else tgrpc


def model_name(server: Server) -> str:
    name: str = httpx.get(f"{server.url}/model").json()["name"]
    return name


def images_input(client: Client, images: list[bytes], shape: list[int] | None = None) -> Any:
    module = protocol_module(client)
    tensor = module.InferInput("image", shape or [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object).reshape(shape or [len(images)]))
    return tensor


def headers_for(client: Client) -> dict[str, str]:
    """HTTP headers, or gRPC metadata (whose keys must be lower case)."""
    return (
        auth()
        if isinstance(client, thttp.InferenceServerClient)
        else {"authorization": f"Bearer {TOKEN}"}
    )


def infer(
    client: Client, server: Server, inputs: list[Any], outputs: list[Any] | None = None
) -> Any:
    return client.infer(model_name(server), inputs, outputs=outputs, headers=headers_for(client))


def test_health_and_metadata(client: Client, server: Server) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    name = model_name(server)
    assert client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    if isinstance(client, tgrpc.InferenceServerClient):
        inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
        outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
        versions = list(meta.versions)
    else:
        inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
        outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
        versions = meta["versions"]
    assert inputs == {"image": ("BYTES", [-1]), "input": ("FP32", [-1, 3, 224, 224])}
    assert outputs == {
        "probabilities": ("FP32", [-1, 1000]),
        "embedding": ("FP32", [-1, 512]),
        "cam": ("FP32", [-1, 7, 7]),
        "tags": ("BYTES", [-1]),  # the ImageNet model's own tag rules
    }
    assert versions == ["1"]
    server_meta = client.get_server_metadata()
    extensions = (
        server_meta.extensions if hasattr(server_meta, "extensions") else server_meta["extensions"]
    )
    assert "classification" in extensions


def test_embedding_and_cam_agree_with_embed_and_explain(client: Client, server: Server) -> None:
    """One request for all three outputs: the vectors /embed gives and the maps /explain
    gives, for the request's ``target`` parameter (tritonclient's way to send it)."""
    photos = [jpeg_of("chelsea"), jpeg_of("coffee")]
    module = protocol_module(client)
    wanted = [module.InferRequestedOutput(name) for name in ("embedding", "cam", "probabilities")]
    result = client.infer(
        model_name(server),
        [images_input(client, photos)],
        outputs=wanted,
        headers=headers_for(client),
        parameters={"target": 7},
    )
    vectors, maps = result.as_numpy("embedding"), result.as_numpy("cam")
    assert vectors.shape == (2, 512)
    assert maps.shape == (2, 7, 7)
    assert result.as_numpy("probabilities").shape == (2, 1000)
    for vector, cam, photo in zip(vectors, maps, photos, strict=True):
        image = {"image": photo}
        embed = httpx.post(f"{server.url}/embed", files=image, headers=auth()).json()
        np.testing.assert_allclose(vector, embed["embedding"], atol=1e-5)
        explain = httpx.post(f"{server.url}/explain?target=7", files=image, headers=auth())
        np.testing.assert_allclose(cam, explain.json()["cam"]["grid"], atol=1e-5)
    with pytest.raises(InferenceServerException, match="target must be a class index"):
        client.infer(
            model_name(server),
            [images_input(client, photos[:1])],
            outputs=wanted[1:2],
            headers=headers_for(client),
            parameters={"target": 1000},
        )


def test_classification_agrees_with_classify(client: Client, server: Server) -> None:
    photos = [jpeg_of("chelsea"), jpeg_of("coffee"), jpeg_of("rocket", (640, 480))]
    module = protocol_module(client)
    wanted = module.InferRequestedOutput("probabilities", class_count=3)
    result = infer(client, server, [images_input(client, photos)], [wanted])
    top3 = result.as_numpy("probabilities")
    assert top3.shape == (3, 3)
    for row, photo in zip(top3, photos, strict=True):
        reference = httpx.post(
            f"{server.url}/classify?top_k=3", files={"image": photo}, headers=auth()
        ).json()["predictions"]
        got = [entry.decode().split(":", 2) for entry in row]
        assert [int(i) for _, i, _ in got] == [p["index"] for p in reference]
        assert [label for _, _, label in got] == [p["label"] for p in reference]
        assert [float(s) for s, _, _ in got] == pytest.approx(
            [p["score"] for p in reference], abs=1e-5
        )


def test_probabilities_for_bytes_and_preprocessed_inputs_agree(
    client: Client, server: Server
) -> None:
    photo = jpeg_of("astronaut")
    module = protocol_module(client)
    from_bytes = infer(client, server, [images_input(client, [photo], [1, 1])]).as_numpy(
        "probabilities"
    )
    pixels = decode_and_preprocess(photo, LIMITS, SPEC)[None]
    tensor = module.InferInput("input", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    from_pixels = infer(client, server, [tensor]).as_numpy("probabilities")
    assert from_bytes.shape == from_pixels.shape == (1, 1000)
    assert from_bytes.sum() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(from_bytes, from_pixels, atol=1e-5)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not an image", "element 1"),
        ("wrong datatype", "BYTES"),
        ("wrong shape", "shape"),
        ("unknown output", "Unknown output"),
        ("too many", "At most 8"),
    ],
)
def test_bad_inputs_are_refused_clearly(
    client: Client, server: Server, case: str, message: str
) -> None:
    module = protocol_module(client)
    inputs = [images_input(client, [jpeg_of("coffee"), b"not an image"])]
    outputs = None
    if case == "wrong datatype":
        tensor = module.InferInput("image", [1], "INT32")
        tensor.set_data_from_numpy(np.array([1], dtype=np.int32))
        inputs = [tensor]
    elif case == "wrong shape":
        tensor = module.InferInput("input", [1, 3, 10, 10], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 3, 10, 10), dtype=np.float32))
        inputs = [tensor]
    elif case == "unknown output":
        inputs = [images_input(client, [jpeg_of("coffee")])]
        outputs = [module.InferRequestedOutput("logits")]
    elif case == "too many":
        inputs = [images_input(client, [jpeg_of("coffee")] * 9)]
    with pytest.raises(InferenceServerException) as info:
        infer(client, server, inputs, outputs)
    assert message in info.value.message()
    status = str(info.value.status())
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), status


def test_unknown_model_and_missing_token(client: Client, server: Server) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(
            "no-such-model",
            [images_input(client, [jpeg_of("coffee")])],
            headers=headers_for(client),
        )
    assert str(info.value.status()) in ("404", "StatusCode.NOT_FOUND")
    with pytest.raises(InferenceServerException) as info:
        client.infer(model_name(server), [images_input(client, [jpeg_of("coffee")])])
    assert str(info.value.status()) in ("401", "StatusCode.UNAUTHENTICATED")


def test_json_mode_with_base64_images_and_binary_outputs(server: Server) -> None:
    name = model_name(server)
    photo = jpeg_of("chelsea")
    body: dict[str, Any] = {
        "id": "req-7",
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(photo).decode()],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    url = f"{server.url}/v2/models/{name}/infer"
    answer = httpx.post(url, json=body, headers=auth()).json()
    assert answer["id"] == "req-7"
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES"
    assert output["shape"] == [1, 2]
    assert len(output["data"]) == 2
    assert output["data"][0].count(":") >= 2
    body["inputs"][0]["parameters"] = {}
    refused = httpx.post(url, json=body, headers=auth())
    assert refused.status_code == 400
    assert "base64" in refused.json()["error"]
    # Binary outputs when asked for: JSON header, then the raw FP32 probabilities.
    body["inputs"][0]["parameters"] = {"content_type": "base64"}
    body["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    binary = httpx.post(url, json=body, headers=auth())
    header_length = int(binary.headers["inference-header-content-length"])
    header = json.loads(binary.content[:header_length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 4000
    probabilities = np.frombuffer(binary.content[header_length:], dtype="<f4")
    assert probabilities.shape == (1000,)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)


def test_oip_requests_are_counted_like_the_json_api(server: Server) -> None:
    thttp.InferenceServerClient(f"127.0.0.1:{server.port}").is_server_ready()
    text = httpx.get(f"{server.url}/metrics").text
    assert 'route="/v2/models/{model_name}/infer"' in text
    assert 'route="grpc:inference.GRPCInferenceService/ModelInfer"' in text


def classed(server: Server, wanted: str) -> float:
    return metric_sum(server.url, "resnet_service_priority_requests", priority=wanted, outcome="ok")


@pytest.mark.parametrize(
    ("how", "wanted"),
    [("level 2", "bulk"), ("level 1", "interactive"), ("header u=7", "bulk")],
)
def test_a_request_says_its_class(client: Client, server: Server, how: str, wanted: str) -> None:
    """tritonclient's ``priority=`` (Triton's levels: 1 highest, 2 and up bulk here), or RFC
    9218's ``Priority`` as an HTTP header or gRPC metadata; each class is counted apart."""
    before = {c: classed(server, c) for c in ("bulk", "interactive")}
    headers = headers_for(client)
    level = 0
    if how.startswith("level"):
        level = int(how.split()[1])
    else:
        headers["priority"] = "u=7"
    inputs = [images_input(client, [jpeg_of("coffee")])]
    client.infer(model_name(server), inputs, headers=headers, priority=level)
    other = "interactive" if wanted == "bulk" else "bulk"
    wait_until(lambda: classed(server, wanted) == before[wanted] + 1, 10, f"one more {wanted}")
    assert classed(server, other) == before[other]


def test_a_priority_that_is_no_class_is_refused(server: Server) -> None:
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(jpeg_of("coffee")).decode()],
            }
        ],
        "parameters": {"priority": "urgent"},
    }
    url = f"{server.url}/v2/models/{model_name(server)}/infer"
    refused = httpx.post(url, json=body, headers=auth())
    assert refused.status_code == 400
    assert "'interactive' or 'bulk'" in refused.json()["error"]
    body["parameters"] = {"priority": "bulk"}
    assert httpx.post(url, json=body, headers=auth()).status_code == 200


def test_not_ready_while_draining(tmp_path: Path, weights_file: Path, model_cache: Path) -> None:
    args = ["--weights", str(weights_file), "--cache-dir", str(model_cache), "--offline"]
    with serve(tmp_path, *args, "--runtime", "openvino", "--drain-delay", "3") as srv:
        http = thttp.InferenceServerClient(f"127.0.0.1:{srv.port}")
        rpc = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port(srv)}")
        assert http.is_server_ready()
        assert rpc.is_server_ready()
        srv.process.send_signal(signal.SIGTERM)
        wait_until(lambda: not http.is_server_ready(), 2, "HTTP readiness off", srv)
        assert not rpc.is_server_ready()
        assert http.is_server_live()
        assert rpc.is_server_live()
        name = model_name(srv)
        assert not http.is_model_ready(name)
        # Still serving through the drain delay: the load balancer is taking it out.
        result = rpc.infer(name, [images_input(rpc, [jpeg_of("coffee")])])
        assert result.as_numpy("probabilities").shape == (1, 1000)
