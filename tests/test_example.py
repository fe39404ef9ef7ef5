"""examples/run_image_classification_udkd.py: argument parsing, data loading, two input views, bad images,
and the script itself (in process on an imagefolder, and once end to end in a subprocess)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import load_script, resnet_config
from transformers import AutoModelForImageClassification, ConvNextImageProcessor, ViTImageProcessor

from hf_udkd.constants import IGNORE_INDEX
from hf_udkd.data import load_animal_mnist
from hf_udkd.image_processing import (
    ImageClassificationTransform,
    UndecodableImageError,
    collate_image_classification,
    decode_image,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_image_classification_udkd.py"
CLASSES = ["bear", "bird", "cat"]


@pytest.fixture(scope="module")
def example():
    return load_script("examples/run_image_classification_udkd.py")


@pytest.fixture(scope="module")
def animals():
    """Real Animal-MNIST images of the first three classes: {class name: [PIL "L" images]}."""
    train = load_animal_mnist()["train"]
    names = train.features["label"].names
    labels = np.asarray(train["label"])
    return {
        name: list(train.select(np.flatnonzero(labels == names.index(name))[:8])["image"]) for name in CLASSES
    }


def student_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def teacher_processor() -> ConvNextImageProcessor:
    """Another size (48, via shortest_edge) and ImageNet's mean/std: a teacher trained its own way."""
    return ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=1.0)


def write_imagefolder(root: Path, animals, per_class: int, broken: str | None = None) -> None:
    """Class subfolders of real PNGs in the modes users meet (L, RGBA, P, RGB); optionally one broken file."""
    modes = ["L", "RGBA", "P", "RGB"]
    for name, images in animals.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images[:per_class]):
            image.convert(modes[i % len(modes)]).save(root / name / f"{i}.png")
    if broken is not None:
        (root / CLASSES[0] / broken).write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated, not an image")


# ---- arguments --------------------------------------------------------------------------------------------


def test_builtin_defaults_apply_only_when_nothing_is_named_and_yield_to_explicit_arguments(example, tmp_path):
    model_args, data_args, args = example.parse_arguments([])
    assert data_args.uses_builtin_data and model_args.uses_builtin_student
    assert args.output_dir == "udkd-animal-mnist" and args.do_train and args.do_eval
    assert args.learning_rate == example.SCRATCH_TRAINING_DEFAULTS["learning_rate"]

    _, _, args = example.parse_arguments(["--learning_rate", "1e-4", "--output_dir", str(tmp_path)])
    assert args.learning_rate == 1e-4 and args.output_dir == str(tmp_path)

    # A named model and data set: transformers' own defaults, as in run_image_classification.py.
    named = ["--model_name_or_path", "m", "--train_dir", "d", "--output_dir", str(tmp_path), "--w_feat", "0.5"]
    model_args, data_args, args = example.parse_arguments(named)
    assert args.learning_rate == 5e-5 and not args.do_train and args.w_feat == 0.5
    assert data_args.crop_scale_min == 0.08

    # A JSON file as the only argument is the same as the command line.
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"num_train_epochs": 2, "temperature": 2.0}))
    _, _, args = example.parse_arguments([str(config)])
    assert args.num_train_epochs == 2 and args.temperature == 2.0 and args.do_train


def test_teacher_cache_options_are_flags_and_the_builtin_teacher_trains_without_the_cache(example, tmp_path):
    cache = ["--teacher_cache", "--teacher_cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path)]
    _, _, args = example.parse_arguments(cache)
    assert args.teacher_cache and args.teacher_cache_dir == str(tmp_path / "cache")
    # The built-in teacher is trained without a teacher, which teacher_cache=True would refuse.
    assert not example.side_arguments(args, str(tmp_path / "teacher")).teacher_cache


def test_a_missing_model_path_names_its_role_before_anything_runs(example, tmp_path):
    (tmp_path / "empty").mkdir()
    for role, option in (("teacher", "--teacher_model_name_or_path"), ("student", "--model_name_or_path")):
        for source in (str(tmp_path / "nowhere"), str(tmp_path / "empty"), "./nowhere"):
            with pytest.raises(ValueError, match=f"the {role} {source} was not found.*config.json.*Hub id"):
                example.parse_arguments([option, source, "--output_dir", str(tmp_path)])


def test_mixed_precision_of_an_accelerate_config_becomes_the_default(example, tmp_path, monkeypatch):
    """`accelerate launch` with mixed_precision: bf16 sets ACCELERATE_MIXED_PRECISION; the Trainer's --bf16 must
    agree (DeepSpeed refuses a mismatch), unless the command line says otherwise."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    common = ["--output_dir", str(tmp_path), "--use_cpu"]
    assert example.parse_arguments(common)[2].bf16
    assert not example.parse_arguments([*common, "--bf16", "false"])[2].bf16


# ---- data -------------------------------------------------------------------------------------------------


def test_renamed_columns_load_and_a_wrong_name_lists_the_columns(example, animals, tmp_path):
    rows = {"img": [], "animal": []}
    for name, images in animals.items():
        for image in images[:4]:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            rows["img"].append({"bytes": buffer.getvalue(), "path": None})
            rows["animal"].append(name)  # strings: the script makes a ClassLabel of them
    features = datasets.Features({"img": datasets.Image(), "animal": datasets.Value("string")})
    data_dir = tmp_path / "renamed"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data_dir / "train.parquet"))

    argv = ["--dataset_name", str(data_dir), "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    model_args, data_args, _ = example.parse_arguments(argv)
    with pytest.raises(ValueError, match="--image_column_name image not found.*img, animal"):
        example.load_image_dataset(data_args, model_args, seed=0)

    model_args, data_args, _ = example.parse_arguments(
        argv + ["--image_column_name", "img", "--label_column_name", "animal", "--train_val_split", "0.25"]
    )
    dataset = example.load_image_dataset(data_args, model_args, seed=0)
    assert sorted(dataset) == ["train", "validation"] and len(dataset["validation"]) == 3
    assert dataset["train"].features["animal"].names == sorted(CLASSES)
    transform = ImageClassificationTransform(
        student_processor(), train=False, image_column="img", label_column="animal"
    )
    batch = collate_image_classification(list(dataset["train"].with_transform(transform)))
    assert batch["pixel_values"].shape == (9, 3, 32, 32)
    assert set(batch["labels"].tolist()) == {0, 1, 2}


def test_modes_are_converted_to_rgb(animals):
    image = animals["bear"][0]
    for mode in ["L", "RGBA", "LA", "P", "I;16", "CMYK"]:
        buffer = io.BytesIO()
        converted = image.convert(mode) if mode != "I;16" else PIL.Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
        converted.save(buffer, format="TIFF")
        decoded = decode_image({"bytes": buffer.getvalue(), "path": None})
        assert decoded.mode == "RGB", mode
        # The silhouette survives every conversion (within rounding): white animal on black.
        grey = np.asarray(decoded.convert("L"), dtype=np.float32)
        assert np.abs(grey - np.asarray(image, dtype=np.float32)).max() <= 2, mode


def test_a_class_folder_without_images_is_named(example, animals, tmp_path):
    write_imagefolder(tmp_path / "train", animals, per_class=2)
    (tmp_path / "train" / "cow").mkdir()
    (tmp_path / "train" / "cow" / "notes.txt").write_text("no images here")
    argv = ["--train_dir", str(tmp_path / "train"), "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    model_args, data_args, _ = example.parse_arguments(argv)
    with pytest.raises(ValueError, match=r"class 'cow' in --train_dir .* has no images"):
        example.load_image_dataset(data_args, model_args, seed=0)


def test_unlabeled_images_get_label_minus_100_whatever_their_folders(example, animals, tmp_path):
    labelled = datasets.Dataset.from_dict(
        {"image": [], "label": []},
        features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=CLASSES)}),
    )
    # Folder names that are no classes of the data set (one is a class of it): all are ignored.
    write_imagefolder(tmp_path / "photos", {"holiday": animals["bear"][:3], "cat": animals["bird"][:2]}, per_class=3)
    argv = ["--unlabeled_dir", str(tmp_path / "photos"), "--model_name_or_path", "m", "--output_dir", str(tmp_path)]
    model_args, data_args, _ = example.parse_arguments(argv)
    images = example.load_unlabeled_images(data_args, model_args, labelled.features["label"])
    assert images.features == labelled.features and images["label"] == [IGNORE_INDEX] * 5
    assert len(datasets.concatenate_datasets([labelled, images])) == 5

    # A dataset with other column names: its label column is dropped, its images renamed to the training set's.
    rows = {"img": [], "animal": []}
    for image in animals["cat"][:4]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows["img"].append({"bytes": buffer.getvalue(), "path": None})
        rows["animal"].append("cat")
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "hub" / "train.parquet"))
    argv = ["--unlabeled_dataset_name", str(tmp_path / "hub"), "--image_column_name", "img", "--model_name_or_path",
            "m", "--output_dir", str(tmp_path)]  # fmt: skip
    model_args, data_args, _ = example.parse_arguments(argv)
    images = example.load_unlabeled_images(data_args, model_args, labelled.features["label"])
    assert images.column_names == ["img", "label"] and images["label"] == [IGNORE_INDEX] * 4

    with pytest.raises(ValueError, match="not both"):
        example.parse_arguments([*argv, "--unlabeled_dir", str(tmp_path / "photos")])


# ---- two input views --------------------------------------------------------------------------------------


def _pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo normalisation: (3, H, W) normalised -> [0, 1]."""
    return x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


def test_teacher_and_student_see_the_same_random_crop_each_in_its_own_format(animals):
    teacher = teacher_processor()
    transform = ImageClassificationTransform(student_processor(), teacher, train=True, crop_scale=(0.2, 0.5))
    assert transform.makes_teacher_inputs
    images = [image for name in CLASSES for image in animals[name][:4]]
    torch.manual_seed(0)
    out = transform({"image": images, "label": [0] * len(images)})
    gaps, shuffled_gaps = [], []
    teacher_as_student = []
    for s, t in zip(out["pixel_values"], out["teacher_pixel_values"], strict=True):
        assert s.shape == (3, 32, 32) and t.shape == (3, 48, 48)
        t01 = _pixels(t, teacher.image_mean, teacher.image_std)
        teacher_as_student.append(torch.nn.functional.interpolate(t01[None], size=32, mode="area")[0])
    for i, s in enumerate(out["pixel_values"]):
        s01 = _pixels(s, [0.5] * 3, [0.5] * 3)
        gaps.append((s01 - teacher_as_student[i]).abs().mean().item())
        shuffled_gaps.append((s01 - teacher_as_student[(i + 1) % len(images)]).abs().mean().item())
    # The same crop seen at two sizes differs by resampling only; another image's crop differs a lot.
    assert max(gaps) < 0.05 < min(shuffled_gaps)

    # Evaluation: the same processor on both sides makes no second view.
    same = ImageClassificationTransform(student_processor(), student_processor(), train=False)
    assert not same.makes_teacher_inputs
    assert "teacher_pixel_values" not in same({"image": images[:2], "label": [0, 1]})


# ---- bad data ---------------------------------------------------------------------------------------------


def test_an_undecodable_file_is_named_or_skipped_with_a_warning(animals, tmp_path, caplog):
    write_imagefolder(tmp_path, animals, per_class=1, broken="broken.png")
    files = [{"bytes": None, "path": str(p)} for p in sorted(tmp_path.rglob("*.png"))]
    batch = {"image": files, "label": list(range(len(files)))}

    strict = ImageClassificationTransform(student_processor(), train=True)
    with pytest.raises(UndecodableImageError, match=r"broken\.png.*--skip_bad_images"):
        strict(dict(batch))

    lenient = ImageClassificationTransform(student_processor(), train=True, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        out = lenient(dict(batch))
        lenient(dict(batch))  # warned once per file, not once per epoch
    assert sum(x is None for x in out["pixel_values"]) == 1
    assert sum("broken.png" in r.getMessage() for r in caplog.records) == 1
    examples = [{"pixel_values": p, "labels": y} for p, y in zip(out["pixel_values"], out["labels"], strict=True)]
    collated = collate_image_classification(examples)
    assert collated["pixel_values"].shape == (len(files) - 1, 3, 32, 32)


# ---- the script -------------------------------------------------------------------------------------------


@pytest.fixture
def imagefolder_run(animals, tmp_path):
    """An imagefolder train/validation split with a broken file, a tiny student config and a tiny teacher
    saved with an image processor of its own (48 px, ImageNet mean/std)."""
    write_imagefolder(tmp_path / "train", animals, per_class=6, broken="broken.png")
    write_imagefolder(tmp_path / "val", {k: v[6:] for k, v in animals.items()}, per_class=2)
    labels = {"num_labels": 3, "id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}
    config_dir = tmp_path / "student_config"
    resnet_config([4, 8, 16, 32], **labels).save_pretrained(config_dir)
    torch.manual_seed(0)
    teacher = AutoModelForImageClassification.from_config(resnet_config([8, 16, 32, 64], **labels))
    teacher.save_pretrained(tmp_path / "teacher")
    teacher_processor().save_pretrained(tmp_path / "teacher")
    return [
        "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val"),
        "--config_name", str(config_dir), "--teacher_model_name_or_path", str(tmp_path / "teacher"),
        "--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--report_to", "none",
        "--log_level", "warning", "--disable_tqdm", "true", "--save_strategy", "no",
    ]  # fmt: skip


def test_script_on_an_imagefolder_with_a_teacher_of_another_input_size(example, imagefolder_run, tmp_path, capsys):
    with pytest.raises(UndecodableImageError, match="broken.png"):
        example.main(imagefolder_run)

    summary = example.main(imagefolder_run + ["--skip_bad_images"])
    trainer = summary.trainer
    # The teacher read its own 48 px inputs: its last ResNet stage is 2x2 there, 1x1 at the student's 32 px.
    teacher_stage = trainer.teacher.stage
    assert (teacher_stage.height, teacher_stage.width) == (2, 2)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["teacher_pixel_values"].shape[-2:] == (48, 48) and batch["pixel_values"].shape[-2:] == (32, 32)
    assert trainer.state.global_step == 2
    assert 0.0 <= summary.student_accuracy <= 1.0 and 0.0 <= summary.teacher_accuracy <= 1.0
    out = tmp_path / "out"
    for name in ["config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json"]:
        assert (out / name).is_file(), name
    saved = AutoModelForImageClassification.from_pretrained(out)
    assert [saved.config.id2label[i] for i in range(3)] == CLASSES
    printed = capsys.readouterr().out
    assert "teacher accuracy" in printed and "CE 1, logit KD 1 (plain logits)" in printed


def test_script_with_unlabeled_images(example, animals, imagefolder_run, tmp_path):
    # Fewer unlabelled images than a batch holds: no batch is without labels.
    write_imagefolder(tmp_path / "unlabeled", {"any": animals["cat"][:6]}, per_class=6)
    summary = example.main(imagefolder_run + ["--skip_bad_images", "--unlabeled_dir", str(tmp_path / "unlabeled")])
    train = summary.trainer.train_dataset
    labels = [example["labels"] for example in train]
    assert len(train) == 3 * 6 + 1 + 6 and labels.count(IGNORE_INDEX) == 6
    assert summary.trainer.state.global_step == 2
    assert all(np.isfinite(entry["loss"]) for entry in summary.trainer.state.log_history if "loss" in entry)
    # Unlabelled images in the training set: the default standardizes the logits, with Sun et al.'s weights.
    assert summary.trainer.args.logit_standardization is True
    assert "CE 0.1, logit KD 9 (standardized logits)" in "\n".join(summary.lines())


def test_script_refuses_a_teacher_it_cannot_find_before_training(example, imagefolder_run, tmp_path):
    argv = list(imagefolder_run)
    argv[argv.index("--teacher_model_name_or_path") + 1] = "org/no-such-teacher"
    with pytest.raises(OSError, match="the teacher org/no-such-teacher was not found.*Hub id"):
        example.main(argv)
    assert not (tmp_path / "out").exists()


def test_script_keeps_its_own_teacher_outside_output_dir(example, imagefolder_run, tmp_path, capsys):
    argv = list(imagefolder_run)
    del argv[argv.index("--teacher_model_name_or_path") : argv.index("--teacher_model_name_or_path") + 2]
    argv += ["--skip_bad_images", "--num_train_epochs", "1"]
    summary = example.main(argv)
    out = tmp_path / "out"
    assert summary.teacher_dir == f"{out}-teacher" and (tmp_path / "out-teacher" / "model.safetensors").is_file()
    # Nothing in output_dir (what a push sends) holds the teacher's weights.
    student_size = sum(p.numel() for p in summary.trainer.student.parameters())
    weights = list(out.rglob("*.safetensors"))
    assert [p.relative_to(out).as_posix() for p in weights] == ["model.safetensors"]
    assert sum(p.numel() for p in AutoModelForImageClassification.from_pretrained(out).parameters()) == student_size
    assert not (out / "teacher").exists()

    # A second run reuses it, also from a folder of one's choosing; inside output_dir is refused.
    capsys.readouterr()
    example.main(argv)
    assert "Reusing the teacher" in capsys.readouterr().out
    elsewhere = tmp_path / "teachers" / "resnet"
    assert example.main(argv + ["--teacher_output_dir", str(elsewhere)]).teacher_dir == str(elsewhere)
    assert (elsewhere / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="--teacher_output_dir .* inside --output_dir"):
        example.main(argv + ["--teacher_output_dir", str(out / "teacher")])


@pytest.mark.slow
def test_builtin_default_run_end_to_end_in_a_subprocess(example, tmp_path):
    """The README's command on a small subset: trains a teacher, distils, evaluates, saves, summarises."""
    out = tmp_path / "run"
    argv = [
        "--output_dir", str(out), "--max_train_samples", "256", "--max_eval_samples", "128",
        "--num_train_epochs", "1", "--teacher_num_train_epochs", "1", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "UniKD distillation summary" in result.stdout
    assert "training a ResNet teacher" in result.stdout
    for name in ["config.json", "model.safetensors", "preprocessor_config.json", "README.md"]:
        assert (out / name).is_file(), name
    assert (tmp_path / "run-teacher" / "model.safetensors").is_file() and not (out / "teacher").exists()
    student = AutoModelForImageClassification.from_pretrained(out)
    teacher = AutoModelForImageClassification.from_pretrained(tmp_path / "run-teacher")
    ratio = sum(p.numel() for p in teacher.parameters()) / sum(p.numel() for p in student.parameters())
    assert ratio >= 10
    assert f"{ratio:.1f}x fewer" in result.stdout
    assert student.config.id2label[0] == "bear"

    # A second run reuses the teacher the first one saved, without training it again.
    model_args, data_args, args = example.parse_arguments(argv)
    reused, teacher_dir = example.train_or_load_teacher(model_args, args, None, student.config.id2label.values(),
                                                        None, None)
    assert teacher_dir == f"{out}-teacher"
    for a, b in zip(reused.parameters(), teacher.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_builtin_default_run_under_torchrun_with_two_cpu_processes(example, tmp_path):
    """The README's torchrun command, on CPU (--use_cpu): the two processes split the data, and one summary,
    one teacher and one student are written."""
    out = tmp_path / "run"
    argv = [
        "--output_dir", str(out), "--max_train_samples", "256", "--max_eval_samples", "128",
        "--num_train_epochs", "1", "--teacher_num_train_epochs", "1", "--disable_tqdm", "true", "--use_cpu",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, str(SCRIPT), *argv], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("UniKD distillation summary") == 1
    assert result.stdout.count("training a ResNet teacher") == 1
    per_device = example.parse_arguments(argv)[2].per_device_train_batch_size
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == -(-256 // (2 * per_device))  # each step consumed both processes' batches
    assert (tmp_path / "run-teacher" / "model.safetensors").is_file()
    AutoModelForImageClassification.from_pretrained(out)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_builtin_default_run_under_accelerate_launch_with_the_zero3_config(tmp_path):
    """examples/accelerate_configs/deepspeed_zero3.yaml as the README launches it, on the CPU (DS_ACCELERATOR=cpu,
    no mixed precision, which DeepSpeed refuses there): a teacher is trained, loaded back and partitioned, the
    student distilled, and the saved student is whole and clean."""
    out = tmp_path / "run"
    argv = [
        "--output_dir", str(out), "--max_train_samples", "256", "--max_eval_samples", "128",
        "--num_train_epochs", "1", "--teacher_num_train_epochs", "1", "--disable_tqdm", "true",
    ]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "examples" / "accelerate_configs" / "deepspeed_zero3.yaml"), "--num_processes", "1",
              "--mixed_precision", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([*launch, str(SCRIPT), *argv], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    student = AutoModelForImageClassification.from_pretrained(out)
    teacher = AutoModelForImageClassification.from_pretrained(tmp_path / "run-teacher")
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    # Counted whole although ZeRO-3 held only partitions when the script counted them.
    assert f"({count(teacher):,} parameters)" in result.stdout and f"({count(student):,} parameters)" in result.stdout
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
