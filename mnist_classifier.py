"""A small MNIST CNN: the feature extractor of the classifier metrics in eval_MNIST.py, and CAS.

ImageNet's InceptionV3 was never shown a digit; a CNN trained on the digits themselves gives
features that mean something for MNIST (the idea of the "MNIST FID" used since Heusel et al. 2017,
arXiv:1706.08500, and of the classification accuracy score of Ravuri & Vinyals 2019,
arXiv:1905.10887). The network is two 3x3 conv pairs with max-pooling, a 128-d penultimate layer
(the features for FID and KID) and 10 logits (the class probabilities for the Inception Score).

`ClassifierFeatureExtractor` wraps it for torch-fidelity, which then computes classifier-FID/IS/KID
with its own code: `register_with_torch_fidelity()` then `calculate_metrics(...,
feature_extractor="mnist-classifier", feature_extractor_weights_path=PATH)`.

The weights file is one dict (format, version, model state dict, data, test accuracy, epochs,
seed), written atomically and read with torch.load(weights_only=True).

Example (about a minute on a 2-core CPU for MNIST-5k):
    python mnist_classifier.py --data mnist-5k --epochs 10
    # -> checkpoints/mnist_classifier_mnist-5k.pt, prints its test accuracy
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from checkpointing import DEFAULT_CHECKPOINT_DIR, read_torch_file, save_checkpoint
from cli import (
    OneLineErrorParser,
    UserError,
    positive_float,
    positive_int,
    resolve_device,
    run_cli,
    writable_dir,
)
from data_sources import DATA_SETS, load_images

CLASSIFIER_FORMAT = "mnist-classifier"
CLASSIFIER_VERSION = 1
NUM_CLASSES = 10
CONV_CHANNELS = (16, 32)
FEATURE_DIM = 128
DROPOUT = 0.25
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 1e-3
EVAL_BATCH_SIZE = 1000

# torch-fidelity names: the extractor, and its two outputs (named like InceptionV3's "2048" / "logits")
EXTRACTOR_NAME = "mnist-classifier"
FEATURES_LAYER = str(FEATURE_DIM)
LOGITS_LAYER = "logits"
UINT8_MAX = 255


class ClassifierError(UserError):
    """A classifier weights file that is missing, unreadable or of another format."""


class MnistClassifier(nn.Module):
    """[B, 1, 28, 28] in [-1, 1] -> logits [B, 10]; `features` gives the penultimate [B, 128]."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 1
        for width in CONV_CHANNELS:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        side = 28 // 2 ** len(CONV_CHANNELS)
        self.convolutions = nn.Sequential(*layers, nn.Flatten())
        self.penultimate = nn.Sequential(nn.Linear(channels * side * side, FEATURE_DIM), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate activations: [B, 1, 28, 28] -> [B, 128] (after ReLU)."""
        return self.penultimate(self.convolutions(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def data_label(data: str, data_dir: str | Path | None) -> str:
    """A short name of the data set for file names: 'mnist-5k', or 'idx-<folder>' for --data-dir."""
    return data if data_dir is None else f"idx-{Path(data_dir).resolve().name}"


def default_classifier_path(data: str, data_dir: str | Path | None) -> Path:
    """checkpoints/mnist_classifier_<data>.pt, so classifiers of different data sets do not collide."""
    return DEFAULT_CHECKPOINT_DIR / f"mnist_classifier_{data_label(data, data_dir)}.pt"


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: bool = False,
) -> MnistClassifier:
    """Train a fresh MnistClassifier with Adam and cross-entropy; returns it in eval mode.

    images: [N, 1, 28, 28] in [-1, 1]; labels: [N] in 0..9. Seeds torch's global RNG with seed
    (initial weights, dropout) and draws the batch order from its own generator.
    """
    torch.manual_seed(seed)
    model = MnistClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(images), generator=generator).to(device)
        total_loss = 0.0
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
        if log:
            print(f"epoch {epoch}/{epochs}: mean training loss {total_loss / len(images):.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose arg-max logit is the label: images [N, 1, 28, 28], labels [N]."""
    device = next(model.parameters()).device
    correct = sum(
        (model(chunk.to(device)).argmax(1).cpu() == target).sum().item()
        for chunk, target in zip(images.split(EVAL_BATCH_SIZE), labels.split(EVAL_BATCH_SIZE), strict=True)
    )
    return correct / len(images)


def save_classifier(model: MnistClassifier, path: str | Path, **info: Any) -> None:
    """Write the weights and plain-value info (data, test_accuracy, ...) atomically."""
    state = {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION, "model": model.state_dict(), **info}
    save_checkpoint(state, path)


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MnistClassifier, dict[str, Any]]:
    """The classifier in eval mode, and its file's other entries (data, test_accuracy, ...)."""
    state = read_torch_file(path, device, "classifier file", ClassifierError)
    if not isinstance(state, dict) or state.get("format") != CLASSIFIER_FORMAT:
        raise ClassifierError(f"{path} is not an MNIST classifier file of this repo (mnist_classifier.py)")
    model = MnistClassifier().to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ClassifierError(
            f"{path} does not match this code's classifier: {error}".splitlines()[0]
        ) from None
    return model.eval(), {key: value for key, value in state.items() if key != "model"}


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor: uint8 [B, 3, 28, 28] (0..255) -> "128" and/or "logits".

    The three channels (a grey digit replicated) are averaged back to one and mapped to [-1, 1]
    as in data_sources.to_model_range. "128" (penultimate) serves FID and KID, "logits" the IS.
    torch-fidelity builds it as cls(name, features_list, **calculate_metrics kwargs).
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None, f"{name} needs feature_extractor_weights_path")
        self.classifier, _ = load_classifier(feature_extractor_weights_path)
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
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting a uint8 image tensor")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        images = x.float().mean(dim=1, keepdim=True) / (UINT8_MAX / 2) - 1
        features = self.classifier.features(images)
        outputs = {FEATURES_LAYER: features, LOGITS_LAYER: self.classifier.head(features)}
        return tuple(outputs[name] for name in self.features_list)


def register_with_torch_fidelity() -> None:
    """Register ClassifierFeatureExtractor as "mnist-classifier" (once per process)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=DATA_SETS, default="mnist", help="data set to train and test on")
    parser.add_argument(
        "--data-dir", default=None, help="folder of MNIST-format IDX files (overrides --data)"
    )
    parser.add_argument(
        "--out", default=None, help="weights file (default checkpoints/mnist_classifier_<data>.pt)"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="passes over the train split"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="training batch size"
    )
    parser.add_argument("--lr", type=positive_float, default=DEFAULT_LR, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else default_classifier_path(args.data, args.data_dir)
    writable_dir(out.parent)
    train_images, train_labels = load_images(args.data, "train", args.data_dir)
    test_images, test_labels = load_images(args.data, "test", args.data_dir)
    label = data_label(args.data, args.data_dir)
    print(f"training the classifier on {label} train ({len(train_images)} images), {args.epochs} epochs")
    model = train_classifier(
        train_images, train_labels, args.epochs, args.batch_size, args.lr, args.seed, device, log=True
    )
    test_accuracy = accuracy(model, test_images, test_labels)
    save_classifier(
        model.cpu(),
        out,
        data=label,
        test_accuracy=test_accuracy,
        epochs=args.epochs,
        seed=args.seed,
        num_train=len(train_images),
    )
    print(f"test accuracy on {label} test ({len(test_images)} images): {test_accuracy:.4f}; saved {out}")


if __name__ == "__main__":
    run_cli(main)
