"""deploy/k8s: every manifest validated strictly (unknown fields fail) by kubernetes-validate
against the bundled schemas of two Kubernetes versions; the ServiceMonitor against the part of the
Prometheus Operator schema it uses; and the pieces agreeing with the server (probes, drain time,
settings, the HPA's metric)."""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from deploy_support import (
    K8S,
    K8S_VERSIONS,
    configmap_data,
    dockerfile_instructions,
    k8s_objects,
    load_docs,
    server_settings,
)
from kubernetes_validate.utils import latest_version

from mixserve.metrics import Metrics

# -- Kubernetes ---------------------------------------------------------------------------------


def k8s_definitions() -> referencing.Resource:
    schemas = files("kubernetes_validate") / "kubernetes-json-schema"
    folder = f"v{latest_version()}-local-strict"
    return referencing.Resource.from_contents(
        json.loads((schemas / folder / "_definitions.json").read_text())
    )


# No registry package ships the Prometheus Operator's CRD schemas, so ServiceMonitor is checked
# against the part of monitoring.coreos.com/v1's schema the manifest uses, written out here:
# required fields, types, the duration pattern and the set of known field names (a typo fails).
# metadata and selector use Kubernetes' own ObjectMeta and LabelSelector schemas.
_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": _META + "ObjectMeta"},
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {"$ref": _META + "LabelSelector"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "params": {"type": "object"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                            "bearerTokenSecret": {"type": "object"},
                            "authorization": {"type": "object"},
                            "basicAuth": {"type": "object"},
                            "tlsConfig": {"type": "object"},
                            "followRedirects": {"type": "boolean"},
                            "enableHttp2": {"type": "boolean"},
                            "filterRunning": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def validate_service_monitor(doc: dict) -> None:
    registry = k8s_definitions() @ referencing.Registry()  # found by its $id
    jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA, registry=registry).validate(doc)


def validate_k8s(doc: dict, version: str) -> None:
    if doc["kind"] == "ServiceMonitor":
        validate_service_monitor(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifest_validates(path, version):
    for doc in load_docs(path):
        validate_k8s(doc, version)


def test_kubernetes_validation_is_strict():
    objects = k8s_objects()
    deployment = copy.deepcopy(objects["Deployment"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(deployment, K8S_VERSIONS[-1])
    monitor = copy.deepcopy(objects["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["interval"] = "10 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(monitor, K8S_VERSIONS[-1])


def server_container(objects: dict) -> dict:
    return objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_deployment_fits_the_image_and_the_other_manifests():
    objects = k8s_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    assert {"containerPort": 8000, "name": "http", "protocol": "TCP"} in container["ports"]
    # Settings from the ConfigMap, API key from the optional Secret.
    refs = container["envFrom"]
    assert refs[0]["configMapRef"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert refs[1]["secretRef"]["optional"] is True
    # Same uid as the image's USER, non-root.
    user = next(a for i, a in dockerfile_instructions() if i == "USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Volumes: adapters and models from the PVCs, the cache on the image's cache path.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["adapters"] in configmap_data()["MIXSERVE_ADAPTER_DIRS"].split(":")
    assert mounts["cache"] == "/cache" and "emptyDir" in volumes["cache"]
    for name in ("adapters", "models"):
        claim = volumes[name]["persistentVolumeClaim"]["claimName"]
        assert claim in objects, f"{claim} is not in pvc.yaml"
    # The Service and the ServiceMonitor reach these pods.
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics"


def test_configmap_sets_only_settings_the_server_reads():
    assert set(configmap_data()) <= server_settings()
    assert all(isinstance(v, str) for v in configmap_data().values())


def test_drain_time_fits_in_the_termination_grace_period():
    objects = k8s_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = server_container(objects)
    grace = pod["terminationGracePeriodSeconds"]
    drain = float(configmap_data()["MIXSERVE_DRAIN_TIMEOUT"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The HTTP server and then the engine may each wait up to the drain time.
    assert drain < grace and float(pre_stop[1]) + 2 * drain < grace
    # A draining pod answers 503; liveness must not restart it before the grace period ends.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= grace


def exported_metric_names() -> set[str]:
    return {family.name for family in Metrics(expert_metrics=True).registry.collect()}


def test_hpa_scales_on_a_metric_the_server_exports():
    objects = k8s_objects()
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    wanted = metric["pods"]["metric"]["name"]

    values = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    assert series == "mixserve:num_requests_waiting"
    assert series in exported_metric_names()
    # The adapter's renaming (Go regexp with ${1}) turns the series into the HPA's metric name.
    replacement = re.sub(r"\$\{(\d+)\}", r"\\g<\1>", rule["name"]["as"])
    renamed = re.sub(rule["name"]["matches"], replacement, series)
    assert renamed == wanted
    # Pods metrics need the series mapped to pods.
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
