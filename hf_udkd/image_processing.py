"""Images -> model inputs for image classification distillation: one augmented image, two views.

The teacher and the student may expect different inputs (size, mean/std). :class:`ImageClassificationTransform`
decodes each image once, converts its mode to RGB, applies the random augmentation once and then prepares
that same augmented image for each model, as its image processor says: ``pixel_values`` for the student and,
when the teacher's processor differs, ``teacher_pixel_values`` (read by :class:`~hf_udkd.UDKDTrainer`).

Images that cannot be decoded raise :class:`UndecodableImageError`, which names the file, or, with
``skip_bad_images=True``, are logged once and dropped by :func:`collate_image_classification`.

Use it with a ``datasets.Dataset`` whose image column is cast to ``datasets.Image(decode=False)``, so that
decoding (and its errors) happens here, where the file is known, and not inside ``datasets``::

    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    dataset = dataset.with_transform(ImageClassificationTransform(processor, teacher_processor, train=True))
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from torchvision import transforms as T
from transformers import default_data_collator
from transformers.image_transforms import convert_to_rgb
from transformers.utils import logging

from .constants import TEACHER_INPUT

logger = logging.get_logger(__name__)

__all__ = [
    "ImageClassificationTransform",
    "ImageView",
    "UndecodableImageError",
    "collate_image_classification",
    "decode_image",
    "to_rgb",
]


class UndecodableImageError(ValueError):
    """An image file or blob that PIL cannot decode."""


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) -> RGB, with transformers' ``convert_to_rgb``.

    Transparent pixels are composited on white, as transformers' image processors do: a plain
    ``convert("RGB")`` would turn them into whatever colour hides beneath.
    """
    if image.mode.startswith("I"):
        # 16/32-bit greyscale: PIL's own conversion, which convert_to_rgb uses, clips at 255 instead of scaling.
        image = image.point(lambda v: v / 256).convert("L")
    return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True))


def describe_image(value: Any) -> str:
    """A name for an image value, for messages: its file path, or its size when it has none."""
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        return f"an in-memory image of {len(value.get('bytes') or b'')} bytes"
    if isinstance(value, str):
        return value
    return f"a {type(value).__name__}"


def decode_image(value: Any) -> PIL.Image.Image:
    """Decode one value of a ``datasets.Image(decode=False)`` column (``{"bytes", "path"}``), a file path or
    a PIL image, fully (a truncated file fails here, not later), as RGB.

    Raises:
        UndecodableImageError: naming the file when PIL cannot read it.
    """
    if isinstance(value, PIL.Image.Image):
        return to_rgb(value)
    try:
        if isinstance(value, dict) and value.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = PIL.Image.open(value["path"])
        elif isinstance(value, str):
            image = PIL.Image.open(value)
        else:
            raise TypeError(f"expected an image, a path or a {{'bytes', 'path'}} dict, got {type(value).__name__}")
        image.load()
    except (OSError, SyntaxError, ValueError, TypeError, PIL.Image.DecompressionBombError) as e:
        raise UndecodableImageError(
            f"cannot decode image {describe_image(value)}: {e}. Fix or remove the file, or pass "
            "--skip_bad_images (skip_bad_images=True) to skip undecodable images with a warning."
        ) from e
    return to_rgb(image)


def _size_field(size: Any, key: str) -> int | None:
    """``size[key]`` of an image processor's ``size``, a dict or a transformers ``SizeDict``."""
    return size.get(key) if hasattr(size, "get") else getattr(size, key, None)


@dataclass(frozen=True)
class ImageView:
    """How one model wants its images, read from its image processor.

    Attributes:
        size: (H, W) of the model's input.
        resize: what evaluation resizes to before the centre crop: the shortest edge (int) or (H, W).
        mean: per-channel mean to subtract after scaling to [0, 1], or None (no normalisation).
        std: per-channel standard deviation, or None.
    """

    size: tuple[int, int]
    resize: int | tuple[int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, image_processor: Any) -> ImageView:
        """Read size and normalisation from a transformers image processor, as transformers' example does:
        ``size["shortest_edge"]`` gives square inputs of that side, else ``(size["height"], size["width"])``."""
        size = image_processor.size
        shortest = _size_field(size, "shortest_edge")
        if shortest:
            hw, resize = (shortest, shortest), shortest
        elif _size_field(size, "height") and _size_field(size, "width"):
            hw = (_size_field(size, "height"), _size_field(size, "width"))
            resize = hw
        else:
            raise ValueError(
                f"{type(image_processor).__name__}.size={size} has neither 'shortest_edge' nor 'height' and "
                "'width': give the image processor one of them"
            )
        if getattr(image_processor, "do_normalize", True) and image_processor.image_mean is not None:
            mean, std = image_processor.image_mean, image_processor.image_std
            channels = 3
            mean = tuple(float(m) for m in mean) if isinstance(mean, Sequence) else (float(mean),) * channels
            std = tuple(float(s) for s in std) if isinstance(std, Sequence) else (float(std),) * channels
        else:
            mean = std = None
        return cls(hw, resize, mean, std)

    def finish(self) -> list:
        """Transforms from a PIL image of any size to the normalised (3, H, W) tensor the model expects."""
        steps = [T.ToTensor()]
        if self.mean is not None:
            steps.append(T.Normalize(mean=self.mean, std=self.std))
        return steps


class ImageClassificationTransform:
    """A ``datasets`` batch transform: images -> ``pixel_values`` (+ ``teacher_pixel_values``) and ``labels``.

    Training: a random resized crop and a horizontal flip, drawn once per image at the larger of the two
    input sizes, then resized to each model's size, so both models see the same crop. Evaluation: each model's
    resize and centre crop of the same image (transformers' example recipe).

    Args:
        image_processor: the student's transformers image processor (size, image_mean, image_std).
        teacher_image_processor: the teacher's; ``teacher_pixel_values`` are made only when it asks for a
            different size or normalisation than the student's.
        train: random augmentation (True) or the deterministic evaluation recipe (False).
        image_column: name of the image column.
        label_column: name of the label column (class ids); copied to ``labels``. None for unlabelled data.
        skip_bad_images: an undecodable image gives ``pixel_values`` None, dropped by
            :func:`collate_image_classification`, and a warning (once per image) instead of an error.
        crop_scale: the (min, max) share of the image area that the training crop keeps.
        horizontal_flip: flip training images at random.

    Returns (``__call__``): the model inputs alone: ``pixel_values``, a list of (3, H_s, W_s) tensors, ``labels``
    and, when the processors differ, ``teacher_pixel_values``, a list of (3, H_t, W_t) tensors.
    """

    def __init__(
        self,
        image_processor: Any,
        teacher_image_processor: Any | None = None,
        *,
        train: bool,
        image_column: str = "image",
        label_column: str | None = "label",
        skip_bad_images: bool = False,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        horizontal_flip: bool = True,
    ):
        self.view = ImageView.from_processor(image_processor)
        teacher_view = (
            ImageView.from_processor(teacher_image_processor) if teacher_image_processor is not None else None
        )
        self.teacher_view = teacher_view if teacher_view != self.view else None
        self.train = train
        self.image_column = image_column
        self.label_column = label_column
        self.skip_bad_images = skip_bad_images
        self._warned: set[str] = set()

        views = [self.view] + ([self.teacher_view] if self.teacher_view else [])
        if train:
            # One crop at the largest input size; each view then only resizes it.
            crop = (max(v.size[0] for v in views), max(v.size[1] for v in views))
            augment = [T.RandomResizedCrop(crop, scale=crop_scale)]
            if horizontal_flip:
                augment.append(T.RandomHorizontalFlip())
            self.augment = T.Compose(augment)
            self.finishers = [T.Compose([T.Resize(v.size), *v.finish()]) for v in views]
        else:
            self.augment = None
            self.finishers = [T.Compose([T.Resize(v.resize), T.CenterCrop(v.size), *v.finish()]) for v in views]

    @property
    def makes_teacher_inputs(self) -> bool:
        """Whether the teacher gets inputs of its own (``teacher_pixel_values``)."""
        return self.teacher_view is not None

    def _decode(self, value: Any) -> PIL.Image.Image | None:
        try:
            return decode_image(value)
        except UndecodableImageError as e:
            if not self.skip_bad_images:
                raise
            name = describe_image(value)
            if name not in self._warned:
                self._warned.add(name)
                logger.warning(f"skipping undecodable image {name}: {e.__cause__}")
            return None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.image_column not in batch:
            raise ValueError(
                f"no image column {self.image_column!r} in the examples (they have {sorted(batch)}): set "
                "--image_column_name"
            )
        outputs: list[list[torch.Tensor | None]] = [[] for _ in self.finishers]
        for value in batch[self.image_column]:
            image = self._decode(value)
            if image is not None and self.augment is not None:
                image = self.augment(image)
            for out, finish in zip(outputs, self.finishers, strict=True):
                out.append(finish(image) if image is not None else None)
        inputs = {"pixel_values": outputs[0]}
        if self.teacher_view is not None:
            inputs[TEACHER_INPUT] = outputs[1]
        if self.label_column is not None:
            inputs["labels"] = batch[self.label_column]
        return inputs


def collate_image_classification(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """transformers' ``default_data_collator`` (``pixel_values`` (B, 3, H, W), ``labels`` (B,) and, if present,
    ``teacher_pixel_values`` (B, 3, H_t, W_t)) over the examples whose image was not skipped as undecodable
    (``pixel_values`` None)."""
    kept = [ex for ex in examples if ex["pixel_values"] is not None]
    if not kept:
        raise UndecodableImageError(
            f"all {len(examples)} images of a batch were undecodable and skipped: check the data set"
        )
    return default_data_collator(kept)
