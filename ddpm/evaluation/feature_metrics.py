"""Feature metrics through torch-fidelity: FID, IS, KID and precision/recall of image sets.

`torch_fidelity.calculate_metrics` computes every number, on uint8 images (a grey image replicated
to 3 channels), with one of two feature extractors:
  - "inception": torch-fidelity's InceptionV3 ("inception-v3-compat"): Inception FID (Heusel et al.
    2017, arXiv:1706.08500), IS (Salimans et al. 2016, arXiv:1606.03498), KID (Binkowski et al.
    2018, arXiv:1801.01401) and improved precision/recall (Kynkaanniemi et al. 2019,
    arXiv:1904.06991, k = 3). Offline, its weights are a local file.
  - "classifier": classifier.py's CNN registered as a feature extractor (128-d penultimate features
    for FID, KID and precision/recall, its logits for IS). No download needed.
Reference (real) sets are cached by torch-fidelity under names that hold the images' and the
extractor weights' sha256, so a second run does not recompute them.

KID is averaged over random subsets of min(1000, half the smaller set) images, so that its ± is the
spread over subsets that differ (subsets as large as the sets would all be the same set).

Example:
    extractor, _ = classifier_extractor(LoadedClassifier.read("weights/classifier_mnist5k.pt"), "mnist-5k")
    comparison = Comparison(real_set(test_images, "mnist-5k", "test"), [extractor], batch_size=250,
                            seed=0, device=torch.device("cpu"))
    scores = fidelity_metrics(ImageSet(to_uint8(samples)), extractor, comparison)   # FidelityScores
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from ddpm.evaluation.classifier import (
    EXTRACTOR_NAME,
    UINT8_MAX,
    LoadedClassifier,
    SmallCNNClassifier,
    register_with_torch_fidelity,
)
from ddpm.evaluation.image_metrics import to_uint8
from ddpm.evaluation.records import FidelityScores, SetScores
from ddpm.plumbing.checkpointing import READ_ERRORS
from ddpm.plumbing.messages import UserError, note
from ddpm.plumbing.provenance import sha256_of_file, sha256_of_tensor

INCEPTION_EXTRACTOR = "inception-v3-compat"
DOWNLOAD_TIMEOUT_S = 20
KID_SUBSET_SIZE = 1000  # torch-fidelity's default, lowered to half the smaller set when needed
ISC_SPLITS = 10  # torch-fidelity's default, lowered to the number of images when needed
PRC_NEIGHBOURHOOD = 3  # torch-fidelity's k of precision/recall: each set needs more images than k
MIN_SET_SIZE = PRC_NEIGHBOURHOOD + 1  # the fewest images per compared set (checked before sampling)
SHORT_HASH = 12


@dataclass
class Extractor:
    """A torch-fidelity feature extractor, the weights file it is built from and, for the classifier,
    its network already loaded (handed to torch-fidelity rather than read again)."""

    label: str  # "classifier" or "inception"
    name: str  # the name registered with torch-fidelity
    weights_path: Path
    sha256: str
    model: SmallCNNClassifier | None = None


@dataclass
class ImageSet:
    """uint8 images [N, C, H, W] and the torch-fidelity cache name of real ones (None: no caching)."""

    images: torch.Tensor
    cache_name: str | None = None


@dataclass
class Comparison:
    """What every torch-fidelity call of a run shares: the reference set, extractors, batch size,
    seed (KID subsets), device and cache folder (None: torch-fidelity's default)."""

    reference: ImageSet
    extractors: list[Extractor]
    batch_size: int
    seed: int
    device: torch.device
    cache_dir: str | None = None


class Uint8Images(Dataset):
    """A torch Dataset for torch-fidelity: item i is uint8 [3, H, W] (a grey image replicated)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].expand(3, -1, -1)


# ----- feature extractors -------------------------------------------------------------------------


def hub_inception_path() -> Path:
    """Where torch.hub (and so torch-fidelity) keeps the downloaded InceptionV3 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name


def download_inception_weights() -> Path:
    """torch-fidelity's InceptionV3 weights in the torch.hub cache, downloaded once; OSError offline."""
    target = hub_inception_path()
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
        finally:
            socket.setdefaulttimeout(previous_timeout)
    return target


def inception_extractor(weights: str | Path | None) -> tuple[Extractor | None, dict[str, Any]]:
    """The InceptionV3 extractor and its provenance; None and the one-line reason when unavailable."""
    get_it = f"download {URL_INCEPTION_V3} and pass --inception-weights PATH"
    if weights is not None and not Path(weights).is_file():
        return None, skipped(
            f"Inception metrics skipped: --inception-weights {weights} does not exist; {get_it}"
        )
    if weights is None:
        try:
            weights = download_inception_weights()
        except OSError as error:
            cached = hub_inception_path()
            return None, skipped(
                f"Inception metrics skipped: {cached.name} is not in {cached.parent} "
                f"and could not be downloaded ({getattr(error, 'reason', error)}); {get_it}"
            )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except READ_ERRORS:
        raise UserError(f"InceptionV3 weights {weights} are not a readable PyTorch file") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise UserError(f"{weights} is not torch-fidelity's InceptionV3 state dict (no fc.weight)")
    extractor = Extractor("inception", INCEPTION_EXTRACTOR, Path(weights), sha256_of_file(weights))
    return extractor, used(extractor)


def classifier_extractor(classifier: LoadedClassifier, data_label: str) -> tuple[Extractor, dict[str, Any]]:
    """The classifier extractor (registered with torch-fidelity) and its provenance."""
    path, info = classifier.path, classifier.info
    if info.get("data") != data_label:
        note(f"the classifier {path} was trained on {info.get('data')}, not {data_label}")
    register_with_torch_fidelity()
    extractor = Extractor("classifier", EXTRACTOR_NAME, path, sha256_of_file(path), classifier.model)
    return extractor, used(extractor) | {
        "trained_on": info.get("data"),
        "test_accuracy": info.get("test_accuracy"),
    }


def used(extractor: Extractor) -> dict[str, Any]:
    return {
        "used": True,
        "name": extractor.name,
        "weights": str(extractor.weights_path),
        "weights_sha256": extractor.sha256,
    }


def skipped(reason: str) -> dict[str, Any]:
    note(reason)
    return {"used": False, "reason": reason}


# ----- image sets ---------------------------------------------------------------------------------


def real_set(images: torch.Tensor, label: str, split: str) -> ImageSet:
    """A set of real images ([N, C, H, W] in [-1, 1]), cached by torch-fidelity under a name that
    fixes its content."""
    images_uint8 = to_uint8(images)
    digest = sha256_of_tensor(images_uint8)[:SHORT_HASH]
    return ImageSet(images_uint8, f"{label}-{split}-{len(images_uint8)}-{digest}")


def floor_set(train_images: torch.Tensor, count: int, label: str, seed: int) -> ImageSet:
    """The real-data floor: a seeded subset of `count` real training images (at most all of them)."""
    subset = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:count]
    return real_set(train_images[subset], label, "train")


def noise_set(count: int, image_shape: tuple[int, int, int], seed: int) -> ImageSet:
    """The ceiling: `count` images of uniform uint8 noise."""
    generator = torch.Generator().manual_seed(seed)
    return ImageSet(
        torch.randint(0, UINT8_MAX + 1, (count, *image_shape), generator=generator, dtype=torch.uint8)
    )


def cache_name(images: ImageSet, extractor: Extractor) -> str | None:
    """torch-fidelity's cache entry for real images: their name plus the extractor weights' hash.

    torch-fidelity adds the extractor's registered name, so "mnist-classifier" features of two
    different classifier files would share an entry without the hash.
    """
    if images.cache_name is None:
        return None
    return f"{images.cache_name}-{extractor.sha256[:SHORT_HASH]}"


# ----- metrics ------------------------------------------------------------------------------------


def kid_subset_size(first: int, second: int) -> int:
    """KID's subset size: 1000, or half the smaller set (at least 2) when the sets are smaller."""
    return max(2, min(KID_SUBSET_SIZE, min(first, second) // 2))


def fidelity_metrics(candidate: ImageSet, extractor: Extractor, comparison: Comparison) -> FidelityScores:
    """FID, IS (of the candidate), KID and precision/recall against the reference, by
    torch_fidelity.calculate_metrics. IS uses min(10, N) splits; each set holds at least MIN_SET_SIZE
    images (the callers' counts are checked before sampling)."""
    reference = comparison.reference
    loaded = {} if extractor.model is None else {"classifier_model": extractor.model}
    subset_size = kid_subset_size(len(candidate.images), len(reference.images))
    result = torch_fidelity.calculate_metrics(
        input1=Uint8Images(candidate.images),
        input2=Uint8Images(reference.images),
        input1_cache_name=cache_name(candidate, extractor),
        input2_cache_name=cache_name(reference, extractor),
        fid=True,
        isc=True,
        kid=True,
        prc=True,
        feature_extractor=extractor.name,
        feature_extractor_weights_path=str(extractor.weights_path),
        kid_subset_size=subset_size,
        isc_splits=min(ISC_SPLITS, len(candidate.images)),
        rng_seed=comparison.seed,
        batch_size=comparison.batch_size,
        cuda=comparison.device.type == "cuda",
        cache_root=comparison.cache_dir,
        save_cpu_ram=True,  # in-memory images: no DataLoader worker processes
        verbose=False,
        **loaded,
    )
    return FidelityScores(
        fid=result[torch_fidelity.KEY_METRIC_FID],
        is_mean=result[torch_fidelity.KEY_METRIC_ISC_MEAN],
        is_std=result[torch_fidelity.KEY_METRIC_ISC_STD],
        kid_mean=result[torch_fidelity.KEY_METRIC_KID_MEAN],
        kid_std=result[torch_fidelity.KEY_METRIC_KID_STD],
        precision=result[torch_fidelity.KEY_METRIC_PRECISION],
        recall=result[torch_fidelity.KEY_METRIC_RECALL],
        kid_subset_size=subset_size,
        num_images=len(candidate.images),
        num_reference=len(reference.images),
    )


def metrics_per_extractor(candidate: ImageSet, comparison: Comparison) -> SetScores:
    """The candidate's FidelityScores with each available extractor (classifier, inception)."""
    return SetScores(
        **{
            extractor.label: fidelity_metrics(candidate, extractor, comparison)
            for extractor in comparison.extractors
        }
    )
