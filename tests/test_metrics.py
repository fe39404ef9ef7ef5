"""Tests for hf_udkd.metrics: the offline top-1 accuracy metric."""

from __future__ import annotations

import evaluate
import numpy as np

from hf_udkd.metrics import ACCURACY_PATH, Accuracy, load_accuracy


def test_accuracy_loads_offline_from_its_path_and_matches_numpy():
    rng = np.random.default_rng(0)
    references = rng.integers(0, 10, size=500)
    predictions = np.where(rng.random(500) < 0.7, references, rng.integers(0, 10, size=500))

    result = evaluate.load(ACCURACY_PATH, keep_in_memory=True).compute(
        predictions=predictions, references=references
    )

    assert set(result) == {"accuracy"}
    assert isinstance(result["accuracy"], float)
    assert result["accuracy"] == np.mean(predictions == references)


def test_load_accuracy_helper_accumulates_batches():
    metric = load_accuracy()
    metric.add_batch(predictions=[0, 1, 2], references=[0, 1, 1])
    metric.add_batch(predictions=[3], references=[3])
    assert metric.compute() == {"accuracy": 0.75}


def test_accuracy_class_matches_hub_options():
    metric = Accuracy()
    assert metric.compute(predictions=[0, 1, 2], references=[0, 1, 1], normalize=False) == {"accuracy": 2.0}
    assert metric.compute(predictions=[0, 1, 2], references=[0, 1, 1], sample_weight=[1, 1, 2]) == {
        "accuracy": 0.5
    }
