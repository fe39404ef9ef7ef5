"""The distilled student's model card: metadata, model-index, body and loss plot (hf_udkd/model_card.py)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import accuracy
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from hf_udkd import UDKDTrainer, UDKDTrainingArguments
from hf_udkd.model_card import (
    DEFAULT_DATASET_NAME,
    PLOT_NAME,
    TAGS,
    DistillationRecord,
    build_model_card,
    dataset_name,
    display_name,
    distillation_settings,
    hub_id,
    plot_loss_terms,
    student_files,
    template_path,
    training_hyperparameters,
    training_push_files,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_template_in_model_cards_is_the_packaged_one():
    """model_cards/ is where readers look; the package ships the same file for installed use."""
    assert (REPO_ROOT / "model_cards" / "distilled_student.md").read_bytes() == template_path().read_bytes()


def test_hub_id_tells_hub_ids_from_local_paths(tmp_path, monkeypatch):
    assert hub_id("org/student-base") == "org/student-base"
    assert hub_id("resnet-18") == "resnet-18"
    assert hub_id(str(tmp_path)) is None
    assert hub_id("/no/such/dir") is None
    assert hub_id("") is None and hub_id(None) is None
    # A local directory shaped like an id is what from_pretrained reads first: local.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub_id("org/local") is None
    # from_pretrained(snapshot_download("org/teacher")) leaves a snapshot path of the Hub cache: that is the id.
    snapshot = tmp_path / "hub" / "models--org--teacher" / "snapshots" / ("0123abcd" * 5)
    snapshot.mkdir(parents=True)
    assert hub_id(str(snapshot)) == "org/teacher"
    assert hub_id(str(tmp_path / "hub" / "models--org--teacher")) is None


def test_teacher_named_by_its_hub_id(resnet_teacher, tmp_path):
    """A teacher loaded from the Hub keeps the repo id in config._name_or_path; a local one shows its folder."""
    assert display_name(resnet_teacher) == "teacher"  # conftest loaded it from tmp_path/teacher
    assert str(tmp_path) not in display_name(resnet_teacher)
    resnet_teacher.config._name_or_path = "org/resnet-teacher"
    assert display_name(resnet_teacher) == "org/resnet-teacher"
    card = build_model_card(_record(teacher_name=display_name(resnet_teacher), teacher_origin="org/resnet-teacher"),
                            plot_name=None)
    assert card.data.teacher_model["hub_id"] == "org/resnet-teacher"
    assert "[org/resnet-teacher](https://huggingface.co/org/resnet-teacher)" in card.text


def test_dataset_name_for_the_model_index():
    named = datasets.Dataset.from_dict({"label": [0, 1]}, info=datasets.DatasetInfo(dataset_name="animal_mnist"))
    assert dataset_name(named) == "animal_mnist"
    # A builder that only reads files says nothing about the data, nor does a tensor dataset.
    assert dataset_name(datasets.Dataset.from_dict({"label": [0, 1]})) == DEFAULT_DATASET_NAME
    assert dataset_name(torch.utils.data.TensorDataset(torch.zeros(2))) == DEFAULT_DATASET_NAME
    assert dataset_name(None) == DEFAULT_DATASET_NAME


def test_warmup_below_one_is_a_ratio(tmp_path):
    args = UDKDTrainingArguments(output_dir=str(tmp_path), warmup_steps=0.1, bf16=False, use_cpu=True)
    shown = training_hyperparameters({"learning_rate": 1e-3, "lr_scheduler_warmup_steps": 0.1}, args, 7)
    assert shown == {"learning_rate": 1e-3, "lr_scheduler_warmup_ratio": 0.1, "steps_trained": 7}
    shown = training_hyperparameters({"lr_scheduler_warmup_steps": 5}, args, 7)
    assert shown == {"lr_scheduler_warmup_steps": 5, "steps_trained": 7}


def _record(**overrides) -> DistillationRecord:
    fields = dict(
        model_name="student", repo_id="user/student", student_architecture="ResNetForImageClassification",
        student_parameters=1_000, teacher_name="org/teacher", teacher_origin="org/teacher",
        teacher_architecture="ResNetForImageClassification", teacher_parameters=4_000,
        student_metrics={"accuracy": 0.9}, teacher_metrics={"accuracy": 0.95}, dataset_names=["Digits"],
        distillation={"method": "UniKD", "temperature": 4.0},
    )
    fields.update(overrides)
    return DistillationRecord(**fields)


def test_base_model_is_the_students_hub_checkpoint_never_the_teacher():
    card = build_model_card(_record(student_origin="org/student-base"), plot_name=None)
    assert card.data.base_model == "org/student-base"
    assert card.data.teacher_model["hub_id"] == "org/teacher"
    assert "[org/teacher](https://huggingface.co/org/teacher)" in card.text
    assert "The teacher has 4.00x the student's parameters (the student has 25.0% of the teacher's)" in card.text

    for origin in (None, "/home/me/student", ""):
        card = build_model_card(_record(student_origin=origin), plot_name=None)
        assert card.data.base_model is None
        assert "base_model" not in card.data.to_dict()
        assert "did not start from a checkpoint on the Hub" in card.text


def test_card_without_teacher_or_dataset():
    """The scratch baseline (no teacher) and a run without a named dataset still give a valid card."""
    record = _record(teacher_name=None, teacher_origin=None, teacher_architecture=None, teacher_parameters=None,
                     teacher_metrics={}, distillation={}, dataset_names=[])
    card = ModelCard(str(build_model_card(record, plot_name=None)))
    assert "without a teacher" in card.text and "## Distillation" not in card.text
    assert card.data.get("teacher_model") is None and card.data.get("distillation") is None
    assert card.data.eval_results is None  # the model-index needs a dataset name
    assert "| accuracy | 0.9000 |  |  |" in card.text


def test_plot_needs_a_logged_train_loss(tmp_path):
    assert not plot_loss_terms([{"eval_loss": 1.0, "step": 2}], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
    history = [{"loss": 3.0 - s / 10, "loss_ce": 2.0, "loss_logit": 0.5, "step": s} for s in (1, 2, 3)]
    assert plot_loss_terms(history, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def _front_matter(text: str) -> str:
    assert text.startswith("---\n")
    return text.split("---\n", 2)[1]


def test_model_card_after_distillation(tmp_path, resnet_teacher, resnet_student, digits):
    """A short real UniKD run, then the card: every field checked against the trainer it came from."""
    train, validation = digits
    output_dir = tmp_path / "out"
    args = UDKDTrainingArguments(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=16, per_device_eval_batch_size=128,
        learning_rate=1e-3, logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=3,
        temperature=2.0, w_feat=0.5, aff_channels=16, warmup_steps=0.25,
    )
    trainer = UDKDTrainer(resnet_student, resnet_teacher, args, train_dataset=train, eval_dataset=validation,
                          compute_metrics=accuracy)
    trainer.train()
    student_eval = trainer.evaluate()
    teacher_eval = trainer.evaluate_teacher()
    # evaluate_teacher against the teacher run by hand on the same images
    with torch.no_grad():
        teacher_logits = resnet_teacher.eval()(pixel_values=validation.pixel_values).logits
    by_hand = float((teacher_logits.argmax(-1) == validation.labels).float().mean())
    assert teacher_eval["teacher_eval_accuracy"] == pytest.approx(by_hand, abs=1e-6)

    trainer.save_model()
    trainer.create_model_card(dataset="scikit-learn digits", dataset_split="validation", license="apache-2.0",
                              tags=["digits"])

    readme = output_dir / "README.md"
    text = readme.read_text(encoding="utf-8")
    card = ModelCard.load(readme)  # parses the metadata, model-index included
    data = card.data
    # transformers loads the student, so the Hub shows how; hf_udkd is a tag.
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert set(TAGS) | {"digits"} <= set(data.tags) and "hf_udkd" in data.tags
    assert data.license == "apache-2.0"
    assert data.base_model is None  # the student came from a local directory
    assert data.teacher_model["name"] == "teacher" and "hub_id" not in data.teacher_model
    assert str(tmp_path) not in text  # no local path leaks into a public card

    teacher_params = sum(p.numel() for p in resnet_teacher.parameters())
    student_params = sum(p.numel() for p in resnet_student.parameters())
    assert student_params < teacher_params
    assert data.teacher_model["parameters"] == teacher_params
    assert f"{student_params:,} parameters" in text and f"{teacher_params:,} parameters" in text
    assert f"The teacher has {teacher_params / student_params:.2f}x the student's parameters" in text

    settings = data.distillation
    assert settings["method"] == "UniKD" and settings["paper"] == "arXiv:2409.18565"
    weights = (settings["temperature"], settings["w_logit"], settings["w_feat"], settings["w_supp"])
    assert weights == (2.0, 1.0, 0.5, 1.0)
    assert settings["aff_channels"] == 16
    # Every training example is labelled: logit_standardization=None resolved to off, UniKD's weights.
    assert settings["w_ce"] == 1.0 and settings["logit_standardization"] is False
    assert settings["aff_init"] == "default" and "dkd_warmup_ratio" not in settings
    tapped = trainer.accelerator.unwrap_model(trainer.model).student_tap.stages
    assert settings["student_layers"] == [stage.layer for stage in tapped]
    assert settings["teacher_layer"] == trainer.teacher.stage.layer

    # The model-index parses with huggingface_hub's own reader; the teacher's score has its own metric type.
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "out"
    by_type = {r.metric_type: r for r in results}
    assert set(by_type) == {"accuracy", "teacher_accuracy"}
    assert by_type["accuracy"].metric_value == round(student_eval["eval_accuracy"], 4)
    assert by_type["teacher_accuracy"].metric_value == round(by_hand, 4)
    assert {(r.task_type, r.dataset_name, r.dataset_split) for r in results} == {
        ("image-classification", "scikit-learn digits", "validation")
    }
    assert f"| accuracy | {student_eval['eval_accuracy']:.4f} | {by_hand:.4f} |" in text

    hyper = _front_matter(text)
    assert "hub_token" not in hyper and "output_dir" not in text
    # The Trainer's own hyperparameter extraction, the warm-up share shown as a ratio.
    assert "| learning_rate | 0.001 |" in text and "| steps_trained | 4 |" in text
    assert "| train_batch_size | 16 |" in text and "| lr_scheduler_warmup_ratio | 0.25 |" in text
    assert "lr_scheduler_warmup_steps" not in text
    assert f"| optimizer | Use {args.optim} with betas=(0.9,0.999)" in text
    assert "Harmonizing knowledge Transfer in Neural Network with Unified Distillation" in text
    assert "2409.18565" in text and "ECCV" in text
    assert 'AutoModelForImageClassification.from_pretrained("out")' in text

    # The plot sits beside the card and is shown in it.
    assert f"]({PLOT_NAME})" in text
    png = output_dir / PLOT_NAME
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (400, 700) and np.ptp(image[..., :3]) > 0
    logged = [entry for entry in trainer.state.log_history if "loss_feat" in entry]
    assert len(logged) == 2  # steps 2 and 4: the plot has the terms to draw


def test_card_after_a_bare_evaluate_lists_the_metrics(tmp_path, resnet_teacher, resnet_student, digits):
    """No dataset= given: the model-index still lists the measured accuracy, under a default dataset name."""
    train, validation = digits
    args = UDKDTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=16,
                                 per_device_eval_batch_size=256, save_strategy="no", report_to=[], use_cpu=True,
                                 aff_channels=16)
    trainer = UDKDTrainer(resnet_student, resnet_teacher, args, train_dataset=train, eval_dataset=validation,
                          compute_metrics=accuracy)
    measured = trainer.evaluate()["eval_accuracy"]
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["accuracy"].metric_value == round(measured, 4)
    assert results["accuracy"].dataset_name == DEFAULT_DATASET_NAME


def test_pushed_files_are_listed_one_by_one(tmp_path):
    """What a push sends: the student at the root, the checkpoint (its subfolders too) without
    training_args.bin; nothing else of output_dir, such as a teacher kept there."""
    output_dir = tmp_path / "out"
    checkpoint = output_dir / "checkpoint-4"
    names = ["config.json", "model.safetensors", "preprocessor_config.json", "udkd_heads.safetensors",
             "optimizer.pt", "trainer_state.json", "training_args.bin", "global_step4/zero_pp_rank_0_states.pt"]
    for name in names:
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / name).write_bytes(name.encode())
    for name in ("README.md", PLOT_NAME, "config.json", "model.safetensors", "training_args.bin",
                 "teacher/model.safetensors", "teacher/config.json", "udkd_heads.safetensors"):
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_bytes(b"root " + name.encode())

    assert student_files(output_dir) == ["config.json", "model.safetensors", "README.md", PLOT_NAME]
    files = training_push_files(checkpoint, output_dir, "last-checkpoint")
    root = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", PLOT_NAME}
    resumable = {f"last-checkpoint/{name}" for name in names if name != "training_args.bin"}
    assert set(files) == root | resumable
    assert files["model.safetensors"] == str(checkpoint / "model.safetensors")  # this checkpoint's weights
    assert files["README.md"] == b"root README.md"  # contents: the next save rewrites the card in place
    assert set(training_push_files(checkpoint, output_dir, None)) == root


def test_dkd_settings_show_the_warmup_that_took_effect(tmp_path):
    args = UDKDTrainingArguments(output_dir=str(tmp_path), logit_loss="dkd", dkd_beta=2.0, report_to="none")
    settings = distillation_settings(args, [1, 2], 4)
    assert settings["method"] == "UniKD" and settings["dkd_beta"] == 2.0
    assert settings["dkd_warmup_ratio"] == args.dkd_warmup_ratio and "dkd_warmup_epochs" not in settings
    args = UDKDTrainingArguments(output_dir=str(tmp_path), logit_loss="dkd", dkd_warmup_epochs=5,
                                 report_to="none")
    assert distillation_settings(args, [1, 2], 4)["dkd_warmup_epochs"] == 5
