"""python -m classifier_client, every subcommand, as a user runs it against a real server."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, python

pytestmark = pytest.mark.e2e

EXAMPLES = ROOT / "examples"


def cli(*args: str):
    return python("-m", "classifier_client", *args, timeout=300)


def test_predict_prints_one_line_per_image(server) -> None:
    images = sorted(EXAMPLES.glob("digit_*"))[:3]
    result = cli("predict", *map(str, images), "--url", server.url)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in images]
    assert [line["label"] for line in lines] == [p.name.split("_")[1] for p in images]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The digit examples, in a nested folder, plus one file that is not an image."""
    root = tmp_path / "photos"
    shutil.copytree(EXAMPLES, root / "batch-1", ignore=lambda _, names: [
        name for name in names if not name.startswith("digit_")])  # not the detector's scene
    (root / "batch-1" / "notes.png").write_bytes(b"not an image")
    return root


def test_folder_writes_csv_reports_failures_and_resumes(server, folder, tmp_path) -> None:
    out = tmp_path / "preds.csv"
    first = cli("folder", str(folder), "--url", server.url, "--out", str(out),
                "--concurrency", "4")
    assert first.returncode == 1, "a failed file makes the exit status non-zero"
    assert "10 answered, 1 failed" in first.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10
    assert all(Path(r["path"]).name.split("_")[1] == r["label"] for r in rows)
    failed = [json.loads(line) for line in (tmp_path / "preds.csv.failed.jsonl").open()]
    assert [Path(f["path"]).name for f in failed] == ["notes.png"]
    assert failed[0]["error"].startswith("invalid_image")

    (folder / "batch-1" / "notes.png").unlink()
    shutil.copy(EXAMPLES / "digit_7_00.png", folder / "late_7.png")
    second = cli("folder", str(folder), "--url", server.url, "--out", str(out))
    assert second.returncode == 0 and "1 answered, 0 failed" in second.stdout
    assert len(list(csv.DictReader(out.open()))) == 11
    assert not (tmp_path / "preds.csv.failed.jsonl").exists()


def test_offline_gives_the_server_answers_without_a_server(server, folder, tmp_path,
                                                           trained_model) -> None:
    (folder / "batch-1" / "notes.png").unlink()
    served, offline = tmp_path / "served.jsonl", tmp_path / "offline.jsonl"
    assert cli("folder", str(folder), "--url", server.url, "--out", str(served)).returncode == 0
    result = cli("offline", str(folder), "--model", trained_model, "--out", str(offline))
    assert result.returncode == 0, result.stderr

    def rows(path: Path) -> dict[str, dict]:
        return {r["path"]: r for r in map(json.loads, path.open())}

    served_rows, offline_rows = rows(served), rows(offline)
    assert served_rows.keys() == offline_rows.keys() and len(served_rows) == 10
    for path, row in offline_rows.items():
        assert row["label"] == served_rows[path]["label"]
        assert row["confidence"] == pytest.approx(served_rows[path]["confidence"], abs=1e-5)


def test_smoke_checks_a_deployment(server) -> None:
    result = cli("smoke", "--url", server.url, "--requests", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert "digit_7_00.png -> 7" in result.stdout and "p99" in result.stdout


def test_smoke_fails_on_a_wrong_prediction(server) -> None:
    result = cli("smoke", "--url", server.url, "--expect", "3", "--requests", "1")
    assert result.returncode == 1 and "FAIL digit_7_00.png -> 3" in result.stdout


def test_load_prints_a_summary(server) -> None:
    result = cli("load", "--url", server.url, "--concurrency", "4", "--duration", "3")
    assert result.returncode == 0, result.stderr
    summary = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert int(summary["ok"]) > 0 and int(summary["ok"]) == int(summary["requests"])
