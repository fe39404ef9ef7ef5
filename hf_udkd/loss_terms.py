"""`LossTermLog`: the UniKD loss terms summed over steps for logging, and the record of non-finite steps."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .modeling import LOSS_TERMS


def batch_mean(value: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A loss term's mean over the batch. ``nn.DataParallel`` (several GPUs, one process) gathers each replica's
    mean into a (replicas,) vector; the replicas held the batch's chunks, so their means are weighted by size."""
    value = value.detach().float()
    if value.dim() == 0:
        return value
    chunk_sizes = [len(chunk) for chunk in torch.arange(batch_size).chunk(value.numel())]
    weights = torch.tensor(chunk_sizes, dtype=value.dtype, device=value.device)
    return (value * weights).sum() / batch_size


def _raise_if_not_finite(values: dict[str, torch.Tensor], when: str) -> None:
    bad = [name for name, value in values.items() if not torch.isfinite(torch.as_tensor(value)).all()]
    if bad:
        raise FloatingPointError(
            f"non-finite UniKD loss term(s) {bad} in {when}. Check the inputs and the teacher; in training, "
            "lower the learning rate or use bf16 instead of fp16."
        )


class LossTermLog:
    """Each loss term summed on the device per split (``"train"``, ``"eval"``) between logging steps, and, for
    training, the first and last step in which each term was not finite. Nothing here syncs with the host
    except the checks and the reduction, which the trainer calls at logging steps and before saves."""

    def __init__(self) -> None:
        # Per split: each term's sum over the examples seen, and their "count".
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        # (len(LOSS_TERMS), 2) on the device: first and last global step in which each term was not finite.
        self._non_finite_steps: torch.Tensor | None = None
        self._checked_finite = False

    def add(self, outputs, batch_size: int, split: str, step: int) -> None:
        """Sum each term of ``outputs`` (a `DistillationOutput`) for ``split``; ``step`` is the global step being
        taken, recorded when a training term is not finite."""
        sums = self.sums.setdefault(split, {})
        for name in LOSS_TERMS:
            value = getattr(outputs, name)
            if value is not None:
                sums[name] = sums.get(name, 0.0) + batch_mean(value, batch_size) * batch_size
        sums["count"] = sums.get("count", 0) + batch_size
        if split == "train":
            self._mark_non_finite_steps(outputs, step)
            if not self._checked_finite:
                # One early check catches a broken set-up (wrong dtype, bad teacher) at step 1, not at logging.
                self._checked_finite = True
                self.raise_if_non_finite()

    def _mark_non_finite_steps(self, outputs, step: int) -> None:
        """Record, on the device (no host sync), the first and last step in which each term was not finite."""
        device = outputs.loss.device
        bad = torch.stack([
            ~torch.isfinite(term.detach()).all() if term is not None else torch.zeros((), dtype=torch.bool, device=device)
            for term in (getattr(outputs, name) for name in LOSS_TERMS)
        ])
        if self._non_finite_steps is None:
            never = torch.tensor([torch.iinfo(torch.int64).max, -1], device=device)
            self._non_finite_steps = never.repeat(len(LOSS_TERMS), 1)
        first, last = self._non_finite_steps.unbind(-1)
        self._non_finite_steps = torch.stack([torch.where(bad, first.clamp(max=step), first),
                                              torch.where(bad, step, last)], dim=-1)

    def raise_if_non_finite(self) -> None:
        """Raise if a loss term was not finite in any step on any process so far: at logging and before saves."""
        if self._non_finite_steps is None:
            return
        first, last = self._non_finite_steps.unbind(-1)
        # Negated, the first step reduces by max like the last: one collective. torch.distributed directly, since
        # accelerate reduces by sum or mean only.
        extremes = torch.stack([-first, last])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
        first, last = (-extremes[0]).tolist(), extremes[1].tolist()
        bad = [f"{name} in step {a}" if a == b else f"{name} in steps {a}-{b}"
               for name, a, b in zip(LOSS_TERMS, first, last, strict=True) if b >= 0]
        if bad:
            raise FloatingPointError(
                f"non-finite UniKD loss term(s): {', '.join(bad)}. Nothing from these steps is saved: checkpoints "
                "written before them are untouched. Lower the learning rate, check the inputs, or use bf16 instead "
                "of fp16; a term going bad alone points at its weight (w_logit, w_feat, w_supp) or at the teacher."
            )

    def reduce(self, split: str, device: torch.device, accelerator: Accelerator, step: int) -> dict[str, float]:
        """Mean of each term of ``split`` since the last reduction, over all processes; clears the sums. ``step``
        (the global step) names when, should a mean not be finite."""
        sums = self.sums.pop(split, None)
        if not sums:
            return {}
        names = [name for name in LOSS_TERMS if name in sums]
        local = torch.stack([torch.as_tensor(sums[n], device=device, dtype=torch.float32) for n in names])
        count = torch.tensor([float(sums["count"])], device=device)
        total = accelerator.reduce(torch.cat([local, count]), reduction="sum")
        means = {name: total[i] / total[-1] for i, name in enumerate(names)}
        _raise_if_not_finite(means, f"the {split} steps up to global step {step}")
        return {name: round(value.item(), 4) for name, value in means.items()}

    def clear(self, split: str) -> None:
        """Drop the sums of ``split`` (an evaluation starts afresh)."""
        self.sums.pop(split, None)
