"""The fine-tuning suite's table from the JSON lines ``RESNET_SUITE_REPORT`` collected.

    RESNET_SUITE_SEEDS=0,1,2 RESNET_SUITE_REPORT=/tmp/suite.jsonl \\
        .venv/bin/pytest -s tests/process/test_training_quality.py
    .venv/bin/python scripts/task_table.py /tmp/suite.jsonl

One row per task: the probe (standardised features), the textbook probe (raw features) and
the served int8 default on the held-out split (mean over seeds), the per-seed gap to each
(served - probe: mean, min, max), fp32, what was trained per seed,
and the fine-tuning wall time (one table for the suite, one for the untuned tasks); then the
mean over tasks, per seed and overall; then the int8
agreement with fp32 per runtime and capped instruction-set level (``isa_task`` rows: the
lowest agreement and the largest accuracy drop over the seeds).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from resnet_bench.tasks import UNTUNED


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def table(rows: list[dict[str, object]]) -> str:
    by_task: dict[str, list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        by_task[str(row["task"])].append(row)
    lines = [
        "| task | probe | textbook probe | default (served int8) | gap to the probe per seed: "
        "mean [min, max] | gap to the textbook probe | fp32 | trained (per seed) | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, runs in sorted(by_task.items()):
        runs.sort(key=lambda r: int(r["seed"]))  # type: ignore[call-overload]
        probe = [float(r["probe_test_accuracy"]) for r in runs]  # type: ignore[arg-type]
        served = [float(r["int8_http_test_accuracy"]) for r in runs]  # type: ignore[arg-type]
        fp32 = [float(r["fp32_test_accuracy"]) for r in runs]  # type: ignore[arg-type]
        textbook = [float(r["textbook_test_accuracy"]) for r in runs]  # type: ignore[arg-type]
        wall = [float(r["finetune_wall_seconds"]) for r in runs]  # type: ignore[arg-type]
        lines.append(
            f"| {task} | {_pct(statistics.mean(probe))} | {_pct(statistics.mean(textbook))} "
            f"| {_pct(statistics.mean(served))} | {_gaps(served, probe)} "
            f"| {_gaps(served, textbook)} | {_pct(statistics.mean(fp32))} "
            f"| {', '.join(str(r['trained']) for r in runs)} | {statistics.mean(wall):.0f} |"
        )
    seeds = sorted({int(r["seed"]) for r in rows})  # type: ignore[call-overload]
    lines.append("")
    for key, name in (("probe_test_accuracy", "probe"), ("textbook_test_accuracy", "textbook")):
        per_seed = []
        for seed in seeds:
            mine = [r for r in rows if r["seed"] == seed]
            gap = statistics.mean(
                float(r["int8_http_test_accuracy"]) - float(r[key])  # type: ignore[arg-type]
                for r in mine
            )
            per_seed.append(f"seed {seed}: {100 * gap:+.2f}")
        lines.append(f"Mean over tasks, served int8 - {name}: " + "; ".join(per_seed))
    return "\n".join(lines)


def _gaps(served: list[float], baseline: list[float]) -> str:
    gaps = [s - b for s, b in zip(served, baseline, strict=True)]
    return f"{100 * statistics.mean(gaps):+.1f} [{100 * min(gaps):+.1f}, {100 * max(gaps):+.1f}]"


def isa_table(rows: list[dict[str, object]]) -> str:
    by_key: dict[tuple[str, str], list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        by_key[(str(row["runtime"]), str(row["level"]))].append(row)
    levels = list(dict.fromkeys(level for _, level in by_key))  # the order they were run in
    lines = [
        f"Int8 against fp32 on {rows[0]['isa_task']}'s held-out images, agreement (lowest over "
        f"{len({r['seed'] for r in rows})} seeds) / accuracy drop in points (largest):",
        "",
        "| runtime | " + " | ".join(levels) + " |",
        "| --- |" + " --- |" * len(levels),
    ]
    for runtime in sorted({runtime for runtime, _ in by_key}):
        cells = []
        for level in levels:
            runs = by_key.get((runtime, level), [])
            agreement = min(float(r["agreement"]) for r in runs)  # type: ignore[arg-type]
            drop = max(float(r["drop"]) for r in runs)  # type: ignore[arg-type]
            cells.append(f"{100 * agreement:.1f}% / {100 * drop:+.1f}")
        lines.append(f"| {runtime} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line]
    tasks = [r for r in rows if "isa_task" not in r]
    for name, members in (
        ("The suite", [r for r in tasks if r["task"] not in UNTUNED]),
        ("Tasks nothing was tuned on", [r for r in tasks if r["task"] in UNTUNED]),
    ):
        if members:
            print(f"{name}:\n")
            print(table(members))
            print()
    isa = [r for r in rows if "isa_task" in r]
    if isa:
        print()
        print(isa_table(isa))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
