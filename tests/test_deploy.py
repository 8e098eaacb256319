"""deploy/ agrees with the service: Kubernetes ports, probe paths, configuration, API key and
grace period; the container bentofiles; the Prometheus configuration."""

from __future__ import annotations

import httpx
import pytest
import yaml

from serving import settings
from tests.helpers import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
MONITORING = ROOT / "deploy" / "monitoring"
BENTOML_PORT = 3000  # `bentoml serve` and the containerized bento listen here


def manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    documents = [yaml.safe_load((KUBERNETES / name).read_text())
                 for name in kustomization["resources"]]
    return {d["kind"]: d for d in documents}


@pytest.fixture(scope="module")
def container() -> dict:
    return manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def shipped() -> settings.Settings:
    return settings.parse_settings(settings.read_config_file(KUBERNETES / "configuration.yaml"))


def test_the_configmap_carries_the_repository_configuration(shipped) -> None:
    assert (KUBERNETES / "configuration.yaml").read_text() == \
        (ROOT / "configuration.yaml").read_text(), "copy configuration.yaml to deploy/kubernetes"
    generator = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert generator["configMapGenerator"][0]["files"] == ["configuration.yaml"]


def test_ports_agree(container) -> None:
    kinds = manifests()
    (port,) = container["ports"]
    assert port["containerPort"] == BENTOML_PORT
    annotations = kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(BENTOML_PORT)
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    selector = kinds["Service"]["spec"]["selector"]
    assert selector.items() <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == \
        kinds["Deployment"]["metadata"]["name"]


@pytest.mark.e2e
def test_probes_and_metrics_are_served_without_the_api_key(container, shipped, server) -> None:
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    paths = [container["readinessProbe"]["httpGet"]["path"],
             container["livenessProbe"]["httpGet"]["path"], annotations["prometheus.io/path"]]
    for path in paths:
        assert path in shipped.security.public_paths, f"{path} would need the API key"
        assert httpx.get(server.url + path).status_code == 200, path


def test_configuration_and_api_key_reach_the_service(container, shipped) -> None:
    env = {e["name"]: e for e in container["env"]}
    (mount,) = container["volumeMounts"]
    assert env["BENTOML_CONFIG"]["value"] == f"{mount['mountPath']}/configuration.yaml"
    key = env[shipped.security.api_key_env]["valueFrom"]["secretKeyRef"]
    assert key["optional"] is True, "without a Secret the service runs without a key"


def test_the_grace_period_covers_the_request_timeout(container, shipped) -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= shipped.limits.request_timeout_s + pause


def test_the_local_base_bentofile_differs_only_in_its_base_image() -> None:
    """deploy/container/bentofile.local-base.yaml is for machines without Docker Hub: the same
    bento, built on a local Debian base."""
    shipped = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    local = yaml.safe_load(
        (ROOT / "deploy" / "container" / "bentofile.local-base.yaml").read_text())
    base = local["docker"].pop("base_image")
    assert local == shipped
    source = (ROOT / "deploy" / "container" / "container.py").read_text()
    assert f'LOCAL_BASE = "{base}"' in source


def test_the_gpu_bentofile_adds_only_cuda_libraries_and_the_gpu_configuration() -> None:
    shipped = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    gpu = yaml.safe_load((ROOT / "deploy" / "container" / "bentofile.gpu.yaml").read_text())
    assert gpu.pop("name") == shipped.pop("name") + "-gpu"
    assert set(gpu["include"]) - set(shipped["include"]) == {"/configuration.gpu.yaml"}
    gpu_requirements = ROOT / gpu["python"]["requirements_txt"]
    assert gpu_requirements.read_text().count("-r serving.txt") == 1
    assert "onnxruntime-gpu[cuda,cudnn]" in gpu_requirements.read_text()
    for key in ("include", "python"):
        gpu.pop(key), shipped.pop(key)
    assert gpu == shipped
    settings.parse_settings(settings.read_config_file(ROOT / "configuration.gpu.yaml"))


def test_the_prometheus_config_scrapes_the_service() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:3000"]
    alerts = yaml.safe_load((MONITORING / config["rule_files"][0]).read_text())
    alert_names = {r["expr"] for g in alerts["groups"] for r in g["rules"]}
    assert any("image_classifier_drift_detected" in e for e in alert_names)
