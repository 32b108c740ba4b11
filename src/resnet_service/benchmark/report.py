"""The benchmark's table (stdout, README) and chart (PNG)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _load(row: dict[str, Any]) -> str:
    return f"rate {row['rate']}/s" if row["rate"] is not None else str(row["concurrency"])


def _rows(name: str, rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"| {name} | {r.get('image', '')} | {r['mode']} | {_load(r)} | {r['rps']} | "
        f"{r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['errors'] + r['non_200']} |"
        for r in rows
    ]


def render_table(result: dict[str, Any]) -> str:
    """Markdown: the machine, throughput/latency rows, the ceiling, ratios against goals."""
    m = result["machine"]
    lines = [
        f"Benchmark {result['date']} on {m['cpu']} ({m['usable_cpus']} usable CPUs), "
        f"torch {m['versions']['torch']}{' [QUICK MODE]' if result['quick'] else ''}",
        "",
        "| server | image | load | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for svc in result["service"].values():
        name = f"service ({svc['layout']})"
        lines += _rows(name, svc["closed_loop"] + [svc["open_loop"]] + svc["other_images"])
    lines += _rows("engine in-process (no HTTP)", result["ceiling"]["engine_in_process"])
    if "naive" in result:
        lines += _rows("naive Flask baseline", result["naive"]["closed_loop"])
    ceiling = result["ceiling"]
    lines += ["", "| engine ceiling (decode + int8 forward, no HTTP) | img/s |", "|---|---|"]
    lines += [f"| {layout['layout']} | {layout['images_per_s']} |" for layout in ceiling["layouts"]]
    lines += [
        f"| best layout, fp32 | {ceiling['best_layout_fp32_images_per_s']} |",
        *(
            f"| best layout, {k} | {v} |"
            for k, v in ceiling["best_layout_images_per_s_by_image"].items()
        ),
    ]
    fwd = result["forward_ms_per_image"]
    lines += [
        "",
        "| model forward, ms/image | batch 1 | batch 8 |",
        "|---|---|---|",
        *(f"| {p} | {v['batch_1']} | {v['batch_8']} |" for p, v in fwd.items()),
    ]
    mem_rows = [(f"service {s['layout']}", s["memory"]) for s in result["service"].values()]
    if "naive" in result:
        mem_rows.append(("naive baseline", result["naive"]["memory"]))
    lines += [
        "",
        "| memory | processes | peak RSS MB | RSS MB | anon RSS MB |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {mm['processes']} | {mm['peak_rss_mb']} | {mm['rss_mb']} | {mm['rss_anon_mb']} |"
        for n, mm in mem_rows
    ]
    ratios = result["ratios"]
    lines += [
        "",
        f"Default layout chosen: {result['service_default_layout']}",
        "",
        "| ratio | value | goal | met |",
        "|---|---|---|---|",
    ]
    goals = ratios["goals"]
    for key, value in ratios.items():
        if key == "goals":
            continue
        goal = goals.get(key)
        lines.append(
            f"| {key} | {value} | {goal['goal'] if goal else ''} | "
            f"{'' if not goal or goal['met'] is None else ('yes' if goal['met'] else 'NO')} |"
        )
    return "\n".join(lines)


def render_chart(result: dict[str, Any], path: Path) -> None:
    """Throughput and latency percentiles vs concurrency, service vs naive vs ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no chart")
        return
    fig, (thr, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [(f"service, {s['layout']}", s["closed_loop"]) for s in result["service"].values()]
    series.append(("engine in-process (no HTTP)", result["ceiling"]["engine_in_process"]))
    if "naive" in result:
        series.append(("naive Flask baseline", result["naive"]["closed_loop"]))
    for name, rows in series:
        conc = [r["concurrency"] for r in rows]
        thr.plot(conc, [r["rps"] for r in rows], marker="o", label=name)
        if not name.startswith("engine"):
            lat.plot(conc, [r["p50_ms"] for r in rows], marker="o", label=f"{name} p50")
            lat.plot(conc, [r["p99_ms"] for r in rows], marker="x", ls="--", label=f"{name} p99")
    best = result["ceiling"]["best_layout_int8_images_per_s"]
    thr.axhline(best, color="grey", ls=":", label=f"ceiling {best} img/s")
    for ax in (thr, lat):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
    thr.set_ylabel("requests/s")
    thr.set_title(f"Throughput, {result['ceiling']['image']} JPEG")
    lat.set_yscale("log")
    lat.set_ylabel("latency, ms")
    lat.set_title("Latency percentiles")
    thr.legend(fontsize=7)
    lat.legend(fontsize=6)
    m = result["machine"]
    fig.suptitle(
        f"resnet-service, {result['date'][:10]}, {m['cpu']} ({m['usable_cpus']} CPUs)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
