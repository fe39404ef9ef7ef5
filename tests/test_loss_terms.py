"""LossTermLog: sums of the loss terms per split, and the steps in which a training term was not finite."""

import pytest
import torch

from hf_udkd.loss_terms import LossTermLog, batch_mean
from hf_udkd.modeling import DistillationOutput


def outputs(loss_ce: float, loss_logit: float | None = None) -> DistillationOutput:
    terms = {"loss_ce": torch.tensor(loss_ce)}
    if loss_logit is not None:
        terms["loss_logit"] = torch.tensor(loss_logit)
    return DistillationOutput(loss=sum(terms.values()), **terms)


def test_batch_mean_weights_data_parallel_replicas_by_their_chunk():
    assert batch_mean(torch.tensor(2.5), 4).item() == 2.5
    # A batch of 5 on two replicas: chunks of 3 and 2 examples.
    assert batch_mean(torch.tensor([1.0, 6.0]), 5).item() == pytest.approx((3 * 1.0 + 2 * 6.0) / 5)


def test_first_training_step_is_checked_at_once():
    log = LossTermLog()
    with pytest.raises(FloatingPointError, match="non-finite UniKD loss term\\(s\\): loss_logit in step 1\\."):
        log.add(outputs(1.0, float("nan")), 2, "train", step=1)


def test_later_non_finite_steps_are_named_as_a_range_when_checked():
    log = LossTermLog()
    log.add(outputs(1.0, 0.5), 2, "train", step=1)
    log.add(outputs(1.0, float("inf")), 2, "train", step=2)
    log.add(outputs(1.0, 0.5), 2, "train", step=3)
    log.add(outputs(float("nan"), float("inf")), 2, "train", step=4)
    # Evaluation terms are not training steps: nothing is recorded for them.
    log.add(outputs(float("nan")), 2, "eval", step=9)
    with pytest.raises(FloatingPointError, match="loss_ce in step 4, loss_logit in steps 2-4\\. Nothing"):
        log.raise_if_non_finite()


def test_sums_per_split_and_clear():
    log = LossTermLog()
    log.add(outputs(1.0, 0.5), 2, "train", step=1)
    log.add(outputs(3.0), 4, "eval", step=1)
    assert set(log.sums["train"]) == {"loss_ce", "loss_logit", "count"}
    assert log.sums["train"]["count"] == 2 and log.sums["eval"]["loss_ce"].item() == 12.0
    log.clear("eval")
    assert "eval" not in log.sums and "train" in log.sums
    log.raise_if_non_finite()
