"""Does it distill? Scratch vs logit KD vs UniKD (and its ablations) on real data, several seeds.

On the bundled Animal-MNIST (10 classes, 28x28 silhouettes; validation = the held-out split of
``load_animal_mnist``), a ResNet teacher trained by this script on ALL training labels (one per split seed,
cached on disk) is distilled into a much smaller ResNet student that sees only ``labels_per_class`` labelled
images per class (30 and 100). Every method trains for the same steps with the same schedule; only the
distillation options differ. Seed ``s`` fixes the split (and so the labelled subset and the teacher) and the
training seed, so the seeds of two methods are paired.

Every run (a teacher, or one (setting, method, seed) student) is an independent unit of work: it runs in its
own process (``--jobs N`` at a time), writes ``<output-dir>/runs/<setting>-<method>-s<seed>.json`` and is
skipped on a rerun while its configuration is unchanged, so partial runs merge. At the end the script writes
``summary.json``, ``summary.md`` (mean +- std of held-out accuracy) and ``accuracy.png`` to the output dir.

    python benchmarks/accuracy_study.py                       # the study (primary methods, 2 settings, 3 seeds)
    python benchmarks/accuracy_study.py --methods all --jobs 16 --device cuda
    python benchmarks/accuracy_study.py --methods scratch kd unikd --settings lpc30 --seeds 0
    python benchmarks/accuracy_study.py --quick               # pipeline check: tiny models, few steps
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForImageClassification, ResNetConfig  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.data import load_animal_mnist  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "accuracy_study"
QUICK_OUTPUT = Path(__file__).resolve().parent / "results" / "accuracy_quick"

SETTINGS: dict[str, int] = {"lpc30": 30, "lpc100": 100}

# name -> UniKD options; None trains the student alone (no teacher). Options not named keep the library
# defaults, so "unikd" follows whatever UDKDTrainingArguments ships.
PRIMARY_METHODS: dict[str, dict[str, Any] | None] = {
    "scratch": None,
    "kd": {"use_fdp": False},
    "unikd": {},
    "no_aff": {"use_aff": False},
    "gaussian": {"feature_kl": "gaussian"},
    "dkd": {"logit_loss": "dkd"},  # dkd_warmup_epochs is scaled to the schedule in _distill_options
    "aff512": {"aff_channels": 512},
    "aff64": {"aff_channels": 64},
}
INVESTIGATION_METHODS: dict[str, dict[str, Any] | None] = {
    "no_detach": {"detach_targets": False},
    "tstage0": {"teacher_stage": 0},
    "tstage_last": {"teacher_stage": -1},
    "wsupp0.1": {"w_supp": 0.1},
    "wsupp0": {"w_supp": 0.0},
    "wfeat0.5": {"w_feat": 0.5},
    "wfeat2": {"w_feat": 2.0},
    "T2": {"temperature": 2.0},
}
METHODS = {**PRIMARY_METHODS, **INVESTIGATION_METHODS}

# The paper's recipe warms DKD up over 20 of 240 epochs; keep that share on a shorter schedule.
DKD_WARMUP_SHARE = 20 / 240


@dataclass(frozen=True)
class Schedule:
    """Everything shared by the runs of one study; part of every run's cache key."""

    student_steps: int = 1500
    teacher_epochs: float = 30.0
    batch_size: int = 64
    teacher_batch_size: int = 128
    learning_rate: float = 0.05
    teacher_learning_rate: float = 0.1
    weight_decay: float = 5e-4
    warmup_share: float = 0.05
    augment: bool = True
    # (hidden_sizes, depths) of the ResNets; the stem already divides 32x32 by 4.
    teacher_arch: tuple[tuple[int, ...], tuple[int, ...]] = ((32, 64, 128, 256), (2, 2, 2, 2))
    student_arch: tuple[tuple[int, ...], tuple[int, ...]] = ((8, 16, 32, 64), (1, 1, 1, 1))
    teacher_train_limit: int | None = None
    val_limit: int | None = None

    @classmethod
    def quick(cls) -> Schedule:
        return cls(
            student_steps=6, teacher_epochs=1.0, batch_size=32, teacher_batch_size=64,
            teacher_arch=((8, 16, 32, 64), (1, 1, 1, 1)), student_arch=((4, 8, 16, 32), (1, 1, 1, 1)),
            teacher_train_limit=256, val_limit=200,
        )


# The schedule fields a teacher depends on: changing the students' schedule keeps the cached teachers.
_TEACHER_FIELDS = ("teacher_epochs", "teacher_batch_size", "teacher_learning_rate", "weight_decay", "warmup_share",
                   "augment", "teacher_arch", "teacher_train_limit", "val_limit")


@dataclass
class RunSpec:
    """One unit of work: a teacher (method ``"teacher"``) or a student of one (setting, method, seed)."""

    setting: str
    method: str
    seed: int
    schedule: Schedule
    output_dir: str
    device: str
    threads: int
    aliases: list[str] = field(default_factory=list)

    @property
    def is_teacher(self) -> bool:
        return self.method == "teacher"

    def config(self) -> dict[str, Any]:
        """What determines the result: compared with a cached run's to decide whether to rerun it."""
        schedule = asdict(self.schedule)
        teacher = {"kind": "teacher", "seed": self.seed, "device": self.device,
                   **{k: v for k, v in schedule.items() if k in _TEACHER_FIELDS}}
        if self.is_teacher:
            return teacher
        options = _distill_options(self.method, self.schedule, SETTINGS[self.setting])
        return {
            "seed": self.seed, "device": self.device, "schedule": schedule,
            "setting": self.setting, "labels_per_class": SETTINGS[self.setting],
            "distill": None if options is None else _resolved_options(options),
            "teacher": None if options is None else teacher,
        }

    def path(self, name: str | None = None) -> Path:
        if self.is_teacher:
            return Path(self.output_dir) / "teachers" / f"split{self.seed}.json"
        return Path(self.output_dir) / "runs" / f"{self.setting}-{name or self.method}-s{self.seed}.json"


def _distill_options(method: str, schedule: Schedule, labels_per_class: int) -> dict[str, Any] | None:
    options = METHODS[method]
    if options is None:
        return None
    options = dict(options)
    if options.get("logit_loss") == "dkd":
        options.setdefault("dkd_warmup_epochs", round(DKD_WARMUP_SHARE * _epochs(schedule, labels_per_class), 2))
    return options


def _epochs(schedule: Schedule, labels_per_class: int) -> float:
    return schedule.student_steps * schedule.batch_size / (labels_per_class * 10)


_UDKD_FIELDS = [f.name for f in fields(UDKDTrainingArguments) if f.name in {
    "temperature", "w_logit", "w_feat", "w_supp", "logit_loss", "dkd_warmup_epochs", "feature_kl",
    "detach_targets", "use_fdp", "use_aff", "aff_channels", "aff_batch_norm", "teacher_stage",
}]


def _resolved_options(options: dict[str, Any]) -> dict[str, Any]:
    """The UniKD options as the run sees them (library defaults filled in), so a changed default reruns it."""
    defaults = {f.name: f.default for f in fields(UDKDTrainingArguments) if f.name in _UDKD_FIELDS}
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(f"unknown UniKD option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **options}


# ---- data ------------------------------------------------------------------------------------------------


class TensorImages(torch.utils.data.Dataset):
    """Examples ``{'pixel_values': (1, 32, 32), 'labels': ()}`` from pre-converted tensors.

    With ``augment``, each example is a random 32x32 crop of the image padded by 4 and flipped with p=0.5,
    drawn from torch's global generator (seeded by the Trainer; ``dataloader_num_workers=0``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool):
        self.labels = labels
        self.augment = augment
        self.images = F.pad(images, (4, 4, 4, 4), value=float(images.min())) if augment else images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = self.images[i]
        if self.augment:
            dy, dx, flip = torch.randint(0, 9, (3,)).tolist()
            image = image[:, dy:dy + 32, dx:dx + 32]
            if flip % 2:
                image = image.flip(-1)
        return {"pixel_values": image, "labels": self.labels[i]}


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
    return (*_to_tensors(full["train"]), *_to_tensors(full["validation"]), full["train"].features["label"].names)


@functools.lru_cache(maxsize=8)
def _labelled_subset(seed: int, labels_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _to_tensors(load_animal_mnist(split_seed=seed, labels_per_class=labels_per_class)["train"])


def _limit(x: torch.Tensor, y: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random ``limit`` examples (the quick mode's small data), or all."""
    if limit is None or limit >= len(y):
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:limit]
    return x[keep], y[keep]


def _load_data(seed: int, labels_per_class: int | None, schedule: Schedule):
    """(train, validation) TensorImages and the class names, normalised with the full training set's stats."""
    all_x, all_y, val_x, val_y, names = _full_split(seed)
    mean, std = all_x.mean(), all_x.std()
    if labels_per_class is None:
        train_x, train_y = _limit(all_x, all_y, schedule.teacher_train_limit)
    else:
        train_x, train_y = _labelled_subset(seed, labels_per_class)
    val_x, val_y = _limit(val_x, val_y, schedule.val_limit)
    train = TensorImages((train_x - mean) / std, train_y, schedule.augment)
    val = TensorImages((val_x - mean) / std, val_y, augment=False)
    return train, val, names


# ---- models and training ---------------------------------------------------------------------------------


def _resnet(arch: tuple[tuple[int, ...], tuple[int, ...]], names: list[str]) -> torch.nn.Module:
    hidden_sizes, depths = arch
    config = ResNetConfig(
        num_channels=1, embedding_size=hidden_sizes[0], hidden_sizes=list(hidden_sizes), depths=list(depths),
        layer_type="basic", num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    return AutoModelForImageClassification.from_config(config)


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def _train(model, teacher, train, val, args: UDKDTrainingArguments) -> tuple[dict[str, float], UDKDTrainer]:
    trainer = UDKDTrainer(
        model=model, teacher_model=teacher, args=args, train_dataset=train, eval_dataset=val,
        compute_metrics=_accuracy,
    )
    # Many runs share one terminal: the per-run summary line is printed by the parent instead.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer.evaluate(), trainer


def _training_args(spec: RunSpec, work_dir: str, steps: int, batch_size: int, lr: float,
                   options: dict[str, Any]) -> UDKDTrainingArguments:
    return UDKDTrainingArguments(
        output_dir=work_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=500, learning_rate=lr, weight_decay=spec.schedule.weight_decay,
        optim="sgd", optim_args="momentum=0.9,nesterov=True", lr_scheduler_type="cosine",
        warmup_steps=spec.schedule.warmup_share, eval_strategy="no", save_strategy="no",
        logging_steps=max(1, steps // 5), report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        seed=spec.seed, use_cpu=spec.device == "cpu", **options,
    )


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one teacher or student; write its JSON; return the record. Runs in a worker."""
    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(spec.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _run_one(spec)
    finally:
        # Restored for the in-process case (jobs=1, tests).
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _run_one(spec: RunSpec) -> dict[str, Any]:
    start = time.perf_counter()
    schedule = spec.schedule
    with tempfile.TemporaryDirectory(prefix="udkd_study_") as work_dir:
        if spec.is_teacher:
            train, val, names = _load_data(spec.seed, None, schedule)
            steps = math.ceil(schedule.teacher_epochs * len(train) / schedule.teacher_batch_size)
            args = _training_args(spec, work_dir, steps, schedule.teacher_batch_size,
                                  schedule.teacher_learning_rate, {})
            model = _resnet(schedule.teacher_arch, names)
            metrics, trainer = _train(model, None, train, val, args)
            trainer.save_model(str(spec.path().with_suffix("")))
        else:
            labels_per_class = SETTINGS[spec.setting]
            train, val, names = _load_data(spec.seed, labels_per_class, schedule)
            options = _distill_options(spec.method, schedule, labels_per_class)
            teacher = None
            if options is not None:
                teacher_dir = RunSpec("", "teacher", spec.seed, schedule, spec.output_dir, spec.device, 1).path()
                teacher = AutoModelForImageClassification.from_pretrained(teacher_dir.with_suffix(""))
            torch.manual_seed(spec.seed)
            model = _resnet(schedule.student_arch, names)
            steps = schedule.student_steps
            args = _training_args(spec, work_dir, steps, schedule.batch_size, schedule.learning_rate,
                                  options or {})
            metrics, trainer = _train(model, teacher, train, val, args)
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    record = {
        "method": spec.method, "setting": spec.setting, "seed": spec.seed,
        "accuracy": metrics["eval_accuracy"],
        "params": sum(p.numel() for p in trainer.student.parameters()),
        "steps": steps, "train_size": len(train), "val_size": len(val),
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval_loss")},
        "train_log": train_logs,
        "wall_s": round(time.perf_counter() - start, 1),
        "config": spec.config(),
    }
    for name in [spec.method, *spec.aliases]:
        path = spec.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, "method": name}, indent=1))
    return record


def _cached(spec: RunSpec, name: str | None = None) -> dict[str, Any] | None:
    path = spec.path(name)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    # Through JSON, as stored: tuples become lists.
    return record if record.get("config") == json.loads(json.dumps(spec.config())) else None


# ---- scheduling ------------------------------------------------------------------------------------------


def _plan(methods: list[str], settings: list[str], seeds: list[int], schedule: Schedule, output_dir: str,
          device: str, threads: int) -> tuple[list[RunSpec], list[RunSpec], list[RunSpec]]:
    """(teachers to train, students to train, students already cached). Students whose configurations are
    identical (e.g. "aff64" while the library default is 64) train once and are written under every name."""
    todo: dict[str, RunSpec] = {}
    cached = []
    for setting in settings:
        for seed in seeds:
            for method in methods:
                spec = RunSpec(setting, method, seed, schedule, output_dir, device, threads)
                if _cached(spec) is not None:
                    cached.append(spec)
                    continue
                key = hashlib.sha1(json.dumps(spec.config(), sort_keys=True).encode()).hexdigest()
                if key in todo:
                    todo[key].aliases.append(method)
                else:
                    todo[key] = spec
    students = list(todo.values())
    needed = sorted({s.seed for s in students if METHODS[s.method] is not None})
    teachers = [RunSpec("", "teacher", seed, schedule, output_dir, device, threads) for seed in needed]
    teachers = [t for t in teachers if _cached(t) is None or not t.path().with_suffix("").is_dir()]
    return teachers, students, cached


def _describe(record: dict[str, Any]) -> str:
    what = "teacher" if record["method"] == "teacher" else f"{record['setting']:>6} {record['method']:<11}"
    return f"{what} seed {record['seed']}: acc {100 * record['accuracy']:.2f}  {record['wall_s']:7.1f} s"


def execute(teachers: list[RunSpec], students: list[RunSpec], jobs: int) -> list[dict[str, Any]]:
    """Run everything, ``jobs`` processes at a time; a student that needs a teacher starts once it exists.
    Students without a teacher (scratch) run alongside the teachers."""
    pending_teachers = {t.seed for t in teachers}
    waiting = list(students)
    records = []
    start = time.perf_counter()
    if jobs == 1:
        # In this process: no start-up cost, and the data stay cached between runs.
        for spec in [*teachers, *students]:
            records.append(run_one(spec))
            print(f"[{time.perf_counter() - start:7.1f} s] {_describe(records[-1])}", flush=True)
        return records
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: dict[Future, RunSpec] = {pool.submit(run_one, t): t for t in teachers}

        def submit_ready() -> None:
            for spec in list(waiting):
                if METHODS[spec.method] is None or spec.seed not in pending_teachers:
                    running[pool.submit(run_one, spec)] = spec
                    waiting.remove(spec)

        submit_ready()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                spec = running.pop(future)
                record = future.result()
                records.append(record)
                if spec.is_teacher:
                    pending_teachers.discard(spec.seed)
                print(f"[{time.perf_counter() - start:7.1f} s] {_describe(record)}", flush=True)
            submit_ready()
    return records


# ---- summary ---------------------------------------------------------------------------------------------


def summarise(output_dir: str, schedule: Schedule, seeds: list[int], device: str) -> dict[str, Any]:
    """Mean and std (over seeds, ddof=1) of every method with cached runs under the current configuration,
    teacher accuracies, and each method's paired gap to logit KD."""
    summary: dict[str, Any] = {"schedule": asdict(schedule), "seeds": seeds, "teachers": {}, "settings": {}}
    for seed in seeds:
        teacher = _cached(RunSpec("", "teacher", seed, schedule, output_dir, device, 1))
        if teacher is not None:
            summary["teachers"][seed] = {"accuracy": teacher["accuracy"], "params": teacher["params"]}
    for setting in SETTINGS:
        rows = {}
        for method in METHODS:
            runs = [_cached(RunSpec(setting, method, s, schedule, output_dir, device, 1)) for s in seeds]
            by_seed = {s: r["accuracy"] for s, r in zip(seeds, runs, strict=True) if r is not None}
            if by_seed:
                rows[method] = {"by_seed": by_seed, **_stats(list(by_seed.values())),
                                "wall_s": float(np.mean([r["wall_s"] for r in runs if r is not None])),
                                "params": next(r["params"] for r in runs if r is not None)}
        if "kd" in rows:
            kd = rows["kd"]
            for row in rows.values():
                common = sorted(set(row["by_seed"]) & set(kd["by_seed"]))
                diffs = [row["by_seed"][s] - kd["by_seed"][s] for s in common]
                row["vs_kd"] = _stats(diffs)
                # The issue's yardstick: the gap against the two methods' seed-to-seed spread.
                sigma = math.sqrt((row["std"] ** 2 + kd["std"] ** 2) / 2)
                row["vs_kd"]["gap_in_sigma"] = row["vs_kd"]["mean"] / sigma if sigma > 0 else None
        if rows:
            summary["settings"][setting] = rows
    return summary


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def write_report(summary: dict[str, Any], output_dir: Path) -> None:
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (output_dir / "summary.md").write_text(markdown_table(summary))
    plot(summary, output_dir / "accuracy.png")


def markdown_table(summary: dict[str, Any]) -> str:
    s = summary["schedule"]
    teachers = summary["teachers"]
    lines = [
        "Held-out accuracy (%) on Animal-MNIST, mean +- std over seeds (n). 'vs KD': paired gap to logit KD "
        "(same seeds), and that gap in units of sigma = sqrt((std^2 + std_KD^2) / 2); |gap| > 2 sigma is marked *.",
        "",
        f"Teacher (ResNet {s['teacher_arch'][0]}, depths {s['teacher_arch'][1]}, all training labels): "
        + ", ".join(f"seed {k}: {100 * v['accuracy']:.2f} ({v['params']:,} params)" for k, v in teachers.items()),
        f"Student: ResNet {s['student_arch'][0]}, depths {s['student_arch'][1]}; {s['student_steps']} steps, "
        f"batch {s['batch_size']}, SGD lr {s['learning_rate']} cosine, augment={s['augment']}.",
        "",
    ]
    settings = summary["settings"]
    header = "| method | " + " | ".join(f"{name} acc | {name} vs KD" for name in settings) + " | s/run |"
    lines += [header, "|" + "---|" * (2 * len(settings) + 2)]
    methods = [m for m in METHODS if any(m in rows for rows in settings.values())]
    for method in methods:
        cells = []
        wall = []
        for rows in settings.values():
            row = rows.get(method)
            if row is None:
                cells += ["", ""]
                continue
            wall.append(row["wall_s"])
            cells.append(f"{100 * row['mean']:.2f} +- {100 * row['std']:.2f} ({row['n']})")
            gap = row.get("vs_kd")
            if gap is None or method == "kd":
                cells.append("")
            else:
                sigma = gap["gap_in_sigma"]
                mark = "*" if sigma is not None and abs(sigma) > 2 else ""
                sig = f", {sigma:+.1f} sigma{mark}" if sigma is not None else ""
                cells.append(f"{100 * gap['mean']:+.2f} +- {100 * gap['std']:.2f}{sig}")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {np.mean(wall):.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = summary["settings"]
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(6 * max(1, len(settings)), 4.5), squeeze=False)
    teacher_acc = [100 * t["accuracy"] for t in summary["teachers"].values()]
    for ax, (setting, rows) in zip(axes[0], settings.items(), strict=False):
        names = list(rows)
        means = [100 * rows[m]["mean"] for m in names]
        stds = [100 * rows[m]["std"] for m in names]
        colors = ["0.6" if m == "scratch" else "tab:orange" if m == "kd" else "tab:blue" for m in names]
        x = np.arange(len(names))
        ax.bar(x, means, yerr=stds, color=colors, capsize=4)
        for i, m in enumerate(names):
            ax.scatter([i] * rows[m]["n"], [100 * v for v in rows[m]["by_seed"].values()], color="k", s=8, zorder=3)
        if "kd" in rows:
            ax.axhline(100 * rows["kd"]["mean"], color="tab:orange", ls="--", lw=1, label="logit KD")
        if teacher_acc:
            ax.axhline(np.mean(teacher_acc), color="tab:green", ls=":", lw=1, label="teacher")
        low = min(m - s for m, s in zip(means, stds, strict=True))
        ax.set_ylim(max(0, low - 3), 100)
        ax.set_xticks(x, names, rotation=35, ha="right")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"Animal-MNIST, {SETTINGS[setting]} labels per class")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["primary"],
                        help=f"method names, 'primary' ({' '.join(PRIMARY_METHODS)}) or 'all' "
                             f"(adds {' '.join(INVESTIGATION_METHODS)})")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores/jobs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default 1500; quick 6)")
    parser.add_argument("--teacher-epochs", type=float, default=None, help="teacher epochs (default 30)")
    parser.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"default {DEFAULT_OUTPUT} ({QUICK_OUTPUT} with --quick)")
    parser.add_argument("--quick", action="store_true", help="pipeline check: tiny models and data, 1 seed")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--summarize-only", action="store_true",
                        help="train nothing: summarise the runs already in the output dir (e.g. after a time-out)")
    args = parser.parse_args(argv)
    methods = []
    for name in args.methods:
        expanded = list(PRIMARY_METHODS) if name == "primary" else list(METHODS) if name == "all" else [name]
        unknown = [m for m in expanded if m not in METHODS]
        if unknown:
            parser.error(f"unknown method {unknown[0]!r}; choose from {list(METHODS)}, 'primary' or 'all'")
        methods += [m for m in expanded if m not in methods]
    args.methods = methods
    if args.quick and args.seeds == [0, 1, 2]:
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
    # Teacher weights are a local cache; only the JSON and the report are meant for the repository.
    (output_dir / ".gitignore").write_text("teachers/*/\n")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)

    teachers, students, cached = _plan(args.methods, args.settings, args.seeds, schedule, str(output_dir),
                                       args.device, threads)
    print(f"{len(teachers)} teacher(s) and {len(students)} student run(s) to train "
          f"({len(cached)} cached), {args.jobs} at a time, {threads} thread(s) each, on {args.device}; "
          f"output in {output_dir}", flush=True)
    for spec in students:
        alias = f" (also written as {', '.join(spec.aliases)}: same configuration)" if spec.aliases else ""
        print(f"  {spec.setting} {spec.method} seed {spec.seed}{alias}")
    if args.dry_run:
        return {}
    start = time.perf_counter()
    records = [] if args.summarize_only else execute(teachers, students, args.jobs)
    wall = time.perf_counter() - start
    if records:
        run_s = sum(r["wall_s"] for r in records)
        print(f"budget: {len(records)} run(s), {run_s:.0f} run-seconds, {wall:.0f} s wall "
              f"({run_s / max(wall, 1e-9):.1f} runs in flight on average)")
    summary = summarise(str(output_dir), schedule, args.seeds, args.device)
    write_report(summary, output_dir)
    print(markdown_table(summary))
    print(f"wrote {output_dir / 'summary.md'}, summary.json, accuracy.png")
    return summary


if __name__ == "__main__":
    main()
