"""Every default of training and export in one place, each with its reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from serving.contract import Training

DEFAULT_ARCHITECTURE = "small_cnn"


@dataclass
class TrainConfig:
    # The store name serving looks up by default (configuration.yaml: image_classifier.model.tag).
    name: str = "digits-classifier"
    # small_cnn trains to >= 97% in seconds on 2 cores; any torchvision.models classifier also works
    # (built with weights=None: nothing is downloaded).
    architecture: str = DEFAULT_ARCHITECTURE
    # 8x8 digits upscaled to MNIST's 28x28: big enough for 3 conv stages, small enough to be fast.
    # torchvision architectures need more (e.g. 32 for resnet18, 224 for their usual setting).
    input_size: int = 28
    # The small CNN plateaus near 99% held-out accuracy after about 15 epochs of 1437 images.
    epochs: int = 15
    batch_size: int = 64
    # AdamW with a one-cycle schedule (OneCycleLR) peaking at 3e-3: fast and stable for a small
    # CNN; no tuning needed.
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    # Random shifts of up to 2 px and +-10 degrees: robustness to off-centre uploads.
    augment: bool = True
    seed: int = 0
    # Your own images instead of the digits: one sub-folder per class (torchvision's ImageFolder
    # layout). Mean and std are then measured on its training split.
    data_dir: Path | None = None
    # 'L' (grey) or 'RGB'; by default L for small_cnn on the digits, RGB otherwise.
    color_mode: str | None = None
    # 20% held out (360 images), stratified: enough to measure accuracy to about +-1%.
    holdout_fraction: float = 0.2
    # Max |p_eager - p_runtime|: float32 kernels differ in the last bits; 1e-4 is far above that
    # noise and far below any change of answer.
    parity_tolerance: float = 1e-4
    # Sample images for users; only written for the default digits dataset.
    examples_dir: Path | None = Path("examples")
    examples_per_format: int = 5

    def to_record(self, train_seconds: float) -> Training:
        """These settings as the card records them, with the time training took."""
        record = asdict(self)
        record["examples_dir"] = str(self.examples_dir) if self.examples_dir else None
        record["data_dir"] = str(Path(self.data_dir).resolve()) if self.data_dir else None
        return Training(**record, train_seconds=round(train_seconds, 1))
