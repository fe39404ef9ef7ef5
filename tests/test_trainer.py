"""UDKDTrainer end to end on real data (scikit-learn digits) with tiny real models."""

import json
import math
import os

import pytest
import timm
import torch
from accelerate.utils import is_compiled_module
from conftest import accuracy, build, labels_kwargs, resnet_config, save_and_load, vit_config
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

from hf_udkd import UDKDTrainer, UDKDTrainingArguments
from hf_udkd.checkpoint import HEADS_NAME
from hf_udkd.modeling import LOSS_TERMS, DistillationOutput


def make_args(tmp_path, **kwargs) -> UDKDTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=3e-3,
        num_train_epochs=1,
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return UDKDTrainingArguments(**{**defaults, **kwargs})


def subset(dataset, n):
    return torch.utils.data.Subset(dataset, range(n))


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, digits):
    """A ResNet teacher trained on digits with cross-entropy, through UDKDTrainer without a teacher."""
    tmp_path = tmp_path_factory.mktemp("teacher")
    train, validation = digits
    teacher = build(resnet_config([16, 32, 64, 128]), tmp_path / "init")
    args = make_args(tmp_path, num_train_epochs=4, learning_rate=5e-3)
    trainer = UDKDTrainer(model=teacher, args=args, train_dataset=train, eval_dataset=validation,
                          compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] > 0.85, metrics
    assert set(metrics) >= {"eval_loss", "eval_loss_ce"} and "eval_loss_feat" not in metrics
    return save_and_load(trainer.student, tmp_path / "trained")


def test_distillation_raises_student_accuracy_and_logs_every_term(tmp_path, trained_teacher, digits):
    train, validation = digits
    student = build(resnet_config([8, 16, 32, 64]), tmp_path / "student")
    trainer = UDKDTrainer(model=student, teacher_model=trained_teacher, args=make_args(tmp_path, num_train_epochs=3),
                          train_dataset=train, eval_dataset=validation, compute_metrics=accuracy)
    before = trainer.evaluate()
    teacher_before = {k: v.clone() for k, v in trained_teacher.state_dict().items()}
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_accuracy"] < 0.3
    assert after["eval_accuracy"] > 0.7, after
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.4
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert train_logs and all(set(LOSS_TERMS) <= set(log) for log in train_logs)
    assert all(f"eval_{term}" in after for term in LOSS_TERMS)
    first, last = train_logs[0], train_logs[-1]
    assert last["loss_ce"] < first["loss_ce"] and last["loss_logit"] < first["loss_logit"]
    # The reported loss is the weighted sum of the terms (all weights 1 by default).
    assert math.isclose(sum(last[t] for t in LOSS_TERMS), last["loss"], rel_tol=0.02)
    # The teacher is frozen: eval mode, no gradients, weights untouched.
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    for name, value in trained_teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_gradients_reach_every_head_and_never_the_teacher(tmp_path, resnet_teacher, resnet_student, digits):
    train, _ = digits
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(tmp_path),
                          train_dataset=train)
    model = trainer.model
    batch = {"pixel_values": train.pixel_values[:8], "labels": train.labels[:8]}
    model.train()
    trainer.compute_loss(model, batch).backward()
    for part in ("fusion", "fdp_student", "fdp_teacher", "student"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert all(g is not None for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part
    assert all(p.grad is None for p in trainer.teacher_model.parameters())


def test_ablations_by_configuration(tmp_path, resnet_teacher, resnet_student, digits):
    train, _ = digits
    batch = {"pixel_values": train.pixel_values[:8], "labels": train.labels[:8]}

    def terms(**kwargs):
        trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher,
                              args=make_args(tmp_path, **kwargs), train_dataset=train)
        trainer.model.eval()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        return trainer.model, set(trainer.loss_terms.sums["eval"]) - {"count"}

    kd_model, kd_terms = terms(use_fdp=False)
    assert kd_terms == {"loss_ce", "loss_logit"}
    assert kd_model.fusion is None and kd_model.fdp_student is None
    no_aff, no_aff_terms = terms(use_aff=False)
    assert no_aff.fusion is None and no_aff_terms == set(LOSS_TERMS)
    assert no_aff.fdp_student.mu.in_features == 64  # the last student stage
    full, _ = terms(aff_channels=24, teacher_stage=0)
    assert full.fusion.laterals[0][0].out_channels == 24
    assert full.fdp_teacher.mu.in_features == 16  # the teacher's first stage
    for options in (dict(feature_kl="gaussian"), dict(logit_loss="dkd"), dict(detach_targets=False)):
        assert terms(**options)[1] == set(LOSS_TERMS)


def test_save_model_writes_only_the_clean_student(tmp_path, resnet_teacher, resnet_student, digits):
    train, validation = digits
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher,
                          args=make_args(tmp_path, max_steps=2), train_dataset=train)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert not (out / HEADS_NAME).exists()
    keys = load_file(out / "model.safetensors").keys()
    assert not any(k.startswith(("student.", "fusion", "fdp_", "teacher")) for k in keys)
    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    student = trainer.student.eval()
    x = validation.pixel_values[:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, student(pixel_values=x).logits)


# ViT: transformers v5 saves it under other parameter names than the module's (its checkpoint format).
STUDENT_CONFIGS = {"resnet": lambda: resnet_config([8, 16, 32, 64]),
                   "vit": lambda: vit_config(hidden_size=32, intermediate_size=64)}


@pytest.mark.parametrize("student_kind", list(STUDENT_CONFIGS))
def test_resume_continues_exactly(tmp_path, resnet_teacher, digits, student_kind):
    train, _ = digits
    train = subset(train, 256)
    common = dict(max_steps=8, logging_steps=1, save_strategy="steps", save_steps=4,
                  per_device_train_batch_size=32)

    def run(name, student, resume=None):
        trainer = UDKDTrainer(model=student, teacher_model=resnet_teacher,
                              args=make_args(tmp_path / name, **common), train_dataset=train)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log]

    full, full_losses = run("full", build(STUDENT_CONFIGS[student_kind](), tmp_path / "student"))
    checkpoint = tmp_path / "full" / "out" / "checkpoint-4"
    assert (checkpoint / HEADS_NAME).exists() and (checkpoint / "udkd_noise_0.safetensors").exists()
    resumed, resumed_losses = run("resumed", build(STUDENT_CONFIGS[student_kind](), tmp_path / "fresh"),
                                  resume=str(checkpoint))
    # The resumed history starts with the 4 logs restored from the checkpoint.
    assert len(full_losses) == 8 and len(resumed_losses) == 8
    assert resumed_losses[4:] == pytest.approx(full_losses[4:], abs=1e-5)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_vit_teacher_with_cnn_student(tmp_path, vit_teacher, resnet_student, digits):
    train, validation = digits
    trainer = UDKDTrainer(model=resnet_student, teacher_model=vit_teacher,
                          args=make_args(tmp_path, max_steps=3, logging_steps=1), train_dataset=subset(train, 96),
                          eval_dataset=subset(validation, 64))
    assert trainer.teacher.stage.channels == 64 and trainer.teacher.stage.height == 8
    trainer.train()
    metrics = trainer.evaluate()
    assert all(math.isfinite(metrics[f"eval_{t}"]) for t in LOSS_TERMS)


def test_cnn_teacher_with_vit_student(tmp_path, resnet_teacher, digits):
    train, _ = digits
    student = build(vit_config(hidden_size=32, intermediate_size=64), tmp_path / "vit")
    trainer = UDKDTrainer(model=student, teacher_model=resnet_teacher,
                          args=make_args(tmp_path, max_steps=2, logging_steps=1), train_dataset=subset(train, 64))
    assert [s.channels for s in trainer.model.student_tap.stages] == [32] * 4
    trainer.train()
    assert all(t in trainer.state.log_history[0] for t in LOSS_TERMS)


def test_timm_pair(tmp_path, digits):
    train, _ = digits
    teacher = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet18", **labels_kwargs()))
    teacher.save_pretrained(tmp_path / "t")
    teacher = AutoModelForImageClassification.from_pretrained(tmp_path / "t")
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    trainer = UDKDTrainer(model=student, teacher_model=teacher,
                          args=make_args(tmp_path, max_steps=2, logging_steps=1), train_dataset=subset(train, 64))
    assert trainer.teacher.stage.channels == 512
    trainer.train()
    assert all(math.isfinite(trainer.state.log_history[0][t]) for t in LOSS_TERMS)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_models_given_as_paths(tmp_path, resnet_teacher, resnet_student, digits):
    train, _ = digits
    resnet_teacher.save_pretrained(tmp_path / "t")
    resnet_student.save_pretrained(tmp_path / "s")
    trainer = UDKDTrainer(model=str(tmp_path / "s"), teacher_model=str(tmp_path / "t"),
                          args=make_args(tmp_path), train_dataset=train)
    assert trainer.student.config.hidden_sizes == [8, 16, 32, 64]
    assert trainer.teacher_model.config.hidden_sizes == [16, 32, 64, 128]


def test_mismatched_label_count_is_refused(tmp_path, resnet_teacher, digits):
    student = build(resnet_config([8, 16], num_labels=5, id2label=None, label2id=None), tmp_path / "s")
    with pytest.raises(ValueError, match="teacher has 10 labels and the student 5"):
        UDKDTrainer(model=student, teacher_model=resnet_teacher, args=make_args(tmp_path), train_dataset=digits[0])


def test_mismatched_label_names_are_refused(tmp_path, resnet_teacher, digits):
    names = [str(i) for i in range(10)]
    names[3], names[7] = names[7], names[3]
    student = build(resnet_config([8, 16], **labels_kwargs(names)), tmp_path / "s")
    with pytest.raises(ValueError, match="id2label differ at .*\\(3, '7', '3'\\)"):
        UDKDTrainer(model=student, teacher_model=resnet_teacher, args=make_args(tmp_path), train_dataset=digits[0])


def test_dataset_without_pixel_values_is_refused(tmp_path, resnet_teacher, resnet_student):
    from datasets import Dataset

    raw = Dataset.from_dict({"image": [[0.0]] * 4, "label": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="no 'pixel_values' \\(they have \\['image', 'label'\\]\\)"):
        UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(tmp_path), train_dataset=raw)


def test_non_finite_loss_names_the_term(tmp_path, resnet_teacher, resnet_student, digits):
    train, _ = digits
    with torch.no_grad():
        resnet_teacher.classifier[-1].weight.fill_(float("inf"))
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher,
                          args=make_args(tmp_path, max_steps=2), train_dataset=train)
    with pytest.raises(FloatingPointError, match="non-finite UniKD loss term\\(s\\): loss_logit in step 1,"):
        trainer.train()


def test_wrong_args_type_and_options(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="UDKDTrainingArguments"):
        UDKDTrainer(model=build(resnet_config([8, 16]), tmp_path), args=TrainingArguments(str(tmp_path)))
    with pytest.raises(ValueError, match="logit_loss='mse'"):
        make_args(tmp_path, logit_loss="mse")


def test_args_round_trip_through_json(tmp_path):
    args = make_args(tmp_path, student_layers=["1", "3"], aff_channels=32, w_supp=0.5)
    restored = UDKDTrainingArguments(**{k: v for k, v in json.loads(args.to_json_string()).items()
                                        if k in UDKDTrainingArguments.__dataclass_fields__})
    assert restored.student_layers == ["1", "3"] and restored.aff_channels == 32 and restored.w_supp == 0.5
    assert os.fspath(restored.output_dir) == args.output_dir


def test_load_best_model_at_end_restores_student_and_heads(tmp_path, resnet_teacher, resnet_student, digits):
    train, validation = digits
    args = make_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                     save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                     greater_is_better=False, logging_steps=2)
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=args,
                          train_dataset=subset(train, 192), eval_dataset=subset(validation, 64))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved_student = load_file(os.path.join(best, "model.safetensors"))
    saved_heads = load_file(os.path.join(best, HEADS_NAME))
    # Whichever checkpoint won, loading it again must overwrite every student and head weight.
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(1.0)
    trainer._load_best_model()
    for name, value in trainer.student.state_dict().items():
        torch.testing.assert_close(value, saved_student[name], msg=name)
    model_state = trainer.model.state_dict()
    for name, value in saved_heads.items():
        torch.testing.assert_close(model_state[name], value, msg=name)


def test_processes_launched_without_a_gpu_and_without_use_cpu_are_refused(tmp_path, monkeypatch):
    """torchrun on a CPU-only machine without --use_cpu: accelerate would run each process alone, so the
    arguments refuse it before anything (a teacher's training, the probe) runs."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="use_cpu"):
        make_args(tmp_path, use_cpu=False)


def _short_run(tmp_path, digits, name, **kwargs) -> tuple[UDKDTrainer, list[dict]]:
    """Three logged steps of UniKD (sampled noise, every head) between two tiny ResNets, saving at the end."""
    torch.manual_seed(0)
    teacher = build(resnet_config([8, 16, 32, 64]), tmp_path / f"{name}_teacher")
    student = build(resnet_config([8, 16, 32, 64]), tmp_path / f"{name}_student")
    args = make_args(tmp_path / name, per_device_train_batch_size=16, max_steps=3, logging_steps=1, **kwargs)
    trainer = UDKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=subset(digits[0], 48))
    trainer.train()
    trainer.save_model()
    return trainer, [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.slow
def test_torch_compile_trains_with_the_eager_losses(tmp_path, digits):
    eager, eager_logs = _short_run(tmp_path, digits, "eager")
    compiled, compiled_logs = _short_run(tmp_path, digits, "compiled", torch_compile=True)
    # accelerate compiled the whole distiller (student, heads, loss) and the teacher's eval-mode forward.
    assert is_compiled_module(compiled.model_wrapped) and is_compiled_module(compiled.teacher.module)
    assert not is_compiled_module(compiled.teacher_model)
    for eager_log, compiled_log in zip(eager_logs, compiled_logs, strict=True):
        for term in ("loss", *LOSS_TERMS):
            assert math.isclose(compiled_log[term], eager_log[term], rel_tol=1e-3, abs_tol=1e-4), term
    # The saved student is the plain module, with the eager run's parameter names.
    saved = load_file(os.path.join(compiled.args.output_dir, "model.safetensors"))
    assert set(saved) == set(load_file(os.path.join(eager.args.output_dir, "model.safetensors")))


def test_data_parallel_terms_are_reduced_to_batch_means(tmp_path, resnet_student, digits):
    # nn.DataParallel (several GPUs, one process) gathers each replica's mean term into a (replicas,) vector.
    trainer = UDKDTrainer(model=resnet_student, args=make_args(tmp_path), train_dataset=subset(digits[0], 8))
    # A batch of 3 on two replicas: chunks of 2 and 1 examples.
    vector = torch.tensor([1.0, 4.0])
    trainer.loss_terms.add(DistillationOutput(loss=vector, loss_ce=vector), 3, "train", step=1)
    # A batch of 4 on one device: a plain scalar.
    trainer.loss_terms.add(DistillationOutput(loss=torch.tensor(0.5), loss_ce=torch.tensor(0.5)), 4, "train", step=2)
    means = trainer.loss_terms.reduce("train", trainer.args.device, trainer.accelerator, step=2)
    assert means == {"loss_ce": round((2 * 1.0 + 4.0 + 4 * 0.5) / 7, 4)}
