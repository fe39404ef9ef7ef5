"""Checkpoint files of a distillation run: the clean student, the UniKD heads, the FDP noise states, the stored
distillation options, and what makes a checkpoint complete.

``save_model()`` writes the student alone, in the format the Auto classes load (a raw timm student as transformers'
``TimmWrapperForImageClassification`` does). A checkpoint adds the heads (``udkd_heads.safetensors``), one
noise-generator state per process (``udkd_noise_<rank>.safetensors``) and, written last, ``udkd_checkpoint.json``:
the distillation options and the size of every file. It is written in ``_incomplete-checkpoint-N`` and renamed to
``checkpoint-N`` once complete, so an interrupted write never leaves a ``checkpoint-N`` behind. Every file is
safetensors or JSON; ``training_args.bin`` never holds the Hub token.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import tempfile

import torch
from huggingface_hub import metadata_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf
from torch import nn
from transformers import (
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, sort_checkpoints
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    VIDEO_PROCESSOR_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

from .config import UDKDTrainingArguments
from .heads import NoiseSource

logger = logging.get_logger(__name__)

HEADS_NAME = "udkd_heads.safetensors"
NOISE_STATE_NAME = "udkd_noise_{process}.safetensors"
NOISE_STATE_KEY = "state"
MANIFEST_NAME = "udkd_checkpoint.json"
TRAINING_ARGS_NAME = "training_args.bin"
STUDENT_PREFIX = "student."
# The prefix of a timm model's weights inside TimmWrapperForImageClassification.
TIMM_PREFIX = "timm_model."
# Names starting with "_" are skipped by the Trainer's pushes during training.
STAGING_PREFIX = "_incomplete-"
DELETING_PREFIX = "_deleting-"
# Options of the run itself, not of the method: a resume may change them.
RUNTIME_OPTIONS = frozenset({"teacher_dtype", "teacher_cache", "teacher_cache_dir"})

# The files a model folder publishes, which a save over another model's folder must not leave behind.
_MODEL_FILES = frozenset({
    CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
    "tf_model.h5", "tf_model.h5.index.json", "flax_model.msgpack", "flax_model.msgpack.index.json",
    ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, IMAGE_PROCESSOR_NAME, PROCESSOR_NAME,
    VIDEO_PROCESSOR_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", TRAINING_ARGS_NAME,
    HEADS_NAME,
})
_WEIGHT_SHARD = re.compile(r"(model|pytorch_model|tf_model|flax_model)-\d{5}-of-\d{5}\.(safetensors|bin|h5|msgpack)")
# The card and its plot: another model's card goes, a card create_model_card() wrote (tagged hf_udkd) stays.
_CARD_NAME, _PLOT_NAME = "README.md", "loss_terms.png"
_CARD_TAG = "hf_udkd"


def split_state(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The distiller's state as (student's own keys, the heads' keys)."""
    student = {k[len(STUDENT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}
    heads = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith(STUDENT_PREFIX)}
    return student, heads


# ---- the student ---------------------------------------------------------------------------------------------


def is_timm_model(model: nn.Module) -> bool:
    """A raw timm model (not wrapped by transformers), known by the ``pretrained_cfg`` every timm model has."""
    return not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "pretrained_cfg", None), dict)


def timm_wrapper_config(model: nn.Module, label_names: list[str]) -> TimmWrapperConfig:
    """The config with which ``TimmWrapperForImageClassification`` rebuilds the raw timm ``model``.

    timm's own exporter records the architecture, the arguments it was created with and its data config (which
    ``TimmWrapperImageProcessor`` reads). Its ``num_classes`` argument is dropped: TimmWrapper passes the number of
    labels itself, and a directory holding both does not load ("multiple values for keyword argument").
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, CONFIG_NAME)
        save_config_for_hf(model, path, model_config={"label_names": label_names})
        with open(path, encoding="utf-8") as f:
            exported = json.load(f)
    exported.get("model_args", {}).pop("num_classes", None)
    config = TimmWrapperConfig.from_dict(exported)
    config.architectures = [TimmWrapperForImageClassification.__name__]
    return config


def save_student(
    student: nn.Module, state: dict[str, torch.Tensor], output_dir: str, label_names: list[str] | None = None
) -> None:
    """Write the student in a format ``AutoModelForImageClassification`` and ``pipeline()`` load.

    transformers models through ``save_pretrained``; a raw timm model as ``TimmWrapperForImageClassification``
    (its config, weights under ``timm_model.``) with ``label_names`` (default ``LABEL_i``); any other module as
    its bare state dict.
    """
    if isinstance(student, PreTrainedModel):
        student.save_pretrained(output_dir, state_dict=state)
        return
    if is_timm_model(student):
        names = label_names or [f"LABEL_{i}" for i in range(student.num_classes)]
        timm_wrapper_config(student, names).save_pretrained(output_dir)
        state = {TIMM_PREFIX + k: v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(output_dir, SAFE_WEIGHTS_NAME),
              metadata={"format": "pt"})


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold NaN or inf."""
    return [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def refuse_non_finite_weights(state: dict[str, torch.Tensor], role: str, step: int, output_dir: str) -> None:
    """Refuse to save the ``role``'s weights (``state``) when any holds NaN or inf, at global step ``step``."""
    bad = non_finite(state)
    if bad:
        raise FloatingPointError(
            f"the {role}'s weights hold NaN or inf at step {step} ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}): nothing was saved to {output_dir}, and checkpoints written "
            "before are untouched. Lower the learning rate or use bf16 instead of fp16, and resume from the "
            "last checkpoint."
        )


def save_heads(state: dict[str, torch.Tensor], output_dir: str) -> None:
    if state:
        save_file(state, os.path.join(output_dir, HEADS_NAME), metadata={"format": "pt"})


def save_training_args(args: TrainingArguments, output_dir: str) -> None:
    """``training_args.bin`` for the Trainer's own resume checks, without the Hub token."""
    args = copy.copy(args)
    args.hub_token = None
    torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))


def load_student_and_heads(checkpoint: str, distiller: nn.Module) -> None:
    """Restore the student and the heads of ``distiller`` from ``checkpoint``."""
    student = distiller.student
    weight_files = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
    if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in weight_files):
        raise ValueError(f"no {SAFE_WEIGHTS_NAME} in {checkpoint}: not a checkpoint written by UDKDTrainer")
    if isinstance(student, PreTrainedModel):
        # save_pretrained writes the checkpoint format, whose parameter names can differ from the module's
        # (transformers v5 renames e.g. ViT's); from_pretrained maps them back.
        saved = type(student).from_pretrained(checkpoint, config=student.config, dtype=student.dtype,
                                             use_safetensors=True)
        student.load_state_dict(saved.state_dict())
    else:
        saved = _read_safetensors(os.path.join(checkpoint, SAFE_WEIGHTS_NAME), "the student's weights")
        student.load_state_dict({k.removeprefix(TIMM_PREFIX): v for k, v in saved.items()})
    _load_heads(os.path.join(checkpoint, HEADS_NAME), distiller)


def _read_safetensors(path: str, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} ({what}) cannot be read: {err}. The file is damaged (a write was interrupted?); resume from "
            "another checkpoint."
        ) from err


def _load_heads(path: str, distiller: nn.Module) -> None:
    has_heads = any(not k.startswith(STUDENT_PREFIX) for k in distiller.state_dict())
    if not os.path.isfile(path):
        if has_heads:
            raise ValueError(
                f"{path} is missing: the checkpoint holds no UniKD heads (fusion, FDP) for this run's options. "
                "Resume from a checkpoint written with use_fdp=True, or train without resuming."
            )
        return
    try:
        result = distiller.load_state_dict(_read_safetensors(path, "the UniKD heads"), strict=False)
    except RuntimeError as err:
        raise ValueError(
            f"{path} holds UniKD heads of other shapes than this run's: {err}. Resume with the options, student and "
            "teacher the checkpoint was written with."
        ) from err
    if result.unexpected_keys:
        raise ValueError(
            f"{path} holds heads of another configuration ({result.unexpected_keys[:3]}...): "
            "resume with the same distillation options"
        )


def save_noise_state(noise: NoiseSource, output_dir: str, process_index: int) -> None:
    """One file per process: ``state`` for a process on one device, ``state.<device>`` per device for
    several (``nn.DataParallel``)."""
    states = noise.get_states()
    if not states:
        return
    if len(states) == 1:
        tensors = {NOISE_STATE_KEY: next(iter(states.values())).cpu()}
    else:
        tensors = {f"{NOISE_STATE_KEY}.{device}": state.cpu() for device, state in states.items()}
    save_file(tensors, os.path.join(output_dir, NOISE_STATE_NAME.format(process=process_index)))


def load_noise_state(noise: NoiseSource, checkpoint: str, process_index: int) -> None:
    path = os.path.join(checkpoint, NOISE_STATE_NAME.format(process=process_index))
    if os.path.isfile(path):
        tensors = _read_safetensors(path, "the FDP noise state")
        noise.set_states({key.removeprefix(f"{NOISE_STATE_KEY}."): state for key, state in tensors.items()})


# ---- where a save may go ---------------------------------------------------------------------------------------


def source_folder(model: nn.Module) -> str | None:
    """The local folder ``model`` was loaded from, if any."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    return os.path.realpath(path) if path and os.path.isdir(path) else None


def refuse_teacher_folder(output_dir: str, teacher_folder: str | None) -> None:
    """Refuse a save into the teacher's folder or below it: it would overwrite or mix with the teacher."""
    if teacher_folder is None:
        return
    target = os.path.realpath(output_dir)
    if os.path.commonpath([target, teacher_folder]) == teacher_folder:
        raise ValueError(
            f"{output_dir} is inside the teacher's folder {teacher_folder} (where the teacher was loaded from): "
            "saving the student there would overwrite or mix with the teacher's files. Choose an output_dir (or a "
            "save_model() directory) outside it."
        )


def remove_stale_model_files(output_dir: str) -> list[str]:
    """Delete the model files in ``output_dir`` before the student is written there, so that nothing of another
    model is left to be loaded or published (its weight shards, image processor, card...). Other files and every
    folder stay. Returns the names deleted."""
    if not os.path.isdir(output_dir):
        return []
    card = os.path.join(output_dir, _CARD_NAME)
    stale = [name for name in os.listdir(output_dir)
             if os.path.isfile(os.path.join(output_dir, name))
             and (name in _MODEL_FILES or _WEIGHT_SHARD.fullmatch(name))]
    if os.path.isfile(card) and _CARD_TAG not in (metadata_load(card) or {}).get("tags", []):
        stale += [name for name in (_CARD_NAME, _PLOT_NAME) if os.path.isfile(os.path.join(output_dir, name))]
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    if stale:
        logger.warning(f"Removed another model's files from {output_dir} before saving the student there: {stale}")
    return stale


# ---- options -----------------------------------------------------------------------------------------------


def distillation_options(args: UDKDTrainingArguments) -> dict:
    """Every UniKD option that shapes the heads or the loss, as JSON values."""
    own = {f.name for f in dataclasses.fields(TrainingArguments)}
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
               if f.name not in own and f.name not in RUNTIME_OPTIONS}
    return json.loads(json.dumps(options))


def _differences(stored: dict, current: dict) -> list[str]:
    return [f"{name}: {stored.get(name, '(not stored)')!r} -> {current.get(name, '(unset)')!r}"
            for name in sorted(set(stored) | set(current)) if stored.get(name) != current.get(name)]


# ---- complete checkpoints ------------------------------------------------------------------------------------


def folder_for(run_dir: str, step: int) -> str:
    """The ``checkpoint-N`` folder of global step ``step`` in ``run_dir``, as transformers names it."""
    return os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def writes_folders(args: TrainingArguments) -> bool:
    """Whether this process writes the saved files and creates, completes and rotates the checkpoint folders: one
    per machine. `should_save` alone can hold on every process of a machine (DeepSpeed on CPU, whose processes
    accelerate counts as one), which would then race to write, clean and rename the same folder."""
    return args.should_save and int(os.environ.get("LOCAL_RANK", "0")) == 0


def staging_folder(folder: str) -> str:
    """Where ``folder`` (``.../checkpoint-N``) is written before it is complete."""
    parent, name = os.path.split(folder)
    return os.path.join(parent, STAGING_PREFIX + name)


def prepare_staging(run_dir: str, staging: str) -> None:
    """An empty ``staging`` folder; leftovers of interrupted writes in ``run_dir`` are removed."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith((STAGING_PREFIX, DELETING_PREFIX)):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    os.makedirs(staging)


def _file_sizes(folder: str) -> dict[str, int]:
    """The size of every file resuming reads: all but ``training_args.bin``, which is written for people, never
    read back, and left out of the checkpoints pushed to the Hub."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name != TRAINING_ARGS_NAME:
                sizes[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    return sizes


def publish(staging: str, folder: str, options: dict) -> None:
    """Record the options and the files of the complete ``staging``, then rename it to ``folder``."""
    manifest = {"options": options, "files": _file_sizes(staging)}
    with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    if os.path.isdir(folder):
        # Rewriting a step (a resume from an earlier checkpoint): the old folder goes by renames, each atomic.
        old = os.path.join(os.path.dirname(folder), DELETING_PREFIX + os.path.basename(folder))
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)


def update_best_checkpoint(state: TrainerState, args: TrainingArguments, run_dir: str, folder: str) -> None:
    """`state.best_model_checkpoint` under its final name, as `Trainer._save_checkpoint` sets it."""
    strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
    if args.save_strategy in strategies and state.best_global_step:
        best = folder_for(run_dir, state.best_global_step)
        if best == folder or os.path.isdir(best):
            state.best_model_checkpoint = best


def save_trainer_state(state: TrainerState, callbacks: list, output_dir: str) -> None:
    """`trainer_state.json` with the state of every stateful callback (and the control) in ``callbacks``, as
    `Trainer._save_checkpoint` writes it."""
    for callback in callbacks:
        if not isinstance(callback, ExportableState):
            continue
        name, callback_state = type(callback).__name__, callback.state()
        if isinstance(state.stateful_callbacks[name], list):
            state.stateful_callbacks[name].append(callback_state)
        else:
            state.stateful_callbacks[name] = callback_state
    state.save_to_json(os.path.join(output_dir, TRAINER_STATE_NAME))


def read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def incomplete_reason(folder: str) -> str | None:
    """Why ``folder`` is not a complete UDKDTrainer checkpoint, or None when it is."""
    manifest = read_manifest(folder)
    if manifest is None:
        return (f"it has no readable {MANIFEST_NAME}, which UDKDTrainer writes last: the write was interrupted, "
                "or another trainer wrote it")
    sizes = _file_sizes(folder)
    for name, size in sorted(manifest["files"].items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != size:
            return f"{name} has {sizes[name]} bytes instead of {size} (truncated or changed)"
    return None


def checkpoints(run_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``run_dir``, by step."""
    return sort_checkpoints(run_dir, use_mtime=False) if os.path.isdir(run_dir) else []


def last_complete(run_dir: str) -> str:
    """The complete checkpoint of ``run_dir`` with the highest step; incomplete ones are skipped with a warning."""
    skipped = []
    for folder in reversed(checkpoints(run_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            for name, why in skipped:
                logger.warning(f"Skipping the incomplete checkpoint {name} ({why}); resuming from {folder}")
            return folder
        skipped.append((os.path.basename(folder), reason))
    found = "; ".join(f"{name}: {why}" for name, why in skipped) or "none at all"
    raise ValueError(
        f"resume_from_checkpoint=True found no complete checkpoint in {run_dir} ({found}). Train without "
        "resuming, or pass the path of a complete checkpoint."
    )


def check_resumable(folder: str, options: dict) -> None:
    """Refuse an incomplete checkpoint, or one written with other distillation options."""
    folder = os.path.normpath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"resume_from_checkpoint={folder!r} is not a folder")
    reason = incomplete_reason(folder)
    if reason is not None:
        others = [path for path in checkpoints(os.path.dirname(folder)) if incomplete_reason(path) is None]
        hint = f"the latest complete one is {others[-1]}" if others else "there is no complete one beside it"
        raise ValueError(
            f"cannot resume from {folder}: {reason}. Resume from a complete checkpoint ({hint}); "
            "resume_from_checkpoint=True takes the latest complete one."
        )
    changed = _differences(read_manifest(folder).get("options", {}), options)
    if changed:
        raise ValueError(
            f"cannot resume from {folder}: it was written with other distillation options ({'; '.join(changed)}, "
            "as stored -> as given). Resume with the stored options, or train without resuming."
        )


def resume_folder(resume_from_checkpoint: str | bool | None, args: UDKDTrainingArguments) -> str | bool | None:
    """What `train()` resumes from: `True` becomes the latest complete checkpoint of `output_dir`; a folder is
    refused before anything is loaded when incomplete or written with other distillation options."""
    if resume_from_checkpoint is True:
        resume_from_checkpoint = last_complete(args.output_dir)
    if resume_from_checkpoint:
        check_resumable(resume_from_checkpoint, distillation_options(args))
    return resume_from_checkpoint


def rotate(run_dir: str, limit: int | None, keep: list[str | None]) -> None:
    """Delete the oldest checkpoints beyond ``limit``, never those in ``keep`` (the newest, the best). Each is
    renamed before it is deleted, so an interrupted deletion leaves no damaged ``checkpoint-N``."""
    if not limit or limit <= 0:
        return
    protected = {os.path.realpath(path) for path in keep if path is not None}
    folders = checkpoints(run_dir)
    excess = len(folders) - max(limit, len(protected))
    for folder in folders:
        if excess <= 0:
            break
        if os.path.realpath(folder) in protected:
            continue
        logger.info(f"Deleting older checkpoint [{folder}] due to args.save_total_limit")
        doomed = os.path.join(run_dir, DELETING_PREFIX + os.path.basename(folder))
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        excess -= 1
