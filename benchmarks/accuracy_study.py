"""Does it distill? Scratch vs logit KD vs UniKD (and variants) on real data, with and without unlabelled images.

On the bundled Animal-MNIST (10 classes, 28x28 silhouettes; validation = the held-out split of
``load_animal_mnist``), a ResNet teacher trained by this script on ALL training labels (one per split seed,
cached on disk) is distilled into a small ResNet student that sees only ``labels_per_class`` labelled images
per class (30 or 100), alone (``lpc30``) or with the rest of the training split as unlabelled images
(``lpc30u``: label -100, distillation terms only). Two students: today's 78k-parameter ResNet (``r78k``) and a
20k-parameter one with a large capacity gap (``r20k``, hidden sizes 4-8-16-32).

Pairing: seed ``s`` fixes the split (so the labelled subset and the teacher), the student's initialisation, the
data order and every augmented view (the k-th read of example i is view k, drawn in advance from the seed), so
two methods with the same seed differ only in their loss. Every method trains for the same steps.

The teacher's training outputs are computed once per (setting, seed) for exactly the views the students will
read and stored on disk (``stores/``); student runs read them instead of running the teacher (evaluation
still runs it). Every unit of work (teacher, store, student run) runs in its own process (``--jobs N`` at a
time), writes its JSON and is skipped on a rerun while its configuration is unchanged, so partial runs merge.
The report: ``summary.json``, ``summary.md`` (mean +- std, the paired difference to logit KD with its std,
95% t-interval and paired t-test) and ``accuracy.png`` / ``vs_kd.png`` (error bars).

    python benchmarks/accuracy_study.py --jobs 16 --device cuda           # the whole study (GPU-sized)
    python benchmarks/accuracy_study.py --settings lpc30u --methods primary --jobs 2 --threads 1
    python benchmarks/accuracy_study.py --quick                            # pipeline check in seconds
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402
from transformers import AutoModelForImageClassification, ResNetConfig, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.constants import INDEX_KEY  # noqa: E402
from hf_udkd.data import load_animal_mnist  # noqa: E402
from hf_udkd.teacher import Teacher  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "accuracy_study"
QUICK_OUTPUT = Path(__file__).resolve().parent / "results" / "accuracy_quick"


class Setting(NamedTuple):
    labels_per_class: int | None  # None: every training image labelled
    unlabelled: bool


SETTINGS: dict[str, Setting] = {
    "lpc30u": Setting(30, True),
    "lpc30": Setting(30, False),
    "lpc100u": Setting(100, True),
    "lpc100": Setting(100, False),
    # Every label: is a default chosen for few labels worse where labels are plentiful?
    "all": Setting(None, False),
}

# name -> (hidden_sizes, depths) of the student ResNets; the stem already divides 32x32 by 4.
STUDENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "r78k": ((8, 16, 32, 64), (1, 1, 1, 1)),
    "r20k": ((4, 8, 16, 32), (1, 1, 1, 1)),
}


@dataclass(frozen=True)
class Method:
    """UniKD options (None: the student alone, cross-entropy on the labelled images) and schedule overrides."""

    options: dict[str, Any] | None
    learning_rate: float | None = None


# Every method names its loss weights and logit standardization, so the study means the same whatever the
# library's defaults are (they moved to UniKD + LS with Sun et al.'s weights after this study). PAPER: UniKD's
# published weights (CE 1, logit KD 1), no standardization; SUN: Sun et al.'s (CE 0.1, KD 9), standardized.
PAPER: dict[str, Any] = {"logit_standardization": False, "w_ce": 1.0, "w_logit": 1.0}
SUN: dict[str, Any] = {"logit_standardization": True, "w_ce": 0.1, "w_logit": 9.0}
PRIMARY_METHODS: dict[str, Method] = {
    "scratch": Method(None),
    "kd": Method({**PAPER, "use_fdp": False}),
    "unikd": Method({**PAPER}),
    "kd_ls": Method({**PAPER, "use_fdp": False, "logit_standardization": True}),
    "unikd_ls": Method({**PAPER, "logit_standardization": True}),
    "unikd_dkd": Method({**PAPER, "logit_loss": "dkd"}),  # warmed up over the library's share of the run (20/240)
}
# The method checks of issue 15 against the development code (METHOD.md).
CHECK_METHODS: dict[str, Method] = {
    "unikd_kaiming": Method({**PAPER, "aff_init": "kaiming"}),
    "unikd_ft1": Method({**PAPER, "feature_temperature": 1.0}),
    # Sun et al. train KD + logit standardization with CE 0.1 and KD 9: standardized logits over T=4 are flat.
    "kd_ls_w9": Method({**SUN, "use_fdp": False}),
    "unikd_ls_w9": Method({**SUN}),  # the library's defaults
}
# Cheap probes of UniKD's instability on the small student: the learning rate and the feature terms' weight.
DIAGNOSTIC_METHODS: dict[str, Method] = {
    "unikd_lr0.02": Method({**PAPER}, learning_rate=0.02),
    "kd_lr0.02": Method({**PAPER, "use_fdp": False}, learning_rate=0.02),
    "unikd_w0.1": Method({**PAPER, "w_feat": 0.1, "w_supp": 0.1}),
}
METHODS: dict[str, Method] = {**PRIMARY_METHODS, **CHECK_METHODS, **DIAGNOSTIC_METHODS}
METHOD_GROUPS = {"primary": PRIMARY_METHODS, "checks": CHECK_METHODS, "diagnostics": DIAGNOSTIC_METHODS}


@dataclass(frozen=True)
class Schedule:
    """Everything shared by the runs of one study; part of every run's cache key."""

    student_steps: int = 1500
    teacher_epochs: float = 15.0
    batch_size: int = 64
    teacher_batch_size: int = 128
    learning_rate: float = 0.05
    teacher_learning_rate: float = 0.1
    weight_decay: float = 5e-4
    warmup_share: float = 0.05
    augment: bool = True
    teacher_arch: tuple[tuple[int, ...], tuple[int, ...]] = ((32, 64, 128, 256), (2, 2, 2, 2))
    teacher_train_limit: int | None = None
    val_limit: int | None = None
    unlabelled_limit: int | None = None
    logging_steps: int = 50

    @classmethod
    def quick(cls) -> Schedule:
        return cls(
            student_steps=6,
            teacher_epochs=1.0,
            batch_size=32,
            teacher_batch_size=64,
            teacher_arch=((8, 16, 32, 64), (1, 1, 1, 1)),
            teacher_train_limit=256,
            val_limit=200,
            unlabelled_limit=200,
            logging_steps=2,
        )


# The schedule fields a teacher depends on: changing the students' schedule keeps the cached teachers.
_TEACHER_FIELDS = (
    "teacher_epochs",
    "teacher_batch_size",
    "teacher_learning_rate",
    "weight_decay",
    "warmup_share",
    "augment",
    "teacher_arch",
    "teacher_train_limit",
    "val_limit",
)
# The fields of UDKDTrainingArguments that are UniKD's options: not the Trainer's, not the teacher's placement or
# its cache (the study has a store of its own), so a new caching option does not invalidate the finished runs.
_UDKD_FIELDS = sorted(
    name
    for name in {f.name for f in fields(UDKDTrainingArguments)} - {f.name for f in fields(TrainingArguments)}
    if not name.startswith("teacher_cache")
    and name not in {"teacher_dtype", "student_layers", "teacher_layers"}
)


@dataclass
class RunSpec:
    """One unit of work: a teacher (kind "teacher"), the teacher's stored outputs for one setting ("store"), or
    one (student, setting, method, seed) run ("student")."""

    kind: str
    seed: int
    schedule: Schedule
    output_dir: str
    device: str
    threads: int
    setting: str = ""
    method: str = ""
    student: str = ""
    # Other (setting, method) names of the same student run, written with it.
    aliases: list[tuple[str, str]] = field(default_factory=list)

    @property
    def uses_teacher(self) -> bool:
        return self.kind == "student" and METHODS[self.method].options is not None

    @property
    def uses_store(self) -> bool:
        """Student runs read the store unless they tap another teacher layer than the stored one."""
        return self.uses_teacher and _resolved_options(self.options())["teacher_stage"] == -1

    @property
    def data_setting(self) -> Setting:
        """Scratch trains on the labelled images only: its run is the same with or without an unlabelled rest."""
        setting = SETTINGS[self.setting]
        return (
            setting._replace(unlabelled=False)
            if self.kind == "student" and not self.uses_teacher
            else setting
        )

    def teacher_spec(self) -> RunSpec:
        return RunSpec("teacher", self.seed, self.schedule, self.output_dir, self.device, self.threads)

    def store_spec(self) -> RunSpec:
        return RunSpec(
            "store", self.seed, self.schedule, self.output_dir, self.device, self.threads, self.setting
        )

    def options(self) -> dict[str, Any] | None:
        return _distill_options(METHODS[self.method])

    def config(self) -> dict[str, Any]:
        """What determines the result: compared with a cached run's to decide whether to rerun it."""
        schedule = asdict(self.schedule)
        teacher = {
            "kind": "teacher",
            "seed": self.seed,
            "device": self.device,
            **{k: v for k, v in schedule.items() if k in _TEACHER_FIELDS},
        }
        if self.kind == "teacher":
            return teacher
        data = {"seed": self.seed, "setting": self.data_setting._asdict(), "schedule": schedule}
        if self.kind == "store":
            return {"kind": "store", **data, "teacher": teacher}
        method = METHODS[self.method]
        return {
            **data,
            "device": self.device,
            "student": STUDENTS[self.student],
            "learning_rate": method.learning_rate or self.schedule.learning_rate,
            "distill": None if method.options is None else _resolved_options(self.options()),
            "teacher": teacher if self.uses_teacher else None,
        }

    def path(self) -> Path:
        root = Path(self.output_dir)
        if self.kind == "teacher":
            return root / "teachers" / f"split{self.seed}.json"
        if self.kind == "store":
            return root / "stores" / f"{self.setting}-s{self.seed}.json"
        return root / "runs" / f"{self.student}-{self.setting}-{self.method}-s{self.seed}.json"

    def describe(self) -> str:
        if self.kind == "student":
            return f"{self.student} {self.setting} {self.method} seed {self.seed}"
        return f"{self.kind} {self.setting} seed {self.seed}".replace("  ", " ")


def _distill_options(method: Method) -> dict[str, Any] | None:
    return None if method.options is None else dict(method.options)


def _resolved_options(options: dict[str, Any]) -> dict[str, Any]:
    """The UniKD options as the run sees them (library defaults filled in), so a changed default reruns it."""
    defaults = {f.name: f.default for f in fields(UDKDTrainingArguments) if f.name in _UDKD_FIELDS}
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(f"unknown UniKD option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **options}


# ---- data ------------------------------------------------------------------------------------------------


class AugmentedImages(torch.utils.data.Dataset):
    """Examples ``{'pixel_values': (1, 32, 32), 'labels': ()}`` from pre-converted tensors.

    Augmentation: a 32x32 crop of the image padded by 4, flipped with p=0.5. With ``num_views`` the views are
    drawn in advance from ``seed`` and replayed: the k-th read of example i is view k, and the example carries
    ``udkd_index = k * N + i``, its row in the teacher store. Without, they come from torch's global generator.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: bool,
        seed: int = 0,
        num_views: int | None = None,
    ):
        self.labels = labels
        self.augment = augment
        self.images = F.pad(images, (4, 4, 4, 4), value=float(images.min())) if augment else images
        self.num_views = num_views
        if num_views is not None:
            generator = torch.Generator().manual_seed(seed)
            # (V, N, 3): crop offsets dy, dx in 0..8 and a flip bit.
            self.views = torch.randint(0, 9, (num_views, len(labels), 3), generator=generator)
            self.views[..., 2] %= 2
            self.reads = torch.zeros(len(labels), dtype=torch.long)
            self.replaying = False
            self.order: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def _view(self, image: torch.Tensor, dy: int, dx: int, flip: int) -> torch.Tensor:
        image = image[:, dy : dy + 32, dx : dx + 32]
        return image.flip(-1) if flip else image

    def view(self, k: int, i: int) -> torch.Tensor:
        """View k of example i, (1, 32, 32)."""
        if not self.augment:
            return self.images[i]
        return self._view(self.images[i], *self.views[k, i].tolist())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.num_views is None:
            image = self.images[i]
            if self.augment:
                dy, dx, flip = torch.randint(0, 9, (3,)).tolist()
                image = self._view(image, dy, dx, flip % 2)
            return {"pixel_values": image, "labels": self.labels[i]}
        if not self.replaying:
            # Reads before training (the Trainer probes and checks a few examples) see view 0 and count nothing.
            return {"pixel_values": self.view(0, i), "labels": self.labels[i], INDEX_KEY: i}
        k = int(self.reads[i])
        if k >= self.num_views:
            raise RuntimeError(f"example {i} read {k + 1} times but only {self.num_views} views were drawn")
        self.reads[i] += 1
        self.order.append(i)
        return {
            "pixel_values": self.view(k, i),
            "labels": self.labels[i],
            INDEX_KEY: k * len(self.labels) + i,
        }

    def start_replay(self) -> None:
        """From now on the k-th read of an example is its view k (call it right before training)."""
        self.replaying = True

    def order_digest(self) -> str:
        """A digest of the sequence of examples read: equal across methods of one seed (checked in the summary)."""
        return hashlib.sha1(np.asarray(self.order, dtype=np.int64).tobytes()).hexdigest()[:16]


def _to_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of PIL 28x28 "L" images -> pixels (N, 1, 32, 32) in [0, 1] (zero-padded) and labels (N,)."""
    pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in split["image"]])
    x = torch.from_numpy(pixels).float().div_(255).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2)), torch.tensor(split["label"], dtype=torch.long)


@functools.lru_cache(maxsize=4)
def _full_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """All training and validation pixels and labels of split ``seed``, and the class names.

    Cached per process: a worker of the pool serves many runs of the same split.
    """
    full = load_animal_mnist(split_seed=seed)
    return (
        *_to_tensors(full["train"]),
        *_to_tensors(full["validation"]),
        full["train"].features["label"].names,
    )


@functools.lru_cache(maxsize=8)
def _student_split(seed: int, setting: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's training pixels and labels (-100 for the unlabelled rest)."""
    train = load_animal_mnist(
        split_seed=seed, labels_per_class=setting.labels_per_class, unlabelled=setting.unlabelled
    )["train"]
    return _to_tensors(train)


def _limit(x: torch.Tensor, y: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random ``limit`` examples (the quick mode's small data), or all."""
    if limit is None or limit >= len(y):
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return x[keep], y[keep]


def _limit_unlabelled(
    x: torch.Tensor, y: torch.Tensor, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    labelled = y != -100
    rest_x, rest_y = _limit(x[~labelled], y[~labelled], limit)
    return torch.cat([x[labelled], rest_x]), torch.cat([y[labelled], rest_y])


def _num_views(spec: RunSpec, train_size: int) -> int:
    """Views per example that a student run reads: one per epoch (the last one may be partial)."""
    batches_per_epoch = math.ceil(train_size / spec.schedule.batch_size)
    return math.ceil(spec.schedule.student_steps / batches_per_epoch)


def _load_data(spec: RunSpec):
    """(train, validation) AugmentedImages and the class names, normalised with the full training set's stats."""
    all_x, all_y, val_x, val_y, names = _full_split(spec.seed)
    mean, std = all_x.mean(), all_x.std()
    schedule = spec.schedule
    val_x, val_y = _limit(val_x, val_y, schedule.val_limit)
    val = AugmentedImages((val_x - mean) / std, val_y, augment=False)
    if spec.kind == "teacher":
        train_x, train_y = _limit(all_x, all_y, schedule.teacher_train_limit)
        return AugmentedImages((train_x - mean) / std, train_y, schedule.augment), val, names
    train_x, train_y = _limit_unlabelled(
        *_student_split(spec.seed, spec.data_setting), schedule.unlabelled_limit
    )
    # The views depend on the seed only, not on the method: paired runs read identical images.
    train = AugmentedImages(
        (train_x - mean) / std,
        train_y,
        schedule.augment,
        seed=spec.seed,
        num_views=_num_views(spec, len(train_y)),
    )
    return train, val, names


# ---- the teacher store -----------------------------------------------------------------------------------


def _store_arrays(spec: RunSpec, mode: str = "r") -> tuple[np.ndarray, np.ndarray]:
    base = spec.path().with_suffix("")
    return (np.load(f"{base}-logits.npy", mmap_mode=mode), np.load(f"{base}-features.npy", mmap_mode=mode))


def _build_store(spec: RunSpec, teacher_module: torch.nn.Module, train: AugmentedImages) -> None:
    """Teacher logits (V*N, K) and pooled last-stage tap (V*N, C_T) for every view of every training example."""
    teacher = Teacher.from_probe(teacher_module, torch.stack([train.view(0, 0), train.view(0, 1)]), None, -1)
    n = len(train)
    rows = train.num_views * n
    base = spec.path().with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    logits = np.lib.format.open_memmap(f"{base}-logits.npy", "w+", np.float32, (rows, teacher.num_labels))
    features = np.lib.format.open_memmap(
        f"{base}-features.npy", "w+", np.float32, (rows, teacher.stage.channels)
    )
    chunk = 500
    for start in range(0, rows, chunk):
        index = range(start, min(rows, start + chunk))
        batch = torch.stack([train.view(r // n, r % n) for r in index])
        out_logits, out_features = teacher.outputs(batch)
        logits[index.start : index.stop] = out_logits.numpy()
        features[index.start : index.stop] = out_features.numpy()
    logits.flush()
    features.flush()


class StoredTeacherTrainer(UDKDTrainer):
    """UDKDTrainer that reads the teacher's training outputs from the study's store (rows ``udkd_index``)."""

    def __init__(self, *args, store: tuple[np.ndarray, np.ndarray] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.store = store

        self.head_statistics = HeadStatistics(self.model)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.head_statistics.flush())
        super().log(logs, start_time)

    def _teacher_outputs_for(self, inputs, teacher_input, training):
        if self.store is None or not training:
            return super()._teacher_outputs_for(inputs, teacher_input, training)
        rows = inputs[INDEX_KEY].cpu().numpy()
        device = teacher_input.device
        return tuple(torch.from_numpy(np.ascontiguousarray(a[rows])).to(device) for a in self.store)


# ---- models and training ---------------------------------------------------------------------------------


def _resnet(arch: tuple[tuple[int, ...], tuple[int, ...]], names: list[str]) -> torch.nn.Module:
    hidden_sizes, depths = arch
    config = ResNetConfig(
        num_channels=1,
        embedding_size=hidden_sizes[0],
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        layer_type="basic",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    return AutoModelForImageClassification.from_config(config)


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


class HeadStatistics:
    """The scale of FDP's sampled noise against its signal, per logging window, for both heads: ``sigma_*`` the
    mean of exp(log_var / 2), ``mu_spread_*`` the mean over the batch of mu's std over the classes."""

    def __init__(self, distiller: torch.nn.Module):
        self.sums: dict[str, float] = {}
        self.count = 0
        for name in ("student", "teacher"):
            head = getattr(distiller, f"fdp_{name}", None)
            if head is not None:
                head.register_forward_hook(functools.partial(self._record, name))

    def _record(self, name: str, module, inputs, output) -> None:
        if not module.training:
            return
        mu, log_var = (x.detach() for x in output)
        for key, value in (
            (f"sigma_{name}", log_var.mul(0.5).exp().mean()),
            (f"mu_spread_{name}", mu.std(-1).mean()),
        ):
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += name == "student"

    def flush(self) -> dict[str, float]:
        means = {k: round(v / self.count, 4) for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means


def _training_args(
    spec: RunSpec, work_dir: str, steps: int, batch_size: int, lr: float, options: dict[str, Any]
) -> UDKDTrainingArguments:
    return UDKDTrainingArguments(
        output_dir=work_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=500,
        learning_rate=lr,
        weight_decay=spec.schedule.weight_decay,
        optim="sgd",
        optim_args="momentum=0.9,nesterov=True",
        lr_scheduler_type="cosine",
        warmup_steps=spec.schedule.warmup_share,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=spec.schedule.logging_steps if spec.kind == "student" else max(1, steps // 5),
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec.seed,
        use_cpu=spec.device == "cpu",
        **options,
    )


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one unit of work; write its JSON; return the record. Runs in a worker."""
    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(spec.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        start = time.perf_counter()
        record = {"teacher": _run_teacher, "store": _run_store, "student": _run_student}[spec.kind](spec)
        record.update(
            kind=spec.kind,
            seed=spec.seed,
            setting=spec.setting,
            wall_s=round(time.perf_counter() - start, 1),
            config=spec.config(),
        )
        names = [(spec.setting, spec.method), *spec.aliases]
        for setting, method in names:
            path = replace(spec, setting=setting, method=method).path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps({**record, "setting": setting, "method": method or spec.kind}, indent=1)
            )
        return {**record, "method": spec.method or spec.kind, "student": spec.student}
    finally:
        # Restored for the in-process case (jobs=1, tests).
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _train(trainer: UDKDTrainer) -> dict[str, float]:
    # Many runs share one terminal: the per-run summary line is printed by the parent instead.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer.evaluate()


def _run_teacher(spec: RunSpec) -> dict[str, Any]:
    schedule = spec.schedule
    train, val, names = _load_data(spec)
    steps = math.ceil(schedule.teacher_epochs * len(train) / schedule.teacher_batch_size)
    with tempfile.TemporaryDirectory(prefix="udkd_study_") as work_dir:
        args = _training_args(
            spec, work_dir, steps, schedule.teacher_batch_size, schedule.teacher_learning_rate, {}
        )
        trainer = UDKDTrainer(
            model=_resnet(schedule.teacher_arch, names),
            args=args,
            train_dataset=train,
            eval_dataset=val,
            compute_metrics=_accuracy,
        )
        metrics = _train(trainer)
        trainer.save_model(str(spec.path().with_suffix("")))
    return {
        "accuracy": metrics["eval_accuracy"],
        "params": sum(p.numel() for p in trainer.student.parameters()),
        "steps": steps,
        "train_size": len(train),
    }


def _load_teacher(spec: RunSpec) -> torch.nn.Module:
    return AutoModelForImageClassification.from_pretrained(spec.teacher_spec().path().with_suffix(""))


def _run_store(spec: RunSpec) -> dict[str, Any]:
    # The views a student of this (setting, seed) reads, whatever the method.
    probe = replace(spec, kind="student", method="kd", student=next(iter(STUDENTS)))
    train, _, _ = _load_data(probe)
    _build_store(spec, _load_teacher(spec), train)
    return {"rows": train.num_views * len(train), "train_size": len(train), "views": train.num_views}


def _run_student(spec: RunSpec) -> dict[str, Any]:
    schedule = spec.schedule
    train, val, names = _load_data(spec)
    options = spec.options()
    teacher = _load_teacher(spec) if spec.uses_teacher else None
    store = _store_arrays(spec.store_spec()) if spec.uses_store else None
    torch.manual_seed(spec.seed)
    model = _resnet(STUDENTS[spec.student], names)
    learning_rate = METHODS[spec.method].learning_rate or schedule.learning_rate
    with tempfile.TemporaryDirectory(prefix="udkd_study_") as work_dir:
        args = _training_args(
            spec, work_dir, schedule.student_steps, schedule.batch_size, learning_rate, options or {}
        )
        trainer = StoredTeacherTrainer(
            model=model,
            teacher_model=teacher,
            args=args,
            train_dataset=train,
            eval_dataset=val,
            compute_metrics=_accuracy,
            store=store,
        )
        train.start_replay()
        metrics = _train(trainer)
    return {
        "student": spec.student,
        "accuracy": metrics["eval_accuracy"],
        "params": sum(p.numel() for p in trainer.student.parameters()),
        "steps": schedule.student_steps,
        "train_size": len(train),
        "labelled": int((train.labels != -100).sum()),
        "val_size": len(val),
        "order_digest": train.order_digest(),
        "teacher_store": store is not None,
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval_loss")},
        "train_log": [log for log in trainer.state.log_history if "loss" in log],
    }


def _cached(spec: RunSpec) -> dict[str, Any] | None:
    path = spec.path()
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    # Through JSON, as stored: tuples become lists.
    if record.get("config") != json.loads(json.dumps(spec.config())):
        return None
    if spec.kind == "teacher" and not path.with_suffix("").is_dir():
        return None
    if spec.kind == "store" and not Path(f"{path.with_suffix('')}-logits.npy").is_file():
        return None
    return record


# ---- scheduling ------------------------------------------------------------------------------------------


def _plan(
    methods: list[str],
    settings: list[str],
    students: list[str],
    seeds: list[int],
    schedule: Schedule,
    output_dir: str,
    device: str,
    threads: int,
) -> tuple[list[RunSpec], list[RunSpec]]:
    """(units to run, seed by seed: teacher, stores, students; students already cached).

    Students whose configurations are identical (scratch with and without the unlabelled rest, say) train once
    and are written under every name."""
    todo: dict[str, RunSpec] = {}
    cached = []
    for setting in settings:
        for seed in seeds:
            for student in students:
                for method in methods:
                    spec = RunSpec(
                        "student", seed, schedule, output_dir, device, threads, setting, method, student
                    )
                    if _cached(spec) is not None:
                        cached.append(spec)
                        continue
                    key = hashlib.sha1(json.dumps(spec.config(), sort_keys=True).encode()).hexdigest()
                    if key in todo:
                        todo[key].aliases.append((setting, method))
                    else:
                        todo[key] = spec
    students_todo = list(todo.values())
    stores = {(s.setting, s.seed): s.store_spec() for s in students_todo if s.uses_store}
    stores_todo = [s for s in stores.values() if _cached(s) is None]
    needed = sorted({s.seed for s in [*students_todo, *stores_todo] if s.kind == "store" or s.uses_teacher})
    teachers = [RunSpec("teacher", seed, schedule, output_dir, device, threads) for seed in needed]
    teachers = [t for t in teachers if _cached(t) is None]
    # Seed by seed, so that a study cut short leaves complete paired seeds; execute() respects the dependencies.
    kinds = ["teacher", "store", "student"]
    units = sorted([*teachers, *stores_todo, *students_todo], key=lambda u: (u.seed, kinds.index(u.kind)))
    return units, cached


def _needs(spec: RunSpec) -> list[str]:
    if spec.kind == "teacher":
        return []
    needs = [spec.teacher_spec().describe()] if spec.kind == "store" or spec.uses_teacher else []
    return needs + ([spec.store_spec().describe()] if spec.uses_store else [])


def _describe(record: dict[str, Any]) -> str:
    if record["kind"] != "student":
        what = f"{record['kind']} {record['setting']}"
        score = f"acc {100 * record['accuracy']:.2f}" if "accuracy" in record else f"{record['rows']} rows"
    else:
        what = f"{record['student']} {record['setting']:>7} {record['method']:<13}"
        score = f"acc {100 * record['accuracy']:.2f}"
    return f"{what} seed {record['seed']}: {score}  {record['wall_s']:7.1f} s"


def execute(units: list[RunSpec], jobs: int) -> list[dict[str, Any]]:
    """Run every unit, at most ``jobs`` processes at a time, in list order as their dependencies finish."""
    pending = {u.describe() for u in units}
    waiting = list(units)
    records = []
    start = time.perf_counter()

    def finished(spec: RunSpec, record: dict[str, Any]) -> None:
        records.append(record)
        pending.discard(spec.describe())
        print(f"[{time.perf_counter() - start:7.1f} s] {_describe(record)}", flush=True)

    if jobs == 1:
        # In this process: no start-up cost, and the data stay cached between runs.
        for spec in waiting:
            finished(spec, run_one(spec))
        return records
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: dict[Future, RunSpec] = {}

        def submit_ready() -> None:
            for spec in list(waiting):
                if len(running) >= jobs:
                    return
                if not set(_needs(spec)) & pending:
                    running[pool.submit(run_one, spec)] = spec
                    waiting.remove(spec)

        submit_ready()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                spec = running.pop(future)
                finished(spec, future.result())
            submit_ready()
    return records


# ---- summary ---------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def paired(diffs: list[float]) -> dict[str, float | None]:
    """Mean and std of paired differences, their 95% t-interval, the paired t-test's p and mean / std."""
    out: dict[str, float | None] = {**_stats(diffs), "ci95": None, "p": None, "mean_over_std": None}
    n, std = len(diffs), out["std"]
    if n > 1 and std > 0:
        half = float(scipy_stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
        out["p"] = float(2 * scipy_stats.t.sf(abs(out["mean"]) / (std / math.sqrt(n)), n - 1))
        out["mean_over_std"] = out["mean"] / std
    return out


def summarise(
    output_dir: str,
    schedule: Schedule,
    methods: list[str],
    settings: list[str],
    students: list[str],
    seeds: list[int],
    device: str,
) -> dict[str, Any]:
    """Every (student, setting, method) with cached runs under the current configuration: accuracy mean and std
    over seeds (ddof=1), the paired difference to logit KD, and whether paired runs read the same data."""
    summary: dict[str, Any] = {"schedule": asdict(schedule), "seeds": seeds, "teachers": {}, "results": {}}
    for seed in seeds:
        teacher = _cached(RunSpec("teacher", seed, schedule, output_dir, device, 1))
        if teacher is not None:
            summary["teachers"][seed] = {"accuracy": teacher["accuracy"], "params": teacher["params"]}
    for student in students:
        for setting in settings:
            rows = {}
            for method in methods:
                specs = [
                    RunSpec("student", s, schedule, output_dir, device, 1, setting, method, student)
                    for s in seeds
                ]
                runs = {s.seed: r for s in specs if (r := _cached(s)) is not None}
                if runs:
                    rows[method] = {
                        "by_seed": {s: r["accuracy"] for s, r in runs.items()},
                        **_stats([r["accuracy"] for r in runs.values()]),
                        "wall_s": float(np.mean([r["wall_s"] for r in runs.values()])),
                        "params": next(iter(runs.values()))["params"],
                        "digests": {s: r["order_digest"] for s, r in runs.items()},
                    }
            if "kd" in rows:
                kd = rows["kd"]
                for method, row in rows.items():
                    common = sorted(set(row["by_seed"]) & set(kd["by_seed"]))
                    if method != "kd" and common:
                        row["vs_kd"] = paired([row["by_seed"][s] - kd["by_seed"][s] for s in common])
                        if METHODS[method].options is not None or not SETTINGS[setting].unlabelled:
                            # Scratch never reads the unlabelled rest, so only there its data may differ.
                            row["same_data_as_kd"] = all(
                                row["digests"][s] == kd["digests"][s] for s in common
                            )
            for row in rows.values():
                row.pop("digests")
            if rows:
                summary["results"].setdefault(student, {})[setting] = rows
    summary["goal"] = _goal(summary)
    return summary


def _goal(summary: dict[str, Any]) -> dict[str, Any]:
    """Issue 15's yardstick per method: beats KD by > 2 std of the paired difference somewhere, and never trails it
    by more than 1 std."""
    verdict: dict[str, Any] = {}
    for student, by_setting in summary["results"].items():
        for setting, rows in by_setting.items():
            for method, row in rows.items():
                ratio = row.get("vs_kd", {}).get("mean_over_std")
                if ratio is not None and METHODS[method].options is not None:
                    verdict.setdefault(method, {})[f"{student}/{setting}"] = round(ratio, 2)
    return {
        method: {
            "mean_over_std": ratios,
            "wins": [k for k, r in ratios.items() if r > 2],
            "trails": [k for k, r in ratios.items() if r < -1],
            "meets_goal": any(r > 2 for r in ratios.values()) and all(r >= -1 for r in ratios.values()),
        }
        for method, ratios in verdict.items()
    }


def diagnostics_table(
    output_dir: str,
    schedule: Schedule,
    methods: list[str],
    settings: list[str],
    students: list[str],
    seeds: list[int],
    device: str,
) -> str:
    """Per run, the logged loss terms early (first logging window) and late (mean of the last three), the gradient
    norm before clipping (mean and largest of the logged ones), and FDP's noise scale against its signal late in
    training: what a collapse looks like."""
    lines = [
        "Loss terms per run (unweighted; early = first logging window, late = mean of the last 3), the gradient "
        "norm before clipping at max_grad_norm=1 (mean / max of its values at the logging steps), and FDP's noise "
        "scale sigma against the spread of mu over the classes (student head). Terms: ce, logit, feat, supp.",
        "",
        "| student | setting | method | seed | acc | early ce / logit / feat / supp | late ce / logit / feat / supp "
        "| grad norm mean / max | sigma / mu spread, early -> late |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    terms = ("loss_ce", "loss_logit", "loss_feat", "loss_supp")

    def fmt(logs: list[dict[str, float]]) -> str:
        return " / ".join(f"{np.mean([log[t] for log in logs]):.3f}" if t in logs[0] else "-" for t in terms)

    for student in students:
        for setting in settings:
            for method in methods:
                for seed in seeds:
                    record = _cached(
                        RunSpec("student", seed, schedule, output_dir, device, 1, setting, method, student)
                    )
                    if record is None or METHODS[method].options is None or not record["train_log"]:
                        continue
                    log = record["train_log"]
                    late = log[-3:]
                    noise = (
                        " -> ".join(
                            f"{np.mean([x['sigma_student'] for x in logs]):.3f} / "
                            f"{np.mean([x['mu_spread_student'] for x in logs]):.3f}"
                            for logs in (log[:1], late)
                        )
                        if "sigma_student" in late[0]
                        else ""
                    )
                    grads = [x["grad_norm"] for x in log if "grad_norm" in x] or [float("nan")]
                    lines.append(
                        f"| {student} | {setting} | {method} | {seed} | {_pct(record['accuracy'])} | "
                        f"{fmt(log[:1])} | {fmt(late)} | {np.mean(grads):.2f} / {max(grads):.2f} | {noise} |"
                    )
    return "\n".join(lines) + "\n"


def write_report(summary: dict[str, Any], output_dir: Path, diagnostics: str) -> None:
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (output_dir / "summary.md").write_text(markdown_table(summary))
    (output_dir / "diagnostics.md").write_text(diagnostics)
    plot(summary, output_dir / "accuracy.png", output_dir / "vs_kd.png")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown_table(summary: dict[str, Any]) -> str:
    s = summary["schedule"]
    teachers = summary["teachers"]
    lines = [
        "Held-out accuracy (%) on Animal-MNIST (2,000 validation images), mean +- std over paired seeds (n). "
        "'vs KD': the paired difference to logit KD (same seed: same split, teacher, data order, views and "
        "initialisation), mean +- std, its 95% t-interval, the paired t-test's p, and mean / std "
        "(issue 15's goal: > 2 somewhere, never < -1).",
        "",
        f"Teacher (ResNet {s['teacher_arch'][0]}, depths {s['teacher_arch'][1]}, all training labels, "
        f"{s['teacher_epochs']:g} epochs): "
        + ", ".join(f"seed {k}: {_pct(v['accuracy'])}" for k, v in teachers.items())
        + (f" ({next(iter(teachers.values()))['params']:,} params)" if teachers else ""),
        f"Students: {', '.join(f'{k} = ResNet {v[0]}' for k, v in STUDENTS.items())}; {s['student_steps']} steps, "
        f"batch {s['batch_size']}, SGD lr {s['learning_rate']} cosine, augment={s['augment']}. Settings: lpcN = N "
        "labels per class; a trailing u adds the rest of the training split unlabelled (scratch ignores it); all = every training label.",
        "",
        "| student | setting | method | accuracy | vs KD | 95% CI | p | mean/std | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for student, by_setting in summary["results"].items():
        for setting, rows in by_setting.items():
            for method, row in rows.items():
                gap = row.get("vs_kd")
                cells = ["", "", "", ""]
                if gap is not None:
                    cells[0] = f"{100 * gap['mean']:+.2f} +- {100 * gap['std']:.2f}"
                    if gap["ci95"] is not None:
                        cells[1] = f"[{100 * gap['ci95'][0]:+.2f}, {100 * gap['ci95'][1]:+.2f}]"
                        cells[2] = f"{gap['p']:.3f}"
                        ratio = gap["mean_over_std"]
                        cells[3] = f"{ratio:+.1f}" + ("*" if ratio > 2 else "")
                    if not row.get("same_data_as_kd", True):
                        cells[0] += " (data differ!)"
                lines.append(
                    f"| {student} | {setting} | {method} | {_pct(row['mean'])} +- {_pct(row['std'])} "
                    f"({row['n']}) | " + " | ".join(cells) + f" | {row['wall_s']:.0f} |"
                )
    goal = summary["goal"]
    if goal:
        lines += ["", "Goal check (mean/std of the paired difference to KD; * > 2):", ""]
        for method, g in goal.items():
            verdict = "meets the goal" if g["meets_goal"] else "does not meet the goal"
            lines.append(
                f"- {method}: {verdict}; wins: {', '.join(g['wins']) or 'none'}; "
                f"trails by > 1 std: {', '.join(g['trails']) or 'none'}"
            )
    return "\n".join(lines) + "\n"


def _color(method: str) -> str:
    if method == "scratch":
        return "0.6"
    if method.startswith("kd"):
        return "tab:orange"
    return "tab:blue"


def plot(summary: dict[str, Any], accuracy_path: Path, gap_path: Path) -> None:
    """Accuracy per method (bars: mean, error bars: std, dots: seeds) and the paired difference to KD (95% CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (student, setting, rows)
        for student, by_setting in summary["results"].items()
        for setting, rows in by_setting.items()
    ]
    if not panels:
        return
    teacher_acc = [100 * t["accuracy"] for t in summary["teachers"].values()]
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    for path, gaps in ((accuracy_path, False), (gap_path, True)):
        fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 4.2 * nrows), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        for ax, (student, setting, rows) in zip(axes.flat, panels, strict=False):
            names = [m for m in rows if not gaps or "vs_kd" in rows[m]]
            x = np.arange(len(names))
            if gaps:
                means = [100 * rows[m]["vs_kd"]["mean"] for m in names]
                ci = [rows[m]["vs_kd"]["ci95"] for m in names]
                err = np.array(
                    [
                        [m - 100 * c[0], 100 * c[1] - m] if c else [0, 0]
                        for m, c in zip(means, ci, strict=True)
                    ]
                ).T
                ax.bar(
                    x, means, yerr=err if len(names) else None, color=[_color(m) for m in names], capsize=4
                )
                ax.axhline(0, color="tab:orange", lw=1)
                ax.set_ylabel("paired difference to logit KD (points, 95% CI)")
            else:
                means = [100 * rows[m]["mean"] for m in names]
                stds = [100 * rows[m]["std"] for m in names]
                ax.bar(x, means, yerr=stds, color=[_color(m) for m in names], capsize=4)
                for i, m in enumerate(names):
                    values = [100 * v for v in rows[m]["by_seed"].values()]
                    ax.scatter([i] * len(values), values, color="k", s=8, zorder=3)
                if "kd" in rows:
                    ax.axhline(100 * rows["kd"]["mean"], color="tab:orange", ls="--", lw=1, label="logit KD")
                if teacher_acc:
                    ax.axhline(np.mean(teacher_acc), color="tab:green", ls=":", lw=1, label="teacher")
                low = min(m - s for m, s in zip(means, stds, strict=True))
                ax.set_ylim(max(0, low - 3), 100)
                ax.set_ylabel("held-out accuracy (%, std over seeds)")
                ax.legend(loc="lower right", fontsize=8)
            ax.set_xticks(x, names, rotation=40, ha="right", fontsize=8)
            setting_info = SETTINGS[setting]
            rest = " + unlabelled rest" if setting_info.unlabelled else ""
            labels = setting_info.labels_per_class
            label_text = "all labels" if labels is None else f"{labels} labels/class"
            ax.set_title(f"{student}, {label_text}{rest}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ---- command line ----------------------------------------------------------------------------------------


def _expand_methods(names: list[str], parser: argparse.ArgumentParser) -> list[str]:
    methods = []
    for name in names:
        expanded = list(METHODS) if name == "all" else list(METHOD_GROUPS.get(name, [name]))
        unknown = [m for m in expanded if m not in METHODS]
        if unknown:
            parser.error(
                f"unknown method {unknown[0]!r}; choose from {list(METHODS)}, "
                f"{', '.join(repr(g) for g in METHOD_GROUPS)} or 'all'"
            )
        methods += [m for m in expanded if m not in methods]
    # The paired differences are to logit KD: it runs whenever anything is compared with it.
    if "kd" not in methods and len(methods) > 1:
        methods.append("kd")
    return sorted(methods, key=list(METHODS).index)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    groups = "; ".join(f"'{g}': {' '.join(m)}" for g, m in METHOD_GROUPS.items())
    parser.add_argument(
        "--methods", nargs="+", default=["all"], help=f"method names or groups ({groups}; 'all')"
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: cores/jobs)"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=None, help="student steps (default 1500; quick 6)")
    parser.add_argument("--teacher-epochs", type=float, default=None, help="teacher epochs (default 15)")
    parser.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"default {DEFAULT_OUTPUT} ({QUICK_OUTPUT} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="pipeline check: tiny teacher and data, 1 seed")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="train nothing: summarise the runs already in the output dir (e.g. after a time-out)",
    )
    args = parser.parse_args(argv)
    args.methods = _expand_methods(args.methods, parser)
    if args.quick and args.seeds == [0, 1, 2, 3, 4]:
        args.seeds = [0]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    schedule = Schedule.quick() if args.quick else Schedule()
    overrides = {"student_steps": args.steps, "teacher_epochs": args.teacher_epochs}
    schedule = replace(schedule, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_augment:
        schedule = replace(schedule, augment=False)
    output_dir = args.output_dir or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Teacher weights and stores are a local cache; only the JSON and the report are meant for the repository.
    (output_dir / ".gitignore").write_text("teachers/*/\nstores/\n")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    units, cached = _plan(
        args.methods,
        args.settings,
        args.students,
        args.seeds,
        schedule,
        str(output_dir),
        args.device,
        threads,
    )
    counts = {kind: sum(u.kind == kind for u in units) for kind in ("teacher", "store", "student")}
    print(
        f"{counts['teacher']} teacher(s), {counts['store']} store(s) and {counts['student']} student run(s) to "
        f"train ({len(cached)} cached), {args.jobs} at a time, {threads} thread(s) each, on {args.device}; "
        f"output in {output_dir}",
        flush=True,
    )
    for spec in units:
        also = ", ".join(f"{setting} {method}" for setting, method in spec.aliases)
        alias = f" (also written as {also}: same configuration)" if spec.aliases else ""
        print(f"  {spec.describe()}{alias}")
    if args.dry_run:
        return {}
    start = time.perf_counter()
    records = [] if args.summarize_only else execute(units, args.jobs)
    wall = time.perf_counter() - start
    if records:
        run_s = sum(r["wall_s"] for r in records)
        print(
            f"budget: {len(records)} unit(s), {run_s:.0f} run-seconds, {wall:.0f} s wall "
            f"({run_s / max(wall, 1e-9):.1f} in flight on average)"
        )
    summary = summarise(
        str(output_dir), schedule, args.methods, args.settings, args.students, args.seeds, args.device
    )
    diagnostics = diagnostics_table(
        str(output_dir), schedule, args.methods, args.settings, args.students, args.seeds, args.device
    )
    write_report(summary, output_dir, diagnostics)
    print(markdown_table(summary))
    print(f"wrote {output_dir / 'summary.md'}, diagnostics.md, summary.json, accuracy.png, vs_kd.png")
    return summary


if __name__ == "__main__":
    main()
