"""Tests for hf_udkd.data: the vendored Animal-MNIST copy and the offline loaders."""

from __future__ import annotations

from importlib.resources import files

import datasets
import numpy as np
import pytest

from hf_udkd.constants import IGNORE_INDEX
from hf_udkd.data import load_animal_mnist, load_digits_dataset

ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def examples(ds: datasets.Dataset) -> list[tuple[bytes, int]]:
    """``(png bytes, label)`` pairs read from the Arrow table: the loaders encode equal pixels to equal
    bytes, and skipping the decoding keeps these comparisons fast."""
    table = ds.data.table
    return list(zip(table["image"].combine_chunks().field("bytes").to_pylist(), ds["label"], strict=True))


@pytest.fixture(scope="module")
def animal() -> datasets.DatasetDict:
    return load_animal_mnist()


def test_npz_has_no_object_arrays():
    with (
        (files("hf_udkd") / "data" / "animal_mnist.npz").open("rb") as f,
        np.load(f, allow_pickle=False) as npz,
    ):
        arrays = {name: npz[name] for name in npz.files}
    assert set(arrays) == {"images", "labels", "class_names"}
    assert not any(a.dtype.hasobject for a in arrays.values())
    assert arrays["images"].shape == (10_000, 28, 28) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].dtype == np.int64
    assert arrays["class_names"].tolist() == ANIMALS
    assert np.bincount(arrays["labels"]).tolist() == [1000] * 10


def test_licence_is_vendored():
    text = (files("hf_udkd") / "data" / "LICENSE.animal_mnist").read_text(encoding="utf-8")
    assert "MIT License" in text and "animal-mnist 0.4" in text


def test_animal_mnist_splits_and_features(animal):
    assert set(animal) == {"train", "validation"}
    assert (animal["train"].num_rows, animal["validation"].num_rows) == (8000, 2000)
    assert animal["train"].features["label"].names == ANIMALS
    image = animal["validation"][0]["image"]
    assert (image.mode, image.size) == ("L", (28, 28))
    for split, per_class in (("train", 800), ("validation", 200)):
        assert np.bincount(animal[split]["label"], minlength=10).tolist() == [per_class] * 10


def test_animal_mnist_split_keeps_duplicates_on_one_side(animal):
    assert not set(examples(animal["train"])) & set(examples(animal["validation"]))


def test_animal_mnist_split_is_deterministic(animal):
    assert examples(load_animal_mnist(split_seed=0)["validation"]) == examples(animal["validation"])
    assert examples(load_animal_mnist(split_seed=1)["validation"]) != examples(animal["validation"])


def test_animal_mnist_labels_per_class(animal):
    few = load_animal_mnist(labels_per_class=5)
    assert np.bincount(few["train"]["label"], minlength=10).tolist() == [5] * 10
    assert len(set(examples(few["train"]))) == 50
    assert examples(few["validation"]) == examples(animal["validation"])
    assert set(examples(few["train"])) <= set(examples(animal["train"]))


def test_animal_mnist_unlabelled_rest(animal):
    mixed = load_animal_mnist(labels_per_class=30, unlabelled=True)
    assert mixed["train"].features == animal["train"].features
    assert examples(mixed["validation"]) == examples(animal["validation"])
    train = examples(mixed["train"])
    labelled = [(image, label) for image, label in train if label != IGNORE_INDEX]
    rest = [image for image, label in train if label == IGNORE_INDEX]
    # The labelled part is exactly the labels_per_class subset, without its copies among the unlabelled.
    assert sorted(labelled) == sorted(examples(load_animal_mnist(labels_per_class=30)["train"]))
    assert np.bincount([label for _, label in labelled], minlength=10).tolist() == [30] * 10
    labelled_images = {image for image, _ in labelled}
    assert not set(rest) & labelled_images
    # Every training image is in one part or the other; only the copies of labelled images are dropped.
    full = [image for image, _ in examples(animal["train"])]
    assert set(full) == set(rest) | labelled_images
    assert len(rest) == len(full) - sum(image in labelled_images for image in full) > 7400


def test_unlabelled_labels_survive_dataset_operations():
    train = load_digits_dataset(labels_per_class=3, unlabelled=True)["train"]
    kept = train.map(lambda example: {"label": example["label"]})
    assert kept["label"] == train["label"] and train["label"].count(IGNORE_INDEX) == train.num_rows - 30
    both = datasets.concatenate_datasets([train, train.shuffle(seed=0)])
    assert both["label"].count(IGNORE_INDEX) == 2 * (train.num_rows - 30)


def test_labels_per_class_subsets_are_nested_and_seeded():
    small, large = load_digits_dataset(labels_per_class=3), load_digits_dataset(labels_per_class=10)
    assert set(examples(small["train"])) <= set(examples(large["train"]))
    assert examples(load_digits_dataset(labels_per_class=3)["train"]) == examples(small["train"])
    assert examples(load_digits_dataset(split_seed=1, labels_per_class=3)["train"]) != examples(
        small["train"]
    )


def test_digits():
    digits = load_digits_dataset()
    assert digits["train"].num_rows + digits["validation"].num_rows == 1797
    assert digits["train"].features["label"].names == [str(d) for d in range(10)]
    counts = np.bincount(digits["validation"]["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    pixels = np.stack([np.asarray(ex["image"]) for ex in digits["validation"]])
    assert pixels.shape == (359, 8, 8) and pixels.dtype == np.uint8 and pixels.max() > 200
    assert digits["validation"][0]["image"].mode == "L"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"test_size": 0.0}, "test_size"),
        ({"test_size": 1.5}, "test_size"),
        ({"labels_per_class": 0}, "at least 1"),
        ({"labels_per_class": 500}, "lower labels_per_class"),
        ({"unlabelled": True}, "needs labels_per_class"),
    ],
)
def test_invalid_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_dataset(**kwargs)
