"""deploy/ agrees with the service and with the API servers that would take it.

The Kubernetes and KServe folders are rendered as `kubectl apply -k` renders them, then checked
against the schemas of the servers that would take them (Kubernetes' own through
kubernetes-validate, KServe's InferenceService through its vendored CRD schema) and against the
service: ports, probe paths, configuration, API key, the image's user, the grace period, the
autoscaler's metrics. Then the container bentofiles and the Prometheus configuration."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from devtools.image import IMAGE_UID_GID
from serving import settings
from tests.helpers import ROOT, metric_samples

KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
MONITORING = ROOT / "deploy" / "monitoring"
BENTOML_PORT = 3000  # `bentoml serve` and the containerized bento listen here
# Kubernetes releases whose OpenAPI schemas every rendered object must pass, strictly (no field
# the schema does not declare): the newest that kubernetes-validate 1.37.0 bundles, and the oldest
# of the three releases maintained alongside it.
KUBERNETES_VERSIONS = ("1.37.0", "1.35.0")
# KServe's InferenceService schema, v1beta1, from its CRD (deploy/kserve/schema/README.md).
INFERENCE_SERVICE_SCHEMA = KSERVE / "schema" / "inferenceservice-v1beta1.json"

# What `kubectl apply -k` gets: a folder, or the Kubernetes folder with its optional components
# (docs/scaling.md shows the kustomization a user writes for them). Paths from the repository root.
VARIANTS: dict[str, dict[str, list[str]]] = {
    "kubernetes": {"resources": ["deploy/kubernetes"]},
    "kubernetes+in-flight": {"resources": ["deploy/kubernetes"],
                             "components": ["deploy/kubernetes/in-flight"]},
    "kubernetes+in-flight+gpu": {"resources": ["deploy/kubernetes"],
                                 "components": ["deploy/kubernetes/in-flight",
                                                "deploy/kubernetes/gpu"]},
    "kserve": {"resources": ["deploy/kserve"]},
}


# --- kustomize, as far as these folders use it ----------------------------------------------------
# `kubectl` is not on every machine that runs these tests, so they render the folders themselves:
# resources, components, configMapGenerator (with kustomize's content hash in the name), JSON
# patches, images and nameReference configurations. test_the_renderer_agrees_with_kubectl
# compares the result with `kubectl kustomize` wherever kubectl is installed.

# Where kustomize itself looks for a ConfigMap's name, for the kinds in these folders; a folder
# adds others through `configurations:` (deploy/kserve/kustomizeconfig.yaml).
CONFIGMAP_REFERENCES = [("Deployment", "spec/template/spec/volumes/configMap/name")]


@dataclass
class Build:
    documents: list[dict[str, Any]] = field(default_factory=list)
    generated: set[str] = field(default_factory=set)  # ConfigMaps whose names get the hash
    references: list[tuple[str, str]] = field(default_factory=lambda: list(CONFIGMAP_REFERENCES))


def kustomize(folder: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` makes of `kustomization`, whose paths start at `folder`."""
    build = accumulate(folder, kustomization)
    names = {}
    for document in build.documents:
        name = document["metadata"]["name"]
        if document["kind"] == "ConfigMap" and name in build.generated:
            names[name] = document["metadata"]["name"] = f"{name}-{configmap_hash(document)}"
    for document in build.documents:
        for kind, path in build.references:
            if document["kind"] == kind:
                rename(document, path.split("/"), names)
    return build.documents


def accumulate(folder: Path, kustomization: dict[str, Any]) -> Build:
    """Kustomize's order: resources, components, then this folder's generators and transformers."""
    build = Build()
    for entry in kustomization.get("resources", []):
        path = folder / entry
        if path.is_dir():
            inner = accumulate(path, read_kustomization(path))
            build.documents += inner.documents
            build.generated |= inner.generated
            build.references += inner.references
        else:
            build.documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in kustomization.get("components", []):
        # a component's generators and transformers work on what the folder has so far
        transform(build, folder / entry, read_kustomization(folder / entry))
    transform(build, folder, kustomization)
    return build


def transform(build: Build, folder: Path, kustomization: dict[str, Any]) -> None:
    for entry in kustomization.get("configurations", []):
        for reference in yaml.safe_load((folder / entry).read_text())["nameReference"]:
            assert reference["kind"] == "ConfigMap", "only ConfigMap references are rendered here"
            build.references += [(spec["kind"], spec["path"]) for spec in reference["fieldSpecs"]]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (folder / path).read_text()
        build.documents.append({"apiVersion": "v1", "kind": "ConfigMap",
                                "metadata": {"name": generator["name"]}, "data": data})
        build.generated.add(generator["name"])
    for patch in kustomization.get("patches", []):
        for document in build.documents:
            if document["kind"] == patch["target"]["kind"] \
                    and document["metadata"]["name"] == patch["target"]["name"]:
                for operation in yaml.safe_load(patch["patch"]):
                    json_patch(document, operation)
    for image in kustomization.get("images", []):
        for container in containers(build.documents):
            if image_name(container["image"]) == image["name"]:
                container["image"] = f"{image['newName']}:{image['newTag']}"


def read_kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def configmap_hash(configmap: dict[str, Any]) -> str:
    """Kustomize's suffix: sha256 of Go's JSON of the data and kind (kubectl 1.32's kustomize 5.5
    counts the name as empty), first 10 hex digits with 0 1 3 a e replaced by g h k m t."""
    encoded = json.dumps({"data": configmap["data"], "kind": "ConfigMap", "name": ""},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char in "<>&\u2028\u2029":  # Go's json.Marshal escapes these
        encoded = encoded.replace(char, f"\\u{ord(char):04x}")
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def rename(node: Any, keys: list[str], names: dict[str, str]) -> None:
    """Follows a kustomize field path (lists are crossed implicitly) and renames what it finds."""
    if isinstance(node, list):
        for item in node:
            rename(item, keys, names)
    elif isinstance(node, dict) and keys[0] in node:
        if len(keys) == 1:
            node[keys[0]] = names.get(node[keys[0]], node[keys[0]])
        else:
            rename(node[keys[0]], keys[1:], names)


def json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """One RFC 6902 `add` or `replace`."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~")
                      for part in operation["path"].split("/")[1:]]
    node: Any = document
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if operation["op"] == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), operation["value"])
    elif operation["op"] in ("add", "replace"):
        if operation["op"] == "replace":
            assert (int(last) < len(node)) if isinstance(node, list) else last in node, \
                f"replace {operation['path']}: nothing there"
        node[int(last) if isinstance(node, list) else last] = operation["value"]
    else:
        raise AssertionError(f"JSON patch op {operation['op']!r} is not rendered here")


def containers(node: Any) -> list[dict[str, Any]]:
    """Every container of every object: kustomize's images transformer finds them at any depth."""
    if isinstance(node, list):
        return [c for item in node for c in containers(item)]
    if not isinstance(node, dict):
        return []
    found = [c for key in ("containers", "initContainers") for c in node.get(key) or []]
    return found + [c for value in node.values() for c in containers(value)]


def image_name(image: str) -> str:
    """`registry:5000/ml/name:tag@sha256:...` -> `registry:5000/ml/name`."""
    name = image.split("@")[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


# --- the rendered objects -------------------------------------------------------------------------

@functools.cache
def rendered(variant: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(ROOT, VARIANTS[variant]))


def one(variant: str, kind: str) -> dict[str, Any]:
    (document,) = [d for d in rendered(variant) if d["kind"] == kind]
    return document


def workload(variant: str) -> dict[str, Any]:
    return one(variant, "InferenceService" if variant == "kserve" else "Deployment")


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    """A Deployment's pod template, or an InferenceService predictor (a pod spec and more)."""
    if document["kind"] == "InferenceService":
        return document["spec"]["predictor"]
    return document["spec"]["template"]["spec"]


def serving_container(variant: str) -> dict[str, Any]:
    (container,) = pod_spec(workload(variant))["containers"]
    return container


def mounted_configuration(variant: str) -> tuple[str, dict[str, Any]]:
    """The file BENTOML_CONFIG names, and what the pod finds there (from the ConfigMap)."""
    container = serving_container(variant)
    path = Path({e["name"]: e for e in container["env"]}["BENTOML_CONFIG"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in pod_spec(workload(variant))["volumes"] if v["name"] == mount["name"]]
    configmap = one(variant, "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"], \
        "the pod mounts a ConfigMap the folder does not make (a kustomize nameReference missing?)"
    assert path.name in configmap["data"], f"{path} is not in the ConfigMap"
    return path.name, yaml.safe_load(configmap["data"][path.name])


def probe_paths(variant: str) -> list[str]:
    container = serving_container(variant)
    return [container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")]


@functools.cache
def inference_service_schema() -> dict[str, Any]:
    return strict(json.loads(INFERENCE_SERVICE_SCHEMA.read_text()))


def strict(schema: Any) -> Any:
    """The schema, closed: every object with declared properties refuses any other field, as the
    API server does for `kubectl apply` (field validation `Strict`, its default) where
    jsonschema would let it through. Objects that keep unknown fields stay open."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    if "properties" in closed:
        closed["properties"] = {k: strict(v) for k, v in closed["properties"].items()}
        if "additionalProperties" not in closed \
                and not closed.get("x-kubernetes-preserve-unknown-fields"):
            closed["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(closed.get(key), dict):
            closed[key] = strict(closed[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in closed:
            closed[key] = [strict(s) for s in closed[key]]
    return closed


def validate_inference_service(document: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(inference_service_schema()).validate(document)


# --- the renderer and the schemas -----------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_the_renderer_agrees_with_kubectl(variant: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the folders are rendered by this module only")
    kustomization = {key: [os.path.relpath(ROOT / p, tmp_path) for p in paths]
                     for key, paths in VARIANTS[variant].items()}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    output = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True,
                            text=True, check=True, timeout=120).stdout

    def by_name(documents: Any) -> list[dict[str, Any]]:
        return sorted(documents, key=lambda d: (d["kind"], d["metadata"]["name"]))

    assert by_name(rendered(variant)) == by_name(yaml.safe_load_all(output))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_kubernetes_object_passes_the_api_schema(variant: str, version: str) -> None:
    for document in rendered(variant):
        if document["kind"] != "InferenceService":
            # it answers the release whose schemas it used
            used = kubernetes_validate.validate(document, version, strict=True)
            assert used == version.rsplit(".", 1)[0]


NOT_AN_INTEGER = "is not of type 'integer'"


@pytest.mark.parametrize(("variant", "kind", "path", "value", "reason"), [
    ("kubernetes", "Deployment", "/spec/template/spec/containers/0/ports/0/containerPort", "3000",
     NOT_AN_INTEGER),
    ("kubernetes", "Deployment", "/spec/template/spec/securityContext/runAsUser", "1034",
     NOT_AN_INTEGER),
    ("kubernetes", "Deployment", "/spec/template/spec/securityContext/runAsUsr", 1034,
     "'runAsUsr' was unexpected"),
    ("kubernetes", "Service", "/spec/ports/0/port", "eighty", NOT_AN_INTEGER),
    ("kubernetes+in-flight", "HorizontalPodAutoscaler",
     "/spec/metrics/0/resource/target/averageUtilization", "70%", NOT_AN_INTEGER),
])
def test_the_kubernetes_schema_refuses_a_wrong_field(variant: str, kind: str, path: str,
                                                     value: Any, reason: str) -> None:
    """The same validator as above, one field changed: a string for an integer, a misspelt key."""
    document = copy.deepcopy(one(variant, kind))
    json_patch(document, {"op": "add", "path": path, "value": value})
    with pytest.raises(kubernetes_validate.ValidationError, match=reason):
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)


def test_the_inference_service_passes_kserves_schema() -> None:
    validate_inference_service(one("kserve", "InferenceService"))


@pytest.mark.parametrize(("path", "value", "reason"), [
    ("/spec/predictor/containers/0/ports/0/containerPort", "3000", NOT_AN_INTEGER),
    ("/spec/predictor/securityContext/runAsUser", "1034", NOT_AN_INTEGER),
    # protocolVersion belongs to a model-format predictor (spec.predictor.model); a custom
    # container says its protocol with the PROTOCOL variable
    ("/spec/predictor/protocolVersion", "v2", "'protocolVersion' was unexpected"),
    ("/spec/predictor/autoScaling/metrics/0/type", "CPU", "is not one of"),
])
def test_kserves_schema_refuses_a_wrong_field(path: str, value: Any, reason: str) -> None:
    document = copy.deepcopy(one("kserve", "InferenceService"))
    json_patch(document, {"op": "add", "path": path, "value": value})
    with pytest.raises(jsonschema.ValidationError, match=reason):
        validate_inference_service(document)


# --- the manifests and the service ----------------------------------------------------------------

@pytest.mark.parametrize(("folder", "name"), [
    (KUBERNETES, "configuration.yaml"), (KUBERNETES, "configuration.gpu.yaml"),
    (KSERVE, "configuration.yaml")])
def test_the_configmaps_carry_the_repository_configuration(folder: Path, name: str) -> None:
    """Kustomize reads files only below its folder: each carries a copy."""
    assert (folder / name).read_text() == (ROOT / name).read_text(), \
        f"cp {name} {folder.relative_to(ROOT)}/"
    generator, = read_kustomization(folder)["configMapGenerator"]
    assert name in generator["files"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pods_run_as_the_images_numeric_user(variant: str) -> None:
    from bentoml._internal.container.generate import BENTO_UID_GID

    assert IMAGE_UID_GID == BENTO_UID_GID, "BentoML changed its bento user's uid: update both"
    context = pod_spec(workload(variant))["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == IMAGE_UID_GID
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_container_writes_only_to_its_empty_dirs(variant: str) -> None:
    """A read-only root, no privilege escalation, no capabilities; BentoML's writable paths
    (BENTOML_HOME and /tmp) are emptyDirs."""
    spec = pod_spec(workload(variant))
    container = serving_container(variant)
    assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True}
    assert spec["automountServiceAccountToken"] is False
    home = {e["name"]: e for e in container["env"]}["BENTOML_HOME"]["value"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]
                if not m.get("readOnly")}
    assert writable.keys() == {home, "/tmp"}
    assert all(volume.get("emptyDir") == {} for volume in writable.values())


def served_settings(variant: str) -> settings.ClassifierSettings:
    name, document = mounted_configuration(variant)
    return settings.parse_settings(document, source=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_configuration_and_api_key_reach_the_service(variant: str) -> None:
    parsed = served_settings(variant)
    variable = parsed.security.api_key_env or parsed.where.api_key_env  # as api_key() reads it
    env = {e["name"]: e for e in serving_container(variant)["env"]}
    key = env[variable]["valueFrom"]["secretKeyRef"]
    assert key["optional"] is True, "without a Secret the service runs without a key"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_probes_need_no_api_key(variant: str) -> None:
    for path in probe_paths(variant):
        assert path in served_settings(variant).security.public_paths, \
            f"{path} would need the API key"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_grace_period_covers_the_request_timeout(variant: str) -> None:
    pause = int(serving_container(variant)["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec(workload(variant))["terminationGracePeriodSeconds"] \
        >= served_settings(variant).limits.request_timeout_s + pause


def test_ports_agree() -> None:
    container = serving_container("kubernetes")
    (port,) = container["ports"]
    assert port["containerPort"] == BENTOML_PORT
    template = workload("kubernetes")["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(BENTOML_PORT)
    service = one("kubernetes", "Service")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    target = one("kubernetes", "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", workload("kubernetes")["metadata"]
                                                 ["name"])
    assert "replicas" not in workload("kubernetes")["spec"], "the autoscaler owns the count"


def test_the_inference_service_speaks_v2_on_the_service_port() -> None:
    """What KServe's webhook and controller read from a custom predictor: the container named
    kserve-container, its PROTOCOL, its first port."""
    container = serving_container("kserve")
    assert container["name"] == "kserve-container"
    assert {e["name"]: e.get("value") for e in container["env"]}["PROTOCOL"] == "v2"
    assert container["ports"][0]["containerPort"] == BENTOML_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == BENTOML_PORT
    assert probe_paths("kserve") == ["/v2/health/ready", "/v2/health/live"]
    annotations = pod_spec(workload("kserve"))["annotations"]
    assert annotations["prometheus.io/port"] == str(BENTOML_PORT)


def test_the_in_flight_autoscaler_reads_the_adapters_metric() -> None:
    """The HPA's pods metric is the one the prometheus-adapter rule serves, made from BentoML's
    in-flight gauge; CPU stays as the other signal."""
    metrics = one("kubernetes+in-flight", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    values = yaml.safe_load(
        (KUBERNETES / "in-flight" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert metrics[1]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith("bentoml_service_request_in_progress{")


def test_the_gpu_component_asks_for_a_gpu_and_serves_the_gpu_configuration() -> None:
    container = serving_container("kubernetes+in-flight+gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert image_name(container["image"]) == "image-classifier-gpu"
    name, document = mounted_configuration("kubernetes+in-flight+gpu")
    assert name == "configuration.gpu.yaml"
    assert document == yaml.safe_load((ROOT / "configuration.gpu.yaml").read_text())
    spec = pod_spec(workload("kubernetes+in-flight+gpu"))
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


@pytest.mark.e2e
def test_probes_and_metrics_are_served_without_the_api_key(server) -> None:
    annotations = workload("kubernetes")["spec"]["template"]["metadata"]["annotations"]
    paths = [*probe_paths("kubernetes"), *probe_paths("kserve"), annotations["prometheus.io/path"]]
    for path in paths:
        assert path in served_settings("kubernetes").security.public_paths, \
            f"{path} would need the API key"
        assert httpx.get(server.url + path).status_code == 200, path


@pytest.mark.e2e
def test_the_in_flight_gauge_the_adapter_reads_is_exported(server) -> None:
    httpx.get(server.url + "/readyz")
    samples = metric_samples(httpx.get(server.url + "/metrics").text,
                             "bentoml_service_request_in_progress")
    assert samples, "BentoML no longer exports bentoml_service_request_in_progress"
    assert all('endpoint="' in labels for labels in samples), "the adapter rule filters endpoint"


# --- the container bentofiles and Prometheus ------------------------------------------------------

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
