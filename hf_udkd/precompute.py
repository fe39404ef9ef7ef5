"""Fill the teacher store before training, with the example script's arguments.

    python -m hf_udkd.precompute --teacher_cache --teacher_cache_views 4 --teacher_cache_dir store [ARGS]
    accelerate launch -m hf_udkd.precompute --teacher_cache ... [ARGS]       # sharded over the processes
    python examples/run_image_classification_udkd.py --teacher_cache ... [ARGS]  # then reads the store

``ARGS`` are those of ``examples/run_image_classification_udkd.py`` (data, models, every
``UDKDTrainingArguments`` option). The script's own ``build_trainer`` builds the teacher, the training set and its
random transform (training the built-in teacher first when none is named, as the script would), and
:meth:`UDKDTrainer.precompute_teacher_outputs` fills every (example, view) row. A training run of the script with the
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

from accelerate import PartialState
from transformers.utils import logging

from .teacher_store import TeacherStore, describe

logger = logging.get_logger(__name__)

EXAMPLE_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "run_image_classification_udkd.py"


def load_example(path: str | os.PathLike = EXAMPLE_SCRIPT) -> ModuleType:
    """The example script as a module, for its argument parsing and its ``build_trainer``."""
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


def main(argv: list[str] | None = None) -> TeacherStore:
    std_logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=std_logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    script = EXAMPLE_SCRIPT
    if "--example_script" in argv:
        at = argv.index("--example_script")
        script, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    example = load_example(script)
    model_args, data_args, training_args = example.parse_arguments(argv)
    if not training_args.teacher_cache:
        raise ValueError("precompute fills the teacher store: pass --teacher_cache (and --teacher_cache_dir, so that "
                         "the training run finds it)")
    if training_args.teacher_cache_dir is None:
        logger.warning("No --teacher_cache_dir: the store is filled in memory and lost when this process ends")
    # The trainer of a training run, on its training set, whatever --do_train/--do_eval say; it never evaluates.
    training_args.do_train, training_args.do_eval, training_args.eval_strategy = True, False, "no"
    trainer, _ = example.build_trainer(model_args, data_args, training_args)
    store = trainer.precompute_teacher_outputs()
    if trainer.is_world_process_zero():
        logger.info(describe(store))
    return store


if __name__ == "__main__":
    main()
    # As the example script ends: each process waits for the others' last writes, then leaves the process group.
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
