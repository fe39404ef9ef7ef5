"""DistillationModel's loss on real tiny models: unlabelled examples, logit standardization, the options."""

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build, resnet_config
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from hf_udkd import DistillationModel, FeatureTap, UDKDTrainer, UDKDTrainingArguments
from hf_udkd.constants import IGNORE_INDEX
from hf_udkd.data import PixelValuesDataset
from hf_udkd.losses import standardize
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
    w_ce = model.args.w_ce
    torch.testing.assert_close(partial.loss, full.loss - w_ce * full.loss_ce + w_ce * partial.loss_ce)


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


def test_label_smoothing_applies_to_cross_entropy_and_w_ce_weighs_it_against_distillation(tmp_path, batch):
    pixel_values, labels = batch
    alone, _ = distiller_and_teacher(tmp_path, pixel_values, with_teacher=False,
                                     label_smoothing_factor=0.2, w_ce=0.5)
    output = alone(pixel_values, labels)
    torch.testing.assert_close(output.loss_ce, F.cross_entropy(output.logits, labels, label_smoothing=0.2))
    # Without a teacher there is nothing to weigh CE against: the loss is CE (the scratch baseline).
    torch.testing.assert_close(output.loss, output.loss_ce)
    distilled, (t_logits, t_features) = distiller_and_teacher(tmp_path, pixel_values, use_fdp=False, w_ce=0.5)
    output = distilled(pixel_values, labels, t_logits, t_features)
    torch.testing.assert_close(output.loss, 0.5 * output.loss_ce + distilled.args.w_logit * output.loss_logit)


def test_loss_weights_follow_logit_standardization(tmp_path):
    # Sun et al.'s weights come with standardization; without it, UniKD's published weights (CE 0.1 / KD 9 were
    # not measured without it, nor with DKD). Weights given are kept.
    standardized = make_args(tmp_path, logit_standardization=True)
    assert (standardized.w_ce, standardized.w_logit) == (0.1, 9.0)
    plain = make_args(tmp_path, logit_standardization=False)
    assert (plain.w_ce, plain.w_logit) == (1.0, 1.0)
    dkd = make_args(tmp_path, logit_standardization=True, logit_loss="dkd")
    assert (dkd.w_ce, dkd.w_logit) == (1.0, 1.0)
    chosen = make_args(tmp_path, logit_standardization=True, w_ce=0.5, w_logit=2.0)
    assert (chosen.w_ce, chosen.w_logit) == (0.5, 2.0)
    one_given = make_args(tmp_path, logit_standardization=False, w_logit=9.0)
    assert (one_given.w_ce, one_given.w_logit) == (1.0, 9.0)
    # The default is left to the trainer, which knows the training set.
    auto = make_args(tmp_path)
    assert (auto.logit_standardization, auto.w_ce, auto.w_logit) == (None, None, None)


@pytest.mark.parametrize("unlabelled_share, standardized", [(0.0, False), (0.5, True), (1.0, True)])
def test_default_standardizes_logits_when_the_training_set_has_unlabelled_examples(
    tmp_path, digits, unlabelled_share, standardized
):
    train, _ = digits
    labels = train.labels[:64].clone()
    labels[: int(unlabelled_share * 64)] = IGNORE_INDEX
    dataset = PixelValuesDataset(train.pixel_values[:64], labels)
    student = build(resnet_config([8, 16, 32, 64]), tmp_path / "student")
    teacher = build(resnet_config([16, 32, 64, 128]), tmp_path / "teacher")
    trainer = UDKDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, max_steps=1),
                          train_dataset=dataset)
    args = trainer.args
    assert args.logit_standardization is standardized
    assert (args.w_ce, args.w_logit) == ((0.1, 9.0) if standardized else (1.0, 1.0))
    # What the loss uses: standardized KD ignores the teacher's logit scale, plain KD does not.
    distiller = trainer.model.eval()
    pixel_values = dataset.pixel_values[:8]
    t_logits, t_features = trainer.teacher.outputs(pixel_values)
    plain = distiller(pixel_values, labels[:8], t_logits, t_features).loss_logit
    rescaled = distiller(pixel_values, labels[:8], 5.0 * t_logits, t_features).loss_logit
    assert torch.isclose(plain, rescaled, atol=1e-6).item() is standardized
    # No teacher: nothing to standardize, and the loss is CE alone.
    alone = UDKDTrainer(model=build(resnet_config([8, 16, 32, 64]), tmp_path / "alone"),
                        args=make_args(tmp_path, max_steps=1),
                        train_dataset=PixelValuesDataset(train.pixel_values[:64], train.labels[:64]))
    assert alone.args.logit_standardization is False


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


def reference_kd(pulled: torch.Tensor, target: torch.Tensor, temperature: float, standardized: bool):
    """One KD term alone, with F.kl_div (the per-term computation the fused pass replaces)."""
    if standardized:
        pulled, target = (standardize(x.float()) for x in (pulled, target))
    log_p_pulled = F.log_softmax(pulled.float() / temperature, dim=-1)
    log_p_target = F.log_softmax(target.float() / temperature, dim=-1)
    return F.kl_div(log_p_pulled, log_p_target, reduction="batchmean", log_target=True) * temperature**2


@pytest.mark.parametrize(
    "options",
    [{}, {"feature_temperature": 1.0}, {"logit_standardization": True, "feature_temperature": 2.0},
     {"logit_loss": "dkd"}, {"feature_kl": "gaussian"}],
)
def test_fused_terms_equal_the_per_term_reference(tmp_path, batch, options):
    pixel_values, labels = batch
    model, (t_logits, t_features) = distiller_and_teacher(tmp_path, pixel_values, **options)
    output = model(pixel_values, labels, t_logits, t_features)
    args = model.args
    # In evaluation z = mu: the reference rebuilds every term from the heads' outputs.
    logits = model.student(pixel_values).logits
    stages = model.student_tap(model.student, pixel_values).stages
    z_s, _ = model.fdp_student(model._student_feature(stages))
    z_t, _ = model.fdp_teacher(t_features)
    t_feat = args.temperature if args.feature_temperature is None else args.feature_temperature
    std = args.logit_standardization
    if args.logit_loss == "kd":
        torch.testing.assert_close(output.loss_logit, reference_kd(logits, t_logits, args.temperature, std),
                                   rtol=0, atol=1e-6)
    if args.feature_kl == "sampled":
        torch.testing.assert_close(output.loss_feat, reference_kd(z_s, z_t, t_feat, std), rtol=0, atol=1e-6)
    supp = reference_kd(z_s, logits, t_feat, std) + reference_kd(z_t, t_logits, t_feat, std)
    torch.testing.assert_close(output.loss_supp, supp, rtol=0, atol=1e-6)
    expected = (args.w_ce * output.loss_ce + args.w_logit * output.loss_logit + args.w_feat * output.loss_feat
                + args.w_supp * output.loss_supp)
    torch.testing.assert_close(output.loss, expected)


def test_feature_temperature_changes_only_the_feature_terms(tmp_path, batch):
    pixel_values, labels = batch
    model, (t_logits, t_features) = distiller_and_teacher(tmp_path, pixel_values)
    shared = model(pixel_values, labels, t_logits, t_features)
    model.args.feature_temperature = 1.0
    apart = model(pixel_values, labels, t_logits, t_features)
    torch.testing.assert_close(apart.loss_logit, shared.loss_logit)
    assert not torch.isclose(apart.loss_supp, shared.loss_supp)


def test_kaiming_fusion_init_reaches_the_model(tmp_path, batch):
    model, _ = distiller_and_teacher(tmp_path, batch[0], aff_init="kaiming")
    assert model.fusion.output[0].bias is None and all(lateral[0].bias is None for lateral in model.fusion.laterals)


@pytest.mark.parametrize("name", ["w_ce", "w_logit", "w_feat", "w_supp", "dkd_alpha", "dkd_beta"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_loss_weights_are_refused_by_name(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"{name}=.*finite and non-negative.*Use 0"):
        make_args(tmp_path, **{name: value})


@pytest.mark.parametrize(
    "options, message",
    [({"feature_temperature": 0.0}, "feature_temperature=0.0"), ({"temperature": float("inf")}, "temperature=inf"),
     ({"dkd_warmup_ratio": 1.5}, "dkd_warmup_ratio=1.5"), ({"dkd_warmup_epochs": -1.0}, "dkd_warmup_epochs=-1.0"),
     ({"aff_init": "xavier"}, "aff_init='xavier'")],
)
def test_bad_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **options)


class WeightRecorder(TrainerCallback):
    """The DKD weight the trainer uses at the start of each optimizer step."""

    def __init__(self):
        self.trainer: UDKDTrainer | None = None
        self.weights: list[tuple[int, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.weights.append((state.global_step, self.trainer._logit_weight()))


def dkd_run(tmp_path, digits, **options) -> list[tuple[int, float]]:
    train, _ = digits
    recorder = WeightRecorder()
    args = make_args(tmp_path, logit_loss="dkd", use_fdp=False, per_device_train_batch_size=8,
                     logging_steps=100, **options)
    trainer = UDKDTrainer(model=build(resnet_config([8, 16, 32, 64]), tmp_path / "student"),
                          teacher_model=build(resnet_config([16, 32, 64, 128]), tmp_path / "teacher"),
                          args=args, train_dataset=torch.utils.data.Subset(train, range(96)), callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    return recorder.weights


def test_dkd_warms_up_over_a_share_of_the_run_by_default(tmp_path, digits):
    # 96 examples / 8 = 12 steps per epoch, 2 epochs: 24 steps, of which 20/240 is 2.
    weights = dkd_run(tmp_path, digits, num_train_epochs=2)
    assert len(weights) == 24
    assert [w for _, w in weights[:4]] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert all(w == 1.0 for _, w in weights[2:])


def test_dkd_warmup_epochs_overrides_the_share(tmp_path, digits):
    weights = dkd_run(tmp_path, digits, num_train_epochs=1, dkd_warmup_epochs=0.5)
    # 12 steps per epoch: the weight is the epoch done over 0.5, so 1 from step 6 on.
    assert [w for _, w in weights[:7]] == pytest.approx([step / 6 for step in range(7)])
    assert all(w == 1.0 for _, w in weights[6:])


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options, passes", [({}, 1), ({"feature_temperature": 1.0}, 2), ({"logit_loss": "dkd"}, 1)])
def test_kl_terms_take_one_softmax_pass_per_temperature(tmp_path, batch, options, passes):
    pixel_values, labels = batch
    model, (t_logits, t_features) = distiller_and_teacher(tmp_path, pixel_values, **options)
    with OpCounter() as ops:
        model.train()(pixel_values, labels, t_logits, t_features)
    dkd = 4 if options.get("logit_loss") == "dkd" else 0  # DKD's own log-softmaxes and softmaxes
    # One for the cross-entropy, one per temperature for the four KL terms (not two per term).
    assert ops.counts["_log_softmax"] + ops.counts["_softmax"] == 1 + passes + dkd


def test_pp_lcnet_student_trains_with_logit_kd_and_predicts(tmp_path, batch):
    """PP-LCNet puts its logits in last_hidden_state: the untapped path (logit KD, prediction) reads them too."""
    from transformers import PPLCNetConfig, PPLCNetForImageClassification

    pixel_values, labels = batch
    torch.manual_seed(0)
    student = PPLCNetForImageClassification(PPLCNetConfig(num_labels=10)).eval()
    teacher = Teacher.from_probe(build(resnet_config([16, 32, 64, 128]), tmp_path / "teacher"), pixel_values, None, -1)
    model = DistillationModel(student, FeatureTap.from_probe(student, pixel_values), teacher.stage,
                              make_args(tmp_path, use_fdp=False)).eval()
    t_logits, t_features = teacher.outputs(pixel_values)
    out = model(pixel_values, labels, t_logits, t_features)
    expected = student(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(out.logits, expected)
    assert torch.isfinite(out.loss) and out.loss_logit > 0
    torch.testing.assert_close(model(pixel_values).logits, expected)


class RandomlyShiftedImages(torch.utils.data.Dataset):
    """Labelled images whose labels can only be read through ``__getitem__``, which draws from torch's generator
    (as a random augmentation does)."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values, self.labels_ = pixel_values, labels

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i] + 0.01 * torch.randn(()), "labels": self.labels_[i]}


def test_the_default_loss_choice_leaves_the_run_as_the_explicit_one(tmp_path, digits):
    # Reading the labels runs the transform; the heads must still start as with the choice spelled out.
    train, _ = digits
    dataset = RandomlyShiftedImages(train.pixel_values[:32], train.labels[:32])
    heads = []
    for options in ({}, {"logit_standardization": False, "w_ce": 1.0, "w_logit": 1.0}):
        student = build(resnet_config([8, 16, 32, 64]), tmp_path / "student")
        teacher = build(resnet_config([16, 32, 64, 128]), tmp_path / "teacher")
        trainer = UDKDTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, **options),
                              train_dataset=dataset)
        assert trainer.args.logit_standardization is False
        heads.append({k: v for k, v in trainer.model.state_dict().items() if not k.startswith("student.")})
    assert heads[0].keys() == heads[1].keys() and heads[0]
    for name, value in heads[0].items():
        torch.testing.assert_close(value, heads[1][name], rtol=0, atol=0, msg=name)
