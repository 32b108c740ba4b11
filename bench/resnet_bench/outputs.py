"""``make bench-outputs``: what the embedding and map outputs cost, measured as ratios.

The same weights built twice: the served graph (logits, embedding and feature map from one
forward) and a copy cut down to its logits (the graph before those outputs existed), served in
turn with rounds interleaved, the order flipped every round (A B, B A, A B, ...) so a noisy
neighbour or a drift hurts both alike. Each round:
- logits-only: ``/classify`` at 16 clients;
- three-outputs: ``/classify`` and ``/embed`` at 16 clients, then ``/classify`` and
  ``/explain`` at one client (the heatmap PNG included).
Reported: /classify throughput three-outputs over logits-only (goal >= 0.97), /embed over
/classify throughput (goal within 5%), /explain p50 over /classify p50 at one client (goal
<= 1.3). Writes ``bench/outputs.json``.

    python -m resnet_bench.outputs --out bench [--rounds 4] [--seconds 10]
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from resnet_bench import interleaved
from resnet_bench.images import bench_images
from resnet_bench.jsonable import to_json
from resnet_bench.runner import MAIN_IMAGE, closed_loop_load, machine_info, serving
from resnet_service.config import Settings
from resnet_service.cpus import usable_cpus
from resnet_service.model.artifacts import HEAD_FILE, MODEL_FILES, read_artifact, seal
from resnet_service.model.served import find_or_build

log = logging.getLogger(__name__)


def logits_only_copy(folder: Path, dest: Path) -> Path:
    """``folder``'s artifact with its graph cut to the first output and no head file."""
    manifest, labels = read_artifact(folder)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    model_file = MODEL_FILES[manifest.runtime]
    if manifest.runtime == "openvino":
        import openvino as ov

        model = ov.Core().read_model(str(folder / model_file))
        cut = ov.Model([model.outputs[0]], model.get_parameters(), "logits-only")
        ov.save_model(cut, str(dest / model_file), compress_to_fp16=False)
    else:
        import onnx

        graph = onnx.load(str(folder / model_file))
        del graph.graph.output[1:]
        onnx.save(graph, str(dest / model_file))
    for name in manifest.files:
        if name not in (HEAD_FILE, "artifact.json", "labels.json") and not (dest / name).exists():
            shutil.copy(folder / name, dest / name)
    seal(dest, manifest, labels)
    return dest


def _load(port: int, path: str, clients: int, seconds: float) -> dict[str, Any]:
    image = bench_images([MAIN_IMAGE])[MAIN_IMAGE]
    closed_loop_load(port, path, "image", image, clients, 2.0)  # warm-up
    row: dict[str, Any] = to_json(closed_loop_load(port, path, "image", image, clients, seconds))
    return row


def _round(
    settings: Settings,
    artifacts: list[tuple[str, Path]],
    seconds: float,
    clients: int,
    workdir: Path,
    index: int,
) -> list[dict[str, Any]]:
    rows = []
    loads = {
        "logits-only": [("/classify", clients)],
        "three-outputs": [
            ("/classify", clients),
            ("/embed", clients),
            ("/classify", 1),
            ("/explain", 1),
        ],
    }
    for config, folder in artifacts:
        log_file = workdir / f"{config}.log"
        with serving(settings, usable_cpus(), log_file, artifact_path=folder) as srv:
            for path, c in loads[config]:
                row = _load(srv.port, path, c, seconds)
                rows.append({"round": index, "config": config, "path": path, "clients": c, **row})
    return rows


def _value(rows: list[dict[str, Any]], key: tuple[object, ...], field: str) -> float:
    (row,) = (r for r in rows if (r["round"], r["config"], r["path"], r["clients"]) == key)
    value: float = row[field]
    return value


def _ratios(
    rows: list[dict[str, Any]], top: tuple[str, str, int], bottom: tuple[str, str, int], field: str
) -> dict[str, Any]:
    """``top`` over ``bottom`` within each round (pairs that shared the round's conditions),
    and the median of those ratios."""
    per_round = [
        round(_value(rows, (i, *top), field) / _value(rows, (i, *bottom), field), 3)
        for i in sorted({r["round"] for r in rows})
    ]
    return {"median": round(statistics.median(per_round), 3), "per_round": per_round}


def summarise(rows: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    def median(config: str, path: str, c: int, field: str) -> float:
        values: list[float] = [
            r[field] for r in rows if (r["config"], r["path"], r["clients"]) == (config, path, c)
        ]
        return round(statistics.median(values), 2)

    return {
        "classify_rps": {
            "logits-only": median("logits-only", "/classify", clients, "rps"),
            "three-outputs": median("three-outputs", "/classify", clients, "rps"),
        },
        "embed_rps": median("three-outputs", "/embed", clients, "rps"),
        "one_client_p50_ms": {
            "classify": median("three-outputs", "/classify", 1, "p50_ms"),
            "explain": median("three-outputs", "/explain", 1, "p50_ms"),
        },
        "classify_three_outputs_over_logits_only": _ratios(
            rows,
            ("three-outputs", "/classify", clients),
            ("logits-only", "/classify", clients),
            "rps",
        ),
        "embed_over_classify_throughput": _ratios(
            rows,
            ("three-outputs", "/embed", clients),
            ("three-outputs", "/classify", clients),
            "rps",
        ),
        "explain_over_classify_p50": _ratios(
            rows, ("three-outputs", "/explain", 1), ("three-outputs", "/classify", 1), "p50_ms"
        ),
    }


def measure(settings: Settings, rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    served = find_or_build(settings)
    workdir = Path(tempfile.mkdtemp(prefix="resnet-outputs-"))
    artifacts = [
        ("logits-only", logits_only_copy(served, workdir / "logits-only")),
        ("three-outputs", served),
    ]
    rows: list[dict[str, Any]] = []
    for i in range(rounds):
        log.info("round %d of %d", i + 1, rounds)
        order = artifacts if i % 2 == 0 else artifacts[::-1]
        rows += _round(settings, order, seconds, concurrency, workdir, i)
    return {
        "machine": machine_info(usable_cpus()),
        "runtime": settings.runtime,
        "precision": settings.precision,
        "workers": usable_cpus(),
        "concurrency": concurrency,
        "seconds_per_round": seconds,
        "rounds": rows,
        **summarise(rows, concurrency),
    }


def main() -> None:
    report = interleaved.main(__doc__ or "", measure, "outputs.json")
    for key in (
        "classify_rps",
        "embed_rps",
        "one_client_p50_ms",
        "classify_three_outputs_over_logits_only",
        "embed_over_classify_throughput",
        "explain_over_classify_p50",
    ):
        print(f"{key}: {report[key]}")


if __name__ == "__main__":
    main()
