"""The published form of a distilled student: its model card, its loss plot and the files pushed to the Hub.

[`record_for`] collects a [`DistillationRecord`] from the trainer, for `UDKDTrainer.create_model_card`; everything
else here works on that record and on plain values, so the card can be built and tested without a trainer.

What a push sends is listed here, file by file, never a folder as it is: [`student_files`] (config, weights,
image processor, card, plot) at the repository's root, and for ``hub_strategy="checkpoint"`` /
``"all_checkpoints"`` the [`checkpoint_files`] that resuming needs. [`commit_files`] commits exactly such a list.

The card is rendered with `huggingface_hub.ModelCard.from_template` from `model_card_template.md`, shipped in
this package (the copy under `model_cards/` in the repository is the same file, checked by the tests).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypedDict, Unpack

from huggingface_hub import CommitInfo, CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.modelcard import extract_hyperparameters_from_trainer
from transformers.utils import (
    CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    logging,
)

from .checkpoint import TRAINING_ARGS_NAME, is_timm_model
from .config import UDKDTrainingArguments

logger = logging.get_logger(__name__)

TEMPLATE_NAME = "model_card_template.md"
CARD_NAME = "README.md"
PLOT_NAME = "loss_terms.png"
TAGS = ["hf_udkd", "knowledge-distillation", "unikd", "image-classification"]
PIPELINE_TAG = "image-classification"
PAPER = "arXiv:2409.18565"
# Keys of an evaluation's metrics that are timings or loss terms, not quality metrics.
_NOT_METRICS = (
    "runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "jit_compilation_time"
)
# Train-log keys drawn in the plot, total loss first.
PLOTTED_TERMS = ("loss", "loss_ce", "loss_logit", "loss_feat", "loss_supp")
# The model-index needs a dataset name to list results; this one stands for data that has none.
DEFAULT_DATASET_NAME = "custom"
# Builders of `datasets` that read local files: their name says nothing about the data (as in transformers).
_FILE_BUILDERS = ("arrow", "audiofolder", "csv", "generator", "imagefolder", "json", "pandas", "parquet", "text",
                  "webdataset")
# A snapshot in the Hub cache: .../models--{org}--{name}/snapshots/{commit}[/...].
_HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/[0-9a-f]{40}(?:/|$)")


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub repository that ``name_or_path`` names (``org/name``, or a snapshot of it in the Hub cache, as
    ``from_pretrained(snapshot_download(...))`` leaves it), None for another local path or an empty name.

    A directory that exists locally is local even when it looks like an id: from_pretrained reads it first.
    """
    if not name_or_path:
        return None
    snapshot = _HUB_CACHE_SNAPSHOT.search(Path(name_or_path).as_posix())
    if snapshot is not None:
        return snapshot["repo"].replace("--", "/")
    if os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def origin(model: nn.Module) -> str | None:
    """Where ``model`` was loaded from: ``config.name_or_path`` (transformers) or timm's ``hf_hub_id``."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "name_or_path", None):
        return str(config.name_or_path)
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return pretrained_cfg.get("hf_hub_id")


def display_name(model: nn.Module) -> str:
    """A short public name: the Hub id, else the local directory's name (never the full local path), else
    the class name."""
    where = origin(model)
    if hub_id(where):
        return where
    if where:
        return Path(where).name or type(model).__name__
    return type(model).__name__


def count_parameters(model: nn.Module) -> int:
    """All parameters of ``model``, also when DeepSpeed ZeRO-3 holds only this process's partition of each."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def quality_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{name: value}`` of the numeric quality metrics in an evaluation's output (``eval_accuracy`` ->
    ``accuracy``), without timings, the loss and the loss terms."""
    out = {}
    for key, value in metrics.items():
        if not key.startswith(f"{prefix}_") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key[len(prefix) + 1 :]
        if name.startswith("loss") or name in _NOT_METRICS or name == "epoch":
            continue
        out[name] = float(value)
    return out


def dataset_name(dataset: Any) -> str:
    """A name for the model-index: a `datasets.Dataset`'s own name or builder (not a file reader such as
    ``parquet``), else [`DEFAULT_DATASET_NAME`]."""
    info = getattr(dataset, "info", None)
    for name in (getattr(info, "dataset_name", None), getattr(info, "builder_name", None)):
        if name and name not in _FILE_BUILDERS:
            return str(name)
    return DEFAULT_DATASET_NAME


def last_metrics(log_history: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """The quality metrics of the latest logged evaluation with ``prefix`` (``eval``, ``teacher_eval``)."""
    for entry in reversed(log_history):
        metrics = quality_metrics(entry, prefix)
        if metrics:
            return metrics
    return {}


@dataclass
class DistillationRecord:
    """What the card says, gathered from a trainer after training.

    Attributes:
        model_name: the student's name (the Hub repository's name).
        repo_id: the repository the student is pushed to, for the loading snippet.
        library_name: the library that loads the student (``transformers``), None when none does as such.
        student_architecture / teacher_architecture: class names.
        student_origin: the student's starting checkpoint if it is a Hub id (becomes ``base_model``).
        teacher_name: the teacher's public name (Hub id or local directory name); None without a teacher.
        teacher_origin: where the teacher was loaded from; linked when it is a Hub id.
        student_parameters / teacher_parameters: parameter counts.
        distillation: the method's settings (metadata field ``distillation`` and a table in the body).
        hyperparameters: the training hyperparameters.
        student_metrics / teacher_metrics: ``{"accuracy": 0.93}`` on the evaluation set.
        log_history: ``trainer.state.log_history``, for the plot.
        dataset_tags: Hub dataset ids (metadata ``datasets``); dataset_names: their pretty names.
        dataset_split / dataset_config: the split and configuration the metrics were computed on.
        license / language / extra_tags: passed through to the metadata.
        framework_versions: ``{"hf_udkd": "0.1.0", ...}``.
    """

    model_name: str
    repo_id: str
    student_architecture: str
    student_parameters: int
    student_origin: str | None = None
    library_name: str | None = None
    teacher_name: str | None = None
    teacher_origin: str | None = None
    teacher_architecture: str | None = None
    teacher_parameters: int | None = None
    distillation: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    student_metrics: dict[str, float] = field(default_factory=dict)
    teacher_metrics: dict[str, float] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    dataset_tags: list[str] = field(default_factory=list)
    dataset_names: list[str] = field(default_factory=list)
    dataset_split: str | None = None
    dataset_config: str | None = None
    license: str | None = None
    language: str | list[str] | None = None
    extra_tags: list[str] = field(default_factory=list)
    framework_versions: dict[str, str] = field(default_factory=dict)


def plot_loss_terms(log_history: list[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Draw each logged train loss term against the step into a PNG at ``path``.

    Uses a bare matplotlib ``Figure`` (Agg canvas) rather than pyplot, so the caller's backend (a notebook's,
    say) is left alone. Returns False, writing nothing, when the history holds no train loss.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [entry for entry in log_history if "loss" in entry and "step" in entry]
    if not train:
        return False
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for term in PLOTTED_TERMS:
        points = [(entry["step"], entry[term]) for entry in train if term in entry]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="." if len(points) < 30 else None, label=term,
                      linewidth=2.0 if term == "loss" else 1.2)
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if evals:
        steps, values = zip(*evals, strict=True)
        axes.plot(steps, values, linestyle="--", marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (unweighted terms)")
    axes.set_title("UniKD loss terms over training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True


def _card_data(record: DistillationRecord) -> ModelCardData:
    """The metadata: Hub fields, the teacher and the method as their own fields, and the model-index."""
    eval_results = None
    if record.student_metrics and record.dataset_names:
        dataset_type = record.dataset_tags[0] if record.dataset_tags else record.dataset_names[0]
        common = {
            "task_type": PIPELINE_TAG,
            "task_name": "Image Classification",
            "dataset_type": dataset_type,
            "dataset_name": record.dataset_names[0],
            "dataset_split": record.dataset_split,
            "dataset_config": record.dataset_config,
        }
        eval_results = [
            EvalResult(metric_type=name, metric_value=round(value, 4), metric_name=name.capitalize(), **common)
            for name, value in record.student_metrics.items()
        ]
        # A metric type of its own, so that no leaderboard reads the teacher's score as the student's.
        eval_results += [
            EvalResult(metric_type=f"teacher_{name}", metric_value=round(value, 4),
                       metric_name=f"Teacher {name} ({record.teacher_name})", **common)
            for name, value in record.teacher_metrics.items()
        ]
    teacher = None
    if record.teacher_name is not None:
        teacher = {
            "name": record.teacher_name,
            "hub_id": hub_id(record.teacher_origin),
            "architecture": record.teacher_architecture,
            "parameters": record.teacher_parameters,
            **{name: round(value, 4) for name, value in record.teacher_metrics.items()},
        }
        teacher = {key: value for key, value in teacher.items() if value is not None}
    return ModelCardData(
        library_name=record.library_name,
        pipeline_tag=PIPELINE_TAG,
        tags=TAGS + record.extra_tags,
        license=record.license,
        language=record.language,
        datasets=record.dataset_tags or None,
        metrics=list(record.student_metrics) or None,
        # The Hub has no distillation relation: the teacher is never the base model.
        base_model=hub_id(record.student_origin),
        model_name=record.model_name,
        eval_results=eval_results,
        teacher_model=teacher,
        distillation=record.distillation or None,
    )


def _format(value: Any) -> str:
    """One table cell: short floats, lists joined, no line break."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return " ".join(str(value).split())


def _results_rows(record: DistillationRecord) -> list[dict[str, str]]:
    rows = []
    for name, student in record.student_metrics.items():
        teacher = record.teacher_metrics.get(name)
        rows.append({
            "metric": name,
            "student": f"{student:.4f}",
            "teacher": "" if teacher is None else f"{teacher:.4f}",
            "gap": "" if teacher is None else f"{student - teacher:+.4f}",
        })
    return rows


def template_path() -> Path:
    """The card template shipped inside the package."""
    return Path(str(resources.files("hf_udkd").joinpath(TEMPLATE_NAME)))


def build_model_card(
    record: DistillationRecord, plot_name: str | None = PLOT_NAME, template: str | os.PathLike | None = None
) -> ModelCard:
    """Render the card of ``record``. ``plot_name``: the loss plot beside the card, None if there is none;
    ``template``: a Jinja template file to use instead of the shipped one."""
    ratio = None
    if record.teacher_parameters:
        ratio = record.teacher_parameters / record.student_parameters
    return ModelCard.from_template(
        _card_data(record),
        template_path=str(template or template_path()),
        model_name=record.model_name,
        repo_id=record.repo_id,
        base_model=hub_id(record.student_origin),
        student_architecture=record.student_architecture,
        student_parameters=f"{record.student_parameters:,}",
        teacher_name=record.teacher_name,
        teacher_hub_id=hub_id(record.teacher_origin),
        teacher_architecture=record.teacher_architecture,
        teacher_parameters=f"{record.teacher_parameters:,}" if record.teacher_parameters else None,
        parameter_ratio=f"{ratio:.2f}" if ratio else None,
        student_share=f"{100 / ratio:.1f}" if ratio else None,
        results=_results_rows(record),
        dataset_names=", ".join(record.dataset_names) or None,
        dataset_split=record.dataset_split,
        distillation_settings={key: _format(value) for key, value in record.distillation.items()},
        hyperparameters={key: _format(value) for key, value in record.hyperparameters.items()},
        plot_name=plot_name,
        framework_versions=record.framework_versions,
    )


def write_model_card(
    record: DistillationRecord, output_dir: str | os.PathLike, template: str | os.PathLike | None = None
) -> ModelCard:
    """Write ``README.md`` and the loss plot (when there is a logged train loss) into ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    plot_path = os.path.join(output_dir, PLOT_NAME)
    has_plot = plot_loss_terms(record.log_history, plot_path)
    if not has_plot and os.path.exists(plot_path):
        os.remove(plot_path)  # a stale plot from an earlier run would not match this card
    card = build_model_card(record, PLOT_NAME if has_plot else None, template)
    card.save(os.path.join(output_dir, CARD_NAME))
    return card


def model_files(folder: str | os.PathLike) -> list[str]:
    """The student's config, weights (shards included) and image processor in ``folder``, relative to it."""
    names = [CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, IMAGE_PROCESSOR_NAME, PROCESSOR_NAME]
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names += sorted(set(json.load(f)["weight_map"].values()))
    return [name for name in names if os.path.isfile(os.path.join(folder, name))]


def card_files(folder: str | os.PathLike) -> list[str]:
    """The card and the loss plot in ``folder``."""
    return [name for name in (CARD_NAME, PLOT_NAME) if os.path.isfile(os.path.join(folder, name))]


def student_files(output_dir: str | os.PathLike) -> list[str]:
    """The files that make the published student, relative to ``output_dir``: weights (shards included),
    config, image processor, card and plot. Never the UniKD heads, checkpoints, training arguments or logs."""
    return model_files(output_dir) + card_files(output_dir)


def checkpoint_files(checkpoint: str | os.PathLike) -> list[str]:
    """Every file of ``checkpoint`` that resuming reads (subfolders such as DeepSpeed's included), relative to
    it: all but ``training_args.bin``, which the Trainer writes for people and never reads back."""
    root = Path(checkpoint)
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.name != TRAINING_ARGS_NAME
    )


def training_push_files(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, checkpoint_in_repo: str | None
) -> dict[str, str | bytes]:
    """What a push during training sends (path in the repository -> local path or contents): the student's
    config, weights and image processor from ``checkpoint`` and the card and plot of ``output_dir`` at the root,
    and with ``checkpoint_in_repo`` the [`checkpoint_files`] in that folder."""
    files: dict[str, str | bytes] = {name: os.path.join(checkpoint, name) for name in model_files(checkpoint)}
    # The next save rewrites the card and plot in place, perhaps while this push runs: send their contents.
    files.update({name: Path(output_dir, name).read_bytes() for name in card_files(output_dir)})
    if checkpoint_in_repo is not None:
        files.update({f"{checkpoint_in_repo}/{name}": os.path.join(checkpoint, name)
                      for name in checkpoint_files(checkpoint)})
    return files


def commit_files(
    api: HfApi,
    repo_id: str,
    files: dict[str, str | bytes],
    commit_message: str,
    token: str | None,
    revision: str | None,
    blocking: bool,
) -> CommitInfo | Future:
    """Commit exactly ``files`` (path in the repository -> local path or contents) to ``repo_id``.

    Local files are opened here, before a background commit starts: a checkpoint that is rotated away (deleted)
    meanwhile is still read whole. Files that are rewritten in place, like the card, are passed as contents.
    """
    handles = {name: open(value, "rb") if isinstance(value, str) else value for name, value in files.items()}

    def commit() -> CommitInfo:
        try:
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=value)
                          for name, value in handles.items()]
            return api.create_commit(repo_id, operations, commit_message=commit_message, token=token,
                                     revision=revision)
        finally:
            for value in handles.values():
                if not isinstance(value, bytes):
                    value.close()

    if blocking:
        return commit()
    job = api.run_as_future(commit)
    job.add_done_callback(_warn_if_failed)
    return job


def _warn_if_failed(job: Future) -> None:
    """A background push that fails does not stop training; say so, since nobody waits for its result."""
    error = job.exception() if not job.cancelled() else None
    if error is not None:
        logger.warning(f"A push to the Hub during training failed ({type(error).__name__}: {error}); training "
                       "goes on, and the next save or trainer.push_to_hub() pushes again.")


def distillation_settings(
    args: UDKDTrainingArguments, student_layers: list[int | str], teacher_layer: int | str | None
) -> dict[str, Any]:
    """The method's settings as the card's ``distillation`` field: only the options that took effect."""
    if teacher_layer is None:
        return {}
    method = "UniKD" if args.use_fdp else args.logit_loss.upper()
    settings: dict[str, Any] = {"method": method, "paper": PAPER if args.use_fdp else None,
                                "logit_loss": args.logit_loss, "temperature": args.temperature,
                                "w_ce": args.w_ce, "w_logit": args.w_logit,
                                "logit_standardization": args.logit_standardization}
    if args.logit_loss == "dkd":
        settings.update(dkd_alpha=args.dkd_alpha, dkd_beta=args.dkd_beta)
        if args.dkd_warmup_epochs is not None:
            settings["dkd_warmup_epochs"] = args.dkd_warmup_epochs
        else:
            settings["dkd_warmup_ratio"] = args.dkd_warmup_ratio
    if args.use_fdp:
        settings.update(w_feat=args.w_feat, w_supp=args.w_supp, feature_kl=args.feature_kl,
                        feature_temperature=args.feature_temperature, detach_targets=args.detach_targets,
                        use_aff=args.use_aff)
        if args.use_aff:
            settings.update(aff_channels=args.aff_channels, aff_batch_norm=args.aff_batch_norm,
                            aff_init=args.aff_init)
        settings.update(student_layers=list(student_layers), teacher_layer=teacher_layer)
    return {key: value for key, value in settings.items() if value is not None}


def training_hyperparameters(
    extracted: dict[str, Any], args: TrainingArguments, global_step: int
) -> dict[str, Any]:
    """The Trainer's own hyperparameters (``transformers.modelcard.extract_hyperparameters_from_trainer``), as the
    card shows them: a warm-up below 1 is a share of the training steps (transformers 5 keeps ``warmup_ratio``
    in ``warmup_steps``), bf16 is named, and the steps actually trained are added."""
    hyperparameters = dict(extracted)
    warmup = hyperparameters.get("lr_scheduler_warmup_steps")
    if warmup is not None and 0 < warmup < 1:
        del hyperparameters["lr_scheduler_warmup_steps"]
        hyperparameters["lr_scheduler_warmup_ratio"] = warmup
    if args.bf16:
        hyperparameters["mixed_precision_training"] = "Native AMP (bf16)"
    hyperparameters["steps_trained"] = global_step
    return hyperparameters


def framework_versions() -> dict[str, str]:
    import huggingface_hub
    import timm
    import torch
    import transformers

    import hf_udkd

    return {"hf_udkd": hf_udkd.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "timm": timm.__version__, "huggingface_hub": huggingface_hub.__version__}


class CardOptions(TypedDict, total=False):
    """What the caller says about the card: the arguments of `UDKDTrainer.create_model_card` but the template."""

    language: str | None
    license: str | None
    tags: str | list[str] | None
    model_name: str | None
    finetuned_from: str | None
    tasks: str | list[str] | None
    dataset_tags: str | list[str] | None
    dataset: str | list[str] | None
    dataset_args: str | None
    dataset_split: str | None
    teacher_name: str | None


def record_for(trainer: Trainer, default_name: str, **options: Unpack[CardOptions]) -> DistillationRecord:
    """The [`DistillationRecord`] of a `UDKDTrainer` (``trainer``) as it stands; ``default_name`` is the model's
    name unless ``options`` give one."""
    tasks, tags = options.get("tasks"), options.get("tags")
    for task in [tasks] if isinstance(tasks, str) else tasks or []:
        if task != PIPELINE_TAG:
            raise ValueError(f"tasks={tasks!r}: an hf_udkd student is an {PIPELINE_TAG} model")
    dataset_tags, dataset = options.get("dataset_tags"), options.get("dataset")
    teacher_name = options.get("teacher_name")
    student = trainer.student
    teacher = trainer.teacher_model
    dataset_tags = [dataset_tags] if isinstance(dataset_tags, str) else list(dataset_tags or [])
    dataset_names = [dataset] if isinstance(dataset, str) else list(dataset or dataset_tags)
    if not dataset_names:
        # The model-index lists results only under a dataset name.
        dataset_names = [dataset_name(trainer.eval_dataset if trainer.eval_dataset is not None
                                      else trainer.train_dataset)]
    history = trainer.state.log_history
    return DistillationRecord(
        model_name=options.get("model_name") or default_name,
        repo_id=trainer.hub_model_id or trainer.args.hub_model_id or default_name,
        student_architecture=type(student).__name__,
        student_parameters=count_parameters(student),
        student_origin=options.get("finetuned_from") or origin(student),
        # Raw timm students are saved in the format of transformers' TimmWrapper.
        library_name="transformers" if isinstance(student, PreTrainedModel) or is_timm_model(student) else None,
        teacher_name=(teacher_name or display_name(teacher)) if teacher is not None else None,
        teacher_origin=origin(teacher) if teacher is not None else None,
        teacher_architecture=type(teacher).__name__ if teacher is not None else None,
        teacher_parameters=count_parameters(teacher) if teacher is not None else None,
        distillation=distillation_settings(
            trainer.args,
            [stage.layer for stage in trainer.accelerator.unwrap_model(trainer.model).student_tap.stages],
            trainer.teacher.stage.layer if trainer.teacher is not None else None,
        ),
        hyperparameters=training_hyperparameters(
            extract_hyperparameters_from_trainer(trainer), trainer.args, trainer.state.global_step
        ),
        student_metrics=last_metrics(history, "eval"),
        teacher_metrics=last_metrics(history, "teacher_eval"),
        log_history=history,
        dataset_tags=dataset_tags,
        dataset_names=dataset_names,
        dataset_split=options.get("dataset_split"),
        dataset_config=options.get("dataset_args"),
        license=options.get("license"),
        language=options.get("language"),
        extra_tags=[tags] if isinstance(tags, str) else list(tags or []),
        framework_versions=framework_versions(),
    )
