"""GPU check: UDKDTrainer steps on CUDA in bf16 and fp16, images/s, and short FSDP2 and DeepSpeed ZeRO-3 runs.

    PYTHONPATH=. python benchmarks/gpu_check.py gpu_check.json [--image-size 224] [--batch-sizes 64 256]

A ResNet-50-shaped teacher (bottleneck, depths 3-4-6-3, widths 256..2048) and a ResNet-18-shaped student
(basic, 2-2-2-2, 64..512) are built from configs with random weights (throughput does not depend on
what the weights know; the teacher's BatchNorm statistics are set from a few batches so that its
activations stay in range in fp16). For each precision (bf16, fp16) and mode (student only, logit KD,
UniKD with the defaults, UniKD fed by the filled teacher store), eagerly and/or compiled (``--compile eager
compiled``: ``torch_compile=True``), the Trainer runs ``--warmup`` steps, then ``--steps`` timed steps
(synchronised); the JSON holds images/s, ms/step, peak GPU memory, the final loss and where the teacher
sat and in which dtype; ``gpu_check.md`` beside the JSON holds the table. Then the script starts itself
under ``torchrun --nproc_per_node 1`` once per engine in ``--engines`` (``fsdp``: FSDP2 full_shard;
``zero3``: DeepSpeed ZeRO-3, when deepspeed imports) and records whether accelerate wrapped the student
and heads, where the teacher sat and in which form, the losses, whether a trainer resumed from the step-2
checkpoint logs the same losses, and whether ``save_model`` wrote a student alone that
``AutoModelForImageClassification`` loads. Synthetic images, no downloads, no ``datasets``: about 2
minutes on an H100. ``--device cpu`` runs the same code on the CPU (a smoke test; no timing claims).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForImageClassification, ResNetConfig, TrainerCallback  # noqa: E402

from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.data import PixelValuesDataset  # noqa: E402

NUM_LABELS = 100
MODES = {
    "student_only": {"teacher": False},
    "logit_kd": {"teacher": True, "use_fdp": False},
    "unikd": {"teacher": True},
    # The teacher store filled before training (precompute_teacher_outputs): steps never run the teacher.
    "unikd_stored": {"teacher": True, "teacher_cache": True},
}


def synthetic_images(n: int, size: int, seed: int = 0) -> PixelValuesDataset:
    """``n`` random (3, size, size) images with random labels, made once on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    return PixelValuesDataset(torch.randn(n, 3, size, size, generator=generator),
                              torch.randint(0, NUM_LABELS, (n,), generator=generator))


def teacher_config() -> ResNetConfig:
    return ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                        embedding_size=64, num_labels=NUM_LABELS)


def student_config() -> ResNetConfig:
    return ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                        embedding_size=64, num_labels=NUM_LABELS)


def build_teacher(data: PixelValuesDataset, device: str) -> torch.nn.Module:
    """A random ResNet-50-shaped teacher whose BatchNorm running statistics match ``data``."""
    torch.manual_seed(0)
    teacher = AutoModelForImageClassification.from_config(teacher_config()).to(device)
    for module in teacher.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    teacher.train()
    with torch.no_grad():
        for start in range(0, 256, 64):
            teacher(data.pixel_values[start:start + 64].to(device))
    return teacher.eval().cpu()


def build_student() -> torch.nn.Module:
    torch.manual_seed(1)
    return AutoModelForImageClassification.from_config(student_config())


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of the steps after ``warmup``, with the GPU synchronised at both ends."""

    def __init__(self, warmup: int, device: str):
        self.warmup = warmup
        self.device = device
        self.start: float | None = None
        self.end: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()
        elif state.global_step == state.max_steps:
            synchronize(self.device)
            self.end = time.perf_counter()


def run_config(precision: str, mode: str, batch_size: int, compiled: bool, data: PixelValuesDataset,
               teacher: torch.nn.Module, cli) -> dict:
    options = {k: v for k, v in MODES[mode].items() if k != "teacher"}
    timer = StepTimer(cli.warmup, cli.device)
    with tempfile.TemporaryDirectory() as tmp:
        args = UDKDTrainingArguments(
            output_dir=tmp,
            max_steps=cli.warmup + cli.steps,
            per_device_train_batch_size=batch_size,
            learning_rate=0.05,
            optim="sgd",
            logging_steps=cli.warmup + cli.steps,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=cli.workers,
            dataloader_persistent_workers=cli.workers > 0,
            dataloader_pin_memory=cli.device == "cuda" and not cli.data_on_device,
            use_cpu=cli.device == "cpu",
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            seed=0,
            torch_compile=compiled,
            **options,
        )
        if cli.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = UDKDTrainer(
            model=build_student(),
            teacher_model=teacher if MODES[mode]["teacher"] else None,
            args=args,
            train_dataset=data,
            callbacks=[timer],
        )
        if args.teacher_cache:
            trainer.precompute_teacher_outputs()
        output = trainer.train()
    elapsed = timer.end - timer.start
    result = {
        "precision": precision,
        "mode": mode,
        "batch_size": batch_size,
        "compiled": compiled,
        "images_per_s": round(cli.steps * batch_size / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / cli.steps, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cli.device == "cuda" else None,
        "train_loss": output.training_loss,
        "loss_finite": math.isfinite(output.training_loss),
        "student_param_dtype": str(next(trainer.student.parameters()).dtype),
    }
    if trainer.teacher_model is not None:
        parameter = next(trainer.teacher_model.parameters())
        result["teacher_device"] = str(parameter.device)
        result["teacher_param_dtype"] = str(parameter.dtype)
        result["teacher_trainable"] = any(p.requires_grad for p in trainer.teacher_model.parameters())
    # The next configuration converts this teacher to its own dtype: start each from float32.
    if MODES[mode]["teacher"]:
        teacher.float()
    return result


# ---- FSDP2 and DeepSpeed ZeRO-3, each in its own torchrun process ------------------------------------------

def zero3_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    }


ENGINES = {
    "fsdp": {"fsdp": "full_shard", "fsdp_config": {"version": 2}},
    "zero3": {"deepspeed": zero3_config()},
}


def engine_worker(engine: str, out_path: str, cli) -> None:
    """A short UniKD run under ``engine``, a resume from its step-2 checkpoint, and a save_model."""
    data = synthetic_images(4 * cli.batch_sizes[0], cli.image_size)
    # All models are built before any arguments: under ZeRO-3, a model built afterwards is partitioned at
    # creation and would not take the calibrated teacher's weights. One student and teacher per trainer.
    teacher = build_teacher(data, cli.device)
    models = [(build_student(), copy.deepcopy(teacher)) for _ in range(2)]

    def trainer_for(output_dir: str) -> UDKDTrainer:
        args = UDKDTrainingArguments(
            output_dir=output_dir, max_steps=4, per_device_train_batch_size=cli.batch_sizes[0], logging_steps=1,
            save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True, seed=0,
            dataloader_num_workers=0, **ENGINES[engine],
            # The CPU smoke run: transformers refuses bf16 under DeepSpeed there, and accelerate drops
            # DeepSpeed under use_cpu (DS_ACCELERATOR=cpu runs it on the CPU instead).
            bf16=cli.device == "cuda", use_cpu=cli.device == "cpu" and engine != "zero3",
        )
        student, teacher = models.pop(0)
        return UDKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)

    def losses(trainer: UDKDTrainer) -> list[float]:
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(os.path.join(tmp, "run"))
        trainer.train()
        teacher = trainer.teacher_model
        parameter = next(teacher.parameters())
        result = {
            "engine": engine,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "wrapped_type": type(trainer.model_wrapped).__name__,
            "sharded_parameters": sum(hasattr(p, "full_tensor") or hasattr(p, "ds_id")
                                      for p in trainer.model.parameters()),
            "parameters": sum(1 for _ in trainer.model.parameters()),
            "teacher_device": str(parameter.device),
            "teacher_param_dtype": str(parameter.dtype),
            "teacher_partitioned": hasattr(parameter, "ds_id"),
            "teacher_trainable": any(p.requires_grad for p in teacher.parameters()),
            "losses": losses(trainer),
        }
        result["losses_finite"] = bool(result["losses"]) and all(math.isfinite(x) for x in result["losses"])
        # Saved where the parent process reads it: loading here would run under this process's ZeRO-3 setup.
        saved = str(Path(out_path).with_suffix("")) + "_student"
        trainer.save_model(saved)
        resumed = trainer_for(os.path.join(tmp, "run"))
        resumed.train(resume_from_checkpoint=os.path.join(tmp, "run", "checkpoint-2"))
        result["resumed_losses"] = losses(resumed)
        result["resume_max_loss_difference"] = max(
            abs(a - b) for a, b in zip(result["losses"], result["resumed_losses"], strict=True))
        if trainer.args.process_index == 0:
            Path(out_path).write_text(json.dumps(result, indent=1))


def check_saved_student(saved: str, cli) -> dict:
    """What ``save_model`` wrote: the student's files alone, loadable by Auto, with finite logits."""
    keys = load_file(os.path.join(saved, "model.safetensors")).keys()
    student = AutoModelForImageClassification.from_pretrained(saved).to(cli.device).eval()
    with torch.no_grad():
        # A ZeRO-3 save holds the 16-bit weights, which from_pretrained keeps.
        logits = student(synthetic_images(4, cli.image_size).pixel_values.to(cli.device, student.dtype)).logits
    return {
        "saved_files": sorted(os.listdir(saved)),
        "saved_keys_with_heads": [k for k in keys if k.startswith(("fusion.", "fdp_"))],
        "saved_student_dtype": str(student.dtype),
        "saved_student_logits_finite": bool(torch.isfinite(logits).all()),
    }


def run_engine(engine: str, cli) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, f"{engine}.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   __file__, out_path, "--engine-worker", engine, "--batch-sizes", str(min(cli.batch_sizes[0], 32)),
                   "--image-size", str(cli.image_size), "--device", cli.device]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=cli.engine_timeout)
        except subprocess.TimeoutExpired as timeout:
            return {"engine": engine, "error": f"timed out after {cli.engine_timeout} s",
                    "stderr_tail": (timeout.stderr or b"")[-3000:].decode(errors="replace")}
        if done.returncode != 0:
            # The first frames name the failing call; the last lines name the error.
            error_lines = [line for line in done.stderr.splitlines() if "Error" in line or "File \"/" in line]
            return {"engine": engine, "error": f"exit {done.returncode}", "stderr_frames": error_lines[:40],
                    "stderr_tail": done.stderr[-3000:]}
        result = json.loads(Path(out_path).read_text())
        result.update(check_saved_student(os.path.join(tmp, f"{engine}_student"), cli))
        return result


def markdown(report: dict) -> str:
    """The throughput table, with each mode's cost against the student alone and against logit KD."""
    lines = [
        f"GPU: {report['gpu']}, torch {report['torch']}, {report['image_size']}x{report['image_size']} images, "
        f"{report['timed_steps']} timed steps after {report['warmup_steps']} warm-up steps; images "
        + ("already on the GPU." if report["data_on_device"] else "from a DataLoader (host memory, pinned)."),
        f"Teacher: {report['teacher']}; student: {report['student']}.",
        "",
        "| precision | batch | compiled | mode | images/s | ms/step | vs student | vs logit KD | vs eager | peak GiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    runs = report["runs"]

    def ratio(run: dict, **other) -> str:
        key = {"precision": run["precision"], "batch_size": run["batch_size"], "compiled": run["compiled"],
               "mode": run["mode"], **other}
        base = next((r for r in runs if all(r[k] == v for k, v in key.items())), None)
        return "" if base is None or base is run else f"{run['ms_per_step'] / base['ms_per_step']:.2f}x"

    def vs_student(run: dict) -> str:
        return "1.00x" if run["mode"] == "student_only" else ratio(run, mode="student_only")

    for run in runs:
        lines.append(
            f"| {run['precision']} | {run['batch_size']} | {'yes' if run['compiled'] else 'no'} | {run['mode']} | "
            f"{run['images_per_s']:,.0f} | {run['ms_per_step']:.1f} | {vs_student(run)} | "
            f"{ratio(run, mode='logit_kd')} | {ratio(run, compiled=False)} | {run['peak_memory_gib']} |"
        )
    for engine in report.get("engines", []):
        shown = {k: v for k, v in engine.items() if k not in ("engine", "stderr_tail", "stderr_frames")}
        if "stderr_frames" in engine:
            shown["last_frames"] = engine["stderr_frames"][-6:]
        lines += ["", f"{engine['engine']}: " + json.dumps(shown)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="where to write the JSON results (the table goes to the same name with .md)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4, help="dataloader workers")
    parser.add_argument("--data-on-device", action="store_true",
                        help="keep the image pool on the GPU: times the training step without the DataLoader's "
                             "collation and the host-to-device copy")
    parser.add_argument("--precisions", nargs="*", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--compile", nargs="*", default=["eager"], choices=["eager", "compiled"],
                        help="run each configuration eagerly and/or with torch_compile=True (student, heads and "
                             "teacher compiled)")
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--engine-timeout", type=int, default=240, help="seconds for each engine's run")
    parser.add_argument("--engine-worker", choices=list(ENGINES), help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    if cli.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU, "
            "or pass --device cpu for a smoke run."
        )
    if cli.engine_worker:
        engine_worker(cli.engine_worker, cli.out, cli)
        return {}

    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    # A pool of a few batches, cycled through: throughput does not depend on which images a step sees.
    data = synthetic_images(4 * max(cli.batch_sizes), cli.image_size)
    if cli.data_on_device:
        data = PixelValuesDataset(data.pixel_values.to(cli.device), data.labels.to(cli.device))
        cli.workers = 0
    teacher = build_teacher(data, cli.device)
    report = {
        "gpu": torch.cuda.get_device_name() if cli.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "image_size": cli.image_size,
        "timed_steps": cli.steps,
        "warmup_steps": cli.warmup,
        "data_on_device": cli.data_on_device,
        "teacher": "ResNet-50-shaped (bottleneck 3-4-6-3, 256..2048), random weights",
        "student": "ResNet-18-shaped (basic 2-2-2-2, 64..512), random weights",
        "runs": [],
    }
    for precision in cli.precisions:
        for batch_size in cli.batch_sizes:
            for compiled in [mode == "compiled" for mode in cli.compile]:
                for mode in cli.modes:
                    result = run_config(precision, mode, batch_size, compiled, data, teacher, cli)
                    print(json.dumps(result), flush=True)
                    report["runs"].append(result)
    report["engines"] = []
    for engine in cli.engines:
        if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
            report["engines"].append({"engine": engine, "error": "deepspeed is not installed"})
            continue
        report["engines"].append(run_engine(engine, cli))
        print(json.dumps(report["engines"][-1]), flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(cli.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.out).write_text(json.dumps(report, indent=1))
    Path(cli.out).with_suffix(".md").write_text(markdown(report))
    print(f"wrote {cli.out} in {report['wall_s']} s")
    return report


if __name__ == "__main__":
    main()
