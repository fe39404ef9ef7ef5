"""hf_udkd: Unified Knowledge Distillation (UniKD) for Hugging Face and timm image classifiers."""

from .config import UDKDTrainingArguments
from .modeling import DistillationModel, DistillationOutput
from .taps import FeatureTap, StageInfo
from .teacher import whole_model_loading
from .trainer import UDKDTrainer

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
