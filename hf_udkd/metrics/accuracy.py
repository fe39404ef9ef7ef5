"""Top-1 accuracy as an ``evaluate`` metric that works offline.

A drop-in for the Hub's ``"accuracy"`` metric, which ``evaluate.load("accuracy")`` cannot fetch offline.
Load it with ``evaluate.load(<path to this file>)`` (see :func:`hf_udkd.metrics.load_accuracy`) or use
:class:`Accuracy` directly::

    >>> Accuracy().compute(predictions=[0, 1, 2], references=[0, 1, 1])
    {'accuracy': 0.6666666666666666}

``evaluate.load`` imports this file on its own, outside the package: it may import only third-party
modules, and it must define exactly one ``evaluate.EvaluationModule`` subclass at module level (the
loader takes the first one it finds, so ``evaluate.Metric`` itself must not be imported by name).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN). Predictions and references are class ids.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, shape `(N,)`.
    references (`list` of `int`): true class ids, shape `(N,)`.
    normalize (`bool`): if `False`, return the (weighted) number of correct predictions instead of
        their share. Defaults to `True`.
    sample_weight (`list` of `float`): per-example weights. Defaults to `None` (all 1).

Returns:
    accuracy (`float`): in [0, 1] if `normalize` is `True`, a count otherwise.

Examples:
    >>> accuracy = evaluate.load("hf_udkd/metrics/accuracy.py")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 accuracy of predicted class ids, with the Hub "accuracy" metric's inputs and output."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, float]:
        correct = np.asarray(predictions) == np.asarray(references)
        weights = (
            np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        )
        score = np.average(correct, weights=weights) if normalize else np.dot(correct, weights)
        return {"accuracy": float(score)}
