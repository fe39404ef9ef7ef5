"""GPU check: UDKDTrainer steps on CUDA in bf16 and fp16, images/s, and one FSDP2 run. Needs one CUDA GPU.

    PYTHONPATH=. python benchmarks/gpu_check.py gpu_check.json [--image-size 224] [--batch-size 64]

A ResNet-50-shaped teacher (bottleneck, depths 3-4-6-3, widths 256..2048) and a ResNet-18-shaped student
(basic, 2-2-2-2, 64..512) are built from configs with random weights (throughput does not depend on
what the weights know; the teacher's BatchNorm statistics are set from a few batches so that its
activations stay in range in fp16). For each precision (bf16, fp16) and mode (student only, logit KD,
UniKD with the defaults), the Trainer runs ``--warmup`` steps, then ``--steps`` timed steps
(synchronised); the JSON holds images/s, ms/step, peak GPU memory, the final loss and where the teacher
sat and in which dtype. Then, unless ``--skip-fsdp``, the script starts itself under
``torchrun --nproc_per_node 1`` with ``fsdp=True`` (FSDP2) and records whether accelerate wrapped the
student and heads, where the teacher sat and whether the loss is finite. Synthetic images, no
downloads, no ``datasets``: about 1 to 2 minutes on an H100.
"""

from __future__ import annotations

import argparse
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

from transformers import AutoModelForImageClassification, ResNetConfig, TrainerCallback  # noqa: E402

from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.data import PixelValuesDataset  # noqa: E402

NUM_LABELS = 100
MODES = {
    "student_only": {"teacher": False},
    "logit_kd": {"teacher": True, "use_fdp": False},
    "unikd": {"teacher": True},
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


def build_teacher(data: PixelValuesDataset) -> torch.nn.Module:
    """A random ResNet-50-shaped teacher whose BatchNorm running statistics match ``data``."""
    torch.manual_seed(0)
    teacher = AutoModelForImageClassification.from_config(teacher_config()).cuda()
    for module in teacher.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    teacher.train()
    with torch.no_grad():
        for start in range(0, 256, 64):
            teacher(data.pixel_values[start:start + 64].cuda())
    return teacher.eval().cpu()


def build_student() -> torch.nn.Module:
    torch.manual_seed(1)
    return AutoModelForImageClassification.from_config(student_config())


class StepTimer(TrainerCallback):
    """Wall time of the steps after ``warmup``, with the GPU synchronised at both ends."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
        elif state.global_step == state.max_steps:
            torch.cuda.synchronize()
            self.end = time.perf_counter()


def run_config(precision: str, mode: str, data: PixelValuesDataset, teacher: torch.nn.Module, cli) -> dict:
    options = {k: v for k, v in MODES[mode].items() if k != "teacher"}
    timer = StepTimer(cli.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        args = UDKDTrainingArguments(
            output_dir=tmp,
            max_steps=cli.warmup + cli.steps,
            per_device_train_batch_size=cli.batch_size,
            learning_rate=0.05,
            optim="sgd",
            logging_steps=cli.warmup + cli.steps,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=4,
            dataloader_pin_memory=True,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            seed=0,
            **options,
        )
        torch.cuda.reset_peak_memory_stats()
        trainer = UDKDTrainer(
            model=build_student(),
            teacher_model=teacher if MODES[mode]["teacher"] else None,
            args=args,
            train_dataset=data,
            callbacks=[timer],
        )
        output = trainer.train()
    elapsed = timer.end - timer.start
    result = {
        "precision": precision,
        "mode": mode,
        "images_per_s": round(cli.steps * cli.batch_size / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / cli.steps, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
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


def fsdp_worker(out_path: str, cli) -> None:
    """One FSDP2 UniKD run (started under torchrun): is the distiller sharded, where is the teacher."""
    data = synthetic_images(4 * cli.batch_size, cli.image_size)
    teacher = build_teacher(data)
    with tempfile.TemporaryDirectory() as tmp:
        args = UDKDTrainingArguments(
            output_dir=tmp, max_steps=4, per_device_train_batch_size=cli.batch_size, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, bf16=True, seed=0,
            fsdp="full_shard", fsdp_config={"version": 2},
        )
        trainer = UDKDTrainer(model=build_student(), teacher_model=teacher, args=args, train_dataset=data)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    parameter = next(trainer.teacher_model.parameters())
    result = {
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped_type": type(trainer.model_wrapped).__name__,
        "sharded_parameters": sum(hasattr(p, "full_tensor") for p in trainer.model.parameters()),
        "parameters": sum(1 for _ in trainer.model.parameters()),
        "teacher_device": str(parameter.device),
        "teacher_param_dtype": str(parameter.dtype),
        "teacher_trainable": any(p.requires_grad for p in trainer.teacher_model.parameters()),
        "losses": losses,
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
    }
    if trainer.args.process_index == 0:
        Path(out_path).write_text(json.dumps(result, indent=1))


def run_fsdp(cli) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "fsdp.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   __file__, out_path, "--fsdp-worker", "--batch-size", str(min(cli.batch_size, 32)),
                   "--image-size", str(cli.image_size)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-4000:]}
        return json.loads(Path(out_path).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="where to write the JSON results")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--skip-fsdp", action="store_true")
    parser.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU."
        )
    if cli.fsdp_worker:
        fsdp_worker(cli.out, cli)
        return

    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    data = synthetic_images((cli.warmup + cli.steps) * cli.batch_size, cli.image_size)
    teacher = build_teacher(data)
    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "image_size": cli.image_size,
        "batch_size": cli.batch_size,
        "timed_steps": cli.steps,
        "teacher": "ResNet-50-shaped (bottleneck 3-4-6-3, 256..2048), random weights",
        "student": "ResNet-18-shaped (basic 2-2-2-2, 64..512), random weights",
        "runs": [],
    }
    for precision in cli.precisions:
        for mode in MODES:
            result = run_config(precision, mode, data, teacher, cli)
            print(json.dumps(result), flush=True)
            report["runs"].append(result)
    if not cli.skip_fsdp:
        report["fsdp"] = run_fsdp(cli)
        print(json.dumps(report["fsdp"]), flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(cli.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {cli.out} in {report['wall_s']} s")


if __name__ == "__main__":
    main()
