"""The benchmark's ratios and the goals they are read against (one run, one machine)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

from resnet_bench.loadgen import at
from resnet_bench.results import Measurements

GOALS: Final[dict[str, tuple[str, float]]] = {
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


#: A figure in the ratios table: a ratio, a count, or None where a side had nothing.
Figure = float | int | None


@dataclass(frozen=True)
class GoalCheck:
    goal: str
    value: Figure
    #: None when the figure was not measured in this run (or has no value).
    met: bool | None


@dataclass(frozen=True)
class BenchRatios:
    """The run's named figures (keys name runtimes and concurrencies, so a mapping) and each
    goal read against its figure. In ``bench.json`` they are one flat object with the goals
    under ``"goals"``."""

    figures: dict[str, Figure]
    goals: dict[str, GoalCheck]

    def to_json(self) -> dict[str, Any]:
        return {**self.figures, "goals": {name: asdict(g) for name, g in self.goals.items()}}


def _runtime_ratios(m: Measurements, c: int) -> dict[str, Figure]:
    by_rt = m.service_by_runtime
    default = by_rt[m.default_runtime]
    out: dict[str, Figure] = {}
    for rt, svc in by_rt.items():
        out[f"service_c{c}_rps_{rt}"] = svc.at(c).rps
        out[f"serving_tree_peak_rss_mb_{rt}"] = svc.memory.peak_rss_mb
        out[f"cold_start_s_{rt}"] = svc.cold_start_s
    if "torch" in by_rt:
        torch_svc = by_rt["torch"]
        out["default_runtime_over_torch_int8_service_c16"] = round(
            default.at(c).rps / torch_svc.at(c).rps, 3
        )
        out["cold_start_over_torch_runtime"] = round(
            default.cold_start_s / torch_svc.cold_start_s, 3
        )
    out["serving_tree_peak_rss_mb"] = default.memory.peak_rss_mb
    out["serving_tree_pss_mb"] = default.memory.pss_mb
    return out


def _admission_ratios(m: Measurements) -> dict[str, Figure]:
    """Refusals where there should be none: a burst on an idle replica, closed loops."""
    by_rt = m.service_by_runtime
    burst = {rt: svc.burst.non_200 for rt, svc in by_rt.items()}
    closed = {rt: sum(r.non_200 for r in svc.closed_loop) for rt, svc in by_rt.items()}
    return {
        **{f"burst_64_refused_{rt}": n for rt, n in burst.items()},
        **{f"closed_loop_refused_{rt}": n for rt, n in closed.items()},
        "burst_64_refused_any_runtime": sum(burst.values()),
        "closed_loop_refused_up_to_c64_any_runtime": sum(closed.values()),
    }


def _pipeline_ratios(m: Measurements, runtime: str) -> dict[str, Figure]:
    """The per-image cost against the model's own, and the service against its pipeline."""
    service = m.default_service
    ceiling = m.ceiling_by_runtime[runtime]
    fwd = m.forward_ms_per_image[runtime]["int8"]
    model_only = 1000 / fwd["batch_8"]  # img/s on every CPU, batched as the engine runs it
    # One ceiling process decodes and infers one image at a time on one thread: the time a
    # lone request's work takes in a worker.
    work_ms = 1000 * ceiling.processes / ceiling.images_per_s
    decode = m.decode_ms.get("jpeg-500x375", {})
    out: dict[str, Figure] = {
        "model_only_img_s": round(model_only, 1),
        "ceiling_over_model_only_throughput": round(ceiling.images_per_s / model_only, 3),
        "decode_plus_forward_ms_one_thread": round(work_ms, 2),
        "p50_c1_over_decode_plus_forward": round(service.at(1).p50_ms / work_ms, 3),
    }
    if "served_over_previous" in decode:
        out["decode_500x375_served_over_previous"] = decode["served_over_previous"]
    return out


def _cache_ratios(m: Measurements) -> dict[str, Figure]:
    cache = m.response_cache
    if not cache:
        return {}
    off = cache.distinct_images_cache_off.rps
    return {
        "response_cache_hit_over_cache_off_c16": round(cache.repeated_image_cache_on.rps / off, 2),
        "response_cache_miss_over_cache_off_c16": round(
            cache.distinct_images_cache_on.rps / off, 3
        ),
    }


def _meets(op: str, value: Figure, target: float) -> bool | None:
    if value is None:
        return None
    return value >= target if op == "≥" else value <= target


def compute_ratios(m: Measurements, c: int) -> BenchRatios:
    service = m.default_service
    runtime = service.runtime
    svc_c, svc1 = service.at(c), service.at(1)
    own_ceiling = m.ceiling_by_runtime[runtime].images_per_s
    engine_c = at(m.engine_in_process, c)
    fwd = m.forward_ms_per_image[runtime]
    client_share = svc_c.client_cpu_s / (svc_c.elapsed_s * m.machine["usable_cpus"])
    ratios: dict[str, Figure] = {
        "concurrency_for_c16_figures": c,
        "service_over_ceiling_c16": round(svc_c.rps / own_ceiling, 3),
        "load_generator_cpu_share_c16": round(client_share, 3),
        "service_over_ceiling_c16_client_cpu_excluded": round(
            svc_c.rps / (own_ceiling * (1 - client_share)), 3
        ),
        "service_over_engine_in_process_rps_c16": round(svc_c.rps / engine_c.rps, 3),
        "p99_c16_over_p50_c1": round(svc_c.p99_ms / svc1.p50_ms, 3),
        "littles_law_floor_c16_ms": round(c / svc_c.rps * 1000, 2),
        "p99_c16_over_littles_law_floor": round(svc_c.p99_ms / (c / svc_c.rps * 1000), 3),
        **_runtime_ratios(m, c),
        **_admission_ratios(m),
        **_pipeline_ratios(m, runtime),
        **_cache_ratios(m),
    }
    if "fp32" in fwd:
        ratios["int8_over_fp32_forward_speed_batch_1"] = round(
            fwd["fp32"]["batch_1"] / fwd["int8"]["batch_1"], 2
        )
    oip = service.oip_v2_rest
    if oip:
        ratios["oip_v2_rest_c16_rps"] = oip.rps
        ratios["oip_v2_rest_over_classify_p50_c16"] = round(oip.p50_ms / svc_c.p50_ms, 3)
        ratios["oip_v2_rest_over_classify_p99_c16"] = round(oip.p99_ms / svc_c.p99_ms, 3)
    if m.naive is not None:
        naive_c = m.naive.at(c)
        ratios["service_over_naive_throughput_c16"] = round(svc_c.rps / max(naive_c.rps, 1e-9), 2)
        ratios["naive_over_service_p99_c16"] = round(naive_c.p99_ms / svc_c.p99_ms, 2)
        ratios["naive_peak_rss_mb"] = m.naive.memory.peak_rss_mb
    goals = {
        name: GoalCheck(
            goal=f"{op} {target}",
            value=ratios.get(name),
            met=None if name not in ratios else _meets(op, ratios[name], target),
        )
        for name, (op, target) in GOALS.items()
    }
    return BenchRatios(ratios, goals)
