"""The client as a package (pyproject.toml): its dependency ranges hold requirements/client.txt's
pins, the base install leaves onnxruntime and torch out, every command's --help says what it
needs, and `offline` without the extra says how to install it. Unit tests: nothing is built or
installed here (tests/classifier_client/test_install.py does that)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from classifier_client.__main__ import EXAMPLE, main
from tests.helpers import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
COMMANDS = ["predict", "detect", "folder", "offline", "smoke", "load"]


def pins(path: Path) -> dict[str, str]:
    """name -> pinned version of a requirements file, following `-r`."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found.update(pins(path.parent / line[3:].strip()))
        elif line:
            requirement = Requirement(line)
            (version,) = [s.version for s in requirement.specifier if s.operator == "=="]
            found[requirement.name.lower()] = version
    return found


def requirements(extra: str | None = None) -> list[Requirement]:
    listed = PROJECT["optional-dependencies"][extra] if extra else PROJECT["dependencies"]
    return [Requirement(text) for text in listed]


@pytest.mark.parametrize("extra", [None, "offline"])
def test_requirements_client_txt_pins_sit_inside_the_package_ranges(extra) -> None:
    pinned = pins(ROOT / "requirements" / "client.txt")
    for requirement in requirements(extra):
        name = requirement.name.lower()
        assert name in pinned, f"{name} is a dependency in pyproject.toml but not pinned in " \
            "requirements/client.txt (or the serving.txt it includes)"
        assert requirement.specifier.contains(pinned[name]), \
            f"requirements pin {name}=={pinned[name]}, outside pyproject.toml's {requirement}"


def test_the_base_install_needs_neither_onnxruntime_nor_torch() -> None:
    names = {r.name.lower() for r in requirements()}
    assert not {n for n in names if n.startswith(("onnxruntime", "torch"))}, names
    assert any(r.name.startswith("onnxruntime") for r in requirements("offline"))


def test_the_console_script_is_the_command_line() -> None:
    assert PROJECT["scripts"] == {"image-client": "classifier_client.__main__:main"}


def test_the_packaged_example_is_the_repository_one() -> None:
    """`smoke` and `load` default to it; an installed client has no examples/ folder."""
    assert EXAMPLE.read_bytes() == (ROOT / "examples" / "digit_7_00.png").read_bytes(), \
        "copy examples/digit_7_00.png to classifier_client/data/"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_help_says_what_it_needs(command, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Needs:" in text
    if command == "offline":
        assert 'pip install "image-client[offline]"' in text and "no server" in text
    else:
        assert "at --url" in text and "API key" in text


def test_offline_without_onnxruntime_says_how_to_install_it(monkeypatch, tmp_path,
                                                            capsys) -> None:
    for module in ("classifier_client.offline", "serving.runtime"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    status = main(["offline", str(tmp_path), "--out", str(tmp_path / "out.csv")])
    error = capsys.readouterr().err
    assert status == 2
    assert "needs onnxruntime" in error and 'pip install "image-client[offline]"' in error, error
