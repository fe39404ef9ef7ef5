"""Checkpoint files of a distillation run: the clean student, the UniKD heads, the FDP noise states.

``save_model()`` writes the student alone, in the format the Auto classes load. A checkpoint adds the heads
(``udkd_heads.safetensors``) and one noise-generator state per process (``udkd_noise_<rank>.safetensors``),
which resuming needs. Every file is safetensors or JSON; ``training_args.bin`` never holds the Hub token.
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, TrainingArguments
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from .heads import NoiseSource

logger = logging.get_logger(__name__)

HEADS_NAME = "udkd_heads.safetensors"
NOISE_STATE_NAME = "udkd_noise_{process}.safetensors"
NOISE_STATE_KEY = "state"
TRAINING_ARGS_NAME = "training_args.bin"
STUDENT_PREFIX = "student."


def split_state(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The distiller's state as (student's own keys, the heads' keys)."""
    student = {k[len(STUDENT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}
    heads = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith(STUDENT_PREFIX)}
    return student, heads


def save_student(student: nn.Module, state: dict[str, torch.Tensor], output_dir: str) -> None:
    """Write the student in standard format: ``save_pretrained`` for transformers models."""
    if isinstance(student, PreTrainedModel):
        student.save_pretrained(output_dir, state_dict=state)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(output_dir, SAFE_WEIGHTS_NAME),
                  metadata={"format": "pt"})


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
        student.load_state_dict(load_file(os.path.join(checkpoint, SAFE_WEIGHTS_NAME)))
    heads_file = os.path.join(checkpoint, HEADS_NAME)
    has_heads = any(not k.startswith(STUDENT_PREFIX) for k in distiller.state_dict())
    if os.path.isfile(heads_file):
        result = distiller.load_state_dict(load_file(heads_file), strict=False)
        if result.unexpected_keys:
            raise ValueError(
                f"{heads_file} holds heads of another configuration ({result.unexpected_keys[:3]}...): "
                "resume with the same distillation options"
            )
    elif has_heads:
        logger.warning(f"{checkpoint} has no {HEADS_NAME}: the UniKD heads start from scratch")


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
        tensors = load_file(path)
        noise.set_states({key.removeprefix(f"{NOISE_STATE_KEY}."): state for key, state in tensors.items()})
