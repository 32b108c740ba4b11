"""The benchmark's ratios and the goals they are read against (one run, one machine)."""

from __future__ import annotations

from typing import Any, Final

GOALS: Final = {
    "default_runtime_over_torch_int8_service_c16": ("≥", 1.25),
    "serving_tree_peak_rss_mb": ("≤", 600.0),
    "service_over_naive_throughput_c16": ("≥", 5.0),
    "cold_start_over_torch_runtime": ("≤", 0.5),
    # Issue 18: admission and the per-image cost.
    "burst_64_refused_any_runtime": ("≤", 0),
    "closed_loop_refused_up_to_c64_any_runtime": ("≤", 0),
    "decode_500x375_served_over_previous": ("≤", 0.5),
    "ceiling_over_model_only_throughput": ("≥", 0.5),
    "service_over_ceiling_c16": ("≥", 0.9),
    "p99_c16_over_littles_law_floor": ("≤", 1.5),
    "p50_c1_over_decode_plus_forward": ("≤", 1.3),
    "response_cache_hit_over_cache_off_c16": ("≥", 5.0),
    "response_cache_miss_over_cache_off_c16": ("≥", 0.98),
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


def _admission_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Refusals where there should be none: a burst on an idle replica, closed loops."""
    by_rt = result["service_by_runtime"]
    burst = {rt: svc["burst"]["non_200"] for rt, svc in by_rt.items()}
    closed = {rt: sum(r["non_200"] for r in svc["closed_loop"]) for rt, svc in by_rt.items()}
    return {
        **{f"burst_64_refused_{rt}": n for rt, n in burst.items()},
        **{f"closed_loop_refused_{rt}": n for rt, n in closed.items()},
        "burst_64_refused_any_runtime": sum(burst.values()),
        "closed_loop_refused_up_to_c64_any_runtime": sum(closed.values()),
    }


def _pipeline_ratios(result: dict[str, Any], runtime: str, c: int) -> dict[str, Any]:
    """The per-image cost against the model's own, and the service against its pipeline."""
    service = result["service"][result["service_default_layout"]]
    ceiling = result["ceiling_by_runtime"][runtime]
    fwd = result["forward_ms_per_image"][runtime]["int8"]
    model_only = 1000 / fwd["batch_8"]  # img/s on every CPU, batched as the engine runs it
    # One ceiling process decodes and infers one image at a time on one thread: the time a
    # lone request's work takes in a worker.
    work_ms = 1000 * ceiling["processes"] / ceiling["images_per_s"]
    decode = result["decode_ms"].get("jpeg-500x375", {})
    out = {
        "model_only_img_s": round(model_only, 1),
        "ceiling_over_model_only_throughput": round(ceiling["images_per_s"] / model_only, 3),
        "decode_plus_forward_ms_one_thread": round(work_ms, 2),
        "p50_c1_over_decode_plus_forward": round(
            _at(service["closed_loop"], 1)["p50_ms"] / work_ms, 3
        ),
    }
    if "served_over_previous" in decode:
        out["decode_500x375_served_over_previous"] = decode["served_over_previous"]
    return out


def _cache_ratios(result: dict[str, Any]) -> dict[str, Any]:
    cache = result.get("response_cache")
    if not cache:
        return {}
    off = cache["distinct_images_cache_off"]["rps"]
    return {
        "response_cache_hit_over_cache_off_c16": round(
            cache["repeated_image_cache_on"]["rps"] / off, 2
        ),
        "response_cache_miss_over_cache_off_c16": round(
            cache["distinct_images_cache_on"]["rps"] / off, 3
        ),
    }


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
        **_admission_ratios(result),
        **_pipeline_ratios(result, runtime, c),
        **_cache_ratios(result),
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
