"""configuration.yaml: the shipped file is valid, bad values name the key and what is allowed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from serving import settings
from tests.helpers import ROOT, python


def in_service_block(section: dict, **bentoml_keys) -> dict:
    return {"services": {"ImageClassifier": {**bentoml_keys, "image_classifier": section}}}


def test_shipped_configuration_is_valid() -> None:
    document = settings.read_config_file(ROOT / "configuration.yaml")
    parsed = settings.parse_settings(document)
    assert parsed.model.tag == "digits-classifier:latest"
    service = settings.service_config(document, parsed)
    assert service["traffic"]["timeout"] > parsed.limits.request_timeout_s, "a backstop behind ours"
    assert settings.SECTION not in service, "our section must not reach @bentoml.service"


def test_bentoml_cli_accepts_the_file_as_bentoml_config() -> None:
    """BentoML validates $BENTOML_CONFIG when its CLI starts (schema v1, then v2 for services)."""
    env = {**os.environ, "BENTOML_CONFIG": str(ROOT / "configuration.yaml")}
    result = python("-c", "import bentoml_cli.cli", env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"model": {"providers": ["gpu"]}}, "'tensorrt', 'cuda' or 'cpu'"),
        ({"batching": {"max_batch_size": 1}}, "greater than 1"),
        ({"response": {"top_k": 0}}, "greater than or equal to 1"),
        ({"model": {"tag": "no spaces allowed"}}, "should match pattern"),
        ({"batching": {"max_batch_sise": 8}}, "Extra inputs are not permitted"),
        ({"batching": {"dispatch": "greedy"}}, "'refill', 'eager' or 'cork'"),
        ({"batching": {"runtime_batch_size": 0}}, "greater than 0"),
        ({"batching": {"runtime_batch_size": "fast"}}, "'auto'"),
    ],
)
def test_invalid_values_name_the_key_and_the_allowed_values(section: dict, fragment: str) -> None:
    with pytest.raises(settings.ConfigurationError) as caught:
        settings.parse_settings(in_service_block(section))
    key = next(iter(section))
    assert f"services.ImageClassifier.image_classifier.{key}." in str(caught.value)
    assert fragment in str(caught.value)


def test_bentoml_config_env_points_at_another_file(tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "prod.yaml"
    other.write_text(yaml.safe_dump(in_service_block({"response": {"top_k": 5}}, workers=2)))
    monkeypatch.setenv("BENTOML_CONFIG", str(other))
    parsed, service = settings.load()
    assert parsed.response.top_k == 5 and service["workers"] == 2


def test_missing_file_says_how_to_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BENTOML_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(settings.ConfigurationError, match="set BENTOML_CONFIG"):
        settings.load()


def test_the_api_key_comes_from_a_secret_file_before_the_environment(tmp_path, monkeypatch) -> None:
    secret = tmp_path / "api_key"
    secret.write_text("from-the-file-0123456789\n")
    monkeypatch.setenv("IMAGE_CLASSIFIER_API_KEY", "from-the-environment-0123")
    assert settings.Settings().api_key() == "from-the-environment-0123"
    parsed = settings.parse_settings(in_service_block({"security": {"api_key_file": str(secret)}}))
    assert parsed.api_key() == "from-the-file-0123456789"


def test_no_key_configured_means_no_key(monkeypatch) -> None:
    monkeypatch.delenv("IMAGE_CLASSIFIER_API_KEY", raising=False)
    assert settings.Settings().api_key() is None


@pytest.mark.parametrize("problem, fragment", [
    ({"api_key_file": "/nonexistent/key"}, "does not exist"),
    ({"api_key_env": "SHORT_KEY_FOR_TEST"}, "use at least 16"),
])
def test_a_bad_api_key_stops_startup(problem: dict, fragment: str, monkeypatch) -> None:
    monkeypatch.setenv("SHORT_KEY_FOR_TEST", "short")
    parsed = settings.parse_settings(in_service_block({"security": problem}))
    with pytest.raises(settings.ConfigurationError, match=fragment):
        parsed.api_key()


def test_one_request_must_fit_one_batch() -> None:
    with pytest.raises(settings.ConfigurationError, match="max_images_per_request"):
        settings.parse_settings(in_service_block({"batching": {"max_batch_size": 8},
                                                  "limits": {"max_images_per_request": 9}}))


def test_the_gate_must_let_in_less_than_the_batcher_drops() -> None:
    with pytest.raises(settings.ConfigurationError, match="target_wait_ms"):
        settings.parse_settings(in_service_block({"batching": {"max_latency_ms": 400},
                                                  "limits": {"target_wait_ms": 400}}))
    no_gate = settings.parse_settings(in_service_block({"batching": {"max_latency_ms": 400},
                                                        "limits": {"target_wait_ms": 0}}))
    assert no_gate.limits.target_wait_ms == 0


def rollout(**section) -> settings.Settings:
    return settings.parse_settings(in_service_block(section))


def test_variants_replace_the_model_tag_and_every_listed_model_is_packed(monkeypatch) -> None:
    monkeypatch.delenv(settings.MODEL_TAG_ENV, raising=False)
    parsed = rollout(model={"tag": "m:v0"}, rollout={
        "variants": [{"tag": "m:v1", "weight": 90}, {"tag": "m:v2", "weight": 10},
                     {"tag": "m:v3", "weight": 0}], "shadow": {"tag": "m:v4"}})
    assert [(v.tag, v.weight) for v in parsed.served_variants()] == [
        ("m:v1", 90), ("m:v2", 10), ("m:v3", 0)]
    assert parsed.packed_tags() == ["m:v1", "m:v2", "m:v3", "m:v4"]
    assert [v.tag for v in rollout(model={"tag": "m:v0"}).served_variants()] == ["m:v0"]


def test_the_environment_variable_pins_one_model(monkeypatch) -> None:
    monkeypatch.setenv(settings.MODEL_TAG_ENV, "m:v1")
    parsed = rollout(rollout={"variants": [{"tag": "m:v2", "weight": 1}]})
    assert [v.tag for v in parsed.served_variants()] == ["m:v1"]
    assert parsed.packed_tags() == ["m:v1", "m:v2"]
    monkeypatch.setenv(settings.MODEL_TAG_ENV, "not a tag!")
    with pytest.raises(settings.ConfigurationError, match="is not a model tag"):
        parsed.served_variants()


@pytest.mark.parametrize("variants, message", [
    ([{"tag": "m:v1", "weight": 0}], "every weight is 0"),
    ([{"tag": "m:v1", "weight": 1}, {"tag": "m:v1", "weight": 2}], "lists a tag twice"),
    ([{"tag": "m:v1", "weight": -1}], "greater than or equal to 0"),
])
def test_bad_variants_are_refused(variants, message) -> None:
    with pytest.raises(settings.ConfigurationError, match=message):
        rollout(rollout={"variants": variants})


def test_batching_defaults_refill_dispatch_and_a_measured_runtime_batch_size() -> None:
    parsed = settings.parse_settings(in_service_block({}))
    assert parsed.batching.dispatch == "refill" and parsed.batching_dispatch == "refill"
    assert parsed.batching.runtime_batch_size == "auto"
    chosen = settings.parse_settings(in_service_block(
        {"batching": {"dispatch": "cork", "runtime_batch_size": 8}}))
    assert chosen.batching_dispatch == "cork" and chosen.batching.runtime_batch_size == 8
