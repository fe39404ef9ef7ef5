"""The teacher store: the teacher's outputs per (training example, view), replayed instead of running the teacher.

The teacher side of UniKD needs, per image, only the teacher's logits (K numbers) and its pooled tap (C_T
numbers, what FDP_t reads; METHOD.md §3 and §8). A random training transform shows a new view of each image at
every read, so the store makes views replayable: around the training set's ``__getitem__`` the generators that
transforms draw from (torch's CPU generator, numpy's and Python's ``random``) are seeded from (seed, example
index, view), in whichever process or DataLoader worker reads it, and epoch ``e`` shows view ``e mod V``.
The store then holds ``examples x V x (K + C_T)`` numbers, float32 by default (a store-fed run gives the
losses of the run that filled it) or float16.

Nothing is replayed that cannot be: at start a few (example, view) pairs are read twice and collated twice, and
a transform that draws from an unseeded source, or a random collator, is refused. On disk
(``teacher_cache_dir``) the store is a ``store.json`` manifest, which records the fingerprint (teacher weights
and dtype, tapped layer, data, views, view seed, dtype), and one safetensors shard per process
(``shard-<rank>.safetensors``: ``rows`` (n,), ``logits`` (n, K), ``features`` (n, C_T); row = view x N + index).
Every process reads every shard; a later run with another fingerprint is refused, naming what differs.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .config import UDKDTrainingArguments
from .constants import INDEX_KEY, TEACHER_INPUT, VIEW_KEY
from .teacher import Teacher, whole_weights

logger = logging.get_logger(__name__)

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MANIFEST = "store.json"
# Keys whose values must replay exactly for the stored teacher outputs to stay valid.
_INPUT_KEYS = ("pixel_values", TEACHER_INPUT, "labels")
# Rows exchanged between processes per collective, to bound the memory of one gather.
_EXCHANGE_CHUNK = 8192


# ---- replayable views --------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded_generators(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's global one and Python's ``random`` with ``seed`` inside the block.

    Afterwards torch's CPU generator is restored exactly; numpy's and Python's continue from a seed drawn from
    their own streams before the block (saving and restoring their 2.5 KB states costs ten times more, about
    0.7 ms per example). Either way what follows the block does not depend on what the block drew. Only the CPU
    generator: ``torch.manual_seed`` would also reseed the GPUs, whose state (dropout in the training step)
    must not depend on the last example read.
    """
    torch_state = torch.get_rng_state()
    numpy_next, python_next = int(np.random.randint(2**32)), random.getrandbits(64)
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.seed(numpy_next)
        random.seed(python_next)


class ReplayViews:
    """Which view the training set shows now (epoch mod V), shared with DataLoader workers, and each view's seed.

    The current view lives in a shared-memory tensor, so persistent DataLoader workers see it change too.
    """

    def __init__(self, seed: int, num_views: int):
        if num_views < 1:
            raise ValueError(f"teacher_cache_views must be at least 1, got {num_views}")
        self.seed = seed
        self.num_views = num_views
        self._current = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def current(self) -> int:
        return int(self._current)

    def set_epoch(self, epoch: int) -> None:
        self._current.fill_(epoch % self.num_views)

    def seed_for(self, index: int, view: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}/{index}/{view}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


class ReplayDataset(torch.utils.data.Dataset):
    """The training set with replayable views: example ``i`` in view ``v`` is the same at every read.

    Each example also carries its index (``udkd_index``) and view (``udkd_view``), the store's keys.
    """

    def __init__(self, dataset, views: ReplayViews):
        self.dataset = dataset
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(int(index), self.views.current)

    def example(self, index: int, view: int) -> dict[str, Any]:
        with seeded_generators(self.views.seed_for(index, view)):
            example = self.dataset[index]
        return {**example, INDEX_KEY: index, VIEW_KEY: view}


class StoreRows(torch.utils.data.Dataset):
    """Given store rows (row = view x N + index) as a dataset of their examples, for the precompute pass."""

    def __init__(self, replay: ReplayDataset, rows: torch.Tensor):
        self.replay = replay
        self.rows = rows.tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        view, index = divmod(self.rows[i], len(self.replay))
        return self.replay.example(index, view)


class IndexedCollator:
    """Collates with the user's collator, then adds the (B,) index and view tensors.

    User collators (e.g. the transformers image-classification guide's) build only the keys they know,
    so the keys are taken out before and put back after.
    """

    def __init__(self, collator: Callable[[list[dict]], dict]):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples or INDEX_KEY not in examples[0]:
            return self.collator(examples)
        keys = {key: torch.tensor([example[key] for example in examples], dtype=torch.long)
                for key in (INDEX_KEY, VIEW_KEY)}
        batch = self.collator([{k: v for k, v in ex.items() if k not in keys} for ex in examples])
        batch.update(keys)
        return batch


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return torch.stack(list(value))
    return torch.as_tensor(np.asarray(value))


def _same(a: Any, b: Any) -> bool:
    return torch.equal(_as_tensor(a), _as_tensor(b))


def _probe_indices(num_examples: int, count: int = 8) -> list[int]:
    """Up to ``count`` indices spread over the data set, first and last included."""
    return sorted({int(i) for i in np.linspace(0, num_examples - 1, min(count, num_examples))})


def check_replayable(replay: ReplayDataset, collator: Callable) -> str:
    """Refuse a training set whose views do not replay, or a random collator; return a digest of the views.

    Reads each probe example in views 0, 1 and V-1 twice, and collates the probe examples four times.
    The generators are restored afterwards, so the check changes neither data order nor augmentation. The
    digest (of the probe examples' inputs and labels, every view read) goes into the store's fingerprint.
    """
    digest = hashlib.sha256()
    views = sorted({0, replay.views.num_views - 1, min(1, replay.views.num_views - 1)})
    indices = _probe_indices(len(replay))
    first_views: dict[int, list[dict]] = {}
    with torch.random.fork_rng(devices=[]), _saved_host_generators():
        for view in views:
            for index in indices:
                first, second = replay.example(index, view), replay.example(index, view)
                for key in _INPUT_KEYS:
                    if key in first and not _same(first[key], second[key]):
                        raise ValueError(
                            f"teacher_cache=True replays each training example's augmentation, but reading "
                            f"example {index} in view {view} twice, with the same seeds, gave different '{key}': "
                            "the transform draws randomness from a source the trainer cannot seed (its own "
                            "torch.Generator or numpy Generator, the GPU, the clock). Draw from the global torch, "
                            "numpy or `random` generators, as torchvision and timm transforms do, or set "
                            "teacher_cache=False."
                        )
                    if key in first:
                        digest.update(_as_tensor(first[key]).contiguous().numpy().tobytes())
                first_views.setdefault(view, []).append(first)
        batches = [collator(first_views[0]) for _ in range(4)]
    for key in _INPUT_KEYS:
        if key in batches[0] and not all(_same(batches[0][key], batch[key]) for batch in batches[1:]):
            raise ValueError(
                f"teacher_cache=True stores the teacher's output per example, but collating the same training "
                f"examples four times gave different '{key}': the data collator is random (mixup, cutmix, a random "
                "crop per batch). The store would replay outputs for inputs the student never sees. Move the "
                "randomness into the dataset's transform (it is replayed per view) or set teacher_cache=False."
            )
    _report_views(replay, first_views)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _saved_host_generators() -> Iterator[None]:
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _report_views(replay: ReplayDataset, first_views: dict[int, list[dict]]) -> None:
    """Say when the number of views does not fit the transform: one view of a random one, several of a fixed one."""
    if len(first_views) < 2:
        return
    a, b = first_views[0], first_views[max(first_views)]
    differ = any(not _same(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b, strict=True))
    if replay.views.num_views == 1 and differ:
        logger.warning(
            "The training transform is random and teacher_cache_views=1: every epoch shows each example the "
            "same augmented view. Set teacher_cache_views to the number of distinct views to train on."
        )
    elif replay.views.num_views > 1 and not differ:
        logger.warning(
            f"teacher_cache_views={replay.views.num_views} but the training transform gives the same view every "
            "time: the store holds identical copies. teacher_cache_views=1 stores the same in 1/V of the space."
        )


# ---- fingerprint -------------------------------------------------------------------------------------------


def weights_digest(module: nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        tensor = tensor.detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def data_description(dataset) -> str:
    """The training set's type and length, and the `datasets` fingerprint (its rows and transform) if it has one."""
    description = f"{type(dataset).__name__} of {len(dataset)} examples"
    fingerprint = getattr(dataset, "_fingerprint", None)
    return description + (f", datasets fingerprint {fingerprint}" if fingerprint else "")


# Names of the fingerprint's parts, as messages print them.
FINGERPRINT_PARTS = {
    "teacher_weights": "the teacher's weights",
    "teacher_dtype": "the teacher's dtype",
    "teacher_tap": "the teacher's tapped layer (teacher_layers, teacher_stage)",
    "data": "the training data",
    "views_digest": "the training views (the transform, the data, or seed/data_seed)",
    "views": "teacher_cache_views",
    "view_seed": "the view seed (data_seed, else seed)",
    "dtype": "teacher_cache_dtype",
}


def check_same_fingerprint(stored: dict[str, Any], current: dict[str, Any], directory: str) -> None:
    differ = [key for key in FINGERPRINT_PARTS if stored.get(key) != current.get(key)]
    if differ:
        details = "; ".join(f"{FINGERPRINT_PARTS[k]}: stored {stored.get(k)!r}, now {current.get(k)!r}" for k in differ)
        raise ValueError(
            f"the teacher store in {directory} was filled for another set-up, so its outputs would be stale. What "
            f"differs: {details}. Use another teacher_cache_dir (or delete this one) to fill a new store, or run "
            "with the set-up the store was filled for."
        )


# ---- the store ---------------------------------------------------------------------------------------------


class TeacherStore:
    """Teacher logits (N x V, K) and pooled teacher taps (N x V, C_T), filled on first sight or by precompute.

    Args:
        num_examples: N, the size of the training set.
        num_views: V.
        num_features: C_T, channels of the teacher tap.
        num_labels: K.
        dtype: what the rows are stored in (float32 or float16); they are read back as float32.
        fingerprint: what the outputs depend on (see :data:`FINGERPRINT_PARTS`).
        directory: None keeps the store in this process's memory; else the store's folder (read at start:
            every shard of an earlier or concurrent run with the same fingerprint is loaded).
        process_index: this process's rank; it writes ``shard-<rank>.safetensors``.
    """

    def __init__(
        self,
        num_examples: int,
        num_views: int,
        num_features: int,
        num_labels: int,
        dtype: torch.dtype,
        fingerprint: dict[str, Any],
        directory: str | None = None,
        process_index: int = 0,
    ):
        self.num_examples, self.num_views = num_examples, num_views
        self.fingerprint = fingerprint
        self.directory = directory
        self.process_index = process_index
        rows = num_examples * num_views
        # Rows never written cost no memory (the OS commits pages on first touch); `filled` says which are valid.
        self.logits = torch.empty(rows, num_labels, dtype=dtype)
        self.features = torch.empty(rows, num_features, dtype=dtype)
        self.filled = torch.zeros(rows, dtype=torch.bool)
        # Rows this process computed (its shard) and those not yet sent to the other processes.
        self._mine = torch.zeros(rows, dtype=torch.bool)
        self._unsent: list[torch.Tensor] = []
        self._unsaved = False
        if directory is not None:
            self._open(directory)

    # -- sizes

    def __len__(self) -> int:
        return self.filled.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the store when full: N x V x (K + C_T) x bytes per number."""
        return (self.logits.numel() + self.features.numel()) * self.logits.element_size()

    @property
    def num_filled(self) -> int:
        return int(self.filled.sum())

    @property
    def is_full(self) -> bool:
        return bool(self.filled.all())

    def missing_rows(self) -> torch.Tensor:
        """Rows (view x N + index) not filled yet, (n,) int64."""
        return torch.nonzero(~self.filled).flatten()

    def rows(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return views.cpu().long() * self.num_examples + indices.cpu().long()

    # -- reading and writing rows

    def fetch(
        self,
        indices: torch.Tensor,
        views: torch.Tensor,
        compute: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits (B, K) and pooled tap (B, C_T), float32 on ``device``, of examples ``indices`` (B,) in
        ``views`` (B,).

        ``compute(rows)`` runs the teacher on the batch rows selected by the boolean mask ``rows`` (B,) (all
        rows when None) and returns float32 (logits, pooled tap); it is called only for rows not stored yet,
        which are then stored.
        """
        rows = self.rows(indices, views)
        missing = ~self.filled[rows]
        if bool(missing.any()):
            everything = bool(missing.all())
            logits, features = compute(None if everything else missing.to(device))
            self.put(rows if everything else rows[missing], logits, features)
        # Read back through the store's dtype even when just computed: a row reads the same every time.
        return (
            self.logits[rows].to(device, torch.float32, non_blocking=True),
            self.features[rows].to(device, torch.float32, non_blocking=True),
        )

    def put(self, rows: torch.Tensor, logits: torch.Tensor, features: torch.Tensor) -> None:
        """Store (n, K) logits and (n, C_T) pooled taps at ``rows`` (n,), as computed by this process."""
        rows = rows.cpu()
        self.logits[rows] = logits.detach().to("cpu", self.logits.dtype)
        self.features[rows] = features.detach().to("cpu", self.features.dtype)
        self.filled[rows] = True
        self._mine[rows] = True
        self._unsent.append(rows)
        self._unsaved = True

    # -- sharing between processes and runs

    def exchange(self, accelerator) -> None:
        """Send the rows computed here since the last exchange to every other process, and take theirs.

        Collective: every process calls it at the same point (epoch end, end of precompute).
        """
        rows = torch.cat(self._unsent) if self._unsent else torch.zeros(0, dtype=torch.long)
        self._unsent = []
        if accelerator.num_processes == 1:
            return
        device = accelerator.device
        counts = accelerator.gather(torch.tensor([len(rows)], device=device))
        for start in range(0, int(counts.max()), _EXCHANGE_CHUNK):
            chunk = rows[start:start + _EXCHANGE_CHUNK]
            padded = accelerator.pad_across_processes(
                {"rows": chunk.to(device), "logits": self.logits[chunk].to(device),
                 "features": self.features[chunk].to(device)},
                dim=0, pad_index=-1,
            )
            gathered = {key: value.cpu() for key, value in accelerator.gather(padded).items()}
            valid = gathered["rows"] >= 0
            received = gathered["rows"][valid]
            self.logits[received] = gathered["logits"][valid]
            self.features[received] = gathered["features"][valid]
            self.filled[received] = True

    def save(self) -> None:
        """Write this process's shard (the rows it computed, in this run or an earlier one) if it has new rows;
        atomic (a reader never sees half a shard)."""
        if self.directory is None or not self._unsaved:
            return
        self._unsaved = False
        rows = torch.nonzero(self._mine).flatten()
        path = self._shard_path(self.process_index)
        save_file(
            {"rows": rows, "logits": self.logits[rows].contiguous(), "features": self.features[rows].contiguous()},
            path + ".tmp",
            metadata={"fingerprint": json.dumps(self.fingerprint, sort_keys=True)},
        )
        os.replace(path + ".tmp", path)

    def _shard_path(self, process_index: int) -> str:
        return os.path.join(self.directory, f"shard-{process_index:05d}.safetensors")

    def _open(self, directory: str) -> None:
        """Check the manifest against this run's fingerprint (or write it), then load every shard."""
        os.makedirs(directory, exist_ok=True)
        manifest = os.path.join(directory, MANIFEST)
        if os.path.isfile(manifest):
            with open(manifest) as f:
                check_same_fingerprint(json.load(f)["fingerprint"], self.fingerprint, directory)
        elif self.process_index == 0:
            self._write_manifest(manifest)
        own = self._shard_path(self.process_index)
        for path in sorted(glob.glob(os.path.join(directory, "shard-*.safetensors"))):
            shard = load_file(path)
            rows = shard["rows"]
            self.logits[rows] = shard["logits"].to(self.logits.dtype)
            self.features[rows] = shard["features"].to(self.features.dtype)
            self.filled[rows] = True
            if path == own:
                # Rewriting this shard later must keep what it held.
                self._mine[rows] = True
        if self.num_filled:
            logger.info(f"Teacher store in {directory}: {self.num_filled} of {len(self)} rows read back")

    def _write_manifest(self, path: str) -> None:
        manifest = {
            "format": "hf_udkd teacher store 1",
            "num_examples": self.num_examples,
            "num_views": self.num_views,
            "num_labels": self.logits.shape[1],
            "num_features": self.features.shape[1],
            "row": "view * num_examples + example index",
            "fingerprint": self.fingerprint,
        }
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(path + ".tmp", path)


def describe(store: TeacherStore) -> str:
    where = "in memory" if store.directory is None else f"in {store.directory}"
    return (
        f"Teacher store {where}: {store.num_examples} examples x {store.num_views} views x "
        f"({store.logits.shape[1]} + {store.features.shape[1]}) {str(store.logits.dtype).removeprefix('torch.')} "
        f"= {store.nbytes / 2**20:.1f} MiB when full, {store.num_filled} rows filled"
    )


def build_teacher_store(
    train_dataset, collator: Callable, teacher: Teacher, args: UDKDTrainingArguments
) -> tuple[TeacherStore, ReplayDataset]:
    """Check that ``train_dataset`` replays through ``collator`` and open this run's store.

    ``collator`` is the training collator as the Trainer wraps it, around an :class:`IndexedCollator`.
    Returns the store and the training set with replayable views (what the training DataLoader reads).
    """
    if train_dataset is None:
        raise ValueError("teacher_cache=True stores the teacher's outputs on the training set, but no train_dataset "
                         "was given")
    if isinstance(train_dataset, torch.utils.data.IterableDataset) or not hasattr(train_dataset, "__len__"):
        raise ValueError(
            "teacher_cache=True needs a map-style train_dataset (with __len__ and __getitem__), so that an "
            f"example can be recognised by its index; got {type(train_dataset).__name__}. Use a map-style "
            "dataset or set teacher_cache=False."
        )
    views = ReplayViews(args.data_seed if args.data_seed is not None else args.seed, args.teacher_cache_views)
    replay = ReplayDataset(train_dataset, views)
    with whole_weights(teacher.module):
        teacher_weights = weights_digest(teacher.module)
    fingerprint = {
        "teacher_weights": teacher_weights,
        "teacher_dtype": str(next(teacher.module.parameters()).dtype).removeprefix("torch."),
        "teacher_tap": f"{teacher.tap.describe()}, {teacher.num_labels} labels",
        "data": data_description(train_dataset),
        "views_digest": check_replayable(replay, collator),
        "views": views.num_views,
        "view_seed": views.seed,
        "dtype": args.teacher_cache_dtype,
    }
    store = TeacherStore(
        len(train_dataset), views.num_views, teacher.stage.channels, teacher.num_labels,
        STORE_DTYPES[args.teacher_cache_dtype], fingerprint, args.teacher_cache_dir, args.process_index,
    )
    logger.info(describe(store))
    return store, replay


class StoreCallback(TrainerCallback):
    """Shows each epoch its view (epoch mod V, also after a resume) and shares and saves new rows at epoch ends."""

    def __init__(self, store: TeacherStore, views: ReplayViews, accelerator):
        self.store, self.views, self.accelerator = store, views, accelerator

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional after a resume in mid-epoch; its integer part is the epoch under way.
        self.views.set_epoch(int(state.epoch or 0))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.store.exchange(self.accelerator)
        self.store.save()
