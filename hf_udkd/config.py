"""`UDKDTrainingArguments`: the Trainer's arguments plus UniKD's options (METHOD.md)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

# The weights of the loss terms, and DKD's weights of its two parts.
_LOSS_WEIGHTS = ("w_ce", "w_logit", "w_feat", "w_supp", "dkd_alpha", "dkd_beta")
_TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class UDKDTrainingArguments(TrainingArguments):
    r"""
    Configuration class for [`UDKDTrainer`]: every [`~transformers.TrainingArguments`] field, plus the options
    of Unified Knowledge Distillation (UniKD). The defaults are the best measured so far (see `benchmarks/`).

    Parameters:
        temperature (`float`, *optional*, defaults to `4.0`):
            Softmax temperature T of every KL term (T = 1 is used for ImageNet-scale runs).
        w_ce (`float`, *optional*):
            Weight of the cross-entropy term `loss_ce`, the mean over the labelled examples of the batch (labels
            `-100` are unlabelled and get the distillation terms only; 0 when a batch has none), against the
            distillation terms; without a teacher the loss is the cross-entropy itself. It uses the Trainer's
            `label_smoothing_factor`. Default: `0.1` when logit standardization is on with `logit_loss="kd"` (Sun
            et al.'s weights), else `1.0` (UniKD's published weights). transformers' distillation guide's
            `(1 - lambda_param) * CE + lambda_param * KD` is `w_ce = 1 - lambda_param`, `w_logit = lambda_param`.
        w_logit (`float`, *optional*):
            Weight of the logit distillation term `loss_logit`. Default: `9.0` when logit standardization is on with
            `logit_loss="kd"` (standardized logits over T are flat, so their KL is small), else `1.0`.
        w_feat (`float`, *optional*, defaults to `1.0`):
            Weight of the feature-distribution term `loss_feat`, KL(z_s <- z_t).
        w_supp (`float`, *optional*, defaults to `1.0`):
            Weight of the supplementary term `loss_supp`, KL(z_s <- s) + KL(z_t <- t).
        logit_loss (`str`, *optional*, defaults to `"kd"`):
            `"kd"` (Hinton) or `"dkd"` (Decoupled KD, `dkd_alpha` * TCKD + `dkd_beta` * NCKD, linear warm-up).
            DKD needs each example's true class: an unlabelled example (`-100`, or a batch without labels) uses
            the teacher's prediction instead.
        dkd_alpha (`float`, *optional*, defaults to `1.0`):
            DKD's weight of the target-class term (TCKD).
        dkd_beta (`float`, *optional*, defaults to `8.0`):
            DKD's weight of the non-target-class term (NCKD).
        dkd_warmup_ratio (`float`, *optional*, defaults to `20/240`):
            Share of the training steps over which the DKD term ramps up linearly from 0 (the paper's 20 of 240
            epochs), used unless `dkd_warmup_epochs` is set.
        dkd_warmup_epochs (`float`, *optional*):
            Epochs over which the DKD term ramps up linearly from 0, instead of `dkd_warmup_ratio`.
        logit_standardization (`bool`, *optional*):
            Z-score each logit vector per example, `(x - mean) / std`, before the temperature softmax of every KL
            term (KD, DKD, the feature and supplementary terms), teacher and student alike (Sun et al., CVPR
            2024): the student need not match the teacher's logit scale. `None` (the default) lets
            [`UDKDTrainer`] choose from the training set, as the accuracy study measured best: on when it holds
            unlabelled examples (label `-100` or no `labels`), off when every example is labelled (or when its
            labels cannot be read before training, as for an iterable data set). It comes with its own loss
            weights (see `w_ce`, `w_logit`): with CE and KD at 1 it cost 9-13 points in the study.
        feature_temperature (`float`, *optional*):
            Temperature of the feature and supplementary KL terms; `None` uses `temperature` (the development
            code's DKD variant uses 1).
        feature_kl (`str`, *optional*, defaults to `"sampled"`):
            `"sampled"`: softmax KL between sampled z_s and z_t; `"gaussian"`: closed-form KL between the two
            predicted diagonal Gaussians.
        detach_targets (`bool`, *optional*, defaults to `True`):
            Stop gradients through the target side of every KL term (z_t in `loss_feat`, s in `loss_supp`).
        use_fdp (`bool`, *optional*, defaults to `True`):
            Feature Distribution Prediction. `False` gives plain logit KD (CE + `w_logit` * KD).
        use_aff (`bool`, *optional*, defaults to `True`):
            Adaptive Feature Fusion. `False` puts FDP_s on the last student stage instead.
        aff_channels (`int`, *optional*, defaults to `64`):
            Fusion width M of the AFF, its main cost; chosen by the accuracy study and the benchmarks.
        aff_batch_norm (`bool`, *optional*, defaults to `False`):
            BatchNorm after the AFF's 1x1 convs (ReviewKD's original).
        aff_init (`str`, *optional*, defaults to `"default"`):
            The AFF's initialisation: `"default"` (PyTorch's, convs with biases) or `"kaiming"` (the development
            code's: Kaiming-uniform with a=1, the 1x1 and output convs without bias).
        student_layers (`list[str]`, *optional*):
            Student layers to fuse, shallow to deep: indices into the model's feature list (`hidden_states`
            for transformers models, `forward_intermediates` for timm) or submodule names (tapped with hooks).
            Default: the last map at each of the 4 deepest resolutions (4 evenly spaced layers for ViTs).
        teacher_layers (`list[str]`, *optional*):
            The teacher's candidate layers, in the same form; default chosen by the same rule.
        teacher_stage (`int`, *optional*, defaults to `-1`):
            Which of the teacher's layers FDP_t reads: `-1` the last (default), `0` the first.
        teacher_dtype (`str`, *optional*, defaults to `"auto"`):
            The teacher's dtype: `"auto"` (bfloat16/float16 when `bf16`/`fp16` is set, else as loaded),
            `"float32"`, `"bfloat16"` or `"float16"`.
        teacher_cache (`bool`, *optional*, defaults to `False`):
            Store the teacher's outputs (logits and pooled tap) per training example and view, and skip the teacher
            for what is stored. Views replay the training transform (random augmentation included) from seeds, so
            that epoch `e` shows view `e mod teacher_cache_views`; a transform or collator that cannot replay is
            refused at start. Size: examples x views x (K + C_T) numbers. Evaluation always runs the teacher.
        teacher_cache_views (`int`, *optional*, defaults to `1`):
            V, the number of distinct augmented views of each example (1 for a deterministic transform).
        teacher_cache_dtype (`str`, *optional*, defaults to `"float32"`):
            What the store holds its numbers in: `"float32"` (a store-fed run gives the losses of the run that
            filled it) or `"float16"` (half the size).
        teacher_cache_dir (`str`, *optional*):
            Where the teacher store lives: `None` in memory, else safetensors shards (one per process) and a
            fingerprint in this directory, reused by later runs with the same teacher, data, transform and views.
    """

    temperature: float = field(default=4.0, metadata={"help": "Softmax temperature T of every KL term."})
    # None: chosen with logit_standardization (the weights that were measured with it), see resolve_loss_options.
    w_ce: float | None = field(
        default=None,
        metadata={"help": "Weight of the cross-entropy term (mean over the labelled examples). Default: 0.1 with "
                          "logit_standardization and logit_loss kd, else 1."},
    )
    w_logit: float | None = field(
        default=None,
        metadata={"help": "Weight of the logit distillation term. Default: 9 with logit_standardization and "
                          "logit_loss kd, else 1."},
    )
    w_feat: float = field(default=1.0, metadata={"help": "Weight of the feature-distribution KL term."})
    w_supp: float = field(default=1.0, metadata={"help": "Weight of the supplementary KL terms."})
    logit_loss: str = field(
        default="kd", metadata={"help": "Logit distillation loss.", "choices": ["kd", "dkd"]}
    )
    dkd_alpha: float = field(default=1.0, metadata={"help": "DKD's weight of the target-class term (TCKD)."})
    dkd_beta: float = field(default=8.0, metadata={"help": "DKD's weight of the non-target-class term (NCKD)."})
    dkd_warmup_ratio: float = field(
        default=20 / 240,
        metadata={"help": "Share of the training steps over which the DKD term ramps up linearly from 0."},
    )
    dkd_warmup_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs over which the DKD term ramps up from 0, instead of dkd_warmup_ratio."},
    )
    logit_standardization: bool | None = field(
        default=None,
        metadata={"help": "Z-score every logit vector before the temperature softmax of each KL term. Default: "
                          "on when the training set holds unlabelled examples, else off."},
    )
    feature_temperature: float | None = field(
        default=None,
        metadata={"help": "Temperature of the feature and supplementary KL terms; None uses temperature."},
    )
    feature_kl: str = field(
        default="sampled",
        metadata={"help": "KL between feature distributions.", "choices": ["sampled", "gaussian"]},
    )
    detach_targets: bool = field(
        default=True, metadata={"help": "Stop gradients through the target side of every KL term."}
    )
    use_fdp: bool = field(
        default=True, metadata={"help": "Feature Distribution Prediction; False gives plain logit KD."}
    )
    use_aff: bool = field(
        default=True, metadata={"help": "Adaptive Feature Fusion; False puts FDP_s on the last student stage."}
    )
    aff_channels: int = field(default=64, metadata={"help": "Fusion width M of the AFF (its main cost)."})
    aff_batch_norm: bool = field(default=False, metadata={"help": "BatchNorm after the AFF's 1x1 convs."})
    aff_init: str = field(
        default="default",
        metadata={"help": "AFF initialisation: PyTorch's or the development code's.",
                  "choices": ["default", "kaiming"]},
    )
    student_layers: list[str] | None = field(
        default=None,
        metadata={"help": "Student layers to fuse: feature-list indices or submodule names. Default: automatic."},
    )
    teacher_layers: list[str] | None = field(
        default=None,
        metadata={"help": "Teacher candidate layers: feature-list indices or submodule names. Default: automatic."},
    )
    teacher_stage: int = field(
        default=-1, metadata={"help": "Which teacher layer FDP_t reads: -1 the last, 0 the first."}
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "Teacher dtype.", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    teacher_cache: bool = field(
        default=False,
        metadata={"help": "Store the teacher's outputs per training example and view; skip the teacher for them."},
    )
    teacher_cache_views: int = field(
        default=1, metadata={"help": "Distinct augmented views per example in the teacher store (epoch mod V)."}
    )
    teacher_cache_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the teacher store.", "choices": ["float32", "float16"]},
    )
    teacher_cache_dir: str | None = field(
        default=None, metadata={"help": "Directory of the teacher store (safetensors shards); None keeps it in memory."}
    )
    # The heads are used in every step, so DDP need not search for unused parameters (it is slow).
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Passed to DistributedDataParallel; UniKD uses every parameter."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.logit_loss not in ("kd", "dkd"):
            raise ValueError(f"logit_loss={self.logit_loss!r}: use 'kd' or 'dkd'")
        if self.logit_standardization is not None:
            self.resolve_loss_options(unlabelled=self.logit_standardization)
        if self.feature_kl not in ("sampled", "gaussian"):
            raise ValueError(f"feature_kl={self.feature_kl!r}: use 'sampled' or 'gaussian'")
        if self.teacher_dtype != "auto" and self.teacher_dtype not in _TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}: use 'auto' or one of {list(_TEACHER_DTYPES)}")
        for name in ("temperature", "feature_temperature"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value}: a softmax temperature must be a finite positive number (e.g. 4)")
        for name in _LOSS_WEIGHTS:
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"{name}={value}: loss weights must be finite and non-negative. Use 0 to switch the term off "
                    "(use_fdp=False drops the feature terms and their heads altogether)."
                )
        if not 0 <= self.dkd_warmup_ratio <= 1:
            raise ValueError(
                f"dkd_warmup_ratio={self.dkd_warmup_ratio}: a share of the run, between 0 (no warm-up) and 1"
            )
        epochs = self.dkd_warmup_epochs
        if epochs is not None and not (math.isfinite(epochs) and epochs >= 0):
            raise ValueError(
                f"dkd_warmup_epochs={epochs}: use a non-negative number of epochs, or None to "
                "warm up over dkd_warmup_ratio of the run"
            )
        if self.aff_init not in ("default", "kaiming"):
            raise ValueError(f"aff_init={self.aff_init!r}: use 'default' or 'kaiming'")
        if self.aff_channels < 1:
            raise ValueError(f"aff_channels must be at least 1, got {self.aff_channels}")
        if self.teacher_cache_views < 1:
            raise ValueError(f"teacher_cache_views must be at least 1, got {self.teacher_cache_views}")
        if self.teacher_cache_dtype not in ("float32", "float16"):
            raise ValueError(f"teacher_cache_dtype={self.teacher_cache_dtype!r}: use 'float32' or 'float16'")
        if self.teacher_cache_dir is not None and not self.teacher_cache:
            raise ValueError("teacher_cache_dir is set but teacher_cache is False: set teacher_cache=True to use it")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world_size == 1 and not self.deepspeed:
            # accelerate finds no GPU for them and runs every process alone, all writing one output_dir.
            raise ValueError(
                f"{launched} processes were launched (WORLD_SIZE={launched}) but each would train alone on all the "
                "data: there is no GPU for them. Pass --use_cpu (use_cpu=True) to train them together on the CPU, "
                "or launch one process."
            )

    def resolve_loss_options(self, unlabelled: bool) -> None:
        """Fix what was left to choose: `logit_standardization=None` to `unlabelled` (whether the training set
        holds unlabelled examples), then `w_ce`/`w_logit` left at None to the weights measured with that choice."""
        if self.logit_standardization is None:
            self.logit_standardization = unlabelled
        sun_weights = self.logit_standardization and self.logit_loss == "kd"
        if self.w_ce is None:
            self.w_ce = 0.1 if sun_weights else 1.0
        if self.w_logit is None:
            self.w_logit = 9.0 if sun_weights else 1.0

    def resolved_teacher_dtype(self, loaded: torch.dtype) -> torch.dtype:
        """The dtype the teacher runs in, given the dtype it was loaded in."""
        if self.teacher_dtype != "auto":
            return _TEACHER_DTYPES[self.teacher_dtype]
        if self.bf16:
            return torch.bfloat16
        if self.fp16:
            return torch.float16
        return loaded
