"""Shared fixtures: tiny real models built from configs (saved and loaded back), and small real data.

Everything runs offline: HF_HUB_OFFLINE is set before transformers is imported, HF_HOME points to a
temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_udkd_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageClassification,
    ResNetConfig,
    ViTConfig,
)

from hf_udkd.data import PixelValuesDataset, load_digits_dataset  # noqa: E402

# The tests' name for the library's tensor dataset.
TensorImageDataset = PixelValuesDataset

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 32
NUM_LABELS = 10
DIGIT_NAMES = [str(i) for i in range(NUM_LABELS)]


def labels_kwargs(names: list[str] = DIGIT_NAMES) -> dict:
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def resnet_config(hidden_sizes: list[int], **kwargs) -> ResNetConfig:
    defaults = dict(hidden_sizes=hidden_sizes, depths=[1] * len(hidden_sizes), embedding_size=hidden_sizes[0])
    return ResNetConfig(**{**defaults, **labels_kwargs(), **kwargs})


def vit_config(**kwargs) -> ViTConfig:
    defaults = dict(image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=128)
    return ViTConfig(**{**defaults, **labels_kwargs(), **kwargs})


def save_and_load(model, directory) -> torch.nn.Module:
    """Exercise the real loading path: save_pretrained, then AutoModelForImageClassification.from_pretrained."""
    model.save_pretrained(directory)
    return AutoModelForImageClassification.from_pretrained(directory)


def build(config, directory) -> torch.nn.Module:
    torch.manual_seed(0)
    return save_and_load(AutoModelForImageClassification.from_config(config), directory)


@pytest.fixture
def resnet_teacher(tmp_path):
    return build(resnet_config([16, 32, 64, 128]), tmp_path / "teacher")


@pytest.fixture
def resnet_student(tmp_path):
    return build(resnet_config([8, 16, 32, 64]), tmp_path / "student")


@pytest.fixture
def vit_teacher(tmp_path):
    return build(vit_config(), tmp_path / "vit_teacher")


def to_pixel_values(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL greyscale images -> (N, 3, size, size) float tensor, normalised to mean 0, std 1."""
    array = np.stack([np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) for im in images])
    x = torch.from_numpy(array).permute(0, 3, 1, 2) / 255.0
    return (x - 0.5) / 0.5


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's real 8x8 digits, upsampled to 32x32 RGB: (train, validation) TensorImageDatasets."""
    splits = load_digits_dataset(split_seed=0)
    return tuple(
        TensorImageDataset(to_pixel_values(splits[name]["image"]), torch.tensor(splits[name]["label"]))
        for name in ("train", "validation")
    )


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def load_script(relative_path: str):
    """Import a script of the repository (examples/, benchmarks/) as a module, to call its functions."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve their string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
