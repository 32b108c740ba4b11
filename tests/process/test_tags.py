"""Tags over real processes: on a model with a hierarchy of its own (five shapes grouped into
"round" and "angular" by its tags.yml), every path gives tags equal to the summed probability
of their classes: HTTP (one image and a batch), OIP REST and gRPC (tritonclient), ``predict``
and the tag job. In poll mode a rules file changed in place takes effect within a second under
16 clients with no failed request, and a broken one is refused with its line while the rules
in force keep serving."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from resnet_service.cli import main
from tests.harness import ClassifyLoad, Server, jpeg_of, serve, wait_until
from tests.weights import write_test_bundle

LABELS = ["circle", "ellipse", "square", "triangle", "star"]
GROUPS = {"round": [0, 1], "angular": [2, 3, 4]}
RULES = """\
version: 1
floor: 0.0
max_tags: 10
groups:
  round: [circle, ellipse]
  angular: [square, triangle, star]
tags:
  - {name: round, classes: [round], threshold: 0.0, priority: 2, categories: [shape]}
  - {name: angular, classes: [angular], threshold: 0.0, priority: 2}
  - {name: circle, classes: [circle], threshold: 0.0, priority: 1, aliases: [ring]}
"""
PHOTOS = {name: jpeg_of(name, (320, 240)) for name in ("chelsea", "astronaut", "coffee")}
#: JSON lines and Parquet rows keep 6 decimals: five rounded terms against one rounded sum.
ROUNDED = 3.5e-6


def expected_tags(probabilities: list[float]) -> dict[str, float]:
    p = np.asarray(probabilities, dtype=np.float64)
    return {name: float(p[members].sum()) for name, members in GROUPS.items()} | {
        "circle": float(p[0])
    }


def assert_tags_sum(tags: list[dict[str, Any]], probabilities: list[float], tol: float) -> None:
    expected = expected_tags(probabilities)
    assert {t["name"] for t in tags} == set(expected)
    for tag in tags:
        assert abs(tag["score"] - expected[tag["name"]]) <= tol, (tag, expected)
    # Priority first (round and angular before circle), then score.
    assert [t["name"] for t in tags][-1] == "circle"


def by_index(predictions: list[dict[str, Any]]) -> list[float]:
    scores = [0.0] * len(LABELS)
    for p in predictions:
        scores[p["index"]] = p["score"]
    return scores


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_test_bundle(tmp_path_factory.mktemp("shapes") / "shapes", LABELS, "shapes")
    (folder / "tags.yml").write_text(RULES)
    return folder


def model_flags(bundle: Path, cache: Path) -> list[str]:
    return ["--bundle", str(bundle), "--precision", "fp32", "--cache-dir", str(cache)]


def test_tags_are_summed_leaf_probabilities_on_every_path(
    bundle: Path, model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve(tmp_path, *model_flags(bundle, model_cache), "--grpc-port", "0") as server:
        check_http(server)
        check_oip(server)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, data in PHOTOS.items():
        (photos / f"{name}.jpg").write_bytes(data)
    flags = model_flags(bundle, model_cache)
    assert main(["predict", str(photos), "--top-k", "5", *flags]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(PHOTOS)
    for line in lines:
        assert_tags_sum(line["tags"], by_index(line["predictions"]), ROUNDED)
    out = tmp_path / "tags-out"
    assert (
        main(["tag", str(photos), "--out", str(out), "--top-k", "5", "--no-progress", *flags]) == 0
    )
    rows = pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()
    assert len(rows) == len(PHOTOS)
    for row in rows:
        assert_tags_sum(row["tags"], by_index(row["predictions"]), ROUNDED)


def check_http(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for data in PHOTOS.values():
            body = client.post(
                "/classify", params={"top_k": 5}, files={"image": ("p.jpg", data, "image/jpeg")}
            ).json()
            assert_tags_sum(body["tags"], by_index(body["predictions"]), 1e-6)
        files = [("images", (f"{n}.jpg", d, "image/jpeg")) for n, d in PHOTOS.items()]
        files.append(("images", ("bad.jpg", b"not an image", "image/jpeg")))
        batch = client.post("/classify/batch", params={"top_k": 5}, files=files).json()
        assert batch["succeeded"] == len(PHOTOS)
        assert batch["failed"] == 1
        for item in batch["results"][: len(PHOTOS)]:
            assert_tags_sum(item["tags"], by_index(item["predictions"]), 1e-6)
        assert batch["results"][-1]["tags"] is None
        assert batch["results"][-1]["error"]
        models = client.get("/models").json()["models"]
        (version,) = models[0]["versions"]
        assert (version["tag_rules"], version["tags"]) == ("tags.yml", 3)


def _oip_inputs(module: Any) -> list[Any]:
    images = np.array([[d] for d in PHOTOS.values()], dtype=np.object_).reshape(-1)
    tensor = module.InferInput("image", [len(PHOTOS)], "BYTES")
    tensor.set_data_from_numpy(images)
    return [tensor]


def check_oip(server: Server) -> None:
    grpc_port = httpx.get(f"{server.url}/model").json()["settings"]["grpc_port"]
    rest = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    grpc = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    for client, module in ((rest, thttp), (grpc, tgrpc)):
        outputs = [module.InferRequestedOutput(n) for n in ("probabilities", "tags")]
        result = client.infer("shapes", _oip_inputs(module), outputs=outputs)
        probabilities = result.as_numpy("probabilities")
        tags = result.as_numpy("tags")
        assert probabilities.shape == (len(PHOTOS), len(LABELS))
        for p, encoded in zip(probabilities, tags, strict=True):
            assert_tags_sum(json.loads(encoded), p.tolist(), 1e-6)
        metadata = client.get_model_metadata("shapes")
        names = (
            [o["name"] for o in metadata["outputs"]]
            if isinstance(metadata, dict)
            else [o.name for o in metadata.outputs]
        )
        assert "tags" in names
    rest.close()
    grpc.close()


# --- live rules under load -------------------------------------------------------------------
def tag_names(body: dict[str, Any]) -> frozenset[str]:
    return frozenset(t["name"] for t in body["tags"])


def first_with(load: ClassifyLoad[frozenset[str]], name: str, after: float) -> float | None:
    return next((t for t, names in load.answers.values if t >= after and name in names), None)


@pytest.fixture
def repository(tmp_path: Path, bundle: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(bundle, root / "shapes" / "1")
    (root / "shapes" / "config.json").write_text(json.dumps({"precision": "fp32"}))
    return root


def test_a_rules_change_under_load_takes_effect_within_a_second(
    repository: Path, model_cache: Path, tmp_path: Path
) -> None:
    rules = repository / "shapes" / "1" / "tags.yml"
    args = ("--repository", str(repository), "--cache-dir", str(model_cache), "--offline")
    poll = ("--repository-control", "poll", "--repository-poll", "5")
    with (
        serve(tmp_path, *args, *poll) as server,
        ClassifyLoad(server.url, tag_names, image=PHOTOS["chelsea"]) as load,
    ):
        wait_until(lambda: load.count() >= 32, 60, "answers under load", server)
        assert all("round" in names and "new" not in names for _, names in load.answers.values)
        rules.write_text(RULES + "  - {name: new, classes: [star, circle], threshold: 0.0}\n")
        written = time.monotonic()
        wait_until(lambda: first_with(load, "new", written) is not None, 10, "new tags", server)
        seen = first_with(load, "new", written)
        assert seen is not None
        delay = seen - written
        assert delay <= 1.0, f"new tags after {delay:.2f} s"
        rules.write_text(RULES + "  - {name: broken, classes: [hexagon]}\n")

        def refused() -> bool:
            (version,) = httpx.get(f"{server.url}/models").json()["models"][0]["versions"]
            return bool(version["tag_rules_problem"])

        wait_until(refused, 10, "the broken file refused", server)
        (version,) = httpx.get(f"{server.url}/models").json()["models"][0]["versions"]
        assert version["tag_rules_problem"].startswith("tags.yml line 11: 'hexagon' is not")
        kept = time.monotonic()
        wait_until(lambda: len(load.answers.after(kept)) >= 16, 30, "load", server)
        assert all("new" in names for names in load.answers.after(kept))  # old rules serve
    assert load.answers.failures == []
    assert "tag rules kept, the new file is refused" in server.log.read_text()
    print(f"rules change under 16 clients: new tags after {delay:.3f} s")
