"""Bring your own detector, end to end through a real `bentoml serve service:ObjectDetector`.

Each path, built here with random weights (nothing is downloaded): a whole model saved with
torch.save(model) from the user's `tasks/detection/model.py`, answering DETR-style or
torchvision-style; torchvision's fasterrcnn_mobilenet_v3_large_320_fpn and
ssdlite320_mobilenet_v3_large from a state_dict; a Hugging Face DetrForObjectDetection from a
save_pretrained folder. Each is imported with the real CLI (which checks parity on 32 images and
records it in the card), then served from a process where `tasks` does not exist, and the served
detections are compared with the original model's own output and its own post-processing,
computed here: torch on the letterboxed upload, then DetrImageProcessor's
post_process_object_detection (DETR-style) or the model's own answer (torchvision-style), at the
threshold the request gives.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from serving.boxes import Letterbox, letterbox, to_image_pixels
from tests.helpers import ROOT, python, start_server
from train_export.detection.evaluate import Detections
from train_export.detection.parity import compare_detections
from train_export.detection.scenes import heldout_scenes

pytestmark = pytest.mark.e2e  # every test here runs the import CLI and a server

LABELS = ["cat", "dog", "bird"]
# Served images: other scenes than the 32 the import checked parity on (seed 1, not 0).
SERVED_IMAGES = 8
SERVED_PER_IMAGE = 5  # detections per image the request's threshold keeps
BOX_TOLERANCE_PX = 0.5
SCORE_TOLERANCE = 1e-4
DETR_SIZE = 128  # the DETR-style models' input: small, for a test on 2 cores

USER_CODE = '''
import math

import torch
from torch import nn


class TinyDetr(nn.Module):
    """A user's DETR-style detector: called as model(pixel_values=x), answers a dict."""

    def __init__(self, classes: int = 3, queries: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU())
        self.queries = nn.Parameter(torch.randn(queries, dim))
        self.class_head = nn.Linear(dim, classes + 1)
        self.box_head = nn.Linear(dim, 4)

    def forward(self, pixel_values: torch.Tensor) -> dict:
        tokens = self.backbone(pixel_values).flatten(2).transpose(1, 2)
        weights = torch.softmax(self.queries @ tokens.transpose(1, 2) / math.sqrt(tokens.shape[-1]),
                                dim=-1)
        hidden = weights @ tokens
        return {"logits": 4 * self.class_head(hidden),
                "pred_boxes": torch.sigmoid(self.box_head(hidden))}


class TinyBoxes(nn.Module):
    """A user's torchvision-style detector: called as model(x), answers one dict per image
    (boxes in input pixels, scores, labels counted from 1, 0 being the background)."""

    def __init__(self, classes: int = 3, keep: int = 20, stride: int = 8) -> None:
        super().__init__()
        self.stride, self.keep = stride, keep
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classes = nn.Conv2d(16, classes, 1)
        self.sizes = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> list:
        maps = self.backbone(x)
        scores = torch.sigmoid(self.classes(maps)).flatten(2)  # N, K, hw
        sizes = self.stride * 4 * torch.sigmoid(self.sizes(maps)).flatten(2)  # N, 2, hw
        height, width = maps.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        cx = (xs.flatten().float() + 0.5) * self.stride
        cy = (ys.flatten().float() + 0.5) * self.stride
        answers = []
        for image_scores, (w, h) in zip(scores, sizes):
            best, label = image_scores.max(dim=0)
            top = best.topk(self.keep)
            i = top.indices
            boxes = torch.stack([cx[i] - w[i] / 2, cy[i] - h[i] / 2, cx[i] + w[i] / 2,
                                 cy[i] + h[i] / 2], dim=-1)
            answers.append({"boxes": boxes, "scores": top.values, "labels": label[i] + 1})
        return answers
'''


# --- the user's models, built and saved here ---------------------------------------------------

@pytest.fixture(scope="module")
def user_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's training repository: tasks/detection/model.py, and torch.save(model) of both
    detectors run from there (detr.pt, boxes.pt)."""
    repo = tmp_path_factory.mktemp("training-repo")
    package = repo / "tasks" / "detection"
    package.mkdir(parents=True)
    (repo / "tasks" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text(USER_CODE)
    result = python("-c", textwrap.dedent("""
        import torch
        from tasks.detection.model import TinyBoxes, TinyDetr
        torch.manual_seed(0)
        torch.save(TinyDetr().eval(), "detr.pt")
        torch.save(TinyBoxes().eval(), "boxes.pt")
    """), cwd=repo)
    assert result.returncode == 0, result.stderr
    return repo


def torchvision_checkpoint(architecture: str, directory: Path) -> Path:
    """Random weights of a torchvision detector (3 classes and the background), saved as a
    state_dict, as a user's fine-tuning leaves one, without a download.

    What a training run would have settled is settled here, or the random model answers
    nothing worth comparing: batch norm statistics measured on a batch (with the initial ones
    every feature vanishes), each variance at least 0.1 (a dead channel's near-zero variance
    would scale rounding up by thousands, and ONNX Runtime and torch round differently), and
    Faster R-CNN's heads initialised as Detectron does (class 0.01, box 0.001) with objectness
    spread out (near-equal proposals' order would be decided by the last bits).
    """
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    model = torchvision.models.get_model(architecture, weights=None, weights_backbone=None,
                                         num_classes=len(LABELS) + 1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # one pass sets the statistics of its batch
    model.train()
    with torch.no_grad():
        model.backbone(torch.rand(2, 3, 320, 320))
        for norm in norms:
            norm.running_var.clamp_(min=0.1)
    if architecture.startswith("fasterrcnn"):
        predictor = model.roi_heads.box_predictor
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)
        nn.init.normal_(model.rpn.head.cls_logits.weight, std=0.1)
    path = directory / f"{architecture}.pt"
    torch.save(model.state_dict(), path)
    return path


def hugging_face_detr(directory: Path) -> Path:
    """A DetrForObjectDetection from a DetrConfig with a tiny ResNet backbone, random weights
    (no timm, no pretrained backbone: nothing is fetched), saved with save_pretrained."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                            layer_type="basic", out_features=["stage2"])
    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=16,
        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), auxiliary_loss=False,
        init_std=0.5)  # DETR's 0.02 leaves a random model scoring every query alike
    torch.manual_seed(0)
    folder = directory / "hf-detr"
    DetrForObjectDetection(config).eval().save_pretrained(folder)
    return folder


# --- the original model's own detections ---------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the import's default --mean and --std
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Original:
    """The model as its user runs it: torch, its own input, its own post-processing."""

    model: torch.nn.Module
    outputs: str  # "detr" or "torchvision"
    size: int  # the square frame the import letterboxes uploads into
    torchvision_architecture: bool = False  # takes a list of 0-1 images, normalizes inside

    @property
    def fill(self) -> tuple[int, ...]:
        """The letterbox's padding, the import's default: the mean colour of the model's input
        (torchvision's detectors have their own; SSDlite's is 0.5 grey)."""
        transform = getattr(self.model, "transform", None)
        mean = transform.image_mean if self.torchvision_architecture else IMAGENET_MEAN
        return tuple(round(255 * m) for m in mean)

    def detect(self, images: list[np.ndarray], threshold: float) -> list[Detections]:
        return [self.detect_one(image, threshold) for image in images]

    def detect_one(self, image: np.ndarray, threshold: float) -> Detections:
        # torchvision's detectors take 0-1 images and normalize inside; the pickles take
        # normalized ones (the import's default --mean and --std).
        mean, std = ((0.0,) * 3, (1.0,) * 3) if self.torchvision_architecture else (
            IMAGENET_MEAN, IMAGENET_STD)
        frame, geometry = letterbox(Image.fromarray(image), self.size, self.size, self.fill)
        x = torch.from_numpy(frame.copy()).permute(2, 0, 1).float() / 255
        x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        with torch.no_grad():
            if self.torchvision_architecture:
                answer = self.model([x])
            elif self.outputs == "detr":
                answer = self.model(pixel_values=x[None])
            else:
                answer = self.model(x[None])
        if self.outputs == "detr":
            return detr_post_processing(answer, threshold, self.size, geometry)
        found = answer[0]
        keep = found["scores"] > threshold
        return in_image(found["boxes"][keep], found["scores"][keep], found["labels"][keep] - 1,
                        geometry)


def detr_post_processing(answer: Any, threshold: float, size: int, geometry: Letterbox
                         ) -> Detections:
    """Hugging Face's DETR post-processing, as its users call it."""
    from types import SimpleNamespace

    from transformers import DetrImageProcessor

    if isinstance(answer, dict):
        answer = SimpleNamespace(**answer)
    found = DetrImageProcessor().post_process_object_detection(
        answer, threshold=threshold, target_sizes=[(size, size)])[0]
    return in_image(found["boxes"], found["scores"], found["labels"], geometry)


def in_image(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
             geometry: Letterbox) -> Detections:
    return Detections(to_image_pixels(boxes.numpy(), geometry), scores.numpy(),
                      labels.numpy().astype(np.int64))


# --- the paths ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportPath:
    """One way in: how the test builds the model, the import command, and the original."""

    name: str
    command: Callable[[Path, Path], list[str]]  # (user repo, work dir) -> CLI arguments
    original: Callable[[Path, Path], Original]
    outputs: str


def pickled(file: str) -> Callable[[Path, Path], list[str]]:
    def command(repo: Path, work: Path) -> list[str]:
        return ["import-pickle", "--task", "detection", "--model", str(repo / file),
                "--code-path", str(repo), "--input-size", str(DETR_SIZE), str(DETR_SIZE)]
    return command


def pickled_original(file: str, outputs: str) -> Callable[[Path, Path], Original]:
    def original(repo: Path, work: Path) -> Original:
        from train_export.imports import load_pickled

        return Original(load_pickled(repo / file, [repo]), outputs, DETR_SIZE)
    return original


def torchvision_path(architecture: str) -> ImportPath:
    def command(repo: Path, work: Path) -> list[str]:
        return ["import-torchvision", "--task", "detection", "--architecture", architecture,
                "--checkpoint", str(torchvision_checkpoint(architecture, work))]

    def original(repo: Path, work: Path) -> Original:
        import torchvision

        model = torchvision.models.get_model(architecture, weights=None, weights_backbone=None,
                                             num_classes=len(LABELS) + 1)
        model.load_state_dict(torch.load(work / f"{architecture}.pt", weights_only=True))
        return Original(model.eval(), "torchvision", 320, torchvision_architecture=True)

    return ImportPath(architecture, command, original, "torchvision")


def hugging_face_command(repo: Path, work: Path) -> list[str]:
    return ["import-pickle", "--task", "detection", "--model", str(hugging_face_detr(work)),
            "--input-size", str(DETR_SIZE), str(DETR_SIZE)]


def hugging_face_original(repo: Path, work: Path) -> Original:
    from transformers import DetrForObjectDetection

    model = DetrForObjectDetection.from_pretrained(work / "hf-detr", local_files_only=True)
    return Original(model.eval(), "detr", DETR_SIZE)


PATHS = [
    ImportPath("pickle-detr", pickled("detr.pt"), pickled_original("detr.pt", "detr"), "detr"),
    ImportPath("pickle-torchvision-style", pickled("boxes.pt"),
          pickled_original("boxes.pt", "torchvision"), "torchvision"),
    torchvision_path("fasterrcnn_mobilenet_v3_large_320_fpn"),
    torchvision_path("ssdlite320_mobilenet_v3_large"),
    ImportPath("hugging-face-detr", hugging_face_command, hugging_face_original, "detr"),
]


# --- the tests ----------------------------------------------------------------------------------

def test_the_pickle_cannot_be_loaded_without_its_code(user_repo: Path) -> None:
    result = python("-c", f"import torch; torch.load({str(user_repo / 'detr.pt')!r}, "
                    "weights_only=False)")
    assert "ModuleNotFoundError: No module named 'tasks'" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def served_scenes() -> list[np.ndarray]:
    return [scene.image for scene in heldout_scenes(SERVED_IMAGES, seed=1)]


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_served_detections_equal_the_models_own(
        path: ImportPath, user_repo: Path, served_scenes: list[np.ndarray], tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    result = python("-m", "train_export", *path.command(user_repo, tmp_path),
                    "--labels", str(labels), "--name", f"byo-{path.name}", timeout=900)
    assert result.returncode == 0, result.stderr
    print(f"\n{path.name}: {result.stdout.strip().splitlines()[-1]}")  # the figures in the docs
    report = json.loads(result.stdout.strip().splitlines()[-1])
    parity = report["parity"]
    assert report["outputs"] == path.outputs
    assert parity["samples"] >= 32 and parity["detections"] > 0, parity
    assert parity["max_box_diff_px"] <= BOX_TOLERANCE_PX
    assert parity["max_score_diff"] <= SCORE_TOLERANCE
    assert report["drift_reference"] is False, "no --data: no drift reference"

    original = path.original(user_repo, tmp_path)
    threshold = keeping(original.detect(served_scenes, 0.0), SERVED_PER_IMAGE)
    with serve(report["tag"], tmp_path) as url:
        info = httpx.post(f"{url}/model_info", json={}, timeout=60).json()
        served = detect(url, served_scenes, threshold)
    assert info["tag"] == report["tag"] and info["labels"] == LABELS
    assert info["parity"] == parity, "the card records the parity the import measured"

    own = original.detect(served_scenes, threshold)
    comparison = compare_detections(served, own, threshold, BOX_TOLERANCE_PX, SCORE_TOLERANCE)
    assert comparison.detections > 0, "the original model detects nothing on the served images"
    assert not comparison.problems, comparison.problems[:5]
    assert comparison.max_box_diff_px <= BOX_TOLERANCE_PX, comparison
    assert comparison.max_score_diff <= SCORE_TOLERANCE, comparison


def test_data_gives_an_imported_detector_its_drift_reference(user_repo: Path, tmp_path: Path,
                                                              ) -> None:
    """--data DIR: the served graph's features of the images under DIR (any depth; what is not
    an image is left out) become the card's drift reference."""
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    for i, scene in enumerate(heldout_scenes(12, seed=2)):
        Image.fromarray(scene.image).save(data / ("nested" if i % 2 else "") / f"s{i}.png")
    (data / "notes.png").write_bytes(b"not an image")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    result = python("-m", "train_export", *pickled("detr.pt")(user_repo, tmp_path),
                    "--labels", str(labels), "--name", "byo-with-data", "--data", str(data),
                    timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["drift_reference"] is True
    stored = python("-c", "import bentoml, json, numpy; m = bentoml.models.get("
                    f"{report['tag']!r}); card = json.load(open(m.path_of('card.json'))); "
                    "features = numpy.load(m.path_of(card['drift_reference']['file'])); "
                    "print(json.dumps([card['drift_reference'], list(features.shape)]))")
    assert stored.returncode == 0, stored.stderr
    reference, shape = json.loads(stored.stdout.strip().splitlines()[-1])
    assert reference["samples"] == 12 and shape[0] == 12, (reference, shape)
    assert str(data) in reference["source"]


def keeping(found: list[Detections], per_image: int) -> float:
    """A threshold (4 decimals) that keeps about `per_image` of these detections per image: a
    random model's scores sit wherever its weights put them."""
    scores = np.sort(np.concatenate([d.scores for d in found]))[::-1]
    return float(np.floor(scores[min(len(scores) - 1, per_image * len(found))] * 1e4) / 1e4)


@contextlib.contextmanager
def serve(tag: str, tmp_path: Path) -> Iterator[str]:
    """`bentoml serve service:ObjectDetector` of `tag` from the project root, one worker, in a
    process where the user's `tasks` package does not exist."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"services": {"ObjectDetector": {
        "workers": 1, "object_detector": {"model": {"tag": tag}}}}}))
    env = {**os.environ, "BENTOML_CONFIG": str(config)}
    env.pop("PYTHONPATH", None)
    assert not (ROOT / "tasks").exists()
    with start_server(["service:ObjectDetector"], cwd=ROOT, log_dir=tmp_path, env=env) as server:
        yield server.url


def detect(url: str, images: list[np.ndarray], threshold: float) -> list[Detections]:
    """One request with every image as PNG, at `threshold`, up to 1000 detections each."""
    files = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        files.append(("images", (f"scene{i}.png", buffer.getvalue(), "image/png")))
    response = httpx.post(f"{url}/detect", files=files, timeout=300, data={
        "confidence_threshold": str(threshold), "max_detections": "1000"})
    assert response.status_code == 200, response.text
    return [Detections(np.array([d["box"] for d in a["detections"]], np.float32).reshape(-1, 4),
                       np.array([d["score"] for d in a["detections"]], np.float32),
                       np.array([d["class_id"] for d in a["detections"]], np.int64))
            for a in response.json()]
