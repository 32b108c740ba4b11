"""The deployment files, through ``tools/deploy_lint.py``: the tool passes on this repository
(run as users run it, and lint by lint), and its checks catch deliberately broken manifests and
Dockerfiles, so none of them can pass vacuously."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from typing import Final

import pytest
from tools.deploy_lint import (
    CHECKS,
    DOCKERFILE,
    LINTS,
    Obj,
    Workload,
    custom_metric_problems,
    dockerignored,
    final_stage_problems,
    inferenceservice_problems,
    of_kind,
    only,
    rayjob_problems,
    render,
    schema_problems,
    slim_problems,
    wiring_problems,
    workloads,
)

from resnet_service.config import ENV_PREFIX
from tests.harness import ROOT


def test_the_tool_passes_on_this_repository() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.deploy_lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok  ") == len(LINTS)


@pytest.mark.parametrize("lint", LINTS)
def test_lint(lint: str) -> None:
    assert LINTS[lint]() == []


# --- tests: the checks themselves catch what they are for ---------------------------------
def base_workload() -> Workload:
    return copy.deepcopy(workloads(render("base"))[0])


def set_env(w: Workload, name: str, value: str) -> None:
    env = w.container.setdefault("env", [])
    env[:] = [e for e in env if e["name"] != name] + [{"name": name, "value": value}]


def _short_grace(w: Workload) -> None:
    w.pod_spec["terminationGracePeriodSeconds"] = 45


def _long_drain(w: Workload) -> None:
    set_env(w, ENV_PREFIX + "DRAIN_DELAY_S", "20")


def _no_prestop(w: Workload) -> None:
    del w.container["lifecycle"]


def _fractional_cpu(w: Workload) -> None:
    w.container["resources"] = {"requests": {"cpu": "1500m", "memory": "2Gi"}}
    w.container["resources"]["limits"] = {"cpu": "1500m", "memory": "2Gi"}


def _burstable(w: Workload) -> None:
    w.container["resources"]["requests"]["cpu"] = "1"


def _oversubscribed(w: Workload) -> None:
    set_env(w, ENV_PREFIX + "INFERENCE_THREADS", "2")


def _auto_workers(w: Workload) -> None:
    set_env(w, ENV_PREFIX + "WORKERS", "0")


def _writable_root(w: Workload) -> None:
    w.container["securityContext"]["readOnlyRootFilesystem"] = False


def _keeps_capabilities(w: Workload) -> None:
    w.container["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}


def _no_tmp(w: Workload) -> None:
    w.container["volumeMounts"] = []


def _cache_on_root(w: Workload) -> None:
    set_env(w, ENV_PREFIX + "MODEL_CACHE_DIR", "/models/cache")


def _typo_setting(w: Workload) -> None:
    set_env(w, ENV_PREFIX + "WORKER", "2")


def _bad_value(w: Workload) -> None:
    set_env(w, ENV_PREFIX + "DRAIN_DELAY_S", "soon")


def _service_links(w: Workload) -> None:
    del w.pod_spec["enableServiceLinks"]


def _probe_typo(w: Workload) -> None:
    w.container["readinessProbe"]["httpGet"]["path"] = "/ready"


def _liveness_on_readyz(w: Workload) -> None:
    w.container["livenessProbe"]["httpGet"]["path"] = "/readyz"


def _probe_wrong_port(w: Workload) -> None:
    w.container["startupProbe"]["httpGet"]["port"] = "grpc"


def _no_startup_probe(w: Workload) -> None:
    del w.container["startupProbe"]


def _port_moved(w: Workload) -> None:
    set_env(w, ENV_PREFIX + "PORT", "9000")


def _loopback(w: Workload) -> None:
    set_env(w, ENV_PREFIX + "HOST", "127.0.0.1")


MUTATIONS: Final[dict[str, tuple[Callable[[Workload], None], str]]] = {
    "grace period too short": (_short_grace, "shutdown"),
    "drain longer than the grace period allows": (_long_drain, "shutdown"),
    "no preStop": (_no_prestop, "shutdown"),
    "fractional CPU": (_fractional_cpu, "resources"),
    "requests below limits": (_burstable, "resources"),
    "threads oversubscribe CPUs": (_oversubscribed, "resources"),
    "workers left to auto": (_auto_workers, "resources"),
    "writable root": (_writable_root, "security"),
    "capabilities kept": (_keeps_capabilities, "security"),
    "no writable /tmp": (_no_tmp, "security"),
    "cache on the read-only root": (_cache_on_root, "security"),
    "unknown setting": (_typo_setting, "env"),
    "invalid value": (_bad_value, "env"),
    "service links on": (_service_links, "env"),
    "probe path typo": (_probe_typo, "probes"),
    "liveness on readiness": (_liveness_on_readyz, "probes"),
    "probe on the gRPC port": (_probe_wrong_port, "probes"),
    "no startup probe": (_no_startup_probe, "probes"),
    "port moved but not the container port": (_port_moved, "ports"),
    "bound to loopback": (_loopback, "ports"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_checks_catch_broken_pod_templates(mutation: str) -> None:
    mutate, check = MUTATIONS[mutation]
    w = base_workload()
    assert CHECKS[check](w) == []
    mutate(w)
    assert CHECKS[check](w) != []


def _mutated_base(mutate: Callable[[list[Obj]], None]) -> tuple[Obj, ...]:
    objects = copy.deepcopy(list(render("base")))
    mutate(objects)
    return tuple(objects)


def _pdb_elsewhere(objects: list[Obj]) -> None:
    of_kind(objects, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"] = {"app": "x"}


def _hpa_elsewhere(objects: list[Obj]) -> None:
    of_kind(objects, "HorizontalPodAutoscaler")[0]["spec"]["scaleTargetRef"]["name"] = "other"


def _policy_opens_all(objects: list[Obj]) -> None:
    of_kind(objects, "NetworkPolicy")[0]["spec"]["ingress"] = [{}]


def _service_port_dangling(objects: list[Obj]) -> None:
    of_kind(objects, "Service")[0]["spec"]["ports"][1]["targetPort"] = "h2c"


def _replicas_pinned(objects: list[Obj]) -> None:
    of_kind(objects, "Deployment")[0]["spec"]["replicas"] = 3


WIRING_MUTATIONS: Final = {
    "PDB selects other pods": _pdb_elsewhere,
    "HPA targets another Deployment": _hpa_elsewhere,
    "NetworkPolicy opens every port": _policy_opens_all,
    "Service port targets nothing": _service_port_dangling,
    "replicas pinned beside the HPA": _replicas_pinned,
}


@pytest.mark.parametrize("mutation", WIRING_MUTATIONS)
def test_checks_catch_broken_wiring(mutation: str) -> None:
    assert wiring_problems(_mutated_base(WIRING_MUTATIONS[mutation])) != []


def test_strict_validation_refuses_unknown_fields() -> None:
    deployment = copy.deepcopy(only(of_kind(render("base"), "Deployment"), "Deployment"))
    assert schema_problems(deployment) == []
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    assert schema_problems(deployment) != []


def test_kserve_check_refuses_a_bad_predictor() -> None:
    isvc = copy.deepcopy(only(of_kind(render("kserve"), "InferenceService"), "InferenceService"))
    isvc["spec"]["predictor"]["minReplica"] = 2  # a typo: neither KServe's nor a PodSpec field
    assert any("minReplica" in p for p in inferenceservice_problems(isvc))
    isvc = copy.deepcopy(only(of_kind(render("kserve"), "InferenceService"), "InferenceService"))
    isvc["spec"]["predictor"]["containers"][0]["env"] = []
    assert inferenceservice_problems(isvc) != []


RAYJOB_BREAKS: Final[dict[str, tuple[Callable[[Obj], None], str]]] = {
    "local job": (
        lambda j: j["spec"].update(entrypoint="resnet-service tag s3://b --out /output/t"),
        "--ray auto",
    ),
    "actors on the head": (
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
        "num-cpus",
    ),
    "output off the head": (
        lambda j: j["spec"].update(entrypoint="resnet-service tag s3://b --out /data/t --ray auto"),
        "--out",
    ),
    "cluster kept": (
        lambda j: j["spec"].pop("shutdownAfterJobFinishes"),
        "shutdownAfterJobFinishes",
    ),
    "a PodSpec typo": (
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"].update(
            restartPolicyy="Never"
        ),
        "restartPolicyy",
    ),
    "the slim image": (
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
            "containers"
        ][0].update(image="resnet-service:0.1.0-slim"),
        "want the full one",
    ),
    "burstable CPUs": (
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
            "containers"
        ][0]["resources"]["requests"].update(cpu="1"),
        "requests must equal limits",
    ),
}


@pytest.mark.parametrize("mutation", sorted(RAYJOB_BREAKS))
def test_rayjob_check_catches_a_broken_job(mutation: str) -> None:
    job = copy.deepcopy(only(of_kind(render("rayjob"), "RayJob"), "RayJob"))
    assert rayjob_problems(job) == []
    breaks, expected = RAYJOB_BREAKS[mutation]
    breaks(job)
    problems = rayjob_problems(job)
    assert any(expected in p for p in problems), problems


def test_adapter_check_refuses_an_unserved_metric() -> None:
    objects = copy.deepcopy(list(render("overlays/monitored")))
    hpa = of_kind(objects, "HorizontalPodAutoscaler")[0]
    hpa["spec"]["metrics"][-1]["pods"]["metric"]["name"] = "resnet_service_queue_lenght"
    assert custom_metric_problems(tuple(objects)) != []


DOCKERFILE_MUTATIONS: Final = {
    "slim venv with every extra": ('"./[openvino]"', '"./[full]"'),
    "slim copies the build venv": (
        "COPY --from=slim-venv /opt/venv /opt/venv",
        "COPY --from=build /opt/venv /opt/venv",
    ),
    "slim leaves the runtime at its default": ("    RESNET_SERVICE_RUNTIME=openvino \\\n", ""),
    "torch pip-installed into slim": (
        "FROM base AS slim\n",
        "FROM base AS slim\nRUN pip install torch==2.14.1\n",
    ),
}


@pytest.mark.parametrize("mutation", DOCKERFILE_MUTATIONS)
def test_slim_check_catches_torch(mutation: str) -> None:
    old, new = DOCKERFILE_MUTATIONS[mutation]
    text = DOCKERFILE.read_text()
    assert old in text
    assert slim_problems(text.replace(old, new, 1)) != []


def test_final_stage_check_catches_root_and_loopback() -> None:
    text = DOCKERFILE.read_text()
    slim_part = text.index("FROM base AS slim")
    broken = text[:slim_part] + text[slim_part:].replace("USER 10001:10001", "USER root")
    assert final_stage_problems(broken, "slim") != []
    broken = text[:slim_part] + text[slim_part:].replace(
        "RESNET_SERVICE_HOST=0.0.0.0", "RESNET_SERVICE_HOST=127.0.0.1"
    )
    assert final_stage_problems(broken, "slim") != []


def test_dockerignore_rule() -> None:
    patterns = ["deploy/*", "!deploy/weights", "tests"]
    assert dockerignored("deploy/base/deployment.yaml", patterns)
    assert not dockerignored("deploy/weights/README.md", patterns)
    assert dockerignored("tests/test_deploy.py", patterns)
    assert not dockerignored("src/resnet_service/config.py", patterns)
