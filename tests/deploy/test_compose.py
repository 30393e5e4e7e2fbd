"""deploy/compose.yaml against the compose spec (check-jsonschema's vendored schema, and `docker
compose config` where the plugin exists), the pieces agreeing with each other, and yamllint over
every YAML file in deploy/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    DEPLOY,
    serve_parser,
    server_settings,
    tool,
)
from yamllint import linter
from yamllint.config import YamlLintConfig

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
