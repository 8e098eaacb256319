"""The command line's arguments: thresholds checked before anything is sent, the output formats
said in --help."""

from __future__ import annotations

import pytest

from classifier_client.__main__ import main, parse_args


def test_thresholds_are_parsed_for_detect_folder_and_offline() -> None:
    args = parse_args(["detect", "a.png", "--confidence-threshold", "0.3", "--iou-threshold",
                       "0.6", "--max-detections", "7", "--draw", "out"])
    assert (args.confidence_threshold, args.iou_threshold, args.max_detections) == (0.3, 0.6, 7)
    for command in (["folder", "photos", "--out", "r.json"],
                    ["offline", "photos", "--out", "r.json"]):
        assert parse_args([*command, "--max-detections", "3"]).max_detections == 3


@pytest.mark.parametrize("option, value", [("--confidence-threshold", "1.5"),
                                           ("--iou-threshold", "-0.1"),
                                           ("--max-detections", "0")])
def test_a_threshold_out_of_range_is_refused_with_its_range(option, value, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["detect", "a.png", option, value])
    assert exited.value.code == 2
    assert "from 0 to 1" in capsys.readouterr().err or option == "--max-detections"


def test_folder_help_says_how_image_ids_are_assigned(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["folder", "--help"])
    text = capsys.readouterr().out
    assert "sorted path order" in text and "results.images.json" in text
    assert "--confidence-threshold 0.05" in text


def test_the_detector_key_is_detects_default(monkeypatch) -> None:
    monkeypatch.delenv("IMAGE_CLASSIFIER_API_KEY", raising=False)
    monkeypatch.setenv("OBJECT_DETECTOR_API_KEY", "d" * 16)
    assert parse_args(["detect", "a.png"]).api_key == "d" * 16
    assert parse_args(["folder", "x", "--out", "r.json"]).api_key == "d" * 16
    assert parse_args(["predict", "a.png"]).api_key is None
