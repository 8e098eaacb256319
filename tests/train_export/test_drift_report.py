"""`python -m train_export.drift_report`: one command writes the report and its figure; --quick
only changes that run."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.helpers import python


@pytest.mark.e2e
def test_the_report_and_its_figure_come_from_one_command(trained_model, tmp_path) -> None:
    out = tmp_path / "drift.md"
    result = python("-m", "train_export.drift_report", "--model", trained_model, "--out",
                    str(out), "--quick", timeout=600)
    assert result.returncode == 0, result.stderr
    report = out.read_text()
    for stream in ("clean held-out", "blur sigma 0.5", "blur sigma 1", "blur sigma 2",
                   "shapes (OOD)", "letters (OOD)"):
        assert f"| {stream} |" in report
    for kernel in ("Gaussian", "Exponential", "Rational Quadratic"):
        assert f"p-value, {kernel}" in report
    assert "separated the blurred digits best" in report and "false-alarm rate" in report
    with Image.open(tmp_path / "drift.png") as figure:
        assert figure.width > 1000 and figure.height > 500


def test_quick_is_an_argument_not_a_change_of_module_state() -> None:
    from train_export.drift_report import FULL, QUICK, parse_args

    assert parse_args(["--quick"]).effort == QUICK
    assert parse_args([]).effort == FULL, "a quick run before must not make the next one quick"
