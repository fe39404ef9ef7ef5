"""The frozen teacher: loading, label checks, placement and dtype, the ZeRO-3 inference engine, and its forward.

The Trainer never optimises, wraps or saves the teacher. It is frozen once, placed on the training device in
its own dtype (or partitioned in a ZeRO-3 inference engine of its own), and every forward runs it in eval
mode, whatever user code did to it in between.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageClassification
from transformers.utils import logging

from .config import UDKDTrainingArguments
from .taps import FeatureTap, uncompiled

logger = logging.get_logger(__name__)


def load_model(model: str | nn.Module, role: str, **kwargs: Any) -> nn.Module:
    """``model`` itself, or the image classifier at the Hub id or path ``model`` (safetensors only); ``kwargs`` go
    to ``from_pretrained``."""
    if isinstance(model, nn.Module):
        return model
    logger.info(f"Loading the {role} from {model}")
    try:
        return AutoModelForImageClassification.from_pretrained(model, use_safetensors=True, **kwargs)
    except OSError as e:
        raise OSError(
            f"the {role} {model} was not found: give a local directory with config.json and model.safetensors, "
            "or a Hub id"
        ) from e


def label_names(model: nn.Module) -> list[str] | None:
    """Class names in index order, or None where the config only has transformers' LABEL_i placeholders."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label:
        return None
    names = [str(id2label[i]) for i in sorted(id2label)]
    if names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def check_same_labels(student: nn.Module, teacher: nn.Module, student_k: int, teacher_k: int) -> None:
    """Refuse a pair whose label sets differ in size or order: their logits could not be compared."""
    if student_k != teacher_k:
        raise ValueError(
            f"the teacher has {teacher_k} labels and the student {student_k}: distillation needs one label set "
            "in one order. Load the student with the teacher's labels, e.g. from_pretrained(..., "
            "num_labels=teacher.config.num_labels, id2label=teacher.config.id2label, "
            "label2id=teacher.config.label2id, ignore_mismatched_sizes=True)."
        )
    student_names, teacher_names = label_names(student), label_names(teacher)
    if student_names is not None and teacher_names is not None and student_names != teacher_names:
        diff = [(i, s, t) for i, (s, t) in enumerate(zip(student_names, teacher_names, strict=True)) if s != t]
        raise ValueError(
            f"the teacher's and the student's id2label differ at (index, student, teacher) {diff[:5]}: the "
            "logits would be compared class against a different class. Give the student the teacher's "
            "id2label/label2id (or re-map the dataset labels) before distilling."
        )


def whole_weights(model: nn.Module) -> contextlib.AbstractContextManager:
    """Gathers the weights of a model partitioned by DeepSpeed ZeRO-3 (made after the arguments) for a probe."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


@contextlib.contextmanager
def whole_model_loading() -> Iterator[None]:
    """Models built or loaded inside this block have whole weights, even when ZeRO-3 arguments exist.

    Once a ZeRO-3 configuration is active, transformers partitions every model as it is created
    (``deepspeed.zero.Init``), and its weight initialisation then fails for composite models such as
    ``ResNetForImageClassification`` ("Fan in and fan out can not be computed for tensor with fewer than 2
    dimensions"; huggingface/transformers PR 47297). UDKDTrainer does not need models partitioned at creation:
    DeepSpeed partitions the student when training starts and the teacher in its own inference engine.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def _deepspeed_half_dtype(deepspeed_config: dict) -> torch.dtype:
    """The dtype DeepSpeed casts a module it wraps to."""
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if deepspeed_config.get(name, {}).get("enabled") is True:
            return dtype
    return torch.float32


class Teacher:
    """The frozen teacher module and the one tapped layer that FDP_t reads.

    Args:
        module: the teacher image classifier.
        tap: a tap of exactly one layer (the chosen ``teacher_stage``).
    """

    def __init__(self, module: nn.Module, tap: FeatureTap):
        self.module = module
        self.tap = tap
        self.engine = None

    @classmethod
    def from_probe(
        cls, module: nn.Module, pixel_values: torch.Tensor, layers: list[str] | None, stage_index: int
    ) -> Teacher:
        """Probe ``module``'s candidate ``layers`` on ``pixel_values`` and keep the ``stage_index``-th."""
        with whole_weights(module):
            tap = FeatureTap.from_probe(module, pixel_values, layers, role="teacher")
        try:
            stage = tap.stages[stage_index]
        except IndexError:
            raise ValueError(
                f"teacher_stage={stage_index} but the teacher has {len(tap.stages)} tapped layers "
                f"({tap.describe()})"
            ) from None
        # Only the chosen stage is read from the teacher at train time.
        return cls(module, FeatureTap([stage.layer], [stage], tap.num_labels))

    @property
    def stage(self):
        """The :class:`StageInfo` of the tapped layer."""
        return self.tap.stages[0]

    @property
    def num_labels(self) -> int:
        return self.tap.num_labels

    def prepare(self, accelerator, args: UDKDTrainingArguments, deepspeed_plugin=None) -> nn.Module:
        """Freeze the teacher and place it for inference; returns the module that runs (the public teacher)."""
        loaded_dtype = next(self.module.parameters()).dtype
        self.module.eval().requires_grad_(False)
        if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
            self._check_zero3_dtype(args, deepspeed_plugin.deepspeed_config)
            self.module = self._zero3_engine(deepspeed_plugin.deepspeed_config).module
            return self.module
        # accelerate does not place models under FSDP; the teacher is not sharded there, each device holds it.
        self.module.to(device=args.device, dtype=args.resolved_teacher_dtype(loaded_dtype))
        prepared = accelerator.prepare_model(self.module, evaluation_mode=True)
        # accelerate wraps forward in the training's autocast; outputs() runs it in the teacher's dtype instead.
        # Under torch_compile the teacher runs compiled; the public teacher is the module itself.
        self.module = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        return uncompiled(self.module)

    @staticmethod
    def _check_zero3_dtype(args: UDKDTrainingArguments, deepspeed_config: dict) -> None:
        """DeepSpeed casts every module it partitions to its own half type: an explicit other dtype can't hold."""
        engine_dtype = _deepspeed_half_dtype(deepspeed_config)
        if args.teacher_dtype != "auto" and args.resolved_teacher_dtype(engine_dtype) != engine_dtype:
            raise ValueError(
                f"teacher_dtype={args.teacher_dtype!r} cannot be honoured under DeepSpeed ZeRO-3: DeepSpeed runs "
                f"the partitioned teacher in its own dtype ({str(engine_dtype).removeprefix('torch.')}, from the "
                "DeepSpeed config's bf16/fp16 sections). Leave teacher_dtype='auto', or use ZeRO-2, DDP or FSDP, "
                "where the teacher runs in the dtype you ask for."
            )

    def _zero3_engine(self, deepspeed_config: dict):
        """The teacher in its own ZeRO-3 inference engine, its weights partitioned like the student's (as TRL's
        ``prepare_deepspeed`` does); ZeRO-3's hooks gather its weights per forward."""
        import deepspeed

        config = copy.deepcopy(deepspeed_config)
        # A frozen model needs no optimizer; the batch size and bucket sizes left at "auto" take DeepSpeed's defaults.
        for key in ("optimizer", "scheduler", "train_batch_size"):
            config.pop(key, None)
        config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if v != "auto"}
        self.engine, *_ = deepspeed.initialize(model=self.module, config=config)
        self.engine.eval()
        return self.engine

    def outputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits (B, K) and pooled tap (B, C_T), float32, as normal (not inference) tensors."""
        # User code may have called teacher.train() (or on a submodule): BatchNorm statistics would then drift
        # while distilling. Setting eval mode walks the modules once, microseconds against the forward.
        self.module.eval()
        dtype = next(self.module.parameters()).dtype
        # A float32 teacher runs in float32 even when the student trains under bf16/fp16 autocast.
        autocast = torch.autocast(pixel_values.device.type, dtype=dtype, enabled=dtype != torch.float32)
        with torch.inference_mode(), autocast:
            tapped = self.tap(self.module, pixel_values.to(dtype))
            logits, pooled = tapped.logits, tapped.stages[0].mean(dim=(-2, -1))
        # Tensors made in inference mode cannot be saved for backward, and FDP_t learns on `pooled`.
        return logits.float().clone(), pooled.float().clone()
