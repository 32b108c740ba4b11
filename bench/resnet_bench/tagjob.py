"""The tag job against this machine's limit for it and against a loop over ``/classify/batch``,
in one run (``make bench-tag``; writes bench/tagjob.json).

- The limit: usable cores / (decode + preprocess + the batch-8 forward, per image, on one
  thread), each measured here, now, with the job's own code (``Tagger``) on the same model.
- The job: ``resnet-service tag`` over a folder of the same images, images/s once its workers
  are ready (its own summary line), and the peak RSS of its process tree.
- The loop: ``serve`` with one worker per core and as many keep-alive clients as workers, each
  posting 8 images a request to ``/classify/batch`` (the raw-socket load generator; its CPU
  share is reported).
- Ray: a one-node Ray cluster on 127.0.0.1 with every CPU: our ``tag --ray`` against the
  local job, and Ray Data's documented batch-inference recipe (``read_images`` -> ``map`` with
  torchvision's transforms -> ``map_batches`` of a torchvision ResNet18 in fp32 in one actor ->
  ``write_parquet``), on the same images (seeded random weights: speed does not depend on
  them, and none can be downloaded here).
- Memory: the job's peak RSS over a small and a large library (symlinks to the same files, so
  only the listing and the committed index grow).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from resnet_bench import loadgen
from resnet_bench.images import _photo
from resnet_bench.servers import free_port, running, stop_process_group, tree_memory
from resnet_service.config import load_settings
from resnet_service.cpus import cpu_name, usable_cpus
from resnet_service.faces.tag.sources import walk
from resnet_service.faces.tag.worker import Decoded, Tagger, WorkerSpec, open_model

SIZES = {"jpeg-500x375": (500, 375), "jpeg-4032x3024": (4032, 3024)}


@dataclass(frozen=True)
class Limit:
    decode_ms: float
    forward_b8_ms: float
    cores: int

    @property
    def images_per_s(self) -> float:
        return self.cores * 1000 / (self.decode_ms + self.forward_b8_ms)


@dataclass(frozen=True)
class JobRun:
    images: int
    images_per_s: float
    startup_s: float
    peak_rss_mb: float


def make_library(folder: Path, size: tuple[int, int], count: int) -> list[Path]:
    """``count`` JPEGs of one photo at ``size``, of varying quality (distinct bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = _photo().resize(size, Image.Resampling.BICUBIC)
    paths = []
    for i in range(count):
        path = folder / f"img-{i:06d}.jpg"
        photo.save(path, "JPEG", quality=80 + i % 16)
        paths.append(path)
    return paths


def measure_limit(artifact: Path, folder: Path, samples: int = 64) -> Limit:
    """Decode and batch-8 forward, per image, one thread, with the job's code."""
    settings = load_settings(artifact_path=artifact)
    spec = WorkerSpec(settings, None, 5, False)
    model = open_model(spec)
    model.runtime.bind_thread()
    tagger = Tagger(model, spec)
    tagger.warm()
    items = list(walk(str(folder)))[:samples]
    started = time.perf_counter()
    decoded = [tagger.decode(item) for item in items]
    decode_ms = (time.perf_counter() - started) * 1000 / len(items)
    pixels = np.stack([d.pixels for d in decoded[:8] if isinstance(d, Decoded)])
    rounds = max(4, samples // 8)
    started = time.perf_counter()
    for _ in range(rounds):
        tagger._forward_pixels(pixels)
    forward_ms = (time.perf_counter() - started) * 1000 / (rounds * 8)
    model.runtime.close()
    return Limit(round(decode_ms, 2), round(forward_ms, 2), usable_cpus())


def tag_command(artifact: Path, out: Path, *args: str) -> list[str]:
    """``resnet-service tag`` from scratch into ``out``."""
    return [
        sys.executable,
        "-m",
        "resnet_service",
        "tag",
        "--artifact",
        str(artifact),
        "--no-progress",
        "--overwrite",
        "--out",
        str(out),
        *args,
    ]


def run_job(artifact: Path, sources: list[str], out: Path) -> JobRun:
    """One ``tag`` run from scratch; its summary and the peak RSS of its process tree."""
    cmd = tag_command(artifact, out, *sources)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], tree_memory(proc.pid).rss_mb)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.join()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    if summary["exit_code"] != 0:
        raise RuntimeError(f"tag failed: {summary}")
    return JobRun(summary["tagged"], summary["images_per_s"], summary["startup_s"], peak[0])


def batch_request(port: int, images: list[bytes]) -> bytes:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
                f'filename="i{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
            for i, data in enumerate(images)
        )
        + f"--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /classify/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


def batch_loop(
    artifact: Path, images: list[bytes], duration_s: float, log: Path
) -> dict[str, float]:
    """``serve`` (one worker per core) and a client per worker posting 8 images a request."""
    workers = usable_cpus()
    cmd = [
        sys.executable,
        "-m",
        "resnet_service",
        "serve",
        "--artifact",
        str(artifact),
        "--workers",
        str(workers),
        "--grpc-port",
        "0",
    ]
    with running(cmd, {}, "/readyz", log) as server:
        payloads = [
            batch_request(server.port, images[i : i + 8]) for i in range(0, len(images) - 7, 8)
        ]
        result = asyncio.run(
            loadgen.closed_loop("127.0.0.1", server.port, payloads, workers, duration_s)
        )
    return {
        "requests_per_s": round(result.ok / result.elapsed_s, 1),
        "images_per_s": round(8 * result.ok / result.elapsed_s, 1),
        "failed": result.errors + sum(n for s, n in result.statuses.items() if s != 200),
        "client_cpu_share": round(result.client_cpu_s / (result.elapsed_s * usable_cpus()), 3),
    }


RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@contextmanager
def local_ray(cores: int) -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node Ray cluster on 127.0.0.1 (``ray start --head --block`` in its own process
    group); yields its address and the environment that reaches it."""
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": tmp}
    address = f"127.0.0.1:{free_port()}"
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            address.split(":")[1],
            "--num-cpus",
            str(cores),
            "--object-store-memory",
            str(300 * 2**20),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        probe = [sys.executable, "-c", f"import ray; ray.init(address={address!r}); ray.shutdown()"]
        deadline = time.monotonic() + 120
        while subprocess.run(probe, env=env, capture_output=True, check=False).returncode:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the local Ray cluster did not start")
        yield address, env
    finally:
        stop_process_group(proc)
        subprocess.run(["rm", "-rf", tmp], check=False)


def ray_job(artifact: Path, lib: Path, out: Path, address: str, env: dict[str, str]) -> float:
    """``tag --ray`` from scratch on the cluster: its images/s."""
    done = subprocess.run(
        tag_command(artifact, out, "--ray", address, str(lib)),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rate: float = json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]
    return rate


_RECIPE = """
import sys, time, numpy as np, ray, torch
from torchvision.models import resnet18, ResNet18_Weights
ray.init(address=sys.argv[1])
ray.data.DataContext.get_current().enable_progress_bars = False
transform = ResNet18_Weights.IMAGENET1K_V1.transforms()
def preprocess(row):
    image = torch.from_numpy(row["image"]).permute(2, 0, 1)
    row["transformed"] = transform(image).numpy()
    return row
class ResnetModel:
    def __init__(self):
        torch.manual_seed(0)
        self.model = resnet18(weights=None).eval()
    def __call__(self, batch):
        with torch.inference_mode():
            prediction = self.model(torch.from_numpy(batch["transformed"]))
        return {"predicted_label": prediction.argmax(dim=1).numpy()}
started = time.perf_counter()
ds = ray.data.read_images(sys.argv[2], mode="RGB").map(preprocess)
ds = ds.map_batches(ResnetModel, concurrency=1, batch_size=16)
ds.write_parquet(sys.argv[3])
print(time.perf_counter() - started)
"""


def ray_recipe(lib: Path, out: Path, address: str, env: dict[str, str]) -> float:
    """Ray Data's documented batch-inference recipe on ``lib``: its images/s."""
    done = subprocess.run(
        [sys.executable, "-c", _RECIPE, address, str(lib), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    seconds = float(done.stdout.strip().splitlines()[-1])
    return len(list(lib.iterdir())) / seconds


def memory_runs(artifact: Path, source: Path, sizes: list[int], work: Path) -> dict[str, float]:
    """Peak RSS of the job over ``sizes`` inputs (symlinks to ``source``'s files)."""
    files = sorted(source.iterdir())
    out: dict[str, float] = {}
    for size in sizes:
        folder = work / f"links-{size}"
        folder.mkdir()
        for i in range(size):
            os.symlink(files[i % len(files)], folder / f"l{i:07d}.jpg")
        run = run_job(artifact, [str(folder)], work / f"out-links-{size}")
        out[str(size)] = run.peak_rss_mb
        print(
            f"  {size} inputs: peak RSS {run.peak_rss_mb:.0f} MB, {run.images_per_s} img/s",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifact", type=Path, required=True, help="a quantize --out folder")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--large-images", type=int, default=240)
    parser.add_argument("--loop-seconds", type=float, default=20.0)
    parser.add_argument(
        "--memory-sizes",
        default="10000,100000",
        help="library sizes for the peak-RSS runs ('' to skip)",
    )
    args = parser.parse_args(argv)
    report: dict[str, object] = {"cpu": cpu_name(), "cores": usable_cpus()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, size in SIZES.items():
            count = args.images if size[0] < 1000 else args.large_images
            lib = work / name
            paths = make_library(lib, size, count)
            limit = measure_limit(args.artifact, lib)
            job = run_job(args.artifact, [str(lib)], work / f"out-{name}")
            entry: dict[str, object] = {
                "limit": {**asdict(limit), "images_per_s": round(limit.images_per_s, 1)},
                "job": asdict(job),
                "job_vs_limit": round(job.images_per_s / limit.images_per_s, 3),
            }
            if size[0] < 1000:
                with local_ray(usable_cpus()) as (address, env):
                    on_ray = ray_job(args.artifact, lib, work / "out-ray", address, env)
                    recipe = ray_recipe(lib, work / "out-recipe", address, env)
                entry["ray_job_images_per_s"] = on_ray
                entry["ray_job_vs_job"] = round(on_ray / job.images_per_s, 2)
                entry["ray_data_recipe_images_per_s"] = round(recipe, 1)
                entry["job_vs_ray_data_recipe"] = round(job.images_per_s / recipe, 1)
                loop = batch_loop(
                    args.artifact,
                    [p.read_bytes() for p in paths],
                    args.loop_seconds,
                    work / "serve.log",
                )
                entry["classify_batch_loop"] = loop
                entry["job_vs_loop"] = round(job.images_per_s / loop["images_per_s"], 2)
            report[name] = entry
            print(f"{name}: {json.dumps(entry)}", flush=True)
        sizes = [int(s) for s in args.memory_sizes.split(",") if s]
        if sizes:
            report["peak_rss_mb_by_inputs"] = memory_runs(
                args.artifact, work / "jpeg-500x375", sizes, work
            )
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "tagjob.json"
    if not sizes and target.exists():  # memory not measured this time: keep the last figures
        previous = json.loads(target.read_text())
        for key in ("peak_rss_mb_by_inputs", "memory_measured_on"):
            if key in previous:
                report[key] = previous[key]
    elif sizes:
        report["memory_measured_on"] = time.strftime("%Y-%m-%d")
    target.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
