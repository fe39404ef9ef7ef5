"""Checkpoint files: the FDP noise states are kept per device, nothing non-finite is saved, no save lands in the teacher's folder or keeps another model's
files, a crash leaves a complete checkpoint or none, resume takes the latest complete one with the same options,
and raw timm students are saved in the format the Auto classes and pipeline() load."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import ROOT, build, load_script, resnet_config, vit_config
from huggingface_hub import metadata_load
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageClassification,
    TimmWrapperForImageClassification,
    TrainerCallback,
    TrainerState,
    pipeline,
)

from hf_udkd import UDKDTrainer, UDKDTrainingArguments
from hf_udkd import checkpoint as ckpt
from hf_udkd.heads import NoiseSource

KILL_SCRIPT = ROOT / "tests" / "scripts" / "killed_during_checkpoint.py"


def make_args(output_dir, **kwargs) -> UDKDTrainingArguments:
    defaults = dict(output_dir=str(output_dir), per_device_train_batch_size=16, learning_rate=3e-3, max_steps=2,
                    logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                    dataloader_num_workers=0, seed=0)
    return UDKDTrainingArguments(**{**defaults, **kwargs})


def subset(dataset, n):
    return torch.utils.data.Subset(dataset, range(n))


def digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))
            if (folder / name).is_file()}


@pytest.fixture
def checkpointed(tmp_path, resnet_teacher, resnet_student, digits):
    """A 4-step run with complete checkpoints at steps 2 and 4."""
    args = make_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=args,
                          train_dataset=subset(digits[0], 64))
    trainer.train()
    return trainer, tmp_path / "run"


class BreakTeacherAfter(TrainerCallback):
    """A fault from outside the trainer: the teacher's classifier becomes inf after ``step``."""

    def __init__(self, teacher, step: int):
        self.teacher, self.step = teacher, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.teacher.classifier[-1].weight.fill_(float("inf"))


# ---- non-finite values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("logging_steps", [1, 10])
def test_nan_from_step_3_is_never_saved_and_the_good_checkpoint_survives(
    tmp_path, resnet_teacher, resnet_student, digits, logging_steps
):
    """Caught at the logging step 3 or, with no logging in between, before the step-4 checkpoint."""
    out = tmp_path / "run"
    args = make_args(out, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1,
                     logging_steps=logging_steps)
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=args,
                          train_dataset=subset(digits[0], 96), callbacks=[BreakTeacherAfter(resnet_teacher, 2)])
    steps = "step 3" if logging_steps == 1 else "steps 3-4"
    with pytest.raises(FloatingPointError, match=f"loss_logit in {steps}"):
        trainer.train()
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    assert ckpt.incomplete_reason(str(out / "checkpoint-2")) is None
    with pytest.raises(FloatingPointError, match="loss_logit"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_non_finite_weights_are_never_saved(tmp_path, resnet_teacher, resnet_student, digits):
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(tmp_path / "run"),
                          train_dataset=digits[0])
    with torch.no_grad():
        trainer.student.classifier[-1].bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match="student's weights hold NaN or inf .*classifier.1.bias"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


# ---- where a save may go -------------------------------------------------------------------------------------


def test_output_dir_in_the_teachers_folder_is_refused(tmp_path, resnet_teacher, resnet_student, digits):
    teacher_dir = tmp_path / "teacher"  # where the fixture loaded the teacher from
    for output_dir in (teacher_dir, teacher_dir / "student"):
        with pytest.raises(ValueError, match="inside the teacher's folder"):
            UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(output_dir),
                        train_dataset=digits[0])
    before = digest(teacher_dir)
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(tmp_path / "run"),
                          train_dataset=digits[0])
    with pytest.raises(ValueError, match="inside the teacher's folder"):
        trainer.save_model(str(teacher_dir))
    assert digest(teacher_dir) == before


def test_save_over_another_model_leaves_nothing_of_it(tmp_path, resnet_teacher, resnet_student, digits):
    from transformers import ViTImageProcessor

    target = tmp_path / "target"
    other = AutoModelForImageClassification.from_config(vit_config())
    other.save_pretrained(target, max_shard_size="100KB")
    ViTImageProcessor().save_pretrained(target)
    (target / "README.md").write_text("---\nlicense: mit\n---\n# Another model\n")
    (target / "notes.txt").write_text("mine")
    (target / "teacher").mkdir()
    (target / "teacher" / "config.json").write_text("{}")
    assert any(name.startswith("model-00001-of-") for name in os.listdir(target))

    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(target),
                          train_dataset=digits[0])
    trainer.save_model()
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "notes.txt", "teacher",
                                          "training_args.bin"]
    assert (target / "teacher" / "config.json").read_text() == "{}"
    assert type(AutoModelForImageClassification.from_pretrained(target)).__name__ == "ResNetForImageClassification"
    # The card written for this student survives the next save.
    trainer.create_model_card()
    trainer.save_model()
    assert (target / "README.md").exists() and "Another model" not in (target / "README.md").read_text()


# ---- complete checkpoints and resume -------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, resnet_teacher,
                                                                            resnet_student):
    script = load_script("tests/scripts/killed_during_checkpoint.py")
    teacher_dir, student_dir, out = tmp_path / "teacher", tmp_path / "student", tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(KILL_SCRIPT), str(teacher_dir), str(student_dir), str(out), "4"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    # The step-4 write stopped half way, under a name no resume or rotation takes for a checkpoint.
    assert sorted(os.listdir(out)) == ["_incomplete-checkpoint-4", "checkpoint-2"]
    assert (out / "_incomplete-checkpoint-4" / "udkd_heads.safetensors").exists()
    assert ckpt.incomplete_reason(str(out / "checkpoint-2")) is None

    trained_steps = []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trained_steps.append(state.global_step)

    trainer = UDKDTrainer(model=str(student_dir), teacher_model=str(teacher_dir),
                          args=script.checkpoint_args(str(out), 6), train_dataset=script.digits_subset(),
                          callbacks=[CountSteps()])
    trainer.train(resume_from_checkpoint=True)
    assert trained_steps == [3, 4, 5, 6]
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(ckpt.incomplete_reason(str(out / name)) is None for name in os.listdir(out))


def test_resume_skips_and_refuses_incomplete_checkpoints(checkpointed):
    trainer, out = checkpointed
    with open(out / "checkpoint-4" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    # A folder as the stock Trainer leaves it when killed while writing: no manifest.
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "config.json").write_text("{}")
    assert ckpt.last_complete(str(out)) == str(out / "checkpoint-2")
    with pytest.raises(ValueError, match="model.safetensors has 100 bytes instead of .*latest complete one is "
                                         ".*checkpoint-2"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    with pytest.raises(ValueError, match="no readable udkd_checkpoint.json"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        (out / name / "udkd_checkpoint.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="found no complete checkpoint in .*checkpoint-6: it has no readable"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_with_other_distillation_options_lists_them(checkpointed, resnet_teacher, resnet_student, digits):
    _, out = checkpointed
    args = make_args(out, max_steps=6, save_strategy="steps", save_steps=2, aff_channels=32, temperature=2.0)
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=args,
                          train_dataset=subset(digits[0], 64))
    with pytest.raises(ValueError, match=r"other distillation options \(aff_channels: 64 -> 32; "
                                         r"temperature: 4.0 -> 2.0, as stored -> as given\)"):
        trainer.train(resume_from_checkpoint=True)


def test_missing_or_unreadable_heads_file_is_named(checkpointed):
    trainer, out = checkpointed
    folder = str(out / "checkpoint-4")
    heads = out / "checkpoint-4" / ckpt.HEADS_NAME
    with open(heads, "r+b") as f:
        f.truncate(50)
    with pytest.raises(ValueError, match="udkd_heads.safetensors has 50 bytes"):
        trainer.train(resume_from_checkpoint=folder)
    # The loader names the file too, for checkpoints it is given without the completeness check (the best one).
    with pytest.raises(ValueError, match="udkd_heads.safetensors \\(the UniKD heads\\) cannot be read"):
        ckpt.load_student_and_heads(folder, trainer.model)
    heads.unlink()
    with pytest.raises(ValueError, match="udkd_heads.safetensors is missing"):
        trainer.train(resume_from_checkpoint=folder)
    with pytest.raises(ValueError, match="udkd_heads.safetensors is missing: the checkpoint holds no UniKD heads"):
        ckpt.load_student_and_heads(folder, trainer.model)


def test_checkpoint_records_the_options_and_every_file(checkpointed):
    trainer, out = checkpointed
    manifest = ckpt.read_manifest(str(out / "checkpoint-4"))
    assert manifest["options"]["aff_channels"] == 64 and manifest["options"]["teacher_stage"] == -1
    assert not set(manifest["options"]) & ckpt.RUNTIME_OPTIONS
    assert {"model.safetensors", "udkd_heads.safetensors", "optimizer.pt", "trainer_state.json",
            "rng_state.pth"} <= set(manifest["files"])


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """After a resume from checkpoint-4 past an earlier run's checkpoint-8, checkpoint-6 is the newest."""
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    ckpt.rotate(str(tmp_path), 1, [str(tmp_path / "checkpoint-6"), None])
    assert os.listdir(tmp_path) == ["checkpoint-6"]
    for step in (2, 4, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    ckpt.rotate(str(tmp_path), 2, [str(tmp_path / "checkpoint-8"), str(tmp_path / "checkpoint-2")])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-8"]


def test_best_checkpoint_is_named_by_its_final_folder(tmp_path):
    """The best step's folder is recorded once it exists or is the one being written, never its staging name."""
    args = UDKDTrainingArguments(output_dir=str(tmp_path), save_strategy="steps", report_to="none", use_cpu=True)
    state = TrainerState(best_global_step=4)
    ckpt.update_best_checkpoint(state, args, str(tmp_path), ckpt.folder_for(str(tmp_path), 6))
    assert state.best_model_checkpoint is None
    ckpt.update_best_checkpoint(state, args, str(tmp_path), ckpt.folder_for(str(tmp_path), 4))
    assert state.best_model_checkpoint == str(tmp_path / "checkpoint-4")


def test_best_model_checkpoint_survives_rotation(tmp_path, resnet_teacher, resnet_student, digits):
    args = make_args(tmp_path / "run", max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                     save_steps=2, save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="loss",
                     greater_is_better=False)
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=args,
                          train_dataset=subset(digits[0], 96), eval_dataset=subset(digits[1], 32))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert os.path.basename(best) in {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert os.listdir(tmp_path / "run") == [os.path.basename(best)]
    assert ckpt.incomplete_reason(best) is None


# ---- raw timm students -----------------------------------------------------------------------------------------


def test_raw_timm_student_loads_through_auto_classes_and_pipeline(tmp_path, resnet_teacher, digits):
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    args = make_args(tmp_path / "run", save_strategy="steps", save_steps=2)
    trainer = UDKDTrainer(model=student, teacher_model=resnet_teacher, args=args, train_dataset=subset(digits[0], 32))
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))

    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    assert isinstance(loaded, TimmWrapperForImageClassification)
    assert loaded.config.id2label == resnet_teacher.config.id2label
    for (name, saved), trained in zip(loaded.timm_model.state_dict().items(), student.state_dict().values(),
                                      strict=True):
        assert torch.equal(saved, trained), name
    x = digits[1].pixel_values[:4]
    student.eval()
    with torch.no_grad():
        # Same weights, same input: the logits differ at most by float32 rounding between two module copies.
        torch.testing.assert_close(loaded(pixel_values=x).logits, student(x), rtol=0, atol=1e-6)

    classify = pipeline("image-classification", model=str(out))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        probabilities = student(classify.image_processor(image)["pixel_values"]).softmax(-1)[0]
    predictions = classify(image, top_k=10)
    expected = sorted(zip(probabilities.tolist(), resnet_teacher.config.id2label.values(), strict=True),
                      reverse=True)
    assert [p["label"] for p in predictions] == [label for _, label in expected]
    assert [p["score"] for p in predictions] == pytest.approx([score for score, _ in expected], abs=1e-6)
    trainer.create_model_card()
    assert metadata_load(tmp_path / "run" / "README.md")["library_name"] == "transformers"

    # A checkpoint of a raw timm student restores it.
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    resumed = UDKDTrainer(model=fresh, teacher_model=resnet_teacher, args=make_args(tmp_path / "other"),
                          train_dataset=subset(digits[0], 32))
    ckpt.load_student_and_heads(str(tmp_path / "run" / "checkpoint-2"), resumed.model)
    for (name, a), b in zip(student.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_source_folder_is_where_a_model_was_loaded_from(tmp_path):
    assert ckpt.source_folder(build(resnet_config([8, 16]), tmp_path / "m")) == os.path.realpath(tmp_path / "m")
    assert ckpt.source_folder(AutoModelForImageClassification.from_config(resnet_config([8, 16]))) is None
    assert ckpt.source_folder(timm.create_model("resnet10t", pretrained=False, num_classes=10)) is None


NOISE_MU, NOISE_LOG_VAR = torch.zeros(4, 10), torch.zeros(4, 10)


def test_single_device_noise_state_keeps_its_file_format(tmp_path):
    noise = NoiseSource(seed=3)
    noise.sample(NOISE_MU, NOISE_LOG_VAR)
    ckpt.save_noise_state(noise, str(tmp_path), process_index=1)
    assert set(load_file(tmp_path / ckpt.NOISE_STATE_NAME.format(process=1))) == {"state"}
    expected = noise.sample(NOISE_MU, NOISE_LOG_VAR)
    resumed = NoiseSource(seed=3)
    ckpt.load_noise_state(resumed, str(tmp_path), process_index=1)
    torch.testing.assert_close(resumed.sample(NOISE_MU, NOISE_LOG_VAR), expected)


def test_noise_states_of_several_devices_round_trip(tmp_path):
    # nn.DataParallel: one process, one generator per GPU.
    states = {"cuda:0": torch.Generator().manual_seed(1).get_state(),
              "cuda:1": torch.Generator().manual_seed(2).get_state()}
    noise = NoiseSource(seed=0)
    noise.set_states(states)
    ckpt.save_noise_state(noise, str(tmp_path), process_index=0)
    assert set(load_file(tmp_path / ckpt.NOISE_STATE_NAME.format(process=0))) == {"state.cuda:0", "state.cuda:1"}
    resumed = NoiseSource(seed=0)
    ckpt.load_noise_state(resumed, str(tmp_path), process_index=0)
    restored = resumed.get_states()
    assert set(restored) == set(states)
    assert all(torch.equal(restored[device], state) for device, state in states.items())


def test_no_noise_drawn_writes_no_noise_file(tmp_path):
    ckpt.save_noise_state(NoiseSource(seed=0), str(tmp_path), process_index=0)
    assert not list(tmp_path.iterdir())
