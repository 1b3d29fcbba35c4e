"""deploy/kubernetes/: every manifest loads, and the fields that tie them
together agree with each other, with the image (Dockerfile) and with the
configuration the pods' relay loads (ports, paths, labels, names)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.app import SHUTDOWN_GRACE
from relay.config import Config, load_config, split_host_port, unknown_variables
from tests.image import REPO, read_image

MANIFESTS = REPO / "deploy" / "kubernetes"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], Manifest]:
    """(kind, name) → manifest, for every file kustomization.yaml lists."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, "kustomization.yaml lists every manifest, and only those"
    found: dict[tuple[str, str], Manifest] = {}
    for name in sorted(listed):
        for document in yaml.safe_load_all((MANIFESTS / name).read_text()):
            key = (document["kind"], document["metadata"]["name"])
            assert key not in found, key
            found[key] = document
    return found


def one(manifests: dict[tuple[str, str], Manifest], kind: str) -> Manifest:
    (manifest,) = [m for (k, _), m in manifests.items() if k == kind]
    return manifest


@pytest.fixture(scope="module")
def statefulset(manifests: dict[tuple[str, str], Manifest]) -> Manifest:
    return one(manifests, "StatefulSet")


def pod(statefulset: Manifest) -> Manifest:
    spec: Manifest = statefulset["spec"]["template"]["spec"]
    return spec


def container(statefulset: Manifest) -> Manifest:
    (only,) = pod(statefulset)["containers"]
    return only


def pod_labels(statefulset: Manifest) -> dict[str, str]:
    labels: dict[str, str] = statefulset["spec"]["template"]["metadata"]["labels"]
    return labels


def selects_the_pods(selector: dict[str, str], statefulset: Manifest) -> bool:
    return bool(selector) and selector.items() <= pod_labels(statefulset).items()


def relay_config(manifests: dict[tuple[str, str], Manifest], directory: Path) -> Config:
    """What the pod's relay loads: the ConfigMap's file at the path its
    arguments name, the image's environment and the container's."""
    statefulset = one(manifests, "StatefulSet")
    args = container(statefulset)["args"]
    path = Path(args[args.index("-c") + 1])
    (mount,) = [m for m in container(statefulset)["volumeMounts"] if m["name"] == "config"]
    assert path.parent == Path(mount["mountPath"])
    (volume,) = [v for v in pod(statefulset)["volumes"] if v["name"] == "config"]
    configmap = manifests[("ConfigMap", volume["configMap"]["name"])]
    text = configmap["data"][path.name]
    tomllib.loads(text)  # valid TOML before the relay's own checks
    env = read_image().env | {e["name"]: e["value"] for e in container(statefulset).get("env", [])}
    file = directory / path.name
    file.write_text(text)
    return load_config(file, env)


def test_the_selectors_select_the_pods(manifests: dict[tuple[str, str], Manifest]) -> None:
    statefulset = one(manifests, "StatefulSet")
    assert selects_the_pods(statefulset["spec"]["selector"]["matchLabels"], statefulset)
    for (kind, name), manifest in manifests.items():
        if kind == "Service":
            assert selects_the_pods(manifest["spec"]["selector"], statefulset), name
        if kind in ("PodDisruptionBudget", "PodMonitor"):
            assert selects_the_pods(manifest["spec"]["selector"]["matchLabels"], statefulset), kind


def test_the_ports_are_the_ones_the_relay_listens_on(
    manifests: dict[tuple[str, str], Manifest], tmp_path: Path
) -> None:
    statefulset = one(manifests, "StatefulSet")
    config = relay_config(manifests, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in container(statefulset)["ports"]}
    assert ports == {
        "smtp": split_host_port(config.smtp.listen[0])[1],
        "metrics": split_host_port(config.metrics.listen)[1],
    }
    for host, _ in (split_host_port(x) for x in (*config.smtp.listen, config.metrics.listen)):
        assert host == "0.0.0.0", "the pod's address, where the kubelet and Services connect"
    for (kind, name), manifest in manifests.items():
        if kind == "Service":
            for port in manifest["spec"]["ports"]:
                assert port["targetPort"] in ports, (name, port)
    monitor = one(manifests, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")


def test_the_probes_ask_health_and_readiness_on_the_metrics_port(statefulset: Manifest) -> None:
    probes = {
        kind: (probe["httpGet"]["path"], probe["httpGet"]["port"])
        for kind, probe in container(statefulset).items()
        if kind.endswith("Probe")
    }
    assert probes == {
        "startupProbe": ("/healthz", "metrics"),
        "livenessProbe": ("/healthz", "metrics"),
        "readinessProbe": ("/readyz", "metrics"),
    }


def test_the_pod_gets_no_variables_the_relay_would_warn_of(
    manifests: dict[tuple[str, str], Manifest],
) -> None:
    """Kubernetes' service links would give the pod SES_RELAY_SERVICE_HOST and
    the like (for the Service "ses-relay"), which the relay reports as naming no
    setting: they are switched off, and every variable set names a setting."""
    statefulset = one(manifests, "StatefulSet")
    links = {
        f"{name.upper().replace('-', '_')}_SERVICE_HOST": "10.0.0.7"
        for (kind, name), manifest in manifests.items()
        if kind == "Service" and manifest["spec"].get("clusterIP") != "None"
    }
    assert unknown_variables(links), "the links would be warned of"
    assert pod(statefulset)["enableServiceLinks"] is False
    env = read_image().env | {e["name"]: e["value"] for e in container(statefulset).get("env", [])}
    assert unknown_variables(env) == []


def test_each_replica_keeps_its_spool_on_its_own_claim(
    manifests: dict[tuple[str, str], Manifest], tmp_path: Path
) -> None:
    statefulset = one(manifests, "StatefulSet")
    config = relay_config(manifests, tmp_path)
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m["mountPath"] for m in container(statefulset)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config.spool.path
    assert claim["metadata"]["name"] not in {v["name"] for v in pod(statefulset)["volumes"]}
    headless = manifests[("Service", statefulset["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"


def test_the_pod_stops_within_its_grace_and_runs_unprivileged(
    manifests: dict[tuple[str, str], Manifest], tmp_path: Path
) -> None:
    statefulset = one(manifests, "StatefulSet")
    assert pod(statefulset)["terminationGracePeriodSeconds"] >= SHUTDOWN_GRACE + 10
    security = pod(statefulset)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] > 0
    assert security["fsGroup"] > 0  # the spool volume is writable by that user
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    own = container(statefulset)["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in own["capabilities"]
    mounts = container(statefulset)["volumeMounts"]
    writable = {m["mountPath"] for m in mounts if not m.get("readOnly")}
    assert writable == {relay_config(manifests, tmp_path).spool.path}


def test_the_service_account_is_annotated_for_irsa(
    manifests: dict[tuple[str, str], Manifest],
) -> None:
    statefulset = one(manifests, "StatefulSet")
    account = manifests[("ServiceAccount", pod(statefulset)["serviceAccountName"])]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role)


def test_the_pod_monitor_names_the_job_the_alerts_expect(
    manifests: dict[tuple[str, str], Manifest],
) -> None:
    statefulset = one(manifests, "StatefulSet")
    monitor = one(manifests, "PodMonitor")
    job = pod_labels(statefulset)[monitor["spec"]["jobLabel"]]
    jobs = set(re.findall(r'job="([^"]+)"', ALERTS.read_text()))
    assert jobs == {job}


def test_the_budget_keeps_a_replica(manifests: dict[tuple[str, str], Manifest]) -> None:
    statefulset = one(manifests, "StatefulSet")
    budget = one(manifests, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] < statefulset["spec"]["replicas"]
