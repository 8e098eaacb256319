"""The serving wrappers of detectors trained elsewhere (train_export/detection/wrappers.py) and
the import's checks, without training, export or a server: which answer format a model gives,
that a DETR-style answer served through the card's outputs and serving's post-processing is
exactly Hugging Face's DETR post-processing, and torchvision-style answers padded to fixed rows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from serving.boxes import select_detections
from serving.contract import InputSpec
from train_export.detection.imports import check_answers, without_background
from train_export.detection.wrappers import (
    CalledModel,
    DetrStyle,
    TorchvisionStyle,
    answer_format,
    takes_pixel_values,
)
from train_export.imports import parse_args

QUERIES, CLASSES = 12, 3


def detr_answer(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"logits": 3 * torch.randn(batch, QUERIES, CLASSES + 1, generator=generator),
            "pred_boxes": torch.rand(batch, QUERIES, 4, generator=generator)}


def torchvision_answer() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 3.0, 3.0]]),
             "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([3, 1])}]


@pytest.mark.parametrize(("answer", "expected"), [
    (detr_answer(), "detr"),
    (SimpleNamespace(**detr_answer()), "detr"),  # a ModelOutput-like object: attributes
    ({"pred_logits": detr_answer()["logits"], "pred_boxes": detr_answer()["pred_boxes"]},
     "detr"),  # facebookresearch/detr's key
    (torchvision_answer(), "torchvision"),
    (torch.zeros(2, 10), None),  # a classifier's logits
    ({"logits": torch.zeros(2, 5, 4), "pred_boxes": torch.zeros(2, 7, 4)}, None),
    ([{"boxes": torch.zeros(0, 4)}], None),  # no scores, no labels
    ([], None),
], ids=["dict", "attributes", "pred_logits", "list-of-dicts", "tensor", "queries-differ",
        "missing-keys", "empty-list"])
def test_answer_format_is_detected(answer: Any, expected: str | None) -> None:
    assert answer_format(answer) == expected


class Keyword(nn.Module):
    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return detr_answer(len(pixel_values))


class Positional(nn.Module):
    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return torchvision_answer() * len(x)


def test_the_input_is_passed_as_the_forward_names_it() -> None:
    assert takes_pixel_values(Keyword()) and not takes_pixel_values(Positional())
    assert answer_format(CalledModel(Keyword(), keyword=True)(torch.zeros(2, 3, 8, 8))) == "detr"


SPEC = InputSpec(height=16, width=24, channels=3, color_mode="RGB", mean=(0.5, 0.5, 0.5),
                 std=(0.25, 0.25, 0.25))


def test_outputs_other_than_the_two_formats_are_refused_with_what_is_understood() -> None:
    class Classifier(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    with pytest.raises(SystemExit, match=r"answered a tensor \(2, 3\).*DETR-style.*torchvision"):
        check_answers(CalledModel(Classifier(), keyword=False), "auto", SPEC)
    with pytest.raises(SystemExit, match="as --outputs torchvision says"):
        check_answers(CalledModel(Keyword(), keyword=True), "torchvision", SPEC)
    assert check_answers(CalledModel(Positional(), keyword=False), "auto", SPEC) == "torchvision"


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6])
def test_detr_style_served_is_hugging_faces_post_processing(threshold: float) -> None:
    """The wrapper's boxes and per-class scores, through serving's selection (best class per
    query, no NMS), give what DetrImageProcessor.post_process_object_detection gives."""
    from transformers import DetrImageProcessor

    wrapper = DetrStyle(CalledModel(Keyword(), keyword=True), SPEC.height, SPEC.width,
                        SPEC.mean, SPEC.std)
    pixels = torch.zeros(2, SPEC.height, SPEC.width, 3, dtype=torch.uint8)
    with torch.no_grad():
        boxes, scores, features = wrapper(pixels)
    assert features.shape == (2, CLASSES + 1), "no hidden state: the logits, pooled over queries"
    theirs = DetrImageProcessor().post_process_object_detection(
        SimpleNamespace(**detr_answer()), threshold=threshold,
        target_sizes=[(SPEC.height, SPEC.width)] * 2)
    for i, expected in enumerate(theirs):
        kept_boxes, kept_scores, class_ids = select_detections(
            boxes[i].numpy(), scores[i].numpy(), threshold, 0.5, 1000, multi_label=False,
            nms=False)
        order = np.argsort(-expected["scores"].numpy(), kind="stable")
        np.testing.assert_array_equal(class_ids, expected["labels"].numpy()[order])
        np.testing.assert_allclose(kept_scores, expected["scores"].numpy()[order], atol=1e-6)
        np.testing.assert_allclose(kept_boxes, expected["boxes"].numpy()[order], atol=1e-4)


def test_torchvision_style_is_padded_to_fixed_rows_in_the_models_order() -> None:
    wrapper = TorchvisionStyle(CalledModel(Positional(), keyword=False), SPEC.mean, SPEC.std,
                               classes=CLASSES, detections=4)
    with torch.no_grad():
        boxes, scores, features = wrapper(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    assert boxes.shape == (1, 4, 4) and scores.shape == (1, 4, CLASSES)
    np.testing.assert_array_equal(boxes[0, :2].numpy(), torchvision_answer()[0]["boxes"])
    # label l in column l - 1 (0 is the background); padding rows score 0 everywhere
    np.testing.assert_allclose(scores[0].numpy(), [[0, 0, 0.9], [0.4, 0, 0], [0, 0, 0],
                                                   [0, 0, 0]])
    assert features.shape == (1, CLASSES), "no backbone: each class's best score"


def test_torchvision_labels_name_the_background_first_or_not_at_all() -> None:
    assert without_background(["__background__", "cat", "dog"]) == ["cat", "dog"]
    assert without_background(["cat", "dog"]) == ["cat", "dog"]


@pytest.mark.parametrize("flag", [["--outputs", "detr"], ["--fill", "0", "0", "0"],
                                  ["--parity-threshold", "0.3"]])
def test_detection_options_need_task_detection(flag: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args("import-pickle", ["--model", "m.pt", "--labels", "l.txt", "--name", "n",
                                     *flag])
    assert "only with --task detection" in capsys.readouterr().err
