"""The benchmark's table (stdout, README) and chart (PNG)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_HEAD = "| server | image | load | clients | req/s | p50 ms | p90 ms | p99 ms | non-200 / errors |"


def _load(row: dict[str, Any]) -> str:
    return f"rate {row['rate']}/s" if row["rate"] is not None else str(row["concurrency"])


def _rows(name: str, rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"| {name} | {r.get('image', '')} | {r['mode']} | {_load(r)} | {r['rps']} | "
        f"{r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['non_200']} / {r['errors']} |"
        for r in rows
    ]


def _service_rows(result: dict[str, Any]) -> list[str]:
    lines = [_HEAD, "|---|---|---|---|---|---|---|---|---|"]
    seen: set[str] = set()
    services = [*result["service_by_runtime"].values(), *result["service"].values()]
    for svc in services:
        if svc["layout"] in seen:
            continue
        seen.add(svc["layout"])
        rows = svc["closed_loop"] + [svc["open_loop"]] + svc["other_images"]
        lines += _rows(f"service ({svc['layout']})", rows)
        if svc.get("oip_v2_rest"):
            lines += _rows(f"service ({svc['layout']}), OIP v2 REST infer", [svc["oip_v2_rest"]])
    lines += _rows("engine in-process (no HTTP)", result["engine_in_process"])
    if "naive" in result:
        lines += _rows("naive Flask baseline", result["naive"]["closed_loop"])
    return lines


def _runtime_rows(result: dict[str, Any]) -> list[str]:
    lines = [
        "| runtime | forward int8 ms/img b1 / b8 | fp32 b1 / b8 | ceiling img/s | service c16 "
        "req/s | tree peak RSS MB | cold start s | requests per worker | int8 top-1 agreement "
        "(digits) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fidelity = result.get("fidelity", {}).get("runtimes", {})
    c = result["ratios"]["concurrency_for_c16_figures"]
    for rt, svc in result["service_by_runtime"].items():
        fwd = result["forward_ms_per_image"][rt]
        c16 = next(r for r in svc["closed_loop"] if r["concurrency"] == c)
        fid = fidelity.get(rt)
        agreement = (
            f"{fid['top1_agreement']:.3f} (acc {fid['fp32_accuracy']:.3f} -> "
            f"{fid['int8_accuracy']:.3f}){' at ' + fid['isa'] if fid.get('isa') else ''}"
            if fid
            else "-"
        )
        fp32 = fwd.get("fp32", {"batch_1": "-", "batch_8": "-"})
        lines.append(
            f"| {rt} | {fwd['int8']['batch_1']} / {fwd['int8']['batch_8']} | "
            f"{fp32['batch_1']} / {fp32['batch_8']} | "
            f"{result['ceiling_by_runtime'][rt]['images_per_s']} | {c16['rps']} | "
            f"{svc['memory']['peak_rss_mb']} | {svc['cold_start_s']} | "
            f"{svc['requests_per_worker']} | {agreement} |"
        )
    return lines


def _choice_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for what in ("runtime", "layout"):
        choice = result.get(f"{what}_choice")
        if choice is None:
            continue
        rounds = "; ".join(
            f"{name} {' / '.join(str(v) for v in rps)} (median {choice['median_rps'][name]})"
            for name, rps in choice["rps"].items()
        )
        lines += [
            "",
            f"The {what} chosen by {choice['rounds']} interleaved rounds at "
            f"{choice['concurrency']} clients, req/s: {rounds}.",
        ]
    return lines


def render_table(result: dict[str, Any]) -> str:
    """Markdown: the machine, runtimes, throughput/latency rows, ratios against goals."""
    m = result["machine"]
    versions = m["versions"]
    lines = [
        f"Benchmark {result['date']} on {m['cpu']} ({m['usable_cpus']} usable CPUs); torch "
        f"{versions['torch']}, openvino {versions['openvino']}, onnxruntime "
        f"{versions['onnxruntime']}{' [QUICK MODE]' if result['quick'] else ''}",
        "",
        f"Default runtime chosen: **{result['default_runtime']}**; default layout: "
        f"{result['service'][result['service_default_layout']]['layout']}",
        *_choice_lines(result),
        "",
        *_runtime_rows(result),
        "",
        *_service_rows(result),
    ]
    mem_rows = [(f"service {s['layout']}", s["memory"]) for s in result["service"].values()]
    if "naive" in result:
        mem_rows.append(("naive baseline", result["naive"]["memory"]))
    lines += [
        "",
        "| memory (after the load) | processes | peak RSS MB | RSS MB | anon RSS MB | PSS MB |",
        "|---|---|---|---|---|---|",
        *(
            f"| {n} | {mm['processes']} | {mm['peak_rss_mb']} | {mm['rss_mb']} | "
            f"{mm['rss_anon_mb']} | {mm.get('pss_mb', '')} |"
            for n, mm in mem_rows
        ),
        "",
        "| ratio | value | goal | met |",
        "|---|---|---|---|",
    ]
    goals = result["ratios"]["goals"]
    for key, value in result["ratios"].items():
        if key == "goals":
            continue
        goal = goals.get(key)
        met = "" if not goal or goal["met"] is None else ("yes" if goal["met"] else "NO")
        lines.append(f"| {key} | {value} | {goal['goal'] if goal else ''} | {met} |")
    return "\n".join(lines)


def render_chart(result: dict[str, Any], path: Path) -> None:
    """Throughput and latency vs concurrency per runtime, with the naive baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no chart")
        return
    fig, (thr, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [
        (f"service, {s['layout']}", s["closed_loop"]) for s in result["service_by_runtime"].values()
    ]
    if "naive" in result:
        series.append(("naive Flask baseline", result["naive"]["closed_loop"]))
    for name, rows in series:
        conc = [r["concurrency"] for r in rows]
        thr.plot(conc, [r["rps"] for r in rows], marker="o", label=name)
        lat.plot(conc, [r["p50_ms"] for r in rows], marker="o", label=f"{name} p50")
        lat.plot(conc, [r["p99_ms"] for r in rows], marker="x", ls="--", label=f"{name} p99")
    for rt, row in result["ceiling_by_runtime"].items():
        thr.axhline(row["images_per_s"], ls=":", lw=0.8, color="grey")
        thr.annotate(f"{rt} ceiling", (1, row["images_per_s"]), fontsize=6)
    for ax in (thr, lat):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
    thr.set_ylabel("requests/s (200 only)")
    thr.set_title("Throughput, 500x375 JPEG")
    lat.set_yscale("log")
    lat.set_ylabel("latency of 200s, ms")
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
