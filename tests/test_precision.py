"""Mixed precision on CPU: bf16 autocast trains and evaluates, and the teacher runs in ``teacher_dtype``."""

from __future__ import annotations

import math

import pytest
import torch

from hf_udkd import UDKDTrainer, UDKDTrainingArguments


def _args(tmp_path, **kwargs) -> UDKDTrainingArguments:
    defaults = {
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    return UDKDTrainingArguments(output_dir=str(tmp_path / "out"), **{**defaults, **kwargs})


def _record_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    """Dtypes of the outputs of ``module``'s forward calls, appended as they happen."""
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda _m, _inputs, output: seen.append(output.dtype))
    return seen


@pytest.mark.parametrize("teacher_dtype", ["bfloat16", "auto"])
def test_bf16_trains_and_evaluates_with_a_bf16_teacher(tmp_path, digits, resnet_teacher, resnet_student, teacher_dtype):
    train, validation = digits
    small_validation = torch.utils.data.Subset(validation, range(32))
    trainer = UDKDTrainer(
        model=resnet_student,
        teacher_model=resnet_teacher,
        args=_args(tmp_path, bf16=True, teacher_dtype=teacher_dtype),
        train_dataset=train,
        eval_dataset=small_validation,
    )
    teacher = trainer.teacher_model
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    teacher_convs = _record_dtypes(teacher.resnet.encoder.stages[-1])
    # Autocast: the student computes in bf16 while its weights (what the optimizer updates) stay float32.
    student_convs = _record_dtypes(trainer.student.resnet.encoder.stages[-1])
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}

    trainer.train()
    metrics = trainer.evaluate()

    assert teacher_convs and set(teacher_convs) == {torch.bfloat16}
    assert student_convs and set(student_convs) == {torch.bfloat16}
    assert {p.dtype for p in trainer.student.parameters()} == {torch.float32}
    assert any(not torch.equal(before[n], p) for n, p in trainer.student.named_parameters())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        terms = [entry[name] for name in ("loss", "loss_ce", "loss_logit", "loss_feat", "loss_supp")]
        assert all(math.isfinite(value) for value in terms), entry
    for name in ("eval_loss", "eval_loss_ce", "eval_loss_logit", "eval_loss_feat", "eval_loss_supp"):
        assert math.isfinite(metrics[name]), metrics
    # bf16 rounding must not move the loss far from its float32 value on the same weights and data.
    assert 0.5 < metrics["eval_loss_ce"] / math.log(10) < 1.5


def test_float32_teacher_under_bf16_keeps_float32(tmp_path, digits, resnet_teacher, resnet_student):
    train, _ = digits
    trainer = UDKDTrainer(
        model=resnet_student,
        teacher_model=resnet_teacher,
        args=_args(tmp_path, bf16=True, teacher_dtype="float32", max_steps=1),
        train_dataset=train,
    )
    teacher = trainer.teacher_model
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    teacher_convs = _record_dtypes(teacher.resnet.encoder.stages[-1])
    trainer.train()
    assert teacher_convs and set(teacher_convs) == {torch.float32}


def test_distiller_cast_to_bf16_takes_float32_inputs(tmp_path, digits, resnet_teacher, resnet_student):
    """DeepSpeed's bf16 mode casts the whole distiller to bf16 (no autocast): float32 images and teacher
    features from the data and the teacher must still go through, and the loss terms stay float32."""
    train, _ = digits
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=_args(tmp_path), train_dataset=train)
    distiller = trainer.model.to(torch.bfloat16)
    pixel_values, labels = train.pixel_values[:8], train.labels[:8]
    teacher_logits, teacher_features = trainer.teacher.outputs(pixel_values)
    assert pixel_values.dtype == teacher_features.dtype == torch.float32
    output = distiller(pixel_values, labels, teacher_logits, teacher_features)
    for name in ("loss", "loss_ce", "loss_logit", "loss_feat", "loss_supp"):
        value = getattr(output, name)
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    output.loss.backward()
    assert distiller.fdp_teacher.mu.weight.grad.dtype == torch.bfloat16
