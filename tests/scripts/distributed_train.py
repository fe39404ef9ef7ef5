"""Tiny UDKDTrainer jobs for tests/test_multiprocess.py, run in one process or under torchrun.

    python tests/scripts/distributed_train.py OUT_DIR JOB [JOB ...]
    torchrun --nproc_per_node 2 tests/scripts/distributed_train.py OUT_DIR JOB [JOB ...]

Every job trains for a few steps with the same GLOBAL batch (16 examples) however many processes run
it, then evaluates. Rank 0 writes ``OUT_DIR/JOB.json`` (per-step losses, eval metrics, one checksum of
the parameters and one FDP noise draw per rank, where the teacher sat) and ``OUT_DIR/JOB.safetensors``
(the trained DistillationModel's parameters), so that one launch serves several assertions.
The jobs run on the CPU (gloo) unless UDKD_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TensorImageDataset, resnet_config, to_pixel_values, vit_config  # noqa: E402

from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.data import load_digits_dataset  # noqa: E402
from hf_udkd.teacher import whole_weights  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 4
TRAIN_EXAMPLES = GLOBAL_BATCH * STEPS
EVAL_EXAMPLES = 32

def _deepspeed_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        # The Trainer's own AdamW, not a DeepSpeed optimizer.
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": stage,
            # 0: every parameter of these tiny models is partitioned (by default small ones stay whole);
            # save_model() gathers the partitions into one state dict for the student's safetensors.
            **({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
               if stage == 3 else {}),
        },
    }


# name -> (student architecture, UDKDTrainingArguments overrides, gradient-accumulation steps).
# The ViT student has no BatchNorm and no dropout, so a batch split over processes computes exactly the
# loss of the whole batch; BatchNorm (ResNet) normalises per process unless converted to SyncBatchNorm.
JOBS: dict[str, tuple[str, dict, int]] = {
    "kd": ("vit", {"use_fdp": False}, 1),
    # No sampling enters the loss: gaussian feature KL, and w_supp=0 drops the sampled supplementary term.
    "unikd_exact": ("vit", {"feature_kl": "gaussian", "w_supp": 0.0}, 1),
    "unikd_exact_ga": ("vit", {"feature_kl": "gaussian", "w_supp": 0.0}, 2),
    "unikd": ("vit", {}, 1),
    "unikd_resnet": ("resnet", {}, 1),
    # FSDP2 (transformers' default version), on CPU over gloo (see _fsdp_on_cpu): the same exact job as
    # unikd_exact, plus a checkpoint at step 2 that a second trainer resumes from.
    "unikd_fsdp": ("vit", {"feature_kl": "gaussian", "w_supp": 0.0, "fsdp": "full_shard",
                           "fsdp_config": {"version": 2}, "save_strategy": "steps", "save_steps": 2}, 1),
    # FSDP2 mixed precision casts parameters, not buffers, to bf16: the ResNet student's BatchNorm must still run.
    "unikd_fsdp_bf16": ("resnet", {"fsdp": "full_shard", "fsdp_config": {"version": 2}, "bf16": True,
                                   "teacher_dtype": "float32"}, 1),
    # accelerate turns DeepSpeed off under use_cpu; DS_ACCELERATOR=cpu runs it on the CPU over gloo. There,
    # accelerate's own state counts one process (DeepSpeed, not accelerate, starts the process group), so
    # the data is not split between ranks: each sees the batches one process would. Gradients are still
    # averaged and ZeRO partitions across both ranks. The exact job, so that ZeRO-2 and ZeRO-3 can be compared.
    "unikd_zero2": ("vit", {"use_cpu": False, "feature_kl": "gaussian", "w_supp": 0.0,
                            "deepspeed": _deepspeed_config(2)}, 1),
    "unikd_zero3": ("vit", {"use_cpu": False, "feature_kl": "gaussian", "w_supp": 0.0, "save_strategy": "steps",
                            "save_steps": 2, "deepspeed": _deepspeed_config(3)}, 1),
}


@contextlib.contextmanager
def _fsdp_on_cpu(args: UDKDTrainingArguments):
    """Let accelerate shard over gloo on the CPU.

    accelerate (1.15) turns the FSDP plugin on only when its process state is one of the accelerator
    types (MULTI_GPU, MULTI_XPU, ...): on CPU it silently trains with DDP instead. torch's FSDP2 itself
    runs over gloo, so for the duration of the job the shared state reports MULTI_GPU, the type under
    which `accelerate launch --use_fsdp` enables it; devices, process group and data sharding stay the
    CPU's. Everything the Trainer then does (fully_shard, sharded optimizer, full state dict on save,
    FSDP checkpoints and their resume) is accelerate's and torch's real FSDP2 code.
    """
    state = PartialState()
    if not args.fsdp or state.device.type != "cpu" or state.num_processes == 1:
        yield
        return
    before = state.distributed_type
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield
    finally:
        PartialState._shared_state["distributed_type"] = before


def _model(kind: str) -> torch.nn.Module:
    # The same seed on every rank and in every run: all processes start from the same weights.
    torch.manual_seed(0)
    configs = {"vit": vit_config, "resnet": lambda: resnet_config([8, 16, 32, 64]),
               "teacher": lambda: resnet_config([16, 32, 64, 128])}
    config = configs[kind]()
    return AutoModelForImageClassification.from_config(config)


def _datasets() -> tuple[TensorImageDataset, TensorImageDataset]:
    splits = load_digits_dataset(split_seed=0)
    train, validation = splits["train"], splits["validation"]
    return (
        TensorImageDataset(to_pixel_values(train["image"][:TRAIN_EXAMPLES]), torch.tensor(train["label"][:TRAIN_EXAMPLES])),
        TensorImageDataset(
            to_pixel_values(validation["image"][:EVAL_EXAMPLES]), torch.tensor(validation["label"][:EVAL_EXAMPLES])
        ),
    )


def _gather(value):
    """``[value of rank 0, value of rank 1, ...]``."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _full_state(trainer: UDKDTrainer) -> dict[str, torch.Tensor]:
    """The distiller's parameters, whole (FSDP2 shards and ZeRO-3 partitions are gathered), on every rank."""
    distiller = trainer.accelerator.unwrap_model(trainer.model)
    with whole_weights(distiller):
        state = {}
        for name, param in distiller.named_parameters():
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name] = value.detach().float().cpu().clone()
    return state


def _teacher_check(trainer: UDKDTrainer, pixel_values: torch.Tensor, expected: torch.Tensor) -> dict:
    """Where the prepared teacher sits, whether ZeRO-3 partitioned it, and whether it still computes
    ``expected``, the logits of the original teacher on ``pixel_values``."""
    teacher = trainer.teacher_model
    parameter = next(teacher.parameters())
    logits, _ = trainer.teacher.outputs(pixel_values.to(trainer.args.device))
    return {
        "device": str(parameter.device),
        "dtype": str(parameter.dtype),
        "requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "training": teacher.training,
        "type": type(teacher).__name__,
        "local_numel": sum(p.numel() for p in teacher.parameters()),
        "numel": sum(getattr(p, "ds_numel", p.numel()) for p in teacher.parameters()),
        "logits_max_error": (logits.cpu() - expected).abs().max().item(),
    }


def _checksum(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    return digest.hexdigest()


def run_job(name: str, out_dir: Path, train, validation, teacher_logits: torch.Tensor) -> None:
    kind, overrides, accumulation = JOBS[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = GLOBAL_BATCH // world // accumulation
    # Built before the arguments: under ZeRO-3, models built afterwards are initialised per partition, with
    # other random weights than the same seed gives elsewhere.
    student, teacher = _model(kind), _model("teacher")
    saves = overrides.get("save_strategy", "no") != "no"
    # The models of the trainer that resumes from a checkpoint, built here for the same reason.
    student_again, teacher_again = (_model(kind), _model("teacher")) if saves else (None, None)
    # A job that saves writes where every rank reads (FSDP writes model and optimizer from rank 0 only).
    context = contextlib.nullcontext(str(out_dir / name)) if saves else tempfile.TemporaryDirectory()
    with context as output_dir:
        make_args = lambda: UDKDTrainingArguments(  # noqa: E731
            output_dir=output_dir,
            max_steps=STEPS,
            per_device_train_batch_size=per_device,
            per_device_eval_batch_size=EVAL_EXAMPLES // world,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-3,
            logging_steps=1,
            report_to="none",
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **{"use_cpu": os.environ.get("UDKD_TEST_DEVICE", "cpu") == "cpu", "save_strategy": "no", **overrides},
        )
        args = make_args()
        with _fsdp_on_cpu(args):
            trainer = UDKDTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                train_dataset=train,
                eval_dataset=validation,
            )
            trainer.train()
            # Counted right after training: after the evaluation forward under bf16 mixed precision, FSDP2 left
            # the root module's parameters unsharded (seen here: 0 of 78 were shards).
            sharded = sum(hasattr(p, "full_tensor") for p in trainer.model.parameters())
            # DeepSpeed on the CPU: accelerate's gather for eval metrics sizes its buffers for one process.
            metrics = trainer.evaluate() if not args.deepspeed else {}
            resumed_losses = None
            if saves:
                trainer.save_model(str(out_dir / f"{name}_student"))
                # A new trainer (with new arguments: DeepSpeed's state is set up per arguments), on fresh models
                # built like the first, continues from the step-2 checkpoint.
                resumed_args = make_args()
                with _fsdp_on_cpu(resumed_args):
                    resumed = UDKDTrainer(model=student_again, teacher_model=teacher_again, args=resumed_args,
                                          train_dataset=train, eval_dataset=validation)
                    resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2"))
                resumed_losses = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
                resumed_checksum = _checksum(_full_state(resumed))
                resumed_type = str(resumed.accelerator.distributed_type)

    distiller = trainer.accelerator.unwrap_model(trainer.model)
    state = _full_state(trainer)
    # One draw from each rank's private FDP generator, as the next training step would make it.
    draw = distiller.noise.sample(torch.zeros(4), torch.zeros(4)).tolist()
    result = {
        "world_size": world,
        "train_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "train_terms": [
            {k: v for k, v in entry.items() if k.startswith("loss_")}
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
        "train_loss": next(e["train_loss"] for e in trainer.state.log_history if "train_loss" in e),
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval_loss")},
        "checksums": _gather(_checksum(state)),
        "noise_draws": _gather(draw),
        "distiller_type": type(trainer.model).__name__,
        "sharded_parameters": sharded,
        # Modules with their own FSDP group: the root, and the student's blocks under the default wrap policy.
        "fsdp_units": sorted({type(m).__name__ for m in trainer.model.modules() if type(m).__name__.startswith("FSDP")}),
        "zero3_partitioned_parameters": sum(hasattr(p, "ds_id") for p in distiller.parameters()),
        "accelerate_num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "parameters": sum(1 for _ in trainer.model.parameters()),
        "teacher": _teacher_check(trainer, validation.pixel_values[:8], teacher_logits),
    }
    if resumed_losses is not None:
        result["resumed_losses"] = resumed_losses
        result["resumed_checksums"] = _gather(resumed_checksum)
        result["resumed_distributed_type"] = resumed_type
    if trainer.args.process_index == 0:
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
        save_file(state, str(out_dir / f"{name}.safetensors"))


def main() -> None:
    out_dir, names = Path(sys.argv[1]), sys.argv[2:]
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; known: {list(JOBS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    train, validation = _datasets()
    # Before any arguments exist: under ZeRO-3 a model built afterwards is partitioned at creation.
    with torch.no_grad():
        teacher_logits = _model("teacher").eval()(validation.pixel_values[:8]).logits
    for name in names:
        run_job(name, out_dir, train, validation, teacher_logits)


if __name__ == "__main__":
    main()
    # As the example script ends: a process that exits with the group open while another still works can
    # abort at exit ("terminate called without an active exception").
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
