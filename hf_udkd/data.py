"""Small real image classification data sets that load offline, as ``datasets.DatasetDict``.

- :func:`load_animal_mnist`: Animal-MNIST (10,000 28x28 greyscale animal silhouettes, 10 classes, MIT
  licence), vendored as ``hf_udkd/data/animal_mnist.npz`` by ``scripts/convert_animal_mnist.py``.
- :func:`load_digits_dataset`: scikit-learn's 1,797 8x8 digits, for fast tests.

Both return splits ``train`` and ``validation`` with columns ``image`` (PIL, mode ``"L"``) and ``label``
(``datasets.ClassLabel``). Neither source ships an official test split, so validation is a stratified
random split, deterministic in ``split_seed``. Identical images with the same label (Animal-MNIST holds
284 such pairs) always land in the same split, so validation accuracy is not inflated by memorised copies.
With ``labels_per_class`` and ``unlabelled=True``, the training images left out of the labelled subset stay in
``train`` with the label ``IGNORE_INDEX`` (-100, the ignore index of cross-entropy): the semi-supervised
setting, where the teacher alone supervises those images.
"""

from __future__ import annotations

import io
from importlib.resources import files

import datasets
import numpy as np
import PIL.Image
import torch
from transformers.utils import logging

from .constants import IGNORE_INDEX

logger = logging.get_logger(__name__)

__all__ = ["PixelValuesDataset", "load_animal_mnist", "load_digits_dataset"]


def load_animal_mnist(
    split_seed: int = 0,
    test_size: float = 0.2,
    labels_per_class: int | None = None,
    unlabelled: bool = False,
) -> datasets.DatasetDict:
    """Load Animal-MNIST from the copy vendored in the package (no network, about a second).

    Classes, in label order: bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra; 1,000
    images each. The wheel the data come from has no train/test split, so ``validation`` is a stratified
    random ``test_size`` share of each class (200 per class by default), kept identical for a given
    ``split_seed`` whatever ``labels_per_class`` is.

    Args:
        split_seed: seed of the train/validation split and of the ``labels_per_class`` subset.
        test_size: share of each class held out for validation, in ``(0, 1)``.
        labels_per_class: if set, keep only this many distinct training images per class (low-label
            settings). For one seed the subsets are nested: the 10-per-class set is part of the 50 one.
        unlabelled: with ``labels_per_class``, keep the rest of the training split in ``train`` as well,
            labelled ``IGNORE_INDEX`` (-100). Copies of a labelled image are left out of that rest, so no
            unlabelled image is also a labelled one. ``validation`` is the same either way.

    Returns:
        ``DatasetDict`` with ``train`` and ``validation``; ``image`` is a 28x28 PIL image of mode ``"L"``
        (white silhouette on black), ``label`` a ``ClassLabel`` with the names above (and -100 for the
        unlabelled images).
    """
    with (
        (files("hf_udkd") / "data" / "animal_mnist.npz").open("rb") as f,
        np.load(f, allow_pickle=False) as npz,
    ):
        images, labels, names = npz["images"], npz["labels"], npz["class_names"].tolist()
    return _build(images, labels, names, split_seed, test_size, labels_per_class, unlabelled, "Animal-MNIST")


def load_digits_dataset(
    split_seed: int = 0,
    test_size: float = 0.2,
    labels_per_class: int | None = None,
    unlabelled: bool = False,
) -> datasets.DatasetDict:
    """Load scikit-learn's handwritten digits (1,797 images, 8x8, classes ``"0"`` to ``"9"``).

    Same splits, columns and arguments as :func:`load_animal_mnist`; the 0..16 grey levels are scaled to
    0..255. Meant for fast tests: scikit-learn is a development dependency only.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "load_digits_dataset needs scikit-learn, a development dependency of hf_udkd: "
            "`pip install scikit-learn` or `pip install -e '.[dev]'`"
        ) from e
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    names = [str(t) for t in digits.target_names]
    return _build(
        images,
        digits.target.astype(np.int64),
        names,
        split_seed,
        test_size,
        labels_per_class,
        unlabelled,
        "digits",
    )


def _build(
    images: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    split_seed: int,
    test_size: float,
    labels_per_class: int | None,
    unlabelled: bool,
    what: str,
) -> datasets.DatasetDict:
    """Split ``images`` ``(N, H, W)`` uint8 and ``labels`` ``(N,)`` and wrap both splits as datasets."""
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must lie strictly between 0 and 1, got {test_size}")
    if unlabelled and labels_per_class is None:
        raise ValueError(
            "unlabelled=True keeps the training images outside the labelled subset, so it needs "
            "labels_per_class (e.g. labels_per_class=30)"
        )
    groups = _duplicate_groups(images, labels)
    train_idx, val_idx = _stratified_group_split(labels, groups, split_seed, test_size)
    train_labels = labels.copy()
    if labels_per_class is not None:
        labelled_idx = _subsample_per_class(train_idx, labels, groups, split_seed, labels_per_class)
        if unlabelled:
            # Copies of a labelled image stay out of the rest: no image is both labelled and unlabelled.
            rest = train_idx[~np.isin(groups[train_idx], groups[labelled_idx])]
            train_labels[rest] = IGNORE_INDEX
            train_idx = np.sort(np.concatenate([labelled_idx, rest]))
        else:
            train_idx = labelled_idx
    splits = datasets.DatasetDict(
        {
            "train": _dataset(images, train_labels, train_idx, names),
            "validation": _dataset(images, labels, val_idx, names),
        }
    )
    n_unlabelled = int((train_labels[train_idx] == IGNORE_INDEX).sum())
    logger.info(
        f"{what}: {len(train_idx)} train ({n_unlabelled} unlabelled) / {len(val_idx)} validation images "
        f"(split_seed={split_seed})"
    )
    return splits


def _dataset(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, names: list[str]) -> datasets.Dataset:
    """The examples ``idx`` as a dataset with ``image`` and a ``ClassLabel`` ``label`` that may hold -100."""
    pngs = datasets.Dataset.from_dict(
        {"image": [_png(images[i]) for i in idx]}, features=datasets.Features({"image": datasets.Image(mode="L")})
    )
    # ClassLabel refuses -100 when it encodes Python values but keeps it in Arrow storage, where later
    # map/concatenate/shuffle calls leave it alone: the labels go in as an Arrow column.
    return pngs.add_column("label", labels[idx], feature=datasets.ClassLabel(names=names))


def _duplicate_groups(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Group id ``(N,)`` shared by byte-identical images with the same label, unique otherwise."""
    seen: dict[tuple[int, bytes], int] = {}
    return np.array(
        [seen.setdefault((int(y), x.tobytes()), len(seen)) for x, y in zip(images, labels, strict=True)]
    )


def _stratified_group_split(
    labels: np.ndarray, groups: np.ndarray, seed: int, test_size: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, validation)`` indices: per class, whole groups go to validation in seeded order
    until their size is closest to ``test_size`` of the class (so within one image of the exact share)."""
    rng = np.random.default_rng(seed)
    group_sizes = np.bincount(groups)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = rng.permutation(np.unique(groups[members]))
        covered = np.cumsum(group_sizes[order])
        n_groups = int(np.argmin(np.abs(covered - test_size * len(members)))) + 1
        val.append(members[np.isin(groups[members], order[:n_groups])])
    val_idx = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def _subsample_per_class(
    train_idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int, per_class: int
) -> np.ndarray:
    """Keep ``per_class`` training indices of distinct images per class, the first in a seeded order."""
    if per_class < 1:
        raise ValueError(f"labels_per_class must be at least 1, got {per_class}")
    # A generator of its own keeps the validation split independent of labels_per_class.
    rng = np.random.default_rng([seed, 1])
    kept = []
    for c in np.unique(labels):
        members = rng.permutation(train_idx[labels[train_idx] == c])
        _, first = np.unique(groups[members], return_index=True)
        distinct = members[np.sort(first)]
        if len(distinct) < per_class:
            raise ValueError(
                f"labels_per_class={per_class}, but class {c} has only {len(distinct)} distinct training "
                "images: lower labels_per_class or test_size"
            )
        kept.append(distinct[:per_class])
    return np.sort(np.concatenate(kept))


def _png(image: np.ndarray) -> dict[str, bytes | None]:
    """Encode one ``(H, W)`` uint8 image as the ``datasets.Image`` storage dict."""
    buffer = io.BytesIO()
    # Fastest lossless level: the images are tiny and encoding dominates the load time.
    PIL.Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


class PixelValuesDataset(torch.utils.data.Dataset):
    """Already preprocessed images as examples ``{"pixel_values": (C, H, W), "labels": ()}`` for UDKDTrainer.

    For data held as tensors (benchmarks, tests, a cached preprocessing): ``pixel_values`` is (N, C, H, W) and
    ``labels`` is (N,).
    """

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        if len(pixel_values) != len(labels):
            raise ValueError(f"{len(pixel_values)} images but {len(labels)} labels")
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}
