"""Folders in, one row per image out (CSV or JSON Lines), the same for the server and offline."""

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


class Output:
    """Appends rows to `path` (.csv or .jsonl); `done` lists the images it already holds, so that
    a second run over the same folder only sends the rest. Failures go to `<path>.failed.jsonl`,
    one line per file and reason, rewritten by each run: they are retried next time."""

    def __init__(self, path: Path) -> None:
        if path.suffix not in (".csv", ".jsonl"):
            raise SystemExit(f"--out must end in .csv or .jsonl, not {path.name!r}")
        self.path = path
        self.failed_path = path.with_name(path.name + ".failed.jsonl")
        self.done = {r["path"] for r in self._existing_rows()}
        self.failures = 0

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
        self._failed = self.failed_path.open("w")
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
        self.failures += 1
        self._failed.write(json.dumps({"path": str(path), "error": reason}) + "\n")
        self._failed.flush()

    def __exit__(self, *exc: object) -> None:
        self._out.close()
        self._failed.close()
        if self.failures == 0:
            self.failed_path.unlink(missing_ok=True)
