"""The benchmark's ratios and the goals they are read against (one run, one machine)."""

from __future__ import annotations

from typing import Any, Final

GOALS: Final = {
    "default_runtime_over_torch_int8_service_c16": ("≥", 1.25),
    "serving_tree_peak_rss_mb": ("≤", 600.0),
    "service_over_naive_throughput_c16": ("≥", 5.0),
    "service_over_ceiling_c16": ("≥", 0.85),
    "cold_start_over_torch_runtime": ("≤", 0.5),
}


def _at(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    return next(r for r in rows if r["concurrency"] == concurrency)


def _runtime_ratios(result: dict[str, Any], c: int) -> dict[str, Any]:
    by_rt = result["service_by_runtime"]
    default = by_rt[result["default_runtime"]]
    out: dict[str, Any] = {}
    for rt, svc in by_rt.items():
        out[f"service_c{c}_rps_{rt}"] = _at(svc["closed_loop"], c)["rps"]
        out[f"serving_tree_peak_rss_mb_{rt}"] = svc["memory"]["peak_rss_mb"]
        out[f"cold_start_s_{rt}"] = svc["cold_start_s"]
    if "torch" in by_rt:
        torch_svc = by_rt["torch"]
        out["default_runtime_over_torch_int8_service_c16"] = round(
            _at(default["closed_loop"], c)["rps"] / _at(torch_svc["closed_loop"], c)["rps"], 3
        )
        out["cold_start_over_torch_runtime"] = round(
            default["cold_start_s"] / torch_svc["cold_start_s"], 3
        )
    out["serving_tree_peak_rss_mb"] = default["memory"]["peak_rss_mb"]
    out["serving_tree_pss_mb"] = default["memory"].get("pss_mb")
    return out


def compute_ratios(result: dict[str, Any], c: int) -> dict[str, Any]:
    service = result["service"][result["service_default_layout"]]
    runtime = service["runtime"]
    svc_c, svc1 = _at(service["closed_loop"], c), _at(service["closed_loop"], 1)
    own_ceiling = result["ceiling_by_runtime"][runtime]["images_per_s"]
    engine_c = _at(result["engine_in_process"], c)
    fwd = result["forward_ms_per_image"][runtime]
    client_share = svc_c["client_cpu_s"] / (svc_c["elapsed_s"] * result["machine"]["usable_cpus"])
    ratios: dict[str, Any] = {
        "concurrency_for_c16_figures": c,
        "service_over_ceiling_c16": round(svc_c["rps"] / own_ceiling, 3),
        "load_generator_cpu_share_c16": round(client_share, 3),
        "service_over_ceiling_c16_client_cpu_excluded": round(
            svc_c["rps"] / (own_ceiling * (1 - client_share)), 3
        ),
        "service_over_engine_in_process_rps_c16": round(svc_c["rps"] / engine_c["rps"], 3),
        "p99_c16_over_p50_c1": round(svc_c["p99_ms"] / svc1["p50_ms"], 3),
        "littles_law_floor_c16_ms": round(c / svc_c["rps"] * 1000, 2),
        "p99_c16_over_littles_law_floor": round(svc_c["p99_ms"] / (c / svc_c["rps"] * 1000), 3),
        **_runtime_ratios(result, c),
    }
    if "fp32" in fwd:
        ratios["int8_over_fp32_forward_speed_batch_1"] = round(
            fwd["fp32"]["batch_1"] / fwd["int8"]["batch_1"], 2
        )
    oip = service.get("oip_v2_rest")
    if oip:
        ratios["oip_v2_rest_c16_rps"] = oip["rps"]
        ratios["oip_v2_rest_over_classify_p50_c16"] = round(oip["p50_ms"] / svc_c["p50_ms"], 3)
        ratios["oip_v2_rest_over_classify_p99_c16"] = round(oip["p99_ms"] / svc_c["p99_ms"], 3)
    if "naive" in result:
        naive_c = _at(result["naive"]["closed_loop"], c)
        ratios["service_over_naive_throughput_c16"] = round(
            svc_c["rps"] / max(naive_c["rps"], 1e-9), 2
        )
        ratios["naive_over_service_p99_c16"] = round(naive_c["p99_ms"] / svc_c["p99_ms"], 2)
        ratios["naive_peak_rss_mb"] = result["naive"]["memory"]["peak_rss_mb"]
    compare = {"≥": lambda v, t: v >= t, "≤": lambda v, t: v <= t}
    ratios["goals"] = {
        name: {
            "goal": f"{op} {target}",
            "value": ratios.get(name),
            "met": None if name not in ratios else compare[op](ratios[name], target),
        }
        for name, (op, target) in GOALS.items()
    }
    return ratios
