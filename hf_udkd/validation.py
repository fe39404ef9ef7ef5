"""Checks on the data and the models before training, so that bad input fails at construction.

`UDKDTrainer.__init__` runs them before the first step: an empty data set, labels the student's classifier
cannot take, images of the wrong shape for the student or the teacher, or a last training batch that BatchNorm
cannot normalise are reported with the role (student or teacher) and what to change, instead of surfacing as a
bare error inside step 1 or at the last batch of the first epoch.

Labels are read without running the datasets' transforms where the data allow it: the underlying column of a
``datasets.Dataset`` (also under ``with_transform``), the ``labels`` tensor of a
:class:`~hf_udkd.data.PixelValuesDataset`; otherwise the first ``MAX_SCANNED_EXAMPLES`` examples are read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from .config import UDKDTrainingArguments
from .constants import IGNORE_INDEX, TEACHER_INPUT

# The keys transformers' data collators read as labels, in their order of precedence.
LABEL_KEYS = ("labels", "label", "label_ids")
# How many examples are read, transform and all, when a data set's labels cannot be read as a column.
MAX_SCANNED_EXAMPLES = 128


def _named_datasets(train_dataset: Any, eval_dataset: Any) -> Iterator[tuple[str, Any]]:
    """``(name for messages, dataset)`` of each data set given, an ``eval_dataset`` dict counting as several."""
    if train_dataset is not None:
        yield "the training set (train_dataset)", train_dataset
    if isinstance(eval_dataset, dict):
        for key, dataset in eval_dataset.items():
            yield f"the evaluation set eval_dataset[{key!r}]", dataset
    elif eval_dataset is not None:
        yield "the evaluation set (eval_dataset)", eval_dataset


def _has_length(dataset: Any) -> bool:
    return not isinstance(dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset)) and hasattr(
        dataset, "__len__"
    )


def check_not_empty(train_dataset: Any, eval_dataset: Any) -> None:
    """Every data set given (of known length) holds examples."""
    for name, dataset in _named_datasets(train_dataset, eval_dataset):
        if _has_length(dataset) and len(dataset) == 0:
            raise ValueError(
                f"{name} is empty: the student has no examples to learn from or be scored on. Check the split and "
                "any filtering that built it, or pass None for a data set that is not needed."
            )


def _label_key(example: dict[str, Any]) -> str | None:
    return next((key for key in LABEL_KEYS if key in example), None)


def _label_column(dataset: datasets.Dataset, key: str) -> str | None:
    """The integer column of ``dataset`` holding its labels before any transform, or None.

    A transform may copy its labels from a column of another name: transformers' examples and
    :class:`~hf_udkd.image_processing.ImageClassificationTransform` copy ``label`` to ``labels``, and the latter
    names its source (``label_column``).
    """
    transform = (dataset.format.get("format_kwargs") or {}).get("transform")
    candidates = [getattr(transform, "label_column", None), key, "labels", "label"]
    column = next((name for name in candidates if name in dataset.column_names), None)
    if column is None:
        return None
    feature = dataset.features[column]
    integer = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    )
    return column if integer else None


def read_labels(dataset: Any, key: str) -> np.ndarray:
    """Labels ``(N,)`` of a map-style data set whose examples hold ``key``: all of them when they can be read
    without the transform, else those of the first ``MAX_SCANNED_EXAMPLES`` examples."""
    if isinstance(dataset, datasets.Dataset):
        column = _label_column(dataset, key)
        if column is not None:
            return np.asarray(dataset.with_format("numpy", columns=[column])[:][column])
    stored = getattr(dataset, "labels", None)
    if isinstance(stored, (torch.Tensor, np.ndarray)) and stored.ndim == 1 and len(stored) == len(dataset):
        return stored.numpy(force=True) if isinstance(stored, torch.Tensor) else stored
    count = min(len(dataset), MAX_SCANNED_EXAMPLES)
    return np.stack([np.asarray(torch.as_tensor(dataset[i][key])) for i in range(count)])


def check_label_dtype(name: str, key: str, value: Any) -> None:
    """An example's label as the collator will batch it must be an integer class id."""
    try:
        kind = torch.as_tensor(value).dtype
    except (TypeError, ValueError, RuntimeError):
        kind = type(value).__name__
    if not isinstance(kind, torch.dtype) or kind.is_floating_point or kind.is_complex or kind == torch.bool:
        raise ValueError(
            f"{name} has {key!r} of type {kind}: the student's cross-entropy needs integer class ids in "
            "[0, num_labels). Store the labels as integers (e.g. dataset.cast_column('label', "
            "datasets.ClassLabel(names=...)) or labels.long()); soft or one-hot targets are not supported."
        )


def check_label_range(name: str, labels: np.ndarray, k: int) -> None:
    """Every label is a class of the student, ``0 <= label < k``, or ``IGNORE_INDEX`` (unlabelled)."""
    if labels.ndim != 1:
        raise ValueError(
            f"{name} has labels of shape {labels.shape[1:]} per example: the student needs one class id per "
            "example, not soft or one-hot targets."
        )
    bad = np.flatnonzero(((labels < 0) | (labels >= k)) & (labels != IGNORE_INDEX))
    if len(bad):
        index = int(bad[0])
        raise ValueError(
            f"{name} holds label {labels[index].item()} (example {index}; {len(bad)} example(s) in all) but the "
            f"student has num_labels={k}: labels must lie in [0, {k}), or be {IGNORE_INDEX} for an unlabelled "
            "example. Give the student (and the teacher) as many labels as the data have classes (num_labels, "
            "id2label), or fix the label column."
        )


def check_labels(train_dataset: Any, eval_dataset: Any, k: int) -> tuple[int, int] | None:
    """The labels of every data set whose examples have them are integer classes of the student's ``k`` (or
    ``IGNORE_INDEX``). Examples without labels are legal: they are distilled.

    Returns ``(unlabelled, examples)`` of the training set, counted over the labels read (all of them when they
    can be read without the transform), or None without a training set or when its labels cannot be read before
    training (an iterable data set)."""
    counted = None
    for name, dataset in _named_datasets(train_dataset, eval_dataset):
        if not _has_length(dataset):
            continue
        example = dataset[0]
        key = _label_key(example)
        if key is None:
            if dataset is train_dataset:
                counted = (len(dataset), len(dataset))
            continue
        check_label_dtype(name, key, example[key])
        labels = read_labels(dataset, key)
        check_label_range(name, labels, k)
        if dataset is train_dataset:
            counted = (int((labels == IGNORE_INDEX).sum()), len(labels))
    return counted


def _check_images(pixel_values: torch.Tensor, model: nn.Module, role: str, key: str) -> None:
    """A batch of ``key`` must be (B, C, H, W) with the channels the model's config says it takes."""
    if pixel_values.ndim != 4:
        raise ValueError(
            f"the {role}'s input {key!r} is {tuple(pixel_values.shape)} for a batch of {len(pixel_values)}: the "
            f"{role} needs (B, C, H, W). Make each example's {key!r} one (C, H, W) image, e.g. with the {role}'s "
            "image processor on RGB images (image.convert('RGB') for greyscale ones)."
        )
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    if channels is not None and pixel_values.shape[1] != channels:
        convert = {1: " (image.convert('L'))", 3: " (image.convert('RGB'))"}.get(channels, "")
        raise ValueError(
            f"the {role}'s input {key!r} has {pixel_values.shape[1]} channel(s) (shape "
            f"{tuple(pixel_values.shape)}) but the {role}'s config has num_channels={channels}. Prepare the images "
            f"with {channels} channel(s){convert}, or build the {role} with num_channels={pixel_values.shape[1]}."
        )


def check_pixel_values(probe: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module | None) -> None:
    """The probe batch suits both models: ``pixel_values`` for the student, ``teacher_pixel_values`` (or the
    student's ``pixel_values`` when the examples have none) for the teacher."""
    _check_images(probe["pixel_values"], student, "student", "pixel_values")
    if teacher is None:
        return
    if TEACHER_INPUT in probe:
        _check_images(probe[TEACHER_INPUT], teacher, "teacher", TEACHER_INPUT)
        return
    try:
        _check_images(probe["pixel_values"], teacher, "teacher", "pixel_values")
    except ValueError as e:
        raise ValueError(
            f"{e} The examples have no {TEACHER_INPUT!r}, so the teacher reads the student's pixel_values: give "
            f"the examples {TEACHER_INPUT!r} made by the teacher's image processor "
            "(ImageClassificationTransform(student_processor, teacher_processor, ...))."
        ) from None


def smallest_batch(
    num_examples: int,
    batch_size: int,
    num_processes: int = 1,
    num_devices: int = 1,
    drop_last: bool = False,
    split_batches: bool = False,
    even_batches: bool = True,
) -> int:
    """The smallest batch one device gets in an epoch of ``num_examples``, as the Trainer's training dataloader
    deals them out.

    Args:
        num_examples: length of the training set.
        batch_size: the dataloader's batch size, ``TrainingArguments.train_batch_size`` (per process).
        num_processes: processes (DDP, FSDP, DeepSpeed); accelerate's ``BatchSamplerShard`` gives each its own
            batches, or with ``split_batches`` a slice of each, and with ``even_batches`` completes the last ones
            from the start of the epoch.
        num_devices: GPUs of one process under ``DataParallel``, which splits each batch with ``Tensor.chunk``.
        drop_last, split_batches, even_batches: as in ``TrainingArguments`` and its ``accelerator_config``.
    """
    # max(1, ...): a batch that does not split over the processes is accelerate's to refuse, with its own message.
    full = max(1, batch_size // num_processes) if split_batches else batch_size
    remainder = num_examples % batch_size
    if drop_last or remainder == 0 or (num_processes > 1 and even_batches):
        last = full
    elif split_batches:
        last = remainder % full or full
    else:
        last = remainder
    if num_devices > 1:
        chunk = math.ceil(last / num_devices)
        last = last - chunk * (math.ceil(last / chunk) - 1)
    return last


def _first_batch_norm(model: nn.Module) -> str | None:
    """The name of the first BatchNorm layer of ``model`` (which the Trainer runs in training mode), or None."""
    return next((name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)


def check_last_batch(distiller: nn.Module, train_dataset: Any, args: UDKDTrainingArguments) -> None:
    """Refuse a training batch of one image per device when the student or the heads hold BatchNorm, which
    cannot compute batch statistics from it (an error at 1x1 maps, one image's statistics otherwise)."""
    if train_dataset is None or not _has_length(train_dataset):
        return
    layer = _first_batch_norm(distiller)
    if layer is None:
        return
    config = args.accelerator_config
    batches = math.ceil(len(train_dataset) / args.train_batch_size)
    if not config.split_batches:
        batches = math.ceil(batches / args.world_size)
    if 0 < args.max_steps and args.max_steps * args.gradient_accumulation_steps < batches:
        # Training stops before the first epoch reaches its last batch.
        return
    size = smallest_batch(
        len(train_dataset), args.train_batch_size, args.world_size, max(1, args.n_gpu),
        args.dataloader_drop_last, config.split_batches, config.even_batches,
    )
    if size > 1:
        return
    in_student = layer.startswith("student.")
    holder = "the student has" if in_student else "the UniKD heads (aff_batch_norm=True) have"
    if args.per_device_train_batch_size == 1:
        fix = "Raise per_device_train_batch_size to 2 or more"
    else:
        fix = (
            "Set dataloader_drop_last=True (--dataloader_drop_last) to drop the incomplete last batch, or change "
            "per_device_train_batch_size so that it does not leave one example"
        )
    if not in_student:
        fix += ", or set aff_batch_norm=False"
    raise ValueError(
        f"{len(train_dataset)} training examples with per_device_train_batch_size="
        f"{args.per_device_train_batch_size} on {args.world_size} process(es) give a training batch of 1 image per "
        f"device, and {holder} BatchNorm ({layer}), which cannot normalise a batch of one image in training. "
        f"{fix}."
    )
