"""Evaluation metrics shipped with the package, so that evaluation works offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

from .accuracy import Accuracy

__all__ = ["Accuracy", "load_accuracy", "ACCURACY_PATH"]

ACCURACY_PATH = str(Path(__file__).with_name("accuracy.py"))


def load_accuracy(**kwargs: Any) -> evaluate.EvaluationModule:
    """Return the package's top-1 accuracy metric through ``evaluate.load``, without network access.

    Keyword arguments go to ``evaluate.load``. ``keep_in_memory`` defaults to ``True``: the inputs are
    small, and it spares the cache files and their locks that concurrent processes would contend for.
    """
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(ACCURACY_PATH, **kwargs)
