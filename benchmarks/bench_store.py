"""What the teacher store buys: epoch times with random augmentation, and the cost of filling the store.

One process, one run, on Animal-MNIST through the example script's own random training transform (random
resized crop + flip, ``crop_scale_min`` of the built-in run), at the default UniKD settings, with the ResNet-50-
and ViT-S-sized teachers and the ResNet-18-sized student of ``benchmarks/bench_speed.py``. Per pair:

- epoch times, through ``UDKDTrainer.train()`` and its DataLoader (the transform included), of
  ``student`` (the student alone, cross-entropy), ``uncached`` (UniKD, the teacher run every step), ``store``
  (UniKD fed by a full store of V views, the teacher never run) and ``store_kd`` (logit KD, ``use_fdp=False``,
  fed by the same store: what the store itself costs, without UniKD's heads). The configurations take turns
  epoch by epoch, the order rotated every round; ratios are medians of per-round ratios, as in bench_speed.py.
- the precompute pass (``trainer.precompute_teacher_outputs()``: reading N x V views through the transform, the
  teacher's forward, writing the shard) against the teacher's forward alone over the same N x V images, already
  in memory. The ``store_kd`` trainer then opens the store the precompute wrote, as a later run would.

With ``--accuracy``, instead: the example script's built-in run (Animal-MNIST, its ResNet teacher and student,
its random transform) for E epochs, uncached (a fresh view every epoch) against a store of V = E/4 views filled
in the first V epochs, on paired seeds; the teacher is trained once and shared.

Run (writes ``benchmarks/results/store_cpu.{json,md}``, or ``store_accuracy_cpu.{json,md}``):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_store.py
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_store.py --accuracy
    python benchmarks/bench_store.py --quick --output-dir /tmp/bench     # tiny models, seconds
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402
from bench_speed import (  # noqa: E402
    RESULTS_DIR,
    build,
    describe,
    machine,
    paired_ratio,
    resnet18_like,
    resnet50_like,
    vit_small_like,
    write,
)
from transformers import TrainerCallback  # noqa: E402

from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.constants import TEACHER_INPUT  # noqa: E402
from hf_udkd.data import load_animal_mnist  # noqa: E402
from hf_udkd.image_processing import ImageClassificationTransform, collate_image_classification  # noqa: E402
from hf_udkd.precompute import load_example  # noqa: E402

# Targets of issue #13.
TARGET_STORE_VS_STUDENT = 1.10
TARGET_PRECOMPUTE_VS_FORWARD = 1.05
CONFIGURATIONS = ("student", "uncached", "store", "store_kd")


class EpochTimer(TrainerCallback):
    """Wall time of each epoch, from its first batch request to its end (the Trainer's set-up excluded)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def training_set(options: argparse.Namespace):
    """The first N Animal-MNIST training images through the example script's random training transform."""
    example = load_example()
    transform = ImageClassificationTransform(
        example.default_image_processor(options.image_size), train=True,
        crop_scale=(example.BUILTIN_DATA_DEFAULTS["crop_scale_min"], 1.0),
    )
    train = load_animal_mnist(split_seed=0)["train"].select(range(options.examples))
    return train.with_transform(transform), train.features["label"].names


def make_trainer(student, teacher, train, options: argparse.Namespace, output_dir: str, **overrides) -> UDKDTrainer:
    args = UDKDTrainingArguments(
        output_dir=output_dir, use_cpu=True, per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size, num_train_epochs=1, save_strategy="no", report_to=[],
        remove_unused_columns=False, disable_tqdm=True, logging_strategy="no", seed=0, **overrides,
    )
    return UDKDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher) if teacher else None,
                       args=args, train_dataset=train, data_collator=collate_image_classification)


def teacher_forward_seconds(trainer: UDKDTrainer, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for pixel_values in batches:
        trainer.teacher.outputs(pixel_values)
    return time.perf_counter() - start


def benchmark_pair(name: str, teacher_config, student_config, train, options: argparse.Namespace,
                   log: Callable[[str], None]) -> dict[str, Any]:
    teacher, student = build(teacher_config), build(student_config)
    with tempfile.TemporaryDirectory(prefix="bench_store_") as output_dir:
        store_options = {"teacher_cache": True, "teacher_cache_views": options.views,
                         "teacher_cache_dir": os.path.join(output_dir, "store")}
        trainers = {
            "student": make_trainer(student, None, train, options, output_dir),
            "uncached": make_trainer(student, teacher, train, options, output_dir),
            "store": make_trainer(student, teacher, train, options, output_dir, **store_options),
        }
        store_trainer = trainers["store"]
        store = store_trainer.teacher_cache
        # The same N x V views as tensors in memory, batched as precompute batches them, for the forward alone.
        loader = torch.utils.data.DataLoader(
            range(len(store)), batch_size=options.batch_size,
            collate_fn=lambda rows: store_trainer._store_collator()(
                [store_trainer._replay.example(r % len(train), r // len(train)) for r in rows]),
        )
        batches = [batch.get(TEACHER_INPUT, batch["pixel_values"]) for batch in loader]
        precompute, forward = [], []
        for round_index in range(options.rounds):
            store.filled.zero_()
            start = time.perf_counter()
            store_trainer.precompute_teacher_outputs()
            precompute.append(time.perf_counter() - start)
            forward.append(teacher_forward_seconds(store_trainer, batches))
            log(f"  {name}: precompute round {round_index + 1}/{options.rounds}: {precompute[-1]:.1f} s, "
                f"teacher forward {forward[-1]:.1f} s")
        trainers["store_kd"] = make_trainer(student, teacher, train, options, output_dir, use_fdp=False,
                                            **store_options)
        if not (store.is_full and trainers["store_kd"].teacher_cache.is_full):
            raise RuntimeError("precompute left rows of the store empty")

        timers = {key: EpochTimer() for key in CONFIGURATIONS}
        for key, trainer in trainers.items():
            trainer.add_callback(timers[key])
        calls = {"teacher": 0}
        for key in ("store", "store_kd"):
            trainers[key].teacher_model.register_forward_pre_hook(
                lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
        order = list(CONFIGURATIONS)
        for round_index in range(options.warmup + options.rounds):
            shift = round_index % len(order)
            for key in order[shift:] + order[:shift]:
                trainers[key].train()
            log(f"  {name}: epoch round {round_index + 1}/{options.warmup + options.rounds}: "
                + ", ".join(f"{key} {timers[key].seconds[-1]:.1f} s" for key in CONFIGURATIONS))
        if calls["teacher"]:
            raise RuntimeError(f"the store-fed trainers ran the teacher {calls['teacher']} times")
    epochs = {key: timers[key].seconds[options.warmup:] for key in CONFIGURATIONS}
    store_vs_student = paired_ratio(epochs["store"], epochs["student"])
    precompute_vs_forward = statistics.median(p / f for p, f in zip(precompute, forward, strict=True))
    return {
        "pair": name,
        "teacher": describe(teacher, teacher_config),
        "student": describe(student, student_config),
        "epoch_seconds": {key: statistics.median(values) for key, values in epochs.items()},
        "epoch_seconds_all": epochs,
        "store_vs_student": store_vs_student,
        "store_kd_vs_student": paired_ratio(epochs["store_kd"], epochs["student"]),
        "uncached_vs_student": paired_ratio(epochs["uncached"], epochs["student"]),
        "store_vs_uncached": paired_ratio(epochs["store"], epochs["uncached"]),
        "precompute_seconds": statistics.median(precompute),
        "teacher_forward_seconds": statistics.median(forward),
        "precompute_vs_forward": precompute_vs_forward,
        "store_mib": store.nbytes / 2**20,
        "targets": {
            "store_epoch_vs_student_epoch": {"value": store_vs_student, "target": f"<= {TARGET_STORE_VS_STUDENT}",
                                             "met": store_vs_student <= TARGET_STORE_VS_STUDENT},
            "precompute_vs_teacher_forward": {"value": precompute_vs_forward,
                                              "target": f"<= {TARGET_PRECOMPUTE_VS_FORWARD}",
                                              "met": precompute_vs_forward <= TARGET_PRECOMPUTE_VS_FORWARD},
        },
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Measured on CPU ({m['processor']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads); torch "
        f"{m['torch']}, transformers {m['transformers']}, hf_udkd {m['hf_udkd']}. {result['examples']} Animal-MNIST "
        f"images per epoch through the example script's random training transform at {result['image_size']}x"
        f"{result['image_size']}, batch {result['batch_size']}, store of {result['views']} views; median of "
        f"{result['rounds']} interleaved rounds after {result['warmup']} warm-up round(s).",
        "",
        f"Command: `{result['command']}`",
        "",
        "| teacher -> student | student epoch s | uncached UniKD epoch s | store-fed UniKD epoch s "
        "| store-fed KD epoch s | store x student | store KD x student | uncached x student | store x uncached "
        "| precompute s | teacher forward s | precompute x forward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pair in result["pairs"]:
        e = pair["epoch_seconds"]
        lines.append(
            f"| {pair['teacher']} -> {pair['student']} | {e['student']:.2f} | {e['uncached']:.2f} | {e['store']:.2f} "
            f"| {e['store_kd']:.2f} | {pair['store_vs_student']:.2f} | {pair['store_kd_vs_student']:.2f} "
            f"| {pair['uncached_vs_student']:.2f} | {pair['store_vs_uncached']:.2f} "
            f"| {pair['precompute_seconds']:.2f} | {pair['teacher_forward_seconds']:.2f} "
            f"| {pair['precompute_vs_forward']:.2f} |"
        )
    lines += ["", "Targets:"]
    for pair in result["pairs"]:
        for key, target in pair["targets"].items():
            lines.append(f"- {pair['pair']} {key}: {target['value']:.3f} (target {target['target']}): "
                         f"{'met' if target['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def accuracy_study(options: argparse.Namespace, argv: list[str] | None, log: Callable[[str], None]) -> dict:
    """Student accuracy after E epochs, uncached against store-fed (V = E/4), on paired seeds."""
    example = load_example()
    views = max(1, options.epochs // 4)
    runs: dict[str, list[float]] = {"uncached": [], "store": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_store_accuracy_") as root:
        # One output_dir: the first run trains the built-in teacher (beside it), the others reuse it.
        common = ["--output_dir", os.path.join(root, "student"), "--num_train_epochs", str(options.epochs), "--max_train_samples",
                  str(options.accuracy_examples), "--eval_strategy", "no", "--disable_tqdm", "true"]
        for seed in options.seeds:
            for mode in runs:
                store = ["--teacher_cache", "--teacher_cache_views", str(views)] if mode == "store" else []
                summary = example.main([*common, "--seed", str(seed), *store])
                runs[mode].append(summary.student_accuracy)
                log(f"  seed {seed}, {mode}: accuracy {summary.student_accuracy:.4f} ({summary.seconds:.0f} s)")
    mean = {mode: statistics.mean(values) for mode, values in runs.items()}
    std = {mode: statistics.stdev(values) for mode, values in runs.items()}
    within = abs(mean["store"] - mean["uncached"]) <= std["uncached"]
    return {
        "machine": machine(argparse.Namespace(device="cpu", bf16=False)),
        "command": "python benchmarks/bench_store.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "epochs": options.epochs, "views": views, "train_examples": options.accuracy_examples,
        "seeds": options.seeds, "accuracy": runs, "mean": mean, "std": std,
        "paired_differences": [s - u for s, u in zip(runs["store"], runs["uncached"], strict=True)],
        "target": {"value": mean["store"] - mean["uncached"], "target": f"|difference| <= {std['uncached']:.4f}",
                   "met": within},
        "wall_seconds": time.perf_counter() - start,
    }


def accuracy_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"The example script's built-in run on CPU ({m['cpu_count']} cores, {m['torch_threads']} torch threads): "
        f"{result['train_examples']} Animal-MNIST training images, its random transform, {result['epochs']} epochs; "
        f"store of {result['views']} views filled in the first {result['views']} epochs against a fresh view every "
        f"epoch; seeds {result['seeds']} (paired); validation accuracy on the whole validation split.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| run | " + " | ".join(f"seed {s}" for s in result["seeds"]) + " | mean | std |",
        "|---|" + "---:|" * (len(result["seeds"]) + 2),
    ]
    for mode, values in result["accuracy"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{100 * v:.2f}" for v in values)
                     + f" | {100 * result['mean'][mode]:.2f} | {100 * result['std'][mode]:.2f} |")
    target = result["target"]
    lines += ["", f"Store - uncached: {100 * target['value']:+.2f} points (target: within one standard deviation of "
              f"the uncached runs, {100 * result['std']['uncached']:.2f}): {'met' if target['met'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=128, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--views", type=int, default=2, help="teacher_cache_views of the store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pairs", nargs="+", choices=["resnet", "vit"], default=["resnet", "vit"])
    parser.add_argument("--quick", action="store_true", help="tiny models, 32 images at 32x32, 1 round")
    parser.add_argument("--accuracy", action="store_true", help="the accuracy study instead of the timings")
    parser.add_argument("--epochs", type=int, default=8, help="--accuracy: epochs E (views V = E/4)")
    parser.add_argument("--accuracy-examples", type=int, default=2000, help="--accuracy: training images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--accuracy: paired seeds")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    options = parser.parse_args(argv)
    if options.quick:
        options.examples, options.batch_size, options.image_size, options.rounds = 32, 16, 32, 1
    return options


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    options = parse_args(argv)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        if options.accuracy:
            return write(accuracy_study(options, argv, log), accuracy_markdown, options, "store_accuracy_cpu", log)
        return run(options, argv, log)
    finally:
        transformers.logging.set_verbosity(verbosity)


def run(options: argparse.Namespace, argv: list[str] | None, log: Callable[[str], None]) -> dict[str, Any]:
    train, names = training_set(options)
    teachers = {"resnet": resnet50_like(names, options.quick),
                "vit": vit_small_like(names, options.quick, options.image_size)}
    result: dict[str, Any] = {
        "machine": machine(argparse.Namespace(device="cpu", bf16=False)),
        "command": "python benchmarks/bench_store.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "examples": options.examples, "batch_size": options.batch_size, "image_size": options.image_size,
        "views": options.views, "rounds": options.rounds, "warmup": options.warmup, "pairs": [],
    }
    start = time.perf_counter()
    for pair in options.pairs:
        log(f"{pair} teacher -> ResNet-18-sized student")
        result["pairs"].append(benchmark_pair(pair, teachers[pair], resnet18_like(names, options.quick), train,
                                              options, log))
    result["wall_seconds"] = time.perf_counter() - start
    return write(result, markdown, options, "store_cpu" + ("_quick" if options.quick else ""), log)


if __name__ == "__main__":
    main()
