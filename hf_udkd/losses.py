"""UniKD's loss terms (METHOD.md §4). All inputs are (B, K) logits or Gaussian parameters; all outputs scalars.

Every term is computed in float32 whatever the autocast dtype, since softmax-KL in half precision loses the
small differences that distillation lives on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .constants import IGNORE_INDEX


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each logit vector over its last dimension, ``(x - mean) / std`` (Sun et al., CVPR 2024).

    As in the authors' code: unbiased std, ``eps`` added to it, so that a constant vector stays finite.
    """
    return (logits - logits.mean(-1, keepdim=True)) / (logits.std(-1, keepdim=True) + eps)


def _prepare(logits: torch.Tensor, temperature: float, standardized: bool) -> torch.Tensor:
    logits = logits.float()
    return (standardize(logits) if standardized else logits) / temperature


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the labelled examples (``labels != -100``); exactly 0 when there are none.

    Divided by the labelled count clamped to 1 on the device, so neither a host sync nor a NaN.
    """
    summed = F.cross_entropy(
        logits.float(), labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
    )
    return summed / (labels != IGNORE_INDEX).sum().clamp_min(1)


def kd_terms(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor, float]], standardized: bool = False
) -> list[torch.Tensor]:
    """Several KD terms at once: one scalar :func:`kd_loss` per ``(pulled, target, temperature)`` triple.

    The pairs, all (B, K), are stacked and go through one softmax-KL pass per distinct temperature, so the
    terms of a step cost a few kernels instead of a few per term (the step's small kernels, not its
    arithmetic, set UniKD's overhead on a GPU). The grouping depends on the configuration only.
    """
    terms: list[torch.Tensor | None] = [None] * len(pairs)
    for temperature in dict.fromkeys(t for _, _, t in pairs):
        members = [i for i, (_, _, t) in enumerate(pairs) if t == temperature]
        # (2N, B, K): the N pulled sides, then the N targets.
        both = torch.stack([pairs[i][0] for i in members] + [pairs[i][1] for i in members])
        log_pulled, log_target = F.log_softmax(_prepare(both, temperature, standardized), dim=-1).chunk(2)
        # KL(target || pulled) summed over K, averaged over B (F.kl_div's "batchmean"), times T^2: one reduction.
        scale = temperature**2 / both.shape[1]
        values = (log_target.exp() * (log_target - log_pulled)).sum(dim=(-2, -1)) * scale
        for i, value in zip(members, values.unbind(), strict=True):
            terms[i] = value
    return terms


def kd_loss(
    pulled: torch.Tensor, target: torch.Tensor, temperature: float, standardized: bool = False
) -> torch.Tensor:
    """Hinton's KD, ``T^2 * mean_batch KL(softmax(target / T) || softmax(pulled / T))``.

    ``pulled`` is the side that learns, ``target`` the side it is pulled toward; ``standardized`` z-scores
    both before the temperature (logit standardization).
    """
    return kd_terms([(pulled, target, temperature)], standardized)[0]


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float = 1.0,
    beta: float = 8.0,
    standardized: bool = False,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD distills the binary target-vs-rest split, NCKD the distribution over the non-target classes. An
    unlabelled example (``-100``) takes the teacher's prediction as its target class (METHOD.md §6).
    """
    labels = torch.where(labels == IGNORE_INDEX, teacher.argmax(-1), labels)
    student = _prepare(student, temperature, standardized)
    teacher = _prepare(teacher, temperature, standardized)
    target_mask = F.one_hot(labels, student.shape[-1]).bool()

    def binary(logits: torch.Tensor) -> torch.Tensor:
        p = F.softmax(logits, dim=-1)
        p_target = (p * target_mask).sum(-1, keepdim=True)
        return torch.cat([p_target, 1.0 - p_target], dim=-1).clamp_min(1e-12)

    p_s, p_t = binary(student), binary(teacher)
    tckd = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    # Masking the target class with a large negative logit leaves the softmax over the other classes.
    masked_s = student.masked_fill(target_mask, -1e4)
    masked_t = teacher.masked_fill(target_mask, -1e4)
    nckd = F.kl_div(
        F.log_softmax(masked_s, -1), F.log_softmax(masked_t, -1), reduction="batchmean", log_target=True
    )
    return (alpha * tckd + beta * nckd) * temperature**2


def gaussian_kl(
    mu_s: torch.Tensor, log_var_s: torch.Tensor, mu_t: torch.Tensor, log_var_t: torch.Tensor
) -> torch.Tensor:
    """Closed-form ``KL(N(mu_s, sigma_s^2) || N(mu_t, sigma_t^2))`` for diagonal Gaussians.

    Summed over the K dimensions, averaged over the batch.
    """
    mu_s, log_var_s, mu_t, log_var_t = (x.float() for x in (mu_s, log_var_s, mu_t, log_var_t))
    kl = 0.5 * (log_var_t - log_var_s) + (log_var_s.exp() + (mu_s - mu_t) ** 2) / (2 * log_var_t.exp()) - 0.5
    return kl.sum(-1).mean()
