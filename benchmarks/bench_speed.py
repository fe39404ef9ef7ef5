"""What distillation costs per training step in `UDKDTrainer`: time, peak memory and FLOPs.

One process, one run: every configuration of a teacher/student pair trains on the same batch of real images
(Animal-MNIST, resized), and the configurations take turns step by step (round robin, the order rotated
every round), so that a slower or busier moment of the machine is shared by all of them. Configurations:

- ``student``: the student alone with cross-entropy (``UDKDTrainer`` with ``teacher_model=None``);
- ``kd``: logit KD (``use_fdp=False``), the transformers guide's method;
- ``unikd_no_aff``: UniKD without the fusion (FDP_s on the last student stage), i.e. everything UniKD adds
  outside the AFF: taps, FDP heads, KL terms, logging;
- ``unikd_m{M}``: UniKD at fusion width M (``aff_channels``); the library default is marked;
- ``unikd_cached``: UniKD at the default width with the teacher cache filled (the teacher is not run);
- ``teacher_forward``: the teacher's forward alone, as the trainer runs it (inference mode, its dtype).

A step is what the Trainer does per batch: ``trainer.training_step`` (forward, loss, backward) on a batch
already on the device, then ``optimizer.step()`` and ``zero_grad()``, on a model and optimizer prepared by
the trainer's accelerator (so bf16 autocast applies as in ``train()``). Reported: the median step time after
warm-up (with the 25th/75th percentiles), peak memory, ratios to ``student`` and ``kd``, and FLOPs
(``torch.utils.flop_counter``). Time ratios are medians of per-round ratios: each round runs every
configuration once, back to back, so the ratio cancels the slow and fast periods of a shared machine.

Peak memory is the bytes of live tensors at the peak of one step: the trained parameters and their
gradients, the optimizer state, the teacher's weights (for configurations that hold a teacher), activations
and temporaries. On CPU it is measured with torch's MemTracker (a tensor-level tracker:
``torch.distributed._tools.mem_tracker``); on CUDA as the persistent tensors plus
``torch.cuda.max_memory_allocated()`` minus the allocation before the step.

Run (writes ``benchmarks/results/speed_<device>[_bf16].{json,md}``):

    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py                        # CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --device cuda --bf16   # one GPU
    python benchmarks/bench_speed.py --quick --output-dir /tmp/bench         # tiny models, seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig  # noqa: E402

import hf_udkd  # noqa: E402
from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.constants import INDEX_KEY  # noqa: E402
from hf_udkd.data import PixelValuesDataset, load_animal_mnist  # noqa: E402

DEFAULT_WIDTH = UDKDTrainingArguments.__dataclass_fields__["aff_channels"].default
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIB = 2**20

# Targets of issue #6, as ratios measured side by side in one run.
TARGET_TIME_VS_KD = 1.25
TARGET_MEMORY_VS_KD = 1.15
TARGET_OUTSIDE_AFF = 0.03
TARGET_CACHE_SAVING = 0.90


# ---- models ------------------------------------------------------------------------------------------------


def _labels(names: list[str]) -> dict[str, Any]:
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def resnet50_like(names: list[str], quick: bool) -> ResNetConfig:
    """ResNet-50-sized: bottleneck blocks, depths [3, 4, 6, 3], widths 256..2048."""
    if quick:
        return ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                            layer_type="bottleneck", **_labels(names))
    return ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                        layer_type="bottleneck", **_labels(names))


def vit_small_like(names: list[str], quick: bool, image_size: int) -> ViTConfig:
    """ViT-Small-sized: width 384, 12 layers, 6 heads, patch 8."""
    if quick:
        return ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, **_labels(names))
    return ViTConfig(image_size=image_size, patch_size=8, hidden_size=384, num_hidden_layers=12,
                     num_attention_heads=6, intermediate_size=1536, **_labels(names))


def resnet18_like(names: list[str], quick: bool) -> ResNetConfig:
    """ResNet-18-sized: basic blocks, depths [2, 2, 2, 2], widths 64..512."""
    if quick:
        return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            layer_type="basic", **_labels(names))
    return ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                        layer_type="basic", **_labels(names))


def build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(config)


def describe(model: torch.nn.Module, config) -> str:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"{type(config).__name__.removesuffix('Config')} ({params:.1f}M params)"


# ---- data --------------------------------------------------------------------------------------------------


def real_batch(batch_size: int, image_size: int) -> tuple[PixelValuesDataset, list[str]]:
    """The first ``batch_size`` Animal-MNIST training images, RGB, resized, normalised: (B, 3, S, S)."""
    train = load_animal_mnist(split_seed=0)["train"].select(range(batch_size))
    images = np.stack([np.asarray(im.convert("RGB").resize((image_size, image_size)), dtype=np.float32)
                       for im in train["image"]])
    pixel_values = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
    names = train.features["label"].names
    return PixelValuesDataset(pixel_values.contiguous(), torch.tensor(train["label"])), names


# ---- configurations ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    uses_teacher: bool
    overrides: dict = field(default_factory=dict)


def settings(widths: list[int]) -> list[Setting]:
    rows = [
        Setting("student", "student only (CE)", False),
        Setting("kd", "logit KD (use_fdp=False)", True, {"use_fdp": False}),
        Setting("unikd_no_aff", "UniKD without AFF (use_aff=False)", True, {"use_aff": False}),
    ]
    for width in sorted(set(widths) | {DEFAULT_WIDTH}, reverse=True):
        default = " (default)" if width == DEFAULT_WIDTH else ""
        rows.append(Setting(f"unikd_m{width}", f"UniKD, aff_channels={width}{default}", True, {"aff_channels": width}))
    rows.append(Setting("unikd_cached", f"UniKD, aff_channels={DEFAULT_WIDTH}, teacher cache filled", True,
                        {"teacher_cache": True}))
    return rows


@dataclass
class Runner:
    """One configuration, ready to step: its trainer, prepared model and optimizer, and its batch."""

    setting: Setting
    trainer: UDKDTrainer
    model: torch.nn.Module
    batch: dict[str, torch.Tensor]
    times: list[float] = field(default_factory=list)

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self.trainer.teacher_model

    def step(self) -> None:
        self.trainer.training_step(self.model, dict(self.batch))
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)


def make_runner(setting: Setting, student, teacher, dataset: PixelValuesDataset, options: argparse.Namespace,
                output_dir: str) -> Runner:
    args = UDKDTrainingArguments(
        output_dir=output_dir,
        use_cpu=options.device == "cpu",
        bf16=options.bf16,
        per_device_train_batch_size=len(dataset),
        report_to=[],
        seed=0,
        **setting.overrides,
    )
    trainer = UDKDTrainer(
        model=copy.deepcopy(student),
        # Each trainer gets its own teacher: preparing one module for several accelerators would wrap its
        # forward in bf16 autocast once per trainer.
        teacher_model=copy.deepcopy(teacher) if setting.uses_teacher else None,
        args=args,
        train_dataset=dataset,
    )
    trainer.create_optimizer()
    # As in Trainer.train(): the accelerator wraps the model (bf16 autocast) and the optimizer.
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    device = args.device
    batch = {"pixel_values": dataset.pixel_values.to(device), "labels": dataset.labels.to(device)}
    if setting.overrides.get("teacher_cache"):
        batch[INDEX_KEY] = torch.arange(len(dataset), device=device)
    return Runner(setting, trainer, model, batch)


# ---- measurements ------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_and_flops(runner: Runner, device: str) -> tuple[int, int]:
    """Bytes of live tensors at the peak of one step (see the module docstring), and the step's FLOPs.

    One extra step per configuration measures both: the FLOP counter sits inside the memory tracker (its
    own few bookkeeping tensors are not allocated through torch).
    """
    # AcceleratedOptimizer wraps the torch optimizer that holds the state.
    optimizer = getattr(runner.trainer.optimizer, "optimizer", runner.trainer.optimizer)
    teacher = runner.teacher
    flops = FlopCounterMode(display=False)
    if device == "cuda":
        persistent = _tensor_bytes(list(runner.model.parameters()) + list(runner.model.buffers()))
        persistent += _tensor_bytes(t for state in optimizer.state.values() for t in state.values()
                                    if isinstance(t, torch.Tensor))
        if teacher is not None:
            persistent += _tensor_bytes(list(teacher.parameters()) + list(teacher.buffers()))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with flops:
            runner.step()
        torch.cuda.synchronize()
        return persistent + torch.cuda.max_memory_allocated() - before, int(flops.get_total_flops())
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(runner.model, optimizer, *([teacher] if teacher is not None else []))
    # MemTracker hooks the gradient of every parameter it sees in a forward, which torch refuses for frozen
    # ones. The teacher runs under inference mode, so unfreezing it for this step computes nothing more.
    frozen = [p for p in (teacher.parameters() if teacher is not None else []) if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with tracker, flops:
            runner.step()
    finally:
        for p in frozen:
            p.requires_grad_(False)
    snapshot = tracker.get_tracker_snapshot("peak")
    return int(sum(per_device["Total"] for per_device in snapshot.values())), int(flops.get_total_flops())


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def component_flops(runner: Runner, aff_runners: dict[int, Runner]) -> dict[str, int]:
    """Forward FLOPs of the teacher, the student and the heads, on the benchmark batch."""
    trainer, batch = runner.trainer, runner.batch
    distiller = trainer.accelerator.unwrap_model(runner.model)
    pixel_values = batch["pixel_values"]
    flops: dict[str, int] = {}
    with torch.no_grad(), trainer.accelerator.autocast():
        flops["teacher_forward"] = count_flops(lambda: trainer.teacher.outputs(pixel_values))
        flops["student_forward"] = count_flops(lambda: distiller.student(pixel_values=pixel_values))
        for width, aff_runner in sorted(aff_runners.items(), reverse=True):
            aff = trainer.accelerator.unwrap_model(aff_runner.model)
            stages = aff.student_tap(aff.student, pixel_values).stages
            flops[f"aff_forward_m{width}"] = count_flops(lambda aff=aff, stages=stages: aff._student_feature(stages))
        logits, pooled = trainer.teacher.outputs(pixel_values)
        default = trainer.accelerator.unwrap_model(aff_runners[DEFAULT_WIDTH].model)
        fused = default._student_feature(default.student_tap(default.student, pixel_values).stages)
        flops["fdp_heads_forward"] = count_flops(lambda: (default.fdp_student(fused), default.fdp_teacher(pooled)))
    return flops


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def benchmark_pair(name: str, teacher_config, student_config, dataset: PixelValuesDataset,
                   options: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """All configurations of one teacher/student pair, interleaved; returns the pair's results."""
    teacher, student = build(teacher_config), build(student_config)
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as output_dir:
        phase = time.perf_counter()
        runners = [make_runner(s, student, teacher, dataset, options, output_dir) for s in settings(options.widths)]
        log(f"  {name}: {len(runners)} trainers ready ({time.perf_counter() - phase:.0f} s)")
        by_name = {r.setting.name: r for r in runners}
        kd = by_name["kd"]
        teacher_input = kd.batch["pixel_values"]
        teacher_times: list[float] = []
        calls = {"teacher": 0}
        cached = by_name["unikd_cached"]
        hook = cached.teacher.register_forward_pre_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
        jobs: list[tuple[str, Callable[[], None]]] = [(r.setting.name, r.step) for r in runners]
        jobs.append(("teacher_forward", lambda: kd.trainer.teacher.outputs(teacher_input)))
        cached_calls = 0
        total_rounds = options.warmup + options.steps
        start = time.perf_counter()
        for round_index in range(total_rounds):
            shift = round_index % len(jobs)
            for job_name, job in jobs[shift:] + jobs[:shift]:
                before = calls["teacher"]
                seconds = timed(job, options.device)
                if round_index < options.warmup:
                    continue
                if job_name == "teacher_forward":
                    teacher_times.append(seconds)
                else:
                    by_name[job_name].times.append(seconds)
                if job_name == "unikd_cached":
                    cached_calls += calls["teacher"] - before
            log(f"  {name}: round {round_index + 1}/{total_rounds} ({time.perf_counter() - start:.0f} s)")
        hook.remove()
        cache = cached.trainer.teacher_cache
        if cached_calls or cache.num_filled != len(dataset):
            raise RuntimeError(f"the teacher cache did not take over: {cached_calls} teacher calls in timed steps")

        phase = time.perf_counter()
        memory, step_flops = {}, {}
        for r in runners:
            memory[r.setting.name], step_flops[r.setting.name] = memory_and_flops(r, options.device)
        aff_runners = {r.setting.overrides["aff_channels"]: r for r in runners if "aff_channels" in r.setting.overrides}
        flops = component_flops(by_name[f"unikd_m{DEFAULT_WIDTH}"], aff_runners)
        log(f"  {name}: peak memory and FLOPs ({time.perf_counter() - phase:.0f} s)")

    student_ms = statistics.median(by_name["student"].times) * 1e3
    kd_ms = statistics.median(kd.times) * 1e3
    rows = []
    for r in runners:
        median_ms = statistics.median(r.times) * 1e3
        rows.append({
            "name": r.setting.name,
            "label": r.setting.label,
            "median_ms": median_ms,
            "p25_ms": _percentile(r.times, 25) * 1e3,
            "p75_ms": _percentile(r.times, 75) * 1e3,
            "time_vs_student": paired_ratio(r.times, by_name["student"].times),
            "time_vs_kd": paired_ratio(r.times, kd.times),
            "median_vs_student_median": median_ms / student_ms,
            "median_vs_kd_median": median_ms / kd_ms,
            "peak_memory_mib": memory[r.setting.name] / MIB,
            "memory_vs_student": memory[r.setting.name] / memory["student"],
            "memory_vs_kd": memory[r.setting.name] / memory["kd"],
            "step_gflop": step_flops[r.setting.name] / 1e9,
        })
    teacher_ms = statistics.median(teacher_times) * 1e3
    return {
        "pair": name,
        "teacher": describe(teacher, teacher_config),
        "student": describe(student, student_config),
        "teacher_tap": kd.trainer.teacher.tap.describe(),
        "student_stages": kd.trainer.accelerator.unwrap_model(kd.model).student_tap.describe(),
        "rows": rows,
        "teacher_forward_ms": teacher_ms,
        "teacher_forward_p25_ms": _percentile(teacher_times, 25) * 1e3,
        "teacher_forward_p75_ms": _percentile(teacher_times, 75) * 1e3,
        "forward_gflop": {key: value / 1e9 for key, value in flops.items()},
        "targets": targets({row["name"]: row for row in rows}, teacher_ms,
                           saving_vs_teacher(by_name[f"unikd_m{DEFAULT_WIDTH}"].times, cached.times, teacher_times)),
    }


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time in the same round.

    Each round runs every configuration once, back to back, so a slow moment of a shared machine slows
    both sides of a pair; the per-round ratio cancels it where a ratio of medians would not.
    """
    return statistics.median(t / ref for t, ref in zip(times, reference, strict=True))


def saving_vs_teacher(uncached: list[float], cached: list[float], teacher: list[float]) -> float:
    """Median over rounds of (uncached step - cached step) / teacher forward time."""
    return statistics.median((u - c) / t for u, c, t in zip(uncached, cached, teacher, strict=True))


def targets(rows: dict[str, dict], teacher_ms: float, cache_saving: float) -> dict[str, dict]:
    """The issue's targets, each with the measured value (paired per round) and whether it is met."""
    default = rows[f"unikd_m{DEFAULT_WIDTH}"]
    outside = rows["unikd_no_aff"]["time_vs_kd"] - 1.0
    cached_limit = default["median_ms"] - TARGET_CACHE_SAVING * teacher_ms
    return {
        "unikd_time_vs_kd": {"value": default["time_vs_kd"], "target": f"<= {TARGET_TIME_VS_KD}",
                             "met": default["time_vs_kd"] <= TARGET_TIME_VS_KD},
        "unikd_memory_vs_kd": {"value": default["memory_vs_kd"], "target": f"<= {TARGET_MEMORY_VS_KD}",
                               "met": default["memory_vs_kd"] <= TARGET_MEMORY_VS_KD},
        "outside_aff_overhead": {"value": outside, "target": f"<= {TARGET_OUTSIDE_AFF}",
                                 "met": outside <= TARGET_OUTSIDE_AFF},
        "cached_step_ms": {"value": rows["unikd_cached"]["median_ms"],
                           "target": f"<= {cached_limit:.1f} (uncached {default['median_ms']:.1f} - "
                                     f"{TARGET_CACHE_SAVING} x teacher forward {teacher_ms:.1f}, medians)",
                           "met": rows["unikd_cached"]["median_ms"] <= cached_limit},
        "cache_saving_vs_teacher_forward": {"value": cache_saving, "target": f">= {TARGET_CACHE_SAVING} (paired)",
                                            "met": cache_saving >= TARGET_CACHE_SAVING},
    }


# ---- report ------------------------------------------------------------------------------------------------


def machine(options: argparse.Namespace) -> dict[str, Any]:
    info = {
        "device": options.device,
        "bf16": options.bf16,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_udkd": hf_udkd.__version__,
    }
    if options.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    where = m.get("gpu", f"{m['processor']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads")
    lines = [
        f"Measured on {m['device'].upper()} ({where}){', bf16' if m['bf16'] else ''}; torch {m['torch']}, "
        f"transformers {m['transformers']}, hf_udkd {m['hf_udkd']}. Batch {result['batch_size']} at "
        f"{result['image_size']}x{result['image_size']}, median of {result['steps']} interleaved steps after "
        f"{result['warmup']} warm-up rounds. Peak memory: {result['memory_method']}.",
        "",
        f"Command: `{result['command']}`",
    ]
    for pair in result["pairs"]:
        lines += [
            "",
            f"**{pair['teacher']} -> {pair['student']}** (teacher tap {pair['teacher_tap']}; "
            f"teacher forward {pair['teacher_forward_ms']:.1f} ms)",
            "",
            "| configuration | step ms (median) | p25-p75 | x student (paired) | x KD (paired) | peak MiB | mem x KD "
            "| GFLOP/step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in pair["rows"]:
            lines.append(
                f"| {row['label']} | {row['median_ms']:.1f} | {row['p25_ms']:.0f}-{row['p75_ms']:.0f} | "
                f"{row['time_vs_student']:.2f} | {row['time_vs_kd']:.2f} | {row['peak_memory_mib']:.0f} | "
                f"{row['memory_vs_kd']:.2f} | {row['step_gflop']:.1f} |"
            )
        fwd = ", ".join(f"{k.removesuffix('_forward').replace('_forward_', ' ')} {v:.2f}"
                        for k, v in pair["forward_gflop"].items())
        lines += ["", f"Forward GFLOP per batch: {fwd}.", "", "Targets:"]
        for key, target in pair["targets"].items():
            value = target["value"]
            shown = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
            lines.append(f"- {key}: {shown} (target {target['target']}): {'met' if target['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the teacher in bf16 too)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 8; GPU 50)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up rounds, at least 1: the first fills the teacher cache (default 1; GPU 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 256, 128, 64], help="AFF widths")
    parser.add_argument("--pairs", nargs="+", choices=["resnet", "vit"], default=["resnet", "vit"])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, batch 4 at 32x32, 2 steps: a smoke test of the script")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; --quick: 1). On a machine shared with "
                             "other jobs, 1 thread avoids the OpenMP threads waiting on each other")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    options = parser.parse_args(argv)
    if options.quick:
        options.batch_size, options.image_size, options.widths = 4, 32, [64, 16]
        options.steps = options.steps or 2
        options.warmup = options.warmup or 1
        options.threads = options.threads or 1
    on_gpu = options.device == "cuda"
    options.steps = options.steps or (50 if on_gpu else 8)
    options.warmup = options.warmup or (5 if on_gpu else 1)
    if options.steps < 1 or options.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the warm-up fills the teacher cache)")
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    return options


def write(result: dict[str, Any], to_markdown: Callable[[dict], str], options: argparse.Namespace, name: str,
          log: Callable[[str], None]) -> dict[str, Any]:
    """Write ``result`` as ``<output_dir>/<name>.json`` and its table as ``<name>.md``; log the table."""
    os.makedirs(options.output_dir, exist_ok=True)
    stem = os.path.join(options.output_dir, name)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2, default=lambda o: dataclasses.asdict(o))
    table = to_markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(table)
    log(table)
    log(f"Wrote {stem}.{{json,md}} in {result['wall_seconds']:.0f} s")
    return result


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    options = parse_args(argv)
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    if options.threads:
        torch.set_num_threads(options.threads)
    transformers.logging.set_verbosity_error()
    try:
        return run(options, argv, log)
    finally:
        # Leave the process as it was (the smoke test runs this in the test process).
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


def run(options: argparse.Namespace, argv: list[str] | None, log: Callable[[str], None]) -> dict[str, Any]:
    dataset, names = real_batch(options.batch_size, options.image_size)
    student_config = resnet18_like(names, options.quick)
    teachers = {
        "resnet": resnet50_like(names, options.quick),
        "vit": vit_small_like(names, options.quick, options.image_size),
    }
    result: dict[str, Any] = {
        "machine": machine(options),
        "command": "python benchmarks/bench_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch_size": options.batch_size,
        "image_size": options.image_size,
        "steps": options.steps,
        "warmup": options.warmup,
        "default_aff_channels": DEFAULT_WIDTH,
        "memory_method": (
            "persistent tensors + torch.cuda.max_memory_allocated() rise during one step" if options.device == "cuda"
            else "live tensor bytes at the peak of one step, torch MemTracker (torch.distributed._tools.mem_tracker)"
        ),
        "pairs": [],
    }
    start = time.perf_counter()
    for pair in options.pairs:
        log(f"{pair} teacher -> ResNet-18-sized student")
        result["pairs"].append(benchmark_pair(pair, teachers[pair], student_config, dataset, options, log))
    result["wall_seconds"] = time.perf_counter() - start

    stem = f"speed_{options.device}{'_bf16' if options.bf16 else ''}{'_quick' if options.quick else ''}"
    return write(result, markdown, options, stem, log)


if __name__ == "__main__":
    main()
