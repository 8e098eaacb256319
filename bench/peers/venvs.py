"""A venv of its own for each peer whose packages cannot share the project's: build/peers/
<name>-venv from requirements/peers-<name>.txt, made on first use and installed again when that
file or one it names (-r, -c) changes. `python -m bench.peers.venvs ray torchserve` makes them
ahead of a bench run (`make peer-venvs`)."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / "build" / "peers"
REQUIREMENTS = ROOT / "requirements"
PEERS = ("ray", "torchserve")


def requirement_files(path: Path) -> list[Path]:
    """`path` and every file it includes with -r or -c, recursively, each once."""
    found = [path]
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) == 2 and words[0] in ("-r", "-c", "--requirement", "--constraint"):
            for included in requirement_files(path.parent / words[1]):
                if included not in found:
                    found.append(included)
    return found


def requirements_digest(path: Path) -> str:
    """What the venv was installed from: a change to any of these files installs it again."""
    digest = hashlib.sha256()
    for file in requirement_files(path):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def venv_python(name: str) -> Path:
    """The Python of peer `name`'s venv, made or brought up to date first."""
    venv = VENVS / f"{name}-venv"
    requirements = REQUIREMENTS / f"peers-{name}.txt"
    stamp = venv / ".installed"
    python = venv / "bin" / "python"
    wanted = requirements_digest(requirements)
    if stamp.is_file() and stamp.read_text() == wanted and python.is_file():
        return python
    print(f"[peers] {venv.relative_to(ROOT)} from {requirements.relative_to(ROOT)} "
          "(pip, a few minutes; about 1 GB for ray, 6 GB for torchserve)", flush=True)
    started = time.perf_counter()
    if not python.is_file():
        # The project's interpreter (the venv module makes a venv of its base Python).
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-qq", "--disable-pip-version-check",
                    "-r", str(requirements)], check=True)
    stamp.write_text(wanted)
    print(f"[peers] {name}: installed in {time.perf_counter() - started:.0f} s", flush=True)
    return python


def peer_names(argv: list[str] | None = None) -> list[str]:
    """The peers named on the command line; none named: every peer."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers.venvs", description=__doc__)
    # Checked here, not with `choices`: argparse checks a list default against the choices as
    # one value and refuses it ("invalid choice: ['ray', 'torchserve']").
    parser.add_argument("names", nargs="*", metavar="{" + ",".join(PEERS) + "}",
                        help="the peers to make (default: all)")
    names: list[str] = parser.parse_args(argv).names or list(PEERS)
    if unknown := sorted(set(names) - set(PEERS)):
        parser.error(f"unknown peer {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    return names


def main() -> None:
    for name in peer_names():
        print(venv_python(name))


if __name__ == "__main__":
    main()
