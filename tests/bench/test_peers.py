"""The Ray Serve and TorchServe peers' launch logic (bench/servers.py, bench/peers/): their
configuration stays on loopback with the stated batching, their venvs are pinned and made again
when a pin changes, and what the report says they ran with is what they run with."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from bench import servers
from bench.peers import torchserve_app, venvs

ROOT = Path(__file__).resolve().parents[2]
PORTS = {"management": 7001, "metrics": 7002, "grpc_inference": 7003, "grpc_management": 7004}


def properties(text: str) -> dict[str, str]:
    """config.properties as TorchServe reads it (ts/model_server.py load_properties)."""
    pairs = [line.split("=", 1) for line in text.splitlines() if not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_torchserve_binds_every_server_to_loopback() -> None:
    config = properties(torchserve_app.config_properties(8080, PORTS, Path("/store"), "m.mar"))
    assert config["inference_address"] == "http://127.0.0.1:8080"
    assert config["management_address"] == "http://127.0.0.1:7001"
    assert config["metrics_address"] == "http://127.0.0.1:7002"
    # TorchServe's gRPC servers bind 0.0.0.0 unless told otherwise.
    assert config["grpc_inference_address"] == "127.0.0.1"
    assert config["grpc_management_address"] == "127.0.0.1"
    assert (config["grpc_inference_port"], config["grpc_management_port"]) == ("7003", "7004")


def test_torchserve_model_has_the_stated_batching() -> None:
    config = properties(torchserve_app.config_properties(8080, PORTS, Path("/store"), "m.mar"))
    model = json.loads(config["models"])[torchserve_app.MODEL_NAME]["1.0"]
    assert (model["minWorkers"], model["maxWorkers"]) == (1, 1)
    assert (model["batchSize"], model["maxBatchDelay"]) == (32, 5)
    assert model["marName"] == config["load_models"] == "m.mar"
    assert int(config["job_queue_size"]) >= 128, "the bench's closed loop reaches 128 waiting"
    assert config["disable_token_authorization"] == "true"


def test_torchserve_is_driven_through_the_routes_name() -> None:
    """wrk posts to {Running.url}/classify: TorchServe's model must be named after the route."""
    assert f"{servers.TORCHSERVE_PREFIX}/{servers.ROUTES['classification']}" == \
        f"/predictions/{torchserve_app.MODEL_NAME}"


def test_archive_packs_the_graph_its_weights_and_the_card(tmp_path: Path) -> None:
    for name in ("model.onnx", "model.onnx.data", "card.json", "model.torchscript.pt"):
        (tmp_path / name).write_bytes(b"x")
    graph, *extra = torchserve_app.archived_files(tmp_path)
    assert graph.name == "model.onnx"
    assert [p.name for p in extra] == ["model.onnx.data", "card.json"]


def test_archive_is_made_again_for_another_handler_or_model(tmp_path: Path) -> None:
    a, b = tmp_path / "digits" / "v1", tmp_path / "digits" / "v2"
    key = torchserve_app.archive_key(a, b"handler")
    assert key.startswith("digits-v1-")
    assert key == torchserve_app.archive_key(a, b"handler")
    assert key != torchserve_app.archive_key(a, b"handler, edited")
    assert key != torchserve_app.archive_key(b, b"handler")


@pytest.mark.parametrize("name", venvs.PEERS)
def test_peer_requirements_pin_every_package_exactly(name: str) -> None:
    path = ROOT / "requirements" / f"peers-{name}.txt"
    constraints = pins(ROOT / "requirements" / "constraints.txt")
    for line in requirement_lines(path):
        if line.startswith("-"):
            continue
        assert "==" in line, f"{path.name}: {line!r} is not pinned with =="
        package, version = line.split("==")
        key = normalized(package)
        assert constraints.get(key, version) == version, \
            f"{path.name} pins {line}, constraints.txt {key}=={constraints[key]}"


def test_peer_requirements_follow_the_projects_constraints() -> None:
    for name in venvs.PEERS:
        included = [p.name for p in venvs.requirement_files(
            ROOT / "requirements" / f"peers-{name}.txt")]
        assert {"constraints.txt", "serving.txt"} <= set(included), \
            f"peers-{name}.txt must install serving.txt under constraints.txt: {included}"


def test_venv_is_installed_again_when_an_included_file_changes(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("numpy==2.4.6\n")
    (tmp_path / "pins.txt").write_text("numpy==2.4.6\n")
    top = tmp_path / "peers-x.txt"
    top.write_text("-c pins.txt\n-r base.txt  # the serving code\nray==2.60.0\n")
    assert [p.name for p in venvs.requirement_files(top)] == ["peers-x.txt", "pins.txt",
                                                              "base.txt"]
    before = venvs.requirements_digest(top)
    (tmp_path / "pins.txt").write_text("numpy==2.4.7\n")
    assert venvs.requirements_digest(top) != before


def test_make_peer_venvs_makes_every_peer_unless_told_which() -> None:
    assert venvs.peer_names([]) == list(venvs.PEERS)  # `make peer-venvs`
    assert venvs.peer_names(["ray"]) == ["ray"]
    with pytest.raises(SystemExit):
        venvs.peer_names(["triton"])


def test_peer_commands_run_from_their_venv_with_the_repository_importable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(venvs, "venv_python", lambda name: Path(f"/peers/{name}/python"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    ray = servers.command_for("ray", "m:1", Path("/m"), 8000, tmp_path, {}, ())
    assert ray.command[:3] == ["/peers/ray/python", "-m", "bench.peers.ray_app"]
    assert ray.command[ray.command.index("--temp-dir") + 1] == str(tmp_path / "ray")
    assert (ray.env["PYTHONPATH"], ray.ready_path, ray.route_prefix) == (str(ROOT), "/health", "")
    torchserve = servers.command_for("torchserve", "m:1", Path("/m"), 8000, tmp_path, {}, ())
    assert torchserve.command[0] == "/peers/torchserve/python"
    assert torchserve.route_prefix == "/predictions"
    assert torchserve.ready is not None, "/ping is Healthy before the worker has the model"
    with pytest.raises(ValueError, match="classifiers only"):
        servers.command_for("ray", "m:1", Path("/m"), 8000, tmp_path, {}, (), "detection")


def test_the_report_states_the_ray_knobs_the_app_uses() -> None:
    """bench/peers/ray_app.py imports ray, so its constants are read from its source here."""
    tree = ast.parse((ROOT / "bench" / "peers" / "ray_app.py").read_text())
    constants = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                 and node.targets[0].id.isupper() and isinstance(node.value, ast.Constant)}
    stated = servers.PEER_SETTINGS["ray"]
    assert f"max_batch_size {constants['MAX_BATCH_SIZE']}" in stated
    assert f"batch_wait_timeout_s {constants['BATCH_WAIT_TIMEOUT_S']}" in stated
    assert f"max_ongoing_requests {constants['MAX_ONGOING_REQUESTS']}" in stated


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def normalized(package: str) -> str:
    return package.split("[")[0].strip().lower().replace("_", "-")


def pins(path: Path) -> dict[str, str]:
    return {normalized(line.split("==")[0]): line.split("==")[1]
            for line in requirement_lines(path) if "==" in line}
