"""hf_udkd: Unified Knowledge Distillation (UniKD) for Hugging Face and timm image classifiers."""

from .config import UDKDTrainingArguments
from .modeling import DistillationModel, DistillationOutput
from .taps import FeatureTap, StageInfo
from .trainer import UDKDTrainer, whole_model_loading

__version__ = "0.1.0"

__all__ = [
    "DistillationModel",
    "DistillationOutput",
    "FeatureTap",
    "StageInfo",
    "UDKDTrainer",
    "UDKDTrainingArguments",
    "whole_model_loading",
]
