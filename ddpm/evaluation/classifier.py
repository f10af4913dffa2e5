"""A small CNN classifier: the feature extractor of the classifier metrics, and CAS's classifier.

ImageNet's InceptionV3 was never shown a digit; a CNN trained on the digits themselves gives
features that mean something for MNIST (the idea of the "MNIST FID" used since Heusel et al. 2017,
arXiv:1706.08500, and of the classification accuracy score of Ravuri & Vinyals 2019,
arXiv:1905.10887). The network is two 3x3 conv pairs with max-pooling, a 128-d penultimate layer
(the features for FID, KID and precision/recall) and one logit per class (the class probabilities
for the Inception Score). It takes C x H x W images in [-1, 1] (1 x 28 x 28 for digits).

`ClassifierFeatureExtractor` wraps it for torch-fidelity, which then computes classifier-FID/IS/KID
with its own code: `register_with_torch_fidelity()` then `calculate_metrics(...,
feature_extractor="mnist-classifier", feature_extractor_weights_path=PATH, classifier_model=MODEL)`
(MODEL: the classifier already loaded, so that an evaluation reads its file once; without it the
extractor reads PATH). "mnist-classifier" is the registered name and the file format of every data
set's classifier, kept as it was when only MNIST had one: reports and caches name it.

The weights file is one dict (format, version, model state dict, image shape, data, test accuracy,
epochs, seed), written atomically and read with torch.load(weights_only=True). The MNIST-5k
classifier is shipped with the repo (`SHIPPED_CLASSIFIER`, its sha256 in `SHIPPED_CLASSIFIER_SHA256`)
and is the default for --data mnist and mnist-5k, so everyone's classifier-FID uses the same network.

Example:
    model = train_classifier(train_images, train_labels, epochs=10)
    save_classifier(model, "checkpoints/classifier_fashion-mnist.pt", data="fashion-mnist")
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

from ddpm.plumbing.checkpointing import DEFAULT_CHECKPOINT_DIR, read_torch_file, save_checkpoint
from ddpm.plumbing.messages import UserError

CLASSIFIER_FORMAT = "mnist-classifier"
CLASSIFIER_VERSION = 2  # 2 records the image shape; version 1 files are 1 x 28 x 28
LEGACY_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
CONV_CHANNELS = (16, 32)
FEATURE_DIM = 128
DROPOUT = 0.25
DEFAULT_EPOCHS = 10
MIN_STEPS = 300  # small data sets get more epochs, so that the default training makes this many steps
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 1e-3
EVAL_BATCH_SIZE = 1000
REPO = Path(__file__).resolve().parents[2]
SHIPPED_CLASSIFIER = REPO / "weights" / "classifier_mnist5k.pt"
SHIPPED_CLASSIFIER_SHA256 = "e2e0de19b4520b2f71ef9e4340c9d7bf92c787609e29fdc27efb656793afcfc9"
SHIPPED_FOR = ("mnist", "mnist-5k")  # data sets whose default classifier is the shipped one

# torch-fidelity names: the extractor, and its two outputs (named like InceptionV3's "2048" / "logits")
EXTRACTOR_NAME = "mnist-classifier"
FEATURES_LAYER = str(FEATURE_DIM)
LOGITS_LAYER = "logits"
UINT8_MAX = 255


class ClassifierError(UserError):
    """A classifier weights file that is missing, unreadable or of another format."""


class SmallCNNClassifier(nn.Module):
    """A small CNN for images of any data set: [B, C, H, W] in [-1, 1] -> logits [B, 10]; `features`
    gives the penultimate [B, 128]."""

    def __init__(self, image_shape: tuple[int, ...] = LEGACY_SHAPE):
        super().__init__()
        self.image_shape = tuple(image_shape)
        channels, height, width = self.image_shape
        layers = []
        for conv_width in CONV_CHANNELS:
            layers += [
                nn.Conv2d(channels, conv_width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(conv_width, conv_width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = conv_width
        pooled = 2 ** len(CONV_CHANNELS)
        self.convolutions = nn.Sequential(*layers, nn.Flatten())
        self.penultimate = nn.Sequential(
            nn.Linear(channels * (height // pooled) * (width // pooled), FEATURE_DIM), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate activations: [B, C, H, W] -> [B, 128] (after ReLU)."""
        return self.penultimate(self.convolutions(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def data_label(data: str, data_dir: str | Path | None) -> str:
    """A short name of the data set for file names: 'mnist-5k', or 'idx-<folder>' for --data-dir."""
    return data if data_dir is None else f"idx-{Path(data_dir).resolve().name}"


def default_classifier_path(
    data: str, data_dir: str | Path | None, image_shape: tuple[int, ...] = LEGACY_SHAPE
) -> Path:
    """The shipped MNIST-5k classifier for MNIST data at 1 x 28 x 28; else
    checkpoints/classifier_<data>.pt (classifier_<data>_<C>x<H>x<W>.pt at other shapes), trained
    there once by `ensure_classifier` (one file per data set and image shape)."""
    image_shape = tuple(image_shape)
    if data_dir is None and data in SHIPPED_FOR and image_shape == LEGACY_SHAPE:
        return Path(os.path.relpath(SHIPPED_CLASSIFIER))  # as the user would write it, in reports
    shape = "" if image_shape == LEGACY_SHAPE else "_" + "x".join(map(str, image_shape))
    return DEFAULT_CHECKPOINT_DIR / f"classifier_{data_label(data, data_dir)}{shape}.pt"


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SmallCNNClassifier:
    """Train a fresh classifier with Adam and cross-entropy; returns it in eval mode.

    images: [N, C, H, W] in [-1, 1]; labels: [N] in 0..9. Seeds torch's global RNG with seed
    (initial weights, dropout) and draws the batch order from its own generator.
    """
    torch.manual_seed(seed)
    model = SmallCNNClassifier(tuple(images.shape[1:])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    for _ in tqdm(range(epochs), desc="training the classifier", unit="epoch", disable=not progress):
        model.train()
        order = torch.randperm(len(images), generator=generator).to(device)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def class_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax class probabilities [N, 10] of images [N, C, H, W] in [-1, 1], on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model(chunk.to(device)).softmax(1).cpu() for chunk in images.split(EVAL_BATCH_SIZE)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose most probable class is the label: images [N, C, H, W], labels [N]."""
    return (class_probabilities(model, images).argmax(1) == labels.cpu()).float().mean().item()


def judge(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """How recognisable images are: the mean of the classifier's top probability (its confidence) and
    the fraction of images predicted as each class (10 floats summing to 1)."""
    probabilities = class_probabilities(model, images)
    confidence, predicted = probabilities.max(dim=1)
    counts = torch.bincount(predicted, minlength=NUM_CLASSES)
    return {"mean_confidence": confidence.mean().item(), "class_fractions": (counts / len(images)).tolist()}


def save_classifier(model: SmallCNNClassifier, path: str | Path, **info: Any) -> None:
    """Write the weights, the image shape and plain-value info (data, test_accuracy, ...) atomically."""
    state = {
        "format": CLASSIFIER_FORMAT,
        "version": CLASSIFIER_VERSION,
        "model": model.state_dict(),
        "image_shape": list(model.image_shape),
        **info,
    }
    save_checkpoint(state, path)


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SmallCNNClassifier, dict[str, Any]]:
    """The classifier in eval mode, and its file's other entries (data, test_accuracy, ...)."""
    state = read_torch_file(path, device, "classifier file", ClassifierError)
    if not isinstance(state, dict) or state.get("format") != CLASSIFIER_FORMAT:
        raise ClassifierError(
            f"{path} is not a classifier file of this repo (python -m ddpm.evaluation.train_classifier)"
        )
    model = SmallCNNClassifier(tuple(state.get("image_shape", LEGACY_SHAPE))).to(device)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as error:
        raise ClassifierError(
            f"{path} does not match this code's classifier: {error}".splitlines()[0]
        ) from None
    return model.eval(), {key: value for key, value in state.items() if key != "model"}


@dataclass
class LoadedClassifier:
    """A classifier file read once: its path, the network (eval mode, on the CPU) and its other entries."""

    path: Path
    model: SmallCNNClassifier
    info: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path) -> LoadedClassifier:
        model, info = load_classifier(path)
        return cls(Path(path), model, info)

    def on(self, device: str | torch.device) -> SmallCNNClassifier:
        """The network on device: itself on the CPU, else a copy there."""
        if torch.device(device).type == "cpu":
            return self.model
        return copy.deepcopy(self.model).to(device)


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor: uint8 [B, 3, H, W] (0..255) -> "128" and/or "logits".

    For a 1-channel classifier the three channels (a grey image replicated) are averaged back to
    one; then the images are mapped to [-1, 1] as in data_sources.to_model_range. "128"
    (penultimate) serves FID, KID and precision/recall, "logits" the IS. torch-fidelity builds it
    as cls(name, features_list, **calculate_metrics kwargs): a `classifier_model` among them (the
    network of feature_extractor_weights_path, already loaded) is copied rather than read again.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path=None,
        classifier_model: SmallCNNClassifier | None = None,
        **kwargs,
    ):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None, f"{name} needs feature_extractor_weights_path")
        if classifier_model is None:
            classifier_model, _ = load_classifier(feature_extractor_weights_path)
        self.classifier = copy.deepcopy(classifier_model)  # torch-fidelity moves its extractor in place
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, str]:
        return FEATURES_LAYER, LOGITS_LAYER

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": LOGITS_LAYER, "fid": FEATURES_LAYER, "kid": FEATURES_LAYER, "prc": FEATURES_LAYER}[
            metric
        ]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, *LEGACY_SHAPE[1:], dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting a uint8 image tensor")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        images = x.float()
        if self.classifier.image_shape[0] == 1:
            images = images.mean(dim=1, keepdim=True)
        features = self.classifier.features(images / (UINT8_MAX / 2) - 1)
        outputs = {FEATURES_LAYER: features, LOGITS_LAYER: self.classifier.head(features)}
        return tuple(outputs[name] for name in self.features_list)


def register_with_torch_fidelity() -> None:
    """Register ClassifierFeatureExtractor as "mnist-classifier" (once per process)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)


def default_epochs(num_images: int, batch_size: int) -> int:
    """DEFAULT_EPOCHS, or as many more as a small data set needs for MIN_STEPS steps (MNIST-5k's
    4,000 images in batches of 128 make 320 steps in 10 epochs: 10)."""
    return max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / math.ceil(num_images / batch_size)))


def train_and_save(
    path: str | Path | None,
    data: str,
    data_dir: str | Path | None,
    epochs: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: str | torch.device = "cpu",
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> dict[str, Any]:
    """Train a classifier on a data set's train split (at image_size and channels, default the
    data's own) for `epochs` (default: default_epochs), test it on its test split, save it to path
    (default: default_classifier_path of the data and shape); returns the info saved with it (data,
    test_accuracy, epochs, seed, num_train) and the path."""
    from ddpm.datasets.sources import load_images
    from ddpm.plumbing.output_files import writable_dir

    train_images, train_labels = load_images(
        data, "train", data_dir, image_size=image_size, channels=channels
    )
    test_images, test_labels = load_images(data, "test", data_dir, image_size=image_size, channels=channels)
    if len(train_labels.unique()) < 2:
        raise ClassifierError(f"{data_label(data, data_dir)} has one class: there is no classifier to train")
    shape = tuple(train_images.shape[1:])
    path = Path(path) if path is not None else default_classifier_path(data, data_dir, shape)
    writable_dir(path.parent)
    epochs = epochs or default_epochs(len(train_images), batch_size)
    model = train_classifier(train_images, train_labels, epochs, batch_size, lr, seed, device, progress=True)
    info = {
        "data": data_label(data, data_dir),
        "test_accuracy": accuracy(model, test_images, test_labels),
        "num_test": len(test_images),
        "epochs": epochs,
        "seed": seed,
        "num_train": len(train_images),
    }
    save_classifier(model.cpu(), path, **info)
    return info | {"path": str(path)}


def ensure_classifier(
    data: str,
    data_dir: str | Path | None,
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    image_shape: tuple[int, int, int] = LEGACY_SHAPE,
) -> LoadedClassifier:
    """The classifier for a data set's images of image_shape, read once: from `path` if given (it must
    exist and take that shape), else from the default file, trained (on device) and cached there once
    (with one line saying so) when it does not exist yet."""
    from ddpm.plumbing.messages import note

    if path is not None:
        return checked_shape(Path(path), image_shape)
    path = default_classifier_path(data, data_dir, image_shape)
    if path.is_file():
        return checked_shape(path, image_shape)
    if path.resolve() == SHIPPED_CLASSIFIER:
        raise ClassifierError(
            f"the shipped classifier {path} is missing: restore it with `git checkout {path}`"
        )
    label = data_label(data, data_dir)
    note(f"no classifier for {label} yet: training one on its train split, cached at {path}")
    channels, height, width = image_shape
    train_and_save(path, data, data_dir, device=device, image_size=(height, width), channels=channels)
    return LoadedClassifier.read(path)


def checked_shape(path: Path, image_shape: tuple[int, int, int]) -> LoadedClassifier:
    """The classifier of path, if it takes images of image_shape; else a one-line ClassifierError."""
    loaded = LoadedClassifier.read(path)
    if loaded.model.image_shape != tuple(image_shape):
        shapes = ["x".join(map(str, shape)) for shape in (loaded.model.image_shape, image_shape)]
        raise ClassifierError(f"the classifier {path} takes {shapes[0]} images, these are {shapes[1]}")
    return loaded
