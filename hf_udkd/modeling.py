"""`DistillationModel`: the student and the trainable UniKD heads in one module.

The Trainer trains, wraps (DDP/FSDP/DeepSpeed) and checkpoints this module, so the heads are optimised
with the student and every head parameter is used inside the wrapped forward. The whole loss is computed
in `forward`, from the student's own output and the teacher's (logits, pooled tap) passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .config import UDKDTrainingArguments
from .constants import IGNORE_INDEX
from .heads import AdaptiveFeatureFusion, FeatureDistributionHead, NoiseSource
from .losses import cross_entropy, dkd_loss, gaussian_kl, kd_terms
from .taps import FeatureTap, StageInfo, logits_of

LOSS_TERMS = ("loss_ce", "loss_logit", "loss_feat", "loss_supp")


@dataclass
class DistillationOutput(ModelOutput):
    """``loss`` (the weighted sum), ``logits`` (B, K) of the student and each unweighted term."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_ce: torch.Tensor | None = None
    loss_logit: torch.Tensor | None = None
    loss_feat: torch.Tensor | None = None
    loss_supp: torch.Tensor | None = None


class DistillationModel(nn.Module):
    """Student + AFF + FDP_s + FDP_t. ``forward`` returns the student's logits and the UniKD loss.

    Args:
        student: the image classifier being trained.
        student_tap: which student stages to fuse (from :meth:`FeatureTap.from_probe`).
        teacher_stage: shape of the teacher tap that FDP_t reads and the AFF's output matches; None
            trains the student alone with cross-entropy (the scratch baseline).
        args: the method's options.
    """

    # The loss is a per-batch mean: the Trainer then neither passes num_items_in_batch nor scales the loss
    # by the number of processes, and divides it by the gradient-accumulation steps itself.
    accepts_loss_kwargs = False
    main_input_name = "pixel_values"

    def __init__(
        self,
        student: nn.Module,
        student_tap: FeatureTap,
        teacher_stage: StageInfo | None,
        args: UDKDTrainingArguments,
    ):
        super().__init__()
        self.student = student
        self.student_tap = student_tap
        # Built alone (UDKDTrainer resolves it from the training set first): as for labelled data.
        args.resolve_loss_options(unlabelled=False)
        self.args = args
        self.noise = NoiseSource(args.seed)
        self.fusion: AdaptiveFeatureFusion | None = None
        self.fdp_student: FeatureDistributionHead | None = None
        self.fdp_teacher: FeatureDistributionHead | None = None
        self.uses_teacher = teacher_stage is not None
        if teacher_stage is None or not args.use_fdp:
            return
        num_labels = student_tap.num_labels
        stages = student_tap.stages
        if args.use_aff:
            # The pooled deepest stage is the deepest level of the fusion (METHOD.md §1).
            in_channels = [s.channels for s in stages] + [stages[-1].channels]
            self.fusion = AdaptiveFeatureFusion(
                in_channels,
                args.aff_channels,
                teacher_stage.channels,
                (teacher_stage.height, teacher_stage.width),
                batch_norm=args.aff_batch_norm,
                init=args.aff_init,
            )
            student_channels = teacher_stage.channels
        else:
            student_channels = stages[-1].channels
        self.fdp_student = FeatureDistributionHead(student_channels, num_labels)
        self.fdp_teacher = FeatureDistributionHead(teacher_stage.channels, num_labels)

    @property
    def config(self):
        """The student's config, for the parts of the Trainer that read ``model.config``."""
        return self.student.config

    @property
    def _no_split_modules(self) -> list[str]:
        """The student's blocks, which FSDP's transformer-based wrap policy shards one by one (accelerate reads
        this from the wrapped model); only those present, since accelerate fails on a name it cannot find."""
        names = getattr(self.student, "_no_split_modules", None) or []
        present = {type(module).__name__ for module in self.student.modules()}
        return [name for name in names if name in present]

    def _student_feature(self, stages: list[torch.Tensor]) -> torch.Tensor:
        if self.fusion is None:
            return stages[-1]
        pooled = stages[-1].mean(dim=(-2, -1), keepdim=True)
        return self.fusion([*stages, pooled])

    def _sample(self, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        return self.noise.sample(mu, log_var) if self.training else mu

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
        logit_weight: float = 1.0,
    ) -> DistillationOutput:
        """
        Args:
            pixel_values: (B, 3, H, W) student input.
            labels: (B,) class indices, ``-100`` for an unlabelled example (distillation terms only). Without
                labels and without teacher outputs only the logits are returned (prediction); without labels
                but with teacher outputs every example is unlabelled.
            teacher_logits: (B, K) teacher logits, no gradient.
            teacher_features: (B, C_T) pooled teacher tap, no gradient.
            logit_weight: a schedule factor on ``loss_logit`` (DKD's warm-up).
        """
        args = self.args
        # DeepSpeed's bf16/fp16 modes cast the module itself instead of autocasting: its inputs must follow.
        # Under autocast the parameters stay float32 and these are no-ops.
        pixel_values = pixel_values.to(next(self.student.parameters()).dtype)
        if teacher_features is not None and self.fdp_teacher is not None:
            teacher_features = teacher_features.to(self.fdp_teacher.mu.weight.dtype)
        needs_loss = labels is not None or teacher_logits is not None
        if self.fdp_student is not None and needs_loss:
            tapped = self.student_tap(self.student, pixel_values)
            logits, stages = tapped.logits, tapped.stages
        else:
            logits, stages = logits_of(self.student(pixel_values)), None
        if not needs_loss:
            return DistillationOutput(logits=logits)
        if labels is None:
            labels = torch.full(logits.shape[:1], IGNORE_INDEX, dtype=torch.long, device=logits.device)

        loss_ce = cross_entropy(logits, labels, args.label_smoothing_factor)
        if not self.uses_teacher:
            # w_ce weighs CE against the distillation terms; alone, the loss is CE (the scratch baseline).
            return DistillationOutput(loss=loss_ce, logits=logits, loss_ce=loss_ce)
        loss = args.w_ce * loss_ce
        if teacher_logits is None:
            raise ValueError("the distiller needs teacher_logits with labels; UDKDTrainer passes them")
        terms = self._distillation_terms(logits, stages, labels, teacher_logits, teacher_features, logit_weight)
        loss = loss + args.w_logit * terms["loss_logit"]
        if stages is not None:
            loss = loss + args.w_feat * terms["loss_feat"] + args.w_supp * terms["loss_supp"]
        return DistillationOutput(loss=loss, logits=logits, loss_ce=loss_ce, **terms)

    def _distillation_terms(
        self,
        logits: torch.Tensor,
        stages: list[torch.Tensor] | None,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_features: torch.Tensor | None,
        logit_weight: float,
    ) -> dict[str, torch.Tensor]:
        """The unweighted ``loss_logit`` and, with FDP (``stages`` given), ``loss_feat`` and ``loss_supp``."""
        args = self.args
        # Every softmax-KL term of the step, as (pulled, target, temperature), computed together by kd_terms.
        kl_pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        if args.logit_loss == "kd":
            kl_pairs["logit"] = (logits, teacher_logits, args.temperature)
        if stages is not None:
            mu_s, log_var_s = self.fdp_student(self._student_feature(stages))
            mu_t, log_var_t = self.fdp_teacher(teacher_features)
            z_s, z_t = self._sample(mu_s, log_var_s), self._sample(mu_t, log_var_t)

            def target(x: torch.Tensor) -> torch.Tensor:
                return x.detach() if args.detach_targets else x

            feature_temperature = (
                args.temperature if args.feature_temperature is None else args.feature_temperature
            )
            if args.feature_kl == "sampled":
                kl_pairs["feat"] = (z_s, target(z_t), feature_temperature)
            kl_pairs["supp_student"] = (z_s, target(logits), feature_temperature)
            kl_pairs["supp_teacher"] = (z_t, teacher_logits, feature_temperature)
        kl = dict(zip(kl_pairs, kd_terms(list(kl_pairs.values()), args.logit_standardization), strict=True))

        if args.logit_loss == "dkd":
            terms = {"loss_logit": logit_weight * dkd_loss(
                logits, teacher_logits, labels, args.temperature, args.dkd_alpha, args.dkd_beta,
                args.logit_standardization,
            )}
        else:
            terms = {"loss_logit": kl["logit"]}
        if stages is None:
            return terms
        if args.feature_kl == "gaussian":
            terms["loss_feat"] = gaussian_kl(mu_s, log_var_s, target(mu_t), target(log_var_t))
        else:
            terms["loss_feat"] = kl["feat"]
        terms["loss_supp"] = kl["supp_student"] + kl["supp_teacher"]
        return terms
