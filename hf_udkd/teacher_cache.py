"""Teacher-output cache: skip the frozen teacher after the first epoch (option ``teacher_cache``).

The teacher side of UniKD needs, per example, only the teacher logits (K numbers) and the pooled teacher
tap (C_T numbers) that FDP_t reads (METHOD.md §3). With a deterministic training transform these never
change, so the first time an example is seen they are stored, and afterwards they are read back instead
of running the teacher. The cache holds ``examples x (C_T + K)`` float32 numbers (4 bytes each), in
memory or in memory-mapped files on disk.

How an example is known again: the training set is wrapped so that each example carries its index
(``udkd_index``), and the collator is wrapped so that the index survives any user collator. Under DDP each
process caches the examples it sees; an example seen for the first time later (a shuffling sampler hands
it to another process in a later epoch) is simply computed then.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .constants import INDEX_KEY

logger = logging.get_logger(__name__)

# Keys whose values must repeat exactly for the cached teacher outputs to stay valid.
_INPUT_KEYS = ("pixel_values", "teacher_pixel_values")


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose examples also carry their index under ``udkd_index``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], INDEX_KEY: int(index)}


class IndexedCollator:
    """Collates with the user's collator, then adds the (B,) index tensor.

    User collators (e.g. the transformers image-classification guide's) build only the keys they know,
    so the index is taken out before and put back after.
    """

    def __init__(self, collator: Callable[[list[dict]], dict]):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples or INDEX_KEY not in examples[0]:
            return self.collator(examples)
        indices = torch.tensor([example[INDEX_KEY] for example in examples], dtype=torch.long)
        batch = self.collator([{k: v for k, v in example.items() if k != INDEX_KEY} for example in examples])
        batch[INDEX_KEY] = indices
        return batch


def _same(a: Any, b: Any) -> bool:
    return torch.equal(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)))


def check_deterministic(dataset, num_examples: int = 8) -> None:
    """Raise if reading an example twice gives different model inputs (a random training transform).

    Reads the first ``num_examples`` examples twice; a transform that flips with probability 1/2 is
    caught with probability 1 - 2**-num_examples. The random generators are restored afterwards, so
    the check does not change the run's data order or augmentation.
    """
    torch_state, python_state, numpy_state = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        for index in range(min(num_examples, len(dataset))):
            first, second = dataset[index], dataset[index]
            for key in _INPUT_KEYS:
                if key in first and not _same(first[key], second[key]):
                    raise ValueError(
                        f"teacher_cache=True needs a deterministic training transform, but reading training "
                        f"example {index} twice gave different '{key}' (random augmentation?). The cache "
                        "would replay the teacher's output for another view of the image. Remove the random "
                        "augmentation from the training transform, or set teacher_cache=False."
                    )
    finally:
        torch.random.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class TeacherCache:
    """Teacher logits (N, K) and pooled teacher taps (N, C_T), float32, filled on first sight.

    Args:
        num_examples: N, the size of the training set.
        num_features: C_T, channels of the teacher tap.
        num_labels: K.
        directory: None keeps the cache in memory; a directory holds it in memory-mapped ``.npy`` files
            (rewritten at every start: a cache is valid for one teacher and one dataset only).
    """

    def __init__(self, num_examples: int, num_features: int, num_labels: int, directory: str | None = None):
        self.directory = directory
        if directory is None:
            # Uninitialised rows cost no memory until written (the OS commits pages on first touch), and
            # `filled` says which rows are valid.
            self.logits = torch.empty(num_examples, num_labels, dtype=torch.float32)
            self.features = torch.empty(num_examples, num_features, dtype=torch.float32)
        else:
            os.makedirs(directory, exist_ok=True)
            self.logits = self._memmap(os.path.join(directory, "teacher_logits.npy"), (num_examples, num_labels))
            self.features = self._memmap(
                os.path.join(directory, "teacher_features.npy"), (num_examples, num_features)
            )
        self.filled = torch.zeros(num_examples, dtype=torch.bool)

    @staticmethod
    def _memmap(path: str, shape: tuple[int, int]) -> torch.Tensor:
        return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape))

    def __len__(self) -> int:
        return self.filled.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the cache when full: N x (C_T + K) x 4."""
        return (self.logits.numel() + self.features.numel()) * self.logits.element_size()

    @property
    def num_filled(self) -> int:
        return int(self.filled.sum())

    def fetch(
        self,
        indices: torch.Tensor,
        compute: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits (B, K) and pooled tap (B, C_T) for the examples ``indices`` (B,), on ``device``.

        ``compute(rows)`` runs the teacher on the batch rows selected by the boolean mask ``rows`` (B,)
        (all rows when None) and returns float32 (logits, pooled tap); it is called only for examples
        not cached yet, whose outputs are then stored.
        """
        # The indices reach us on the training device; the lookup is on the CPU, where the cache lives.
        indices = indices.cpu()
        missing = ~self.filled[indices]
        if bool(missing.all()):
            logits, features = compute(None)
            self._store(indices, logits, features)
            return logits, features
        logits = self.logits[indices].to(device, non_blocking=True)
        features = self.features[indices].to(device, non_blocking=True)
        if bool(missing.any()):
            rows = missing.to(device)
            new_logits, new_features = compute(rows)
            self._store(indices[missing], new_logits, new_features)
            logits[rows], features[rows] = new_logits, new_features
        return logits, features

    def _store(self, indices: torch.Tensor, logits: torch.Tensor, features: torch.Tensor) -> None:
        self.logits[indices] = logits.detach().cpu()
        self.features[indices] = features.detach().cpu()
        self.filled[indices] = True


def build_teacher_cache(
    train_dataset, num_features: int, num_labels: int, directory: str | None, process_index: int
) -> TeacherCache:
    """Check that ``train_dataset`` can be cached and make this process's cache (its own files on disk)."""
    if train_dataset is None:
        raise ValueError("teacher_cache=True caches the teacher on the training set, but no train_dataset was given")
    if isinstance(train_dataset, torch.utils.data.IterableDataset) or not hasattr(train_dataset, "__len__"):
        raise ValueError(
            "teacher_cache=True needs a map-style train_dataset (with __len__ and __getitem__), so that an "
            f"example can be recognised by its index; got {type(train_dataset).__name__}. Use a map-style "
            "dataset or set teacher_cache=False."
        )
    check_deterministic(train_dataset)
    if directory is not None:
        directory = os.path.join(directory, f"process_{process_index}")
    cache = TeacherCache(len(train_dataset), num_features, num_labels, directory)
    where = "in memory" if directory is None else f"in {directory}"
    logger.info(
        f"Teacher cache {where}: {len(train_dataset)} examples x ({num_features} + {num_labels}) float32 = "
        f"{cache.nbytes / 2**20:.1f} MiB when full"
    )
    return cache
