"""One process against two (DDP, FSDP2 and DeepSpeed ZeRO-2/3 over gloo, on CPU): same losses, same update,
identical ranks, exact resume, a clean student out of sharded training.

Three launches serve every test here: tests/scripts/distributed_train.py runs a set of tiny jobs once in
one process, once under ``torchrun --nproc_per_node 2`` with the same global batch, and once more under
torchrun for the DeepSpeed jobs (DS_ACCELERATOR=cpu), and writes each job's losses, per-rank parameter
checksums, per-rank FDP noise draws and final parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "scripts" / "distributed_train.py"
ONE_PROCESS_JOBS = ["kd", "unikd_exact", "unikd_exact_ga", "unikd"]
TWO_PROCESS_JOBS = [*ONE_PROCESS_JOBS, "unikd_resnet", "unikd_fsdp", "unikd_fsdp_bf16"]


def _launch(command: list[str], out_dir: Path, **env_overrides: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env_overrides}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


class Run:
    """The outputs of one launch: ``run[job]`` is the job's JSON, ``run.weights(job)`` its parameters."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def __getitem__(self, job: str) -> dict:
        return json.loads((self.out_dir / f"{job}.json").read_text())

    def weights(self, job: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.out_dir / f"{job}.safetensors"))


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Run:
    out_dir = tmp_path_factory.mktemp("one_process")
    _launch([sys.executable, str(SCRIPT), str(out_dir), *ONE_PROCESS_JOBS], out_dir)
    return Run(out_dir)


# --standalone picks a free port, so concurrent test runs on one machine do not collide.
TORCHRUN_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Run:
    out_dir = tmp_path_factory.mktemp("two_processes")
    _launch([*TORCHRUN_TWO, str(SCRIPT), str(out_dir), *TWO_PROCESS_JOBS], out_dir)
    return Run(out_dir)


@pytest.fixture(scope="module")
def deepspeed_two(tmp_path_factory) -> Run:
    """ZeRO-2 and ZeRO-3 in two processes. DeepSpeed builds its CPU communication op on first use (about
    40 s with a C++ compiler, cached afterwards in torch's extensions folder)."""
    out_dir = tmp_path_factory.mktemp("deepspeed")
    _launch([*TORCHRUN_TWO, str(SCRIPT), str(out_dir), "unikd_zero2", "unikd_zero3"], out_dir, DS_ACCELERATOR="cpu")
    return Run(out_dir)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # Four AdamW steps amplify float rounding of the gradient sums (different reduction orders).
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("job", ["kd", "unikd_exact"])
def test_two_processes_give_the_losses_and_weights_of_one(one, two, job):
    """Logit KD, and UniKD without sampled noise in the loss: the same run whatever the number of processes."""
    assert two[job]["world_size"] == 2
    torch.testing.assert_close(two[job]["train_losses"], one[job]["train_losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two[job]["train_loss"], one[job]["train_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two[job]["eval"], one[job]["eval"], rtol=1e-4, atol=1e-4)
    _assert_same_weights(one.weights(job), two.weights(job))


def test_reported_loss_is_not_scaled_by_the_number_of_processes(two):
    """The logged loss is the weighted sum of the logged terms (all weights 1), not twice it."""
    for job, names in [("kd", ["loss_ce", "loss_logit"]), ("unikd", ["loss_ce", "loss_logit", "loss_feat", "loss_supp"])]:
        for loss, terms in zip(two[job]["train_losses"], two[job]["train_terms"], strict=True):
            assert loss == pytest.approx(sum(terms[n] for n in names), abs=1e-3), (job, loss, terms)


def test_gradient_accumulation_matches_one_larger_batch(one, two):
    """2 micro-batches of 8 accumulated == 1 batch of 16, in one process and across two (4 x 2 x 2)."""
    for run in (one, two):
        torch.testing.assert_close(run["unikd_exact_ga"]["train_losses"], one["unikd_exact"]["train_losses"],
                                   rtol=1e-5, atol=1e-6)
        _assert_same_weights(one.weights("unikd_exact"), run.weights("unikd_exact_ga"))


@pytest.mark.parametrize("job", TWO_PROCESS_JOBS)
def test_ranks_end_with_identical_parameters(two, job):
    checksums = two[job]["checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]


def test_fdp_noise_differs_across_ranks_and_loss_scale_holds(one, two):
    """Sampled UniKD: each rank draws its own noise; the loss stays on the one-process scale."""
    draws = two["unikd"]["noise_draws"]
    assert len(draws) == 2 and draws[0] != draws[1]
    # Same weights and data, different noise: the losses agree loosely, far from a factor of 2.
    for loss_two, loss_one in zip(two["unikd"]["train_losses"], one["unikd"]["train_losses"], strict=True):
        assert 0.8 < loss_two / loss_one < 1.25
    assert two["unikd"]["eval"]["eval_loss"] == pytest.approx(one["unikd"]["eval"]["eval_loss"], rel=0.05)


def test_teacher_is_frozen_on_the_training_device_and_unchanged(two):
    """After training, in every job, the prepared teacher still computes the original teacher's logits."""
    for job in TWO_PROCESS_JOBS:
        teacher = two[job]["teacher"]
        assert teacher.pop("logits_max_error") < 1e-5, job
        assert teacher == {
            "device": "cpu",
            "dtype": "torch.float32",
            "requires_grad": False,
            "training": False,
            "type": "ResNetForImageClassification",
            "local_numel": teacher["numel"],
            "numel": teacher["numel"],
        }


def test_fsdp_shards_student_and_heads_and_trains_like_one_process(one, two):
    """FSDP2 through accelerate: every parameter of the distiller (student + heads) is a shard, and the
    exact UniKD job gives the losses and the weights of the one-process run."""
    fsdp = two["unikd_fsdp"]
    assert fsdp["distributed_type"] == "DistributedType.FSDP"
    assert fsdp["distiller_type"] == "FSDPDistillationModel"
    assert fsdp["sharded_parameters"] == fsdp["parameters"] > 0
    # transformers' default wrap policy (transformer-based) shards each of the student's blocks on its own.
    assert fsdp["fsdp_units"] == ["FSDPDistillationModel", "FSDPViTEmbeddings", "FSDPViTLayer"]
    torch.testing.assert_close(fsdp["train_losses"], one["unikd_exact"]["train_losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fsdp["eval"], one["unikd_exact"]["eval"], rtol=1e-4, atol=1e-4)
    _assert_same_weights(one.weights("unikd_exact"), two.weights("unikd_fsdp"))


def test_fsdp_bf16_trains_a_batchnorm_student(two):
    """Under FSDP2's bf16 mixed precision the ResNet student (BatchNorm) and the heads train, sharded, with
    finite losses of the one-process scale."""
    fsdp = two["unikd_fsdp_bf16"]
    assert fsdp["distributed_type"] == "DistributedType.FSDP"
    assert fsdp["sharded_parameters"] == fsdp["parameters"] > 0
    assert "FSDPResNetConvLayer" in fsdp["fsdp_units"]
    for loss_bf16, loss in zip(fsdp["train_losses"], two["unikd_resnet"]["train_losses"], strict=True):
        assert 0.8 < loss_bf16 / loss < 1.25


def test_fsdp_checkpoint_resumes_exactly(two):
    """A new trainer resumed from the FSDP checkpoint at step 2 logs the same losses and ends with the
    same parameters, on both ranks, as the uninterrupted run."""
    fsdp = two["unikd_fsdp"]
    assert fsdp["resumed_distributed_type"] == "DistributedType.FSDP"
    assert fsdp["resumed_losses"] == fsdp["train_losses"]
    assert fsdp["resumed_checksums"] == fsdp["checksums"]


def _assert_clean_student(run: Run, job: str) -> None:
    """``save_model()`` under sharding gathered the shards and wrote the student alone, loadable by Auto,
    with the trained weights."""
    saved = run.out_dir / f"{job}_student"
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors", "training_args.bin"]
    trained = run.weights(job)
    expected = {k.removeprefix("student."): v for k, v in trained.items() if k.startswith("student.")}
    assert len(expected) < len(trained)  # the fusion and FDP heads trained beside the student...
    saved_keys = load_file(str(saved / "model.safetensors")).keys()  # ...and are not saved
    assert len(saved_keys) == len(expected) and not any(k.startswith(("fusion.", "fdp_")) for k in saved_keys)
    student = AutoModelForImageClassification.from_pretrained(saved)
    loaded = dict(student.named_parameters())
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name].detach(), value, rtol=0, atol=0, msg=name)


def test_fsdp_save_model_writes_the_clean_student(two):
    _assert_clean_student(two, "unikd_fsdp")


def test_deepspeed_zero3_partitions_student_heads_and_teacher(deepspeed_two):
    """Under ZeRO-3 every parameter of the distiller is partitioned, and so is the teacher, in its own
    inference engine (not left whole outside DeepSpeed); it still computes the original teacher's logits."""
    zero3 = deepspeed_two["unikd_zero3"]
    assert zero3["distributed_type"] == "DistributedType.DEEPSPEED"
    assert zero3["zero3_partitioned_parameters"] == zero3["parameters"] > 0
    teacher = zero3["teacher"]
    assert teacher["local_numel"] < teacher["numel"]
    assert teacher["logits_max_error"] < 1e-5
    assert not teacher["requires_grad"] and not teacher["training"]
    zero2 = deepspeed_two["unikd_zero2"]
    assert zero2["zero3_partitioned_parameters"] == 0 and zero2["teacher"]["local_numel"] == zero2["teacher"]["numel"]


def test_deepspeed_zero3_trains_like_zero2_with_identical_ranks(deepspeed_two):
    zero2, zero3 = deepspeed_two["unikd_zero2"], deepspeed_two["unikd_zero3"]
    torch.testing.assert_close(zero3["train_losses"], zero2["train_losses"], rtol=1e-5, atol=1e-6)
    _assert_same_weights(deepspeed_two.weights("unikd_zero2"), deepspeed_two.weights("unikd_zero3"))
    for job in (zero2, zero3):
        assert len(job["checksums"]) == 2 and job["checksums"][0] == job["checksums"][1]


def test_deepspeed_zero3_checkpoint_resumes_exactly(deepspeed_two):
    zero3 = deepspeed_two["unikd_zero3"]
    assert zero3["resumed_distributed_type"] == "DistributedType.DEEPSPEED"
    assert zero3["resumed_losses"] == zero3["train_losses"]
    assert zero3["resumed_checksums"] == zero3["checksums"]


def test_deepspeed_zero3_save_model_writes_the_clean_student(deepspeed_two):
    _assert_clean_student(deepspeed_two, "unikd_zero3")
