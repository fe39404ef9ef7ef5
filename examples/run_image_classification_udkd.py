#!/usr/bin/env python
"""Distil an image classifier with UniKD (Unified Knowledge Distillation) and `hf_udkd.UDKDTrainer`.

The arguments and the flow follow transformers' `examples/pytorch/image-classification/
run_image_classification.py`, plus a teacher (`--teacher_model_name_or_path`, `--teacher_image_processor_name`)
and every `UDKDTrainingArguments` option (`--temperature`, `--w_feat`, `--aff_channels`, ...).

Run with no arguments, it does a complete distillation offline on the bundled Animal-MNIST data (10 classes of
animal silhouettes): it trains a ResNet teacher (saved in `<output_dir>-teacher`, next to `<output_dir>` so that
nothing pushed from `<output_dir>` holds it, and reused on the next run), distils a ResNet student with 15x fewer
parameters, evaluates both, saves the student with its image processor and model card in `<output_dir>` and
prints a summary:

    python examples/run_image_classification_udkd.py

Your own data and models:

    python examples/run_image_classification_udkd.py \
        --train_dir path/to/train --validation_dir path/to/val \
        --model_name_or_path my-student --teacher_model_name_or_path my-teacher \
        --output_dir my-distilled-student --do_train --do_eval --num_train_epochs 30 --learning_rate 5e-4

Images without labels (`--unlabeled_dir`, or `--unlabeled_dataset_name` with `--unlabeled_split`) join the training
set with the label -100: cross-entropy skips them and the teacher alone supervises them.

Without `--model_name_or_path`/`--config_name`, the student (and, without a teacher, the teacher) are small
ResNets trained from scratch, and the training defaults in `SCRATCH_TRAINING_DEFAULTS` apply; any of them can
be overridden on the command line. A JSON file as the only argument holds the same arguments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from accelerate import PartialState
from datasets import ClassLabel, DatasetDict, concatenate_datasets, load_dataset
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    PreTrainedModel,
    ResNetConfig,
    ViTImageProcessor,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_udkd import UDKDTrainer, UDKDTrainingArguments, whole_model_loading
from hf_udkd.constants import IGNORE_INDEX
from hf_udkd.data import load_animal_mnist
from hf_udkd.image_processing import ImageClassificationTransform, collate_image_classification
from hf_udkd.metrics import load_accuracy
from hf_udkd.model_card import count_parameters
from hf_udkd.teacher import load_model

logger = logging.getLogger(__name__)

# Animal-MNIST is 28x28; 32x32 keeps ResNet's stride-32 stages at least 1x1.
DEFAULT_IMAGE_SIZE = 32
# Built-in models, trained from scratch. The student has 15x fewer parameters than the teacher.
DEFAULT_TEACHER = {"hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1], "embedding_size": 32}
DEFAULT_STUDENT = {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "embedding_size": 8}
# Training from scratch needs a far larger learning rate than fine-tuning (TrainingArguments' 5e-5).
SCRATCH_TRAINING_DEFAULTS = {
    "do_train": True,
    "do_eval": True,
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "num_train_epochs": 5,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 25,
    "seed": 42,
}
# The demo shows progress bars, metrics and a summary; --log_level info brings back the Trainer's logs.
BUILTIN_DATA_DEFAULTS = {"output_dir": "udkd-animal-mnist", "crop_scale_min": 0.6, "log_level": "warning"}


@dataclass
class DataTrainingArguments:
    """Arguments about the data for training and evaluation (as in transformers' image classification example).

    With neither `dataset_name` nor `train_dir`/`validation_dir`, the bundled Animal-MNIST is used.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Name of a dataset from the Hub, or a local directory datasets.load_dataset can read."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "A folder containing the training data."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder containing the validation data."})
    unlabeled_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder of images without labels (any subfolder names are ignored), added to the training "
            "set with label -100: only the teacher supervises them."
        },
    )
    unlabeled_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Like --unlabeled_dir, from a Hub dataset or a local directory (its labels ignored)."},
    )
    unlabeled_split: str = field(
        default="train", metadata={"help": "The split of --unlabeled_dataset_name to use."}
    )
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Share of train split off for validation when there is no validation split."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "For debugging or quicker training, truncate the number of (labelled) training examples to this."
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "For debugging or quicker training, truncate the number of evaluation examples to this."},
    )
    image_column_name: str = field(
        default="image", metadata={"help": "The name of the dataset column containing the image data."}
    )
    label_column_name: str = field(
        default="label", metadata={"help": "The name of the dataset column containing the labels."}
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "Skip images that cannot be decoded, with a warning, instead of stopping with an error."},
    )
    crop_scale_min: float = field(
        default=0.08,
        metadata={"help": "Smallest share of the image area the training RandomResizedCrop keeps (torchvision: 0.08)."},
    )

    def __post_init__(self):
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must lie in (0, 1], got {self.crop_scale_min}")
        if self.unlabeled_dir is not None and self.unlabeled_dataset_name is not None:
            raise ValueError("give either --unlabeled_dir or --unlabeled_dataset_name, not both")

    @property
    def uses_builtin_data(self) -> bool:
        return self.dataset_name is None and self.train_dir is None and self.validation_dir is None


@dataclass
class ModelArguments:
    """Arguments about the student and the teacher.

    Without `model_name_or_path` and `config_name`, the student is a small ResNet trained from scratch; without
    `teacher_model_name_or_path`, a larger ResNet teacher is first trained from scratch on the same data.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The student: path to a pretrained model or model identifier from huggingface.co/models."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Student config name or path; alone (no model_name_or_path), trains it from scratch."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the models and datasets downloaded from the Hub."}
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The specific model version to use (can be a branch name, tag name or commit id)."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Name or path of the student's image processor config."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "The token for remote files (default: the one from `hf auth login`). Never logged."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom models defined on the Hub in their own modeling files (runs their code)."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load the student even if its classifier has another number of labels (re-initialised)."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The teacher, trained on the same labels. Default: train a ResNet teacher here first."},
    )
    teacher_image_processor_name: str | None = field(
        default=None,
        metadata={"help": "Name or path of the teacher's image processor config (default: the teacher's own)."},
    )
    teacher_num_train_epochs: float = field(
        default=4.0, metadata={"help": "Epochs for the teacher trained here when no teacher is given."}
    )
    teacher_output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the teacher trained here is saved and reused (default: `<output_dir>-teacher`). Keep it "
            "outside output_dir: everything there may be pushed to the Hub."
        },
    )

    def __post_init__(self):
        for role, source in (("student", self.model_name_or_path), ("teacher", self.teacher_model_name_or_path)):
            if source is not None:
                check_model_source(source, role)

    @property
    def uses_builtin_student(self) -> bool:
        return self.model_name_or_path is None and self.config_name is None


def check_model_source(source: str, role: str) -> None:
    """Refuse a local path that holds no model; a Hub id is checked when it is loaded."""
    looks_local = os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not os.path.isfile(os.path.join(os.path.expanduser(source), "config.json")):
        raise ValueError(
            f"the {role} {source} was not found: give a local directory with config.json and model.safetensors, "
            "or a Hub id"
        )


@dataclass
class RunSummary:
    """What a run measured; `main` prints it and returns it."""

    output_dir: str
    teacher_dir: str
    teacher_accuracy: float | None
    student_accuracy: float | None
    teacher_parameters: int
    student_parameters: int
    seconds: float
    trainer: UDKDTrainer = field(repr=False)

    def loss_weights(self) -> str:
        args = self.trainer.args
        standardized = "standardized logits" if args.logit_standardization else "plain logits"
        return f"CE {args.w_ce:g}, logit {args.logit_loss.upper()} {args.w_logit:g} ({standardized})"

    @property
    def parameter_ratio(self) -> float:
        return self.teacher_parameters / self.student_parameters

    def lines(self) -> list[str]:
        def pct(x: float | None) -> str:
            return "n/a (no evaluation)" if x is None else f"{100 * x:.2f}%"

        return [
            "UniKD distillation summary",
            f"  teacher accuracy : {pct(self.teacher_accuracy)}  ({self.teacher_parameters:,} parameters)",
            f"  student accuracy : {pct(self.student_accuracy)}  ({self.student_parameters:,} parameters)",
            f"  parameter ratio  : {self.parameter_ratio:.1f}x fewer in the student",
            f"  loss weights     : {self.loss_weights()}",
            f"  student saved in : {self.output_dir}",
            f"  teacher in       : {self.teacher_dir}",
            f"  wall time        : {self.seconds:.0f} s",
        ]


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, UDKDTrainingArguments]:
    """Parse command-line arguments, or a JSON file given as the only argument.

    Defaults for training from scratch are put first when no student model is named (`SCRATCH_TRAINING_DEFAULTS`)
    and the Animal-MNIST defaults when no data set is named, so that anything given explicitly wins.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, UDKDTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            given = json.load(f)
        model_args, data_args, _ = parser.parse_dict(given)
        defaults = _defaults(model_args, data_args)
        return parser.parse_dict({**defaults, **given})
    model_args, data_args = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)[:2]
    parser.set_defaults(**_defaults(model_args, data_args))
    return parser.parse_args_into_dataclasses(args=argv)


def _defaults(model_args: ModelArguments, data_args: DataTrainingArguments) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    # Under `accelerate launch` with mixed_precision in its config, the Trainer's flag must say the same
    # (DeepSpeed refuses to start otherwise); --bf16/--fp16 given explicitly still win.
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("bf16", "fp16"):
        defaults[precision] = True
    if model_args.uses_builtin_student:
        defaults.update(SCRATCH_TRAINING_DEFAULTS)
    if data_args.uses_builtin_data:
        defaults.update(BUILTIN_DATA_DEFAULTS)
    return defaults


def load_image_dataset(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> DatasetDict:
    """The `train` and `validation` splits, with a `ClassLabel` label column and a not-yet-decoded image column."""
    if data_args.uses_builtin_data:
        dataset = load_animal_mnist()
    elif data_args.dataset_name is not None:
        dataset = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    else:
        data_files = {}
        for split, option, directory in (
            ("train", "--train_dir", data_args.train_dir),
            ("validation", "--validation_dir", data_args.validation_dir),
        ):
            if directory is not None:
                check_class_folders(directory, option)
                data_files[split] = os.path.join(directory, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)

    check_columns(
        dataset["train" if "train" in dataset else next(iter(dataset))],
        ("--image_column_name", data_args.image_column_name),
        ("--label_column_name", data_args.label_column_name),
    )
    dataset = with_class_labels(dataset, data_args.label_column_name)
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset = DatasetDict(train=split["train"], validation=split["test"])
    # Decoding happens in the transform, where an undecodable file can be named (or skipped).
    return dataset.cast_column(data_args.image_column_name, datasets.Image(decode=False))


def check_columns(dataset: datasets.Dataset, *options: tuple[str, str]) -> None:
    """Each `(option, column name)` names a column of `dataset`, or the error lists the columns there are."""
    for option, name in options:
        if name not in dataset.column_names:
            raise ValueError(
                f"{option} {name} not found in the dataset; its columns are {', '.join(dataset.column_names)}. "
                f"Set {option} to one of them."
            )


def check_class_folders(directory: str, option: str) -> None:
    """Refuse a class folder without images: imagefolder would drop that class, or leave it out of this split,
    without a word."""
    if not os.path.isdir(directory):
        raise ValueError(f"{option} {directory} is not a directory")
    extensions = {extension.lower() for extension in IMAGE_EXTENSIONS}
    for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
        # datasets skips hidden and dunder folders (.ipynb_checkpoints, __MACOSX) as well.
        if not entry.is_dir() or entry.name.startswith((".", "__")):
            continue
        files = (path for path in Path(entry.path).rglob("*") if path.is_file())
        if not any(path.suffix.lower() in extensions for path in files):
            raise ValueError(
                f"class {entry.name!r} in {option} {directory} has no images: add images of it to "
                f"{entry.path}, or remove that folder"
            )


def load_unlabeled_images(
    data_args: DataTrainingArguments, model_args: ModelArguments, label_feature: ClassLabel
) -> datasets.Dataset | None:
    """The images of `--unlabeled_dir` or `--unlabeled_dataset_name` with the label -100, in the training set's
    two columns (image not yet decoded, label of `label_feature`), or None when neither is given."""
    if data_args.unlabeled_dir is not None:
        if not os.path.isdir(data_args.unlabeled_dir):
            raise ValueError(f"--unlabeled_dir {data_args.unlabeled_dir} is not a directory")
        images = load_dataset(
            "imagefolder",
            data_files={"train": os.path.join(data_args.unlabeled_dir, "**")},
            drop_labels=True,
            split="train",
            cache_dir=model_args.cache_dir,
        )
        column = "image"
    elif data_args.unlabeled_dataset_name is not None:
        images = load_dataset(
            data_args.unlabeled_dataset_name,
            split=data_args.unlabeled_split,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
        column = data_args.image_column_name
        check_columns(images, ("--image_column_name", column))
    else:
        return None
    images = images.select_columns(column)
    if column != data_args.image_column_name:
        images = images.rename_column(column, data_args.image_column_name)
    images = images.cast_column(data_args.image_column_name, datasets.Image(decode=False))
    return images.add_column(data_args.label_column_name, [IGNORE_INDEX] * len(images), feature=label_feature)


def with_class_labels(dataset: DatasetDict, label: str) -> DatasetDict:
    """Make the label column a `ClassLabel`, with the same names in every split.

    Strings become classes in sorted order; integers must already be class ids 0..K-1.
    """
    feature = dataset[next(iter(dataset))].features[label]
    if isinstance(feature, ClassLabel):
        return dataset
    values = sorted({v for split in dataset.values() for v in split.unique(label)})
    if all(isinstance(v, str) for v in values):
        return dataset.cast_column(label, ClassLabel(names=values))
    if values != list(range(len(values))):
        raise ValueError(
            f"--label_column_name {label} holds {feature} values {values[:10]}...: labels must be class names "
            "(strings) or class ids 0..K-1; re-map them first"
        )
    return dataset.cast_column(label, ClassLabel(names=[str(v) for v in values]))


def default_image_processor(size: int = DEFAULT_IMAGE_SIZE) -> ViTImageProcessor:
    """Resize to size x size, scale to [0, 1], normalise each channel with mean 0.5 and std 0.5."""
    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def label_kwargs(names: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def hub_kwargs(model_args: ModelArguments, student: bool = True) -> dict[str, Any]:
    """Keyword arguments of the `from_pretrained` calls; `--model_revision` applies to the student only."""
    kwargs = {
        "cache_dir": model_args.cache_dir,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if student:
        kwargs["revision"] = model_args.model_revision
    return kwargs


def load_student(model_args: ModelArguments, names: list[str]) -> tuple[PreTrainedModel, Any]:
    """The student model (with the dataset's labels) and its image processor."""
    labels = label_kwargs(names)
    if model_args.uses_builtin_student:
        model = AutoModelForImageClassification.from_config(
            ResNetConfig(**DEFAULT_STUDENT, layer_type="basic", **labels)
        )
    else:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path,
            finetuning_task="image-classification",
            **labels,
            **hub_kwargs(model_args),
        )
        if model_args.model_name_or_path is None:
            model = AutoModelForImageClassification.from_config(
                config, trust_remote_code=model_args.trust_remote_code
            )
        else:
            model = load_model(
                model_args.model_name_or_path,
                "student",
                config=config,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                **hub_kwargs(model_args),
            )
    processor_source = model_args.image_processor_name or model_args.model_name_or_path
    if processor_source is None:
        return model, default_image_processor()
    return model, AutoImageProcessor.from_pretrained(processor_source, **hub_kwargs(model_args))


def load_teacher_image_processor(model_args: ModelArguments, student_processor: Any) -> Any:
    """The teacher's image processor: named, else the teacher's own, else the student's (with a warning)."""
    source = model_args.teacher_image_processor_name or model_args.teacher_model_name_or_path
    try:
        return AutoImageProcessor.from_pretrained(source, **hub_kwargs(model_args, student=False))
    except OSError:
        if model_args.teacher_image_processor_name is not None:
            raise
        logger.warning(
            f"{source} has no image processor: the teacher gets the student's inputs. Pass "
            "--teacher_image_processor_name if it was trained with another size or normalisation."
        )
        return student_processor


def check_teacher_labels(teacher: PreTrainedModel, names: list[str], where: str) -> None:
    """The teacher must predict the dataset's classes in the dataset's order."""
    teacher_names = [str(teacher.config.id2label[i]) for i in range(teacher.config.num_labels)]
    if teacher_names != [str(n) for n in names]:
        raise ValueError(
            f"the teacher in {where} predicts {teacher_names[:10]}{'...' if len(teacher_names) > 10 else ''} but "
            f"the dataset's labels are {names[:10]}{'...' if len(names) > 10 else ''}: give a teacher trained on "
            "these labels in this order, or (for a teacher trained here) delete that directory to retrain it."
        )


def compute_metrics_fn():
    """Top-1 accuracy through `evaluate`, from the metric module shipped in hf_udkd (works offline)."""
    metric = load_accuracy()

    def compute_metrics(p: transformers.EvalPrediction) -> dict[str, float]:
        return metric.compute(predictions=np.argmax(p.predictions, axis=1), references=p.label_ids)

    return compute_metrics


def side_arguments(training_args: UDKDTrainingArguments, output_dir: str, **changes: Any) -> UDKDTrainingArguments:
    """Copy of the training arguments for the teacher's own Trainer (no hub push, no checkpoints)."""
    return dataclasses.replace(
        training_args,
        output_dir=output_dir,
        push_to_hub=False,
        teacher_cache=False,
        teacher_cache_dir=None,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        resume_from_checkpoint=None,
        **changes,
    )


def train_or_load_teacher(
    model_args: ModelArguments,
    training_args: UDKDTrainingArguments,
    dataset: DatasetDict,
    names: list[str],
    transforms: tuple[ImageClassificationTransform, ImageClassificationTransform],
    image_processor: Any,
) -> tuple[PreTrainedModel, str]:
    """Train the built-in ResNet teacher on the training split, or load it if a previous run saved it.

    Returns the teacher and the directory it lives in: `--teacher_output_dir`, by default `<output_dir>-teacher`,
    outside `output_dir` so that no push from there carries the teacher.
    """
    output_dir = os.path.abspath(training_args.output_dir)
    teacher_dir = model_args.teacher_output_dir or output_dir + "-teacher"
    if os.path.commonpath([output_dir, os.path.abspath(teacher_dir)]) == output_dir:
        raise ValueError(
            f"--teacher_output_dir {teacher_dir} is inside --output_dir {training_args.output_dir}, whose files "
            "may be pushed to the Hub: choose a folder outside it"
        )
    if os.path.isfile(os.path.join(teacher_dir, "config.json")):
        if training_args.process_index == 0:
            print(f"Reusing the teacher trained by an earlier run in {teacher_dir}")
        with whole_model_loading():
            teacher = AutoModelForImageClassification.from_pretrained(teacher_dir)
        check_teacher_labels(teacher, names, teacher_dir)
        return teacher, teacher_dir
    if "train" not in dataset:
        raise ValueError("no teacher was given and there is no training split to train one: pass --train_dir")
    if training_args.process_index == 0:
        print(f"No --teacher_model_name_or_path: training a ResNet teacher for "
              f"{model_args.teacher_num_train_epochs:g} epochs first (saved in {teacher_dir}, reused next time)")
    torch.manual_seed(training_args.seed)
    with whole_model_loading():
        teacher = AutoModelForImageClassification.from_config(
            ResNetConfig(**DEFAULT_TEACHER, layer_type="basic", **label_kwargs(names))
        )
    # UDKDTrainer without a teacher trains with cross-entropy alone, under the same engines and precisions.
    trainer = UDKDTrainer(
        model=teacher,
        args=side_arguments(training_args, teacher_dir, num_train_epochs=model_args.teacher_num_train_epochs),
        train_dataset=dataset["train"].with_transform(transforms[0]),
        data_collator=collate_image_classification,
        processing_class=image_processor,
    )
    trainer.train()
    trainer.save_model(teacher_dir)
    trainer.accelerator.wait_for_everyone()
    # Loaded back as a later run would: under DeepSpeed ZeRO-3 the trained module holds only partitions.
    with whole_model_loading():
        return AutoModelForImageClassification.from_pretrained(teacher_dir), teacher_dir


def build_trainer(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: UDKDTrainingArguments
) -> tuple[UDKDTrainer, str]:
    """The UDKDTrainer of `main()` and of `python -m hf_udkd.precompute`, and the teacher's directory (or name).

    Data (the `train` split when `do_train`, with any unlabelled images; `validation` when `do_eval`), student,
    transforms, teacher (named, else the built-in one, trained here first or reused), trainer. One function for
    both, so that the training set and teacher that precompute stores outputs for are those a training run
    reads (another would not match the store's fingerprint and be refused).
    """
    # The transforms read the image column, which the Trainer would otherwise drop as unused by the model.
    training_args.remove_unused_columns = False

    transformers.set_seed(training_args.seed)
    dataset = load_image_dataset(data_args, model_args, training_args.seed)
    label_feature = dataset[next(iter(dataset))].features[data_args.label_column_name]
    names = label_feature.names
    unlabeled = load_unlabeled_images(data_args, model_args, label_feature) if training_args.do_train else None

    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("training needs a train split and the data set has none: pass --train_dir, or "
                             "a --dataset_name with a train split")
        if data_args.max_train_samples is not None:
            dataset["train"] = (
                dataset["train"].shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
            )
    if training_args.do_eval:
        if "validation" not in dataset:
            raise ValueError("--do_eval requires a validation dataset")
        if data_args.max_eval_samples is not None:
            dataset["validation"] = (
                dataset["validation"].shuffle(seed=training_args.seed).select(range(data_args.max_eval_samples))
            )

    # Whole models even under ZeRO-3 (see whole_model_loading); DeepSpeed partitions them when training starts.
    with whole_model_loading():
        student, image_processor = load_student(model_args, names)

    def make_transforms(teacher_processor: Any | None) -> tuple[ImageClassificationTransform, ...]:
        common = {
            "image_column": data_args.image_column_name,
            "label_column": data_args.label_column_name,
            "skip_bad_images": data_args.skip_bad_images,
        }
        return (
            ImageClassificationTransform(
                image_processor, teacher_processor, train=True, crop_scale=(data_args.crop_scale_min, 1.0), **common
            ),
            ImageClassificationTransform(image_processor, teacher_processor, train=False, **common),
        )

    if model_args.teacher_model_name_or_path is not None:
        with whole_model_loading():
            teacher = load_model(
                model_args.teacher_model_name_or_path, "teacher", **hub_kwargs(model_args, student=False)
            )
        teacher_dir = model_args.teacher_model_name_or_path
        check_teacher_labels(teacher, names, teacher_dir)
        teacher_processor = load_teacher_image_processor(model_args, image_processor)
    else:
        teacher, teacher_dir = train_or_load_teacher(
            model_args, training_args, dataset, names, make_transforms(None), image_processor
        )
        teacher_processor = image_processor
    train_transform, eval_transform = make_transforms(teacher_processor)
    if train_transform.makes_teacher_inputs:
        logger.info("The teacher's image processor differs from the student's: each gets its own view of each image")
    if unlabeled is not None:
        # After the built-in teacher, which learns from the labelled images only.
        columns = [data_args.image_column_name, data_args.label_column_name]
        dataset["train"] = concatenate_datasets([dataset["train"].select_columns(columns), unlabeled])
        n_labelled = len(dataset["train"]) - len(unlabeled)
        logger.info(f"Training on {n_labelled} labelled and {len(unlabeled)} unlabelled images")

    trainer = UDKDTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=dataset["train"].with_transform(train_transform) if training_args.do_train else None,
        eval_dataset=dataset["validation"].with_transform(eval_transform) if training_args.do_eval else None,
        compute_metrics=compute_metrics_fn() if training_args.do_eval else None,
        processing_class=image_processor,
        data_collator=collate_image_classification,
    )
    return trainer, teacher_dir


def main(argv: list[str] | None = None) -> RunSummary:
    start = time.time()
    model_args, data_args, training_args = parse_arguments(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so info level here.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}"
    )

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")

    trainer, teacher_dir = build_trainer(model_args, data_args, training_args)

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    student_accuracy = teacher_accuracy = None
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        student_accuracy = metrics["eval_accuracy"]
        # The teacher on the same evaluation batches, in its own view; logged, so the model card lists it.
        teacher_metrics = trainer.evaluate_teacher()
        trainer.log_metrics("teacher_eval", teacher_metrics)
        trainer.save_metrics("teacher_eval", teacher_metrics)
        teacher_accuracy = teacher_metrics["teacher_eval_accuracy"]

    # Write the model card and (optionally) push to the Hub.
    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.dataset_name or ("animal-mnist" if data_args.uses_builtin_data else None),
        "tags": ["image-classification", "vision", "knowledge-distillation"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)

    summary = RunSummary(
        output_dir=training_args.output_dir,
        teacher_dir=teacher_dir,
        teacher_accuracy=teacher_accuracy,
        student_accuracy=student_accuracy,
        teacher_parameters=count_parameters(trainer.teacher.module),
        student_parameters=count_parameters(trainer.student),
        seconds=time.time() - start,
        trainer=trainer,
    )
    if trainer.is_world_process_zero():
        print("\n".join(summary.lines()))
    return summary


if __name__ == "__main__":
    main()
    # Each process waits for the others' last writes, then leaves the process group, as accelerate ends a script:
    # one that exits with the group still open while another writes can abort at exit.
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
