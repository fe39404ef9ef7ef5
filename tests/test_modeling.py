"""DistillationModel's loss on real tiny models: unlabelled examples, logit standardization, the options."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build, resnet_config

from hf_udkd import DistillationModel, FeatureTap, UDKDTrainer, UDKDTrainingArguments
from hf_udkd.losses import IGNORE_INDEX
from hf_udkd.teacher import Teacher

DISTILLATION_TERMS = ("loss_logit", "loss_feat", "loss_supp")


def make_args(tmp_path, **kwargs) -> UDKDTrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return UDKDTrainingArguments(**{**defaults, **kwargs})


@pytest.fixture
def batch(digits):
    train, _ = digits
    return train.pixel_values[:8], train.labels[:8]


def distiller_and_teacher(tmp_path, pixel_values, with_teacher=True, **options):
    """A DistillationModel in eval mode (z = mu, so every call is deterministic) and the teacher's outputs."""
    student = build(resnet_config([8, 16, 32, 64]), tmp_path / "student")
    tap = FeatureTap.from_probe(student, pixel_values)
    teacher = None
    if with_teacher:
        teacher = Teacher.from_probe(build(resnet_config([16, 32, 64, 128]), tmp_path / "teacher"), pixel_values,
                                     None, -1)
    torch.manual_seed(0)
    model = DistillationModel(student, tap, teacher.stage if teacher else None, make_args(tmp_path, **options))
    return model.eval(), (teacher.outputs(pixel_values) if teacher else None)


def test_unlabelled_examples_get_only_the_distillation_terms(tmp_path, batch):
    pixel_values, labels = batch
    model, (t_logits, t_features) = distiller_and_teacher(tmp_path, pixel_values)
    full = model(pixel_values, labels, t_logits, t_features)
    mixed = labels.clone()
    mixed[::2] = IGNORE_INDEX
    partial = model(pixel_values, mixed, t_logits, t_features)
    torch.testing.assert_close(partial.loss_ce, F.cross_entropy(full.logits[1::2], labels[1::2]))
    for name in DISTILLATION_TERMS:
        torch.testing.assert_close(getattr(partial, name), getattr(full, name))
    torch.testing.assert_close(partial.loss, full.loss - full.loss_ce + partial.loss_ce)


def test_a_batch_without_labels_distils_every_example_and_has_zero_ce(tmp_path, batch):
    pixel_values, labels = batch
    model, (t_logits, t_features) = distiller_and_teacher(tmp_path, pixel_values)
    labelled = model(pixel_values, labels, t_logits, t_features)
    no_key = model(pixel_values, None, t_logits, t_features)
    assert no_key.loss_ce.item() == 0.0
    for name in DISTILLATION_TERMS:
        torch.testing.assert_close(getattr(no_key, name), getattr(labelled, name))
    model.train()
    unlabelled = model(pixel_values, torch.full_like(labels, IGNORE_INDEX), t_logits, t_features)
    assert unlabelled.loss_ce.item() == 0.0 and torch.isfinite(unlabelled.loss)
    unlabelled.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    prediction = model(pixel_values)
    assert prediction.loss is None and prediction.logits.shape == (8, 10)


def test_scratch_batch_without_a_labelled_example_is_zero_not_nan(tmp_path, batch):
    pixel_values, labels = batch
    model, _ = distiller_and_teacher(tmp_path, pixel_values, with_teacher=False)
    output = model.train()(pixel_values, torch.full_like(labels, IGNORE_INDEX))
    assert output.loss.item() == 0.0
    output.loss.backward()


def test_label_smoothing_and_w_ce_apply_to_cross_entropy(tmp_path, batch):
    pixel_values, labels = batch
    model, _ = distiller_and_teacher(tmp_path, pixel_values, with_teacher=False,
                                     label_smoothing_factor=0.2, w_ce=0.5)
    output = model(pixel_values, labels)
    torch.testing.assert_close(output.loss_ce, F.cross_entropy(output.logits, labels, label_smoothing=0.2))
    torch.testing.assert_close(output.loss, 0.5 * output.loss_ce)


@pytest.mark.parametrize("logit_loss", ["kd", "dkd"])
def test_logit_standardization_ignores_the_teachers_logit_scale(tmp_path, batch, logit_loss):
    pixel_values, labels = batch
    model, (t_logits, t_features) = distiller_and_teacher(
        tmp_path, pixel_values, logit_standardization=True, logit_loss=logit_loss
    )
    plain = model(pixel_values, labels, t_logits, t_features)
    rescaled = model(pixel_values, labels, 7.0 * t_logits - 3.0, t_features)
    # loss_logit is KL(s <- t) and loss_supp holds KL(z_t <- t): both see only the z-scored teacher logits.
    for name in ("loss_logit", "loss_supp"):
        torch.testing.assert_close(getattr(rescaled, name), getattr(plain, name))
    model.args.logit_standardization = False
    assert not torch.isclose(model(pixel_values, labels, 7.0 * t_logits - 3.0, t_features).loss_logit,
                             model(pixel_values, labels, t_logits, t_features).loss_logit)


class UnlabelledImages(torch.utils.data.Dataset):
    """Images without a ``labels`` key, as an unlabelled pool would give them."""

    def __init__(self, pixel_values: torch.Tensor):
        self.pixel_values = pixel_values

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i]}


def test_trainer_distils_a_dataset_without_labels(tmp_path, digits):
    train, validation = digits
    student = build(resnet_config([8, 16, 32, 64]), tmp_path / "student")
    teacher = build(resnet_config([16, 32, 64, 128]), tmp_path / "teacher")
    args = make_args(tmp_path, max_steps=4, logging_steps=2, per_device_train_batch_size=16,
                     per_device_eval_batch_size=64)
    trainer = UDKDTrainer(model=student, teacher_model=teacher, args=args,
                          train_dataset=UnlabelledImages(train.pixel_values[:64]), eval_dataset=validation)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss_logit" in entry]
    assert logged and all(entry["loss_ce"] == 0.0 and entry["loss_feat"] > 0 for entry in logged)
    assert all(math.isfinite(entry["loss"]) for entry in logged)
    # Evaluation still measures the labelled validation split; prediction on unlabelled images gives logits.
    metrics = trainer.evaluate()
    assert metrics["eval_loss_ce"] > 0
    predictions = trainer.predict(UnlabelledImages(validation.pixel_values[:10]))
    assert predictions.predictions.shape == (10, 10)


def test_scratch_training_without_labels_is_refused(tmp_path, digits):
    train, _ = digits
    student = build(resnet_config([8, 16, 32, 64]), tmp_path / "student")
    trainer = UDKDTrainer(model=student, args=make_args(tmp_path, max_steps=1),
                          train_dataset=UnlabelledImages(train.pixel_values[:16]))
    with pytest.raises(ValueError, match="needs labels"):
        trainer.train()
