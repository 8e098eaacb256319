"""Folders in; out, the same for the server and offline: a classifier's rows (CSV or JSON Lines,
resumable) or a detector's COCO results (classifier_client/coco.py); failures per file."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
COLUMNS = ["path", "label", "confidence", "model"]


def images_in(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def row(path: Path, answer: dict[str, Any]) -> dict[str, Any]:
    return {"path": str(path), "label": answer["label"],
            "confidence": round(float(answer["confidence"]), 6), "model": answer["model"]}


class Failures:
    """`<out>.failed.jsonl`: one line per file that failed and why, rewritten by each run (the
    files in it are tried again next time) and removed after a run without failures."""

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(out.name + ".failed.jsonl")
        self.count = 0

    def __enter__(self) -> Failures:
        self._file = self.path.open("w")
        return self

    def fail(self, path: Path, reason: str) -> None:
        self.count += 1
        self._file.write(json.dumps({"path": str(path), "error": reason}) + "\n")
        self._file.flush()

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        if self.count == 0:
            self.path.unlink(missing_ok=True)


class Output:
    """Appends rows to `path` (.csv or .jsonl); `done` lists the images it already holds, so that
    a second run over the same folder only sends the rest. Failures go to `<path>.failed.jsonl`
    (`Failures`): they are retried next time."""

    def __init__(self, path: Path) -> None:
        if path.suffix not in (".csv", ".jsonl"):
            raise SystemExit(f"--out must end in .csv or .jsonl, not {path.name!r}")
        self.path = path
        self.done = {r["path"] for r in self._existing_rows()}
        self._failures = Failures(path)

    @property
    def failed_path(self) -> Path:
        return self._failures.path

    @property
    def failures(self) -> int:
        return self._failures.count

    def _existing_rows(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open(newline="") as source:
            if self.path.suffix == ".csv":
                yield from csv.DictReader(source)
            else:
                yield from (json.loads(line) for line in source if line.strip())

    def __enter__(self) -> Output:
        new_csv = self.path.suffix == ".csv" and not self.path.exists()
        self._out = self.path.open("a", newline="")
        self._failures.__enter__()
        self._csv = csv.DictWriter(self._out, COLUMNS) if self.path.suffix == ".csv" else None
        if new_csv and self._csv is not None:  # (new_csv implies a DictWriter)
            self._csv.writeheader()
        return self

    def write(self, values: dict[str, Any]) -> None:
        if self._csv is not None:
            self._csv.writerow(values)
        else:
            self._out.write(json.dumps(values) + "\n")
        self._out.flush()  # a crash loses no finished row: the next run resumes after it

    def fail(self, path: Path, reason: str) -> None:
        self._failures.fail(path, reason)

    def __exit__(self, *exc: object) -> None:
        self._out.close()
        self._failures.__exit__(*exc)
