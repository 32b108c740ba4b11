"""BentoML as ``make bench-peers`` runs it: an image classifier written the way BentoML's
documentation writes one, on the same fp32 weights, under the same load.

``@bentoml.service`` with one worker per usable CPU and one torch thread each,
``@bentoml.api(batchable=True)`` over PIL images (adaptive batching: BentoML's dispatcher
groups concurrent requests), torchvision's reference transforms and fp32 eager torch, as its
users get by default. BentoML lives in a virtual environment of its own (made once, reused),
next to TorchServe's, so its pins never touch the project's.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import httpx
import torch

from resnet_bench.images import BenchImage
from resnet_bench.loadgen import multipart_request
from resnet_bench.peers.load import Probe, ServerResult, drive
from resnet_bench.peers.options import PeerOptions
from resnet_bench.peers.processes import READY_TIMEOUT_S, StartedServer, wait_until
from resnet_bench.peers.venv import ensure_peer_venv
from resnet_bench.servers import free_port, memory_mb, stop_process_group
from resnet_service.cpus import usable_cpus
from resnet_service.model.torch_network import imagenet_labels
from resnet_service.model.weights import ResolvedWeights

BENTOML_VERSION: Final = "1.4.40"
REQUIREMENTS: Final = ("torch==2.14.1", "torchvision==0.29.1", f"bentoml=={BENTOML_VERSION}")
MAX_BATCH_SIZE: Final = 8  # the service's own micro-batch cap: the same batching budget

#: The service, as BentoML's docs write an image classifier (a template: the worker count,
#: batch size and file names are filled in).
SERVICE_PY: Final = '''"""An image classifier as BentoML's documentation writes one (written by make bench-peers)."""

import json
import os

import bentoml
import torch
from PIL.Image import Image
from torchvision.models import ResNet18_Weights, resnet18

HERE = os.path.dirname(os.path.abspath(__file__))


@bentoml.service(workers={workers}, resources={{"cpu": "{workers}"}}, traffic={{"timeout": 60}})
class ResNet18Classifier:
    def __init__(self) -> None:
        torch.set_num_threads(1)  # one per worker: the workers are the parallelism
        self.model = resnet18()
        state = torch.load(os.path.join(HERE, "weights.pt"), weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()
        self.transform = ResNet18_Weights.IMAGENET1K_V1.transforms()
        with open(os.path.join(HERE, "labels.json")) as f:
            self.labels = json.load(f)

    @bentoml.api(batchable=True, max_batch_size={max_batch_size}, max_latency_ms=10000)
    def classify(self, images: list[Image]) -> list[list[dict]]:
        batch = torch.stack([self.transform(image.convert("RGB")) for image in images])
        with torch.inference_mode():
            probabilities = self.model(batch).softmax(dim=1)
        scores, indices = probabilities.topk(5, dim=1)
        return [
            [{{"label": self.labels[i], "score": s}} for s, i in zip(row_s.tolist(), row_i.tolist())]
            for row_s, row_i in zip(scores, indices)
        ]
'''


def write_service(weights: ResolvedWeights, workdir: Path, workers: int) -> Path:
    """The service's folder: ``service.py``, the weights and the labels."""
    folder = workdir / "bentoml-service"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "service.py").write_text(
        SERVICE_PY.format(workers=workers, max_batch_size=MAX_BATCH_SIZE)
    )
    torch.save(weights.state_dict, folder / "weights.pt")
    (folder / "labels.json").write_text(json.dumps(imagenet_labels()))
    return folder


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running_bentoml(bin_dir: Path, folder: Path) -> Iterator[StartedServer]:
    """``bentoml serve`` in its own process group until ready; the group stopped after."""
    port = free_port()
    cmd = [str(bin_dir / "bentoml"), "serve", "service:ResNet18Classifier", "--port", str(port)]
    env = {**os.environ, "BENTOML_HOME": str(folder / ".bentoml"), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with (folder / "bentoml.out").open("wb") as out:
        process = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(lambda: _ready(port), process, READY_TIMEOUT_S, folder)
        yield StartedServer(process, port, round(time.perf_counter() - started, 2))
    finally:
        stop_process_group(process)


def request_bytes(port: int, image: BenchImage) -> bytes:
    """One image in the multipart field the API's parameter names (``images``)."""
    name = f"{image.name}.jpg"
    return multipart_request(
        "127.0.0.1", port, "/classify", "images", name, image.data, image.content_type
    )


def probe_bentoml(port: int, image: BenchImage) -> Probe:
    answer = httpx.post(
        f"http://127.0.0.1:{port}/classify",
        files={"images": (f"{image.name}.jpg", image.data, image.content_type)},
        timeout=60,
    )
    answer.raise_for_status()
    body = answer.json()
    best = (body[0] if body and isinstance(body[0], list) else body)[0]
    return Probe(best["label"], round(best["score"], 4), model="torch fp32")


def bench_bentoml(
    weights: ResolvedWeights, image: BenchImage, opts: PeerOptions, workdir: Path
) -> ServerResult:
    """BentoML in its own venv, one worker per usable CPU, under the same load."""
    peer_python = ensure_peer_venv(opts.bentoml_venv, REQUIREMENTS)
    workers = usable_cpus()
    folder = write_service(weights, workdir, workers)
    layout = (
        f"BentoML {BENTOML_VERSION}, {workers} worker(s) x 1 thread, adaptive batching "
        f"(max {MAX_BATCH_SIZE}), fp32 eager"
    )
    with running_bentoml(peer_python.parent, folder) as srv:
        probe = probe_bentoml(srv.port, image)
        levels = drive(
            srv.port, request_bytes(srv.port, image), opts.concurrencies, opts.duration_s
        )
        memory = memory_mb(srv.process.pid)
    return ServerResult("BentoML", layout, srv.startup_s, probe, levels, memory)
