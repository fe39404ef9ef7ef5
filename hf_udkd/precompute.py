"""Fill the teacher store before training, with the example script's arguments.

    python -m hf_udkd.precompute --teacher_cache --teacher_cache_views 4 --teacher_cache_dir store [ARGS]
    accelerate launch -m hf_udkd.precompute --teacher_cache ... [ARGS]       # sharded over the processes
    python examples/run_image_classification_udkd.py --teacher_cache ... [ARGS]  # then reads the store

``ARGS`` are those of ``examples/run_image_classification_udkd.py`` (data, models, every
``UDKDTrainingArguments`` option). This builds the teacher, the training set and its random transform exactly as
the script does (training the built-in teacher first when none is named, as the script would), and fills every
(example, view) row with :meth:`UDKDTrainer.precompute_teacher_outputs`. A training run of the script with the
same arguments (any student, any optimiser settings) finds a full store with its fingerprint and never runs the
teacher in training. The script is read from the source checkout (``--example_script`` names another copy).
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys
from pathlib import Path
from types import ModuleType

import datasets
import transformers
from transformers.utils import logging

from .image_processing import ImageClassificationTransform, collate_image_classification
from .teacher import load_model, whole_model_loading
from .teacher_store import TeacherStore, describe
from .trainer import UDKDTrainer

logger = logging.get_logger(__name__)

EXAMPLE_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "run_image_classification_udkd.py"


def load_example(path: str | os.PathLike = EXAMPLE_SCRIPT) -> ModuleType:
    """The example script as a module, for its argument dataclasses and data and model loading."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"python -m hf_udkd.precompute takes the arguments of the example script, which is not at {path}: run "
            "it from a source checkout of hf_udkd, pass --example_script PATH, or call "
            "trainer.precompute_teacher_outputs() in your own training script."
        )
    spec = importlib.util.spec_from_file_location("run_image_classification_udkd", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve their string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_trainer(example: ModuleType, argv: list[str]) -> UDKDTrainer:
    """The UDKDTrainer the example script would train with, on its training set (no evaluation set).

    The steps are those of the script's ``main()`` up to its trainer, through the script's own functions; a
    training set or teacher that came out differently would not match the store's fingerprint and be refused.
    """
    model_args, data_args, training_args = example.parse_arguments(argv)
    if not training_args.teacher_cache:
        raise ValueError("precompute fills the teacher store: pass --teacher_cache (and --teacher_cache_dir, so that "
                         "the training run finds it)")
    if training_args.teacher_cache_dir is None:
        logger.warning("No --teacher_cache_dir: the store is filled in memory and lost when this process ends")
    # As in the script: the transforms read the image column. This trainer never evaluates.
    training_args.remove_unused_columns = False
    training_args.eval_strategy = "no"
    transformers.set_seed(training_args.seed)
    dataset = example.load_image_dataset(data_args, model_args, training_args.seed)
    if "train" not in dataset:
        raise ValueError("the teacher store is filled on the training split, and the data set has none")
    label_feature = dataset["train"].features[data_args.label_column_name]
    names = label_feature.names
    unlabeled = example.load_unlabeled_images(data_args, model_args, label_feature)
    if data_args.max_train_samples is not None:
        dataset["train"] = dataset["train"].shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
    with whole_model_loading():
        student, image_processor = example.load_student(model_args, names)

    def transforms(teacher_processor) -> tuple[ImageClassificationTransform, ImageClassificationTransform]:
        common = {"image_column": data_args.image_column_name, "label_column": data_args.label_column_name,
                  "skip_bad_images": data_args.skip_bad_images}
        return (
            ImageClassificationTransform(image_processor, teacher_processor, train=True,
                                         crop_scale=(data_args.crop_scale_min, 1.0), **common),
            ImageClassificationTransform(image_processor, teacher_processor, train=False, **common),
        )

    if model_args.teacher_model_name_or_path is not None:
        with whole_model_loading():
            teacher = load_model(model_args.teacher_model_name_or_path, "teacher",
                                 **example.hub_kwargs(model_args, student=False))
        example.check_teacher_labels(teacher, names, model_args.teacher_model_name_or_path)
        teacher_processor = example.load_teacher_image_processor(model_args, image_processor)
    else:
        teacher, _ = example.train_or_load_teacher(
            model_args, training_args, dataset, names, transforms(None), image_processor
        )
        teacher_processor = image_processor
    if unlabeled is not None:
        columns = [data_args.image_column_name, data_args.label_column_name]
        dataset["train"] = datasets.concatenate_datasets([dataset["train"].select_columns(columns), unlabeled])
    return UDKDTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=dataset["train"].with_transform(transforms(teacher_processor)[0]),
        processing_class=image_processor,
        data_collator=collate_image_classification,
    )


def main(argv: list[str] | None = None) -> TeacherStore:
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    script = EXAMPLE_SCRIPT
    if "--example_script" in argv:
        at = argv.index("--example_script")
        script, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    trainer = build_trainer(load_example(script), argv)
    store = trainer.precompute_teacher_outputs()
    if trainer.is_world_process_zero():
        logger.info(describe(store))
    return store


if __name__ == "__main__":
    main()
