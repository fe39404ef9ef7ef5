"""`UDKDTrainer`: UniKD distillation inside `transformers.Trainer`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import is_compiled_module
from huggingface_hub.errors import HfHubHTTPError
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import EvalPrediction, HubStrategy, SaveStrategy
from transformers.utils import logging
from transformers.utils.hub import PushInProgress, hf_api

from . import checkpoint, model_card, validation
from .config import UDKDTrainingArguments
from .constants import INDEX_KEY, TEACHER_INPUT, VIEW_KEY
from .loss_terms import LossTermLog
from .modeling import DistillationModel
from .taps import FeatureTap
from .teacher import Teacher, check_same_labels, label_names, load_model, whole_weights
from .teacher_store import (
    IndexedCollator,
    ReplayDataset,
    StoreCallback,
    StoreRows,
    TeacherStore,
    build_teacher_store,
)

logger = logging.get_logger(__name__)


def _probe_batch(dataset, role: str) -> dict[str, torch.Tensor]:
    """Two examples of ``dataset`` as tensors, to learn the models' shapes before training."""
    if dataset is None:
        raise ValueError(
            "UDKDTrainer needs a train_dataset or eval_dataset to learn the feature shapes of the models"
        )
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()))
    if isinstance(dataset, torch.utils.data.IterableDataset):
        iterator = iter(dataset)
        examples = [next(iterator), next(iterator)]
    else:
        examples = [dataset[i] for i in range(min(2, len(dataset)))]
    if "pixel_values" not in examples[0]:
        raise ValueError(
            f"the {role} examples have no 'pixel_values' (they have {sorted(examples[0])}). Turn images into "
            "pixel_values with the image processor in a transform (dataset.with_transform), as for "
            "transformers' image classification."
        )
    keys = ["pixel_values"] + ([TEACHER_INPUT] if TEACHER_INPUT in examples[0] else [])
    return {key: torch.stack([torch.as_tensor(ex[key]) for ex in examples]) for key in keys}


def _resolve_loss_options(args: UDKDTrainingArguments, counted: tuple[int, int] | None, has_train: bool) -> None:
    """`logit_standardization=None`: on when the training set holds unlabelled examples (``counted``: unlabelled,
    examples), where the accuracy study measured it best with Sun et al.'s weights; off otherwise, where UniKD's
    published weights were best."""
    chosen_here = args.logit_standardization is None
    args.resolve_loss_options(unlabelled=counted is not None and counted[0] > 0)
    if chosen_here and has_train:
        seen = "labels not read before training" if counted is None else f"{counted[0]:,} of {counted[1]:,} unlabelled"
        logger.info(
            f"logit_standardization=None: {args.logit_standardization} (training set: {seen}); "
            f"w_ce={args.w_ce}, w_logit={args.w_logit}"
        )


class UDKDTrainer(Trainer):
    r"""
    Trainer for Unified Knowledge Distillation (UniKD, Huang et al., ECCV 2024) of image classifiers.

    The student and the trainable heads (Adaptive Feature Fusion, the two Feature Distribution Prediction
    heads) are held in one [`DistillationModel`], which the Trainer optimises, wraps for DDP/FSDP/DeepSpeed and
    checkpoints. The teacher is frozen and prepared by the accelerator for evaluation only. `save_model()`
    writes the student alone, in standard format; checkpoints also hold the heads.

    Args:
        model (`PreTrainedModel`, `nn.Module` or `str`):
            The student: a transformers image classifier, a timm model, or an id/path loaded with
            `AutoModelForImageClassification`.
        teacher_model (`PreTrainedModel`, `nn.Module`, `str` or `None`):
            The teacher, in the same forms, with the same labels as the student. `None` trains the student
            alone with cross-entropy (the scratch baseline).
        args ([`UDKDTrainingArguments`], *optional*):
            Training and distillation options.
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks, optimizers,
        optimizer_cls_and_kwargs, preprocess_logits_for_metrics:
            As for [`~transformers.Trainer`]. Examples hold `pixel_values` and `labels`; with a teacher, training
            labels are optional (`-100`, or no `labels` key: distillation terms only), evaluation needs them. An
            optional `teacher_pixel_values` is the same image prepared for the teacher when its processor differs.
    """

    _tag_names = ["hf_udkd", "knowledge-distillation", "unikd", "image-classification"]
    # DistillationModel returns a per-batch mean, so the Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: UDKDTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        if args is None:
            args = UDKDTrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, UDKDTrainingArguments):
            raise TypeError(f"args must be UDKDTrainingArguments, got {type(args).__name__}")
        student = load_model(model, "student")
        if is_compiled_module(student):
            # The Trainer saves, wraps and loads the module it trains: the student's own, not a compiled wrapper.
            logger.warning(
                "The student is compiled (torch.compile): UDKDTrainer trains the module it wraps. Pass "
                "torch_compile=True in UDKDTrainingArguments to compile the whole step (student, heads and loss)."
            )
            student = student._orig_mod
        teacher_module = load_model(teacher_model, "teacher") if teacher_model is not None else None
        teacher_folder = checkpoint.source_folder(teacher_module) if teacher_module is not None else None
        checkpoint.refuse_teacher_folder(args.output_dir, teacher_folder)
        validation.check_not_empty(train_dataset, eval_dataset)
        probe = _probe_batch(train_dataset if train_dataset is not None else eval_dataset, "dataset")
        validation.check_pixel_values(probe, student, teacher_module)
        with whole_weights(student):
            student_tap = FeatureTap.from_probe(student, probe["pixel_values"], args.student_layers)
        teacher = None
        if teacher_module is not None:
            teacher = Teacher.from_probe(
                teacher_module, probe.get(TEACHER_INPUT, probe["pixel_values"]),
                args.teacher_layers, args.teacher_stage,
            )
            check_same_labels(student, teacher.module, student_tap.num_labels, teacher.num_labels)
        if getattr(args, "deepspeed_plugin", None) is not None:
            # A Trainer that ran before in this process (a teacher's, say) left its DeepSpeed state, and accelerate
            # refuses a second one; transformers resets it the same way between hyperparameter-search trials.
            AcceleratorState._reset_state()
        # The heads are built here, before Trainer.__init__ seeds, so seed them for reproducible runs.
        # Before seeding: reading the labels may run the data set's (random) transform.
        unlabelled = validation.check_labels(train_dataset, eval_dataset, student_tap.num_labels)
        _resolve_loss_options(args, unlabelled if teacher is not None else None, train_dataset is not None)
        set_seed(args.seed)
        distiller = DistillationModel(student, student_tap, teacher.stage if teacher is not None else None, args)
        validation.check_last_batch(distiller, train_dataset, args)

        super().__init__(
            model=distiller,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # Each process draws its own FDP noise.
        distiller.noise.seed = args.seed + args.process_index
        self._match_buffers_to_sharded_precision(distiller)
        self.teacher = teacher
        self.teacher_model = (
            teacher.prepare(self.accelerator, args, getattr(self.accelerator.state, "deepspeed_plugin", None))
            if teacher is not None else None
        )
        self._teacher_folder = teacher_folder
        self.loss_terms = LossTermLog()
        self._saving_checkpoint = False
        self.teacher_cache: TeacherStore | None = None
        self._replay: ReplayDataset | None = None
        if args.teacher_cache:
            if teacher is None:
                raise ValueError("teacher_cache=True stores a teacher's outputs, but no teacher_model was given")
            self.teacher_cache, self._replay = build_teacher_store(
                train_dataset, self._store_collator(), teacher, args
            )
            self.add_callback(StoreCallback(self.teacher_cache, self._replay.views, self.accelerator))

        logger.info(f"UniKD student stages: {student_tap.describe()}")
        if teacher is not None:
            logger.info(f"UniKD teacher tap (FDP_t): {teacher.tap.describe()}")

    def _match_buffers_to_sharded_precision(self, distiller: nn.Module) -> None:
        """FSDP2's mixed precision and DeepSpeed's bf16/fp16 compute with parameters cast to the half type but
        leave buffers as they are; BatchNorm then meets bf16 weights and float32 running statistics, which it
        rejects. Buffers are given the parameters' compute dtype (DeepSpeed's ``data_types.buffer_dtype``, set
        here unless the config sets it; FSDP2 has no such option, so they are cast before wrapping)."""
        if self.is_deepspeed_enabled:
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            half = next((name for name in ("bf16", "fp16") if config.get(name, {}).get("enabled") is True), None)
            if half is not None:
                config.setdefault("data_types", {}).setdefault("buffer_dtype", half)
        elif self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
            policy = self.accelerator.state.fsdp_plugin.mixed_precision_policy
            dtype = getattr(policy, "param_dtype", None)
            if dtype is not None:
                for buffer in distiller.buffers():
                    if buffer.is_floating_point():
                        buffer.data = buffer.data.to(dtype)

    # ---- loss ----------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for key in (TEACHER_INPUT, INDEX_KEY, VIEW_KEY):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def _store_collator(self) -> Callable:
        """The training collator as the Trainer wraps it, keeping the store's keys (index and view)."""
        return self._get_collator_with_removed_columns(IndexedCollator(self.data_collator), description="training")

    def get_train_dataloader(self):
        """With the teacher store, training examples are read in replayable views and carry their store keys."""
        if self.teacher_cache is None:
            return super().get_train_dataloader()
        if self.teacher.engine is not None and not self.teacher_cache.is_full:
            # A partitioned teacher's forward is collective: ranks filling different rows would wait on each other.
            raise ValueError(
                "teacher_cache=True under DeepSpeed ZeRO-3 needs a full store before training: "
                f"{len(self.teacher_cache) - self.teacher_cache.num_filled} of {len(self.teacher_cache)} rows are "
                "missing. Call trainer.precompute_teacher_outputs() first (or run `python -m hf_udkd.precompute`)."
            )
        dataset, collator = self.train_dataset, self.data_collator
        self.train_dataset, self.data_collator = self._replay, IndexedCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset, self.data_collator = dataset, collator

    def precompute_teacher_outputs(self) -> TeacherStore:
        """Fill every (example, view) row of the teacher store before training; returns the store.

        The rows still missing are split over the processes (accelerate's data-loader sharding), read in their
        views through the training collator, run through the teacher in batches of
        ``per_device_eval_batch_size``, shared between the processes and, with ``teacher_cache_dir``, written as
        one shard per process. Call it on every process.
        """
        if self.teacher_cache is None:
            raise ValueError("precompute_teacher_outputs() fills the teacher store: set teacher_cache=True")
        store = self.teacher_cache
        missing = store.missing_rows()
        logger.info(f"Precomputing {len(missing)} of {len(store)} teacher store rows")
        loader = self.accelerator.prepare_data_loader(
            torch.utils.data.DataLoader(
                StoreRows(self._replay, missing),
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=self._store_collator(),
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
        )
        for batch in loader:
            logits, features = self.teacher.outputs(batch.get(TEACHER_INPUT, batch["pixel_values"]))
            store.put(store.rows(batch[INDEX_KEY], batch[VIEW_KEY]), logits, features)
        store.exchange(self.accelerator)
        store.save()
        self.accelerator.wait_for_everyone()
        return store

    def _teacher_outputs_for(self, inputs: dict[str, Any], teacher_input: torch.Tensor, training: bool):
        """Teacher logits (B, K) and pooled tap (B, C_T): from the store in training when it has them."""
        indices = inputs.get(INDEX_KEY)
        if self.teacher_cache is None or not training or indices is None:
            return self.teacher.outputs(teacher_input)

        def compute(rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            return self.teacher.outputs(teacher_input if rows is None else teacher_input[rows])

        views = inputs.get(VIEW_KEY, torch.zeros_like(indices))
        return self.teacher_cache.fetch(indices, views, compute, teacher_input.device)

    def _logit_weight(self) -> float:
        """DKD's linear warm-up: the share of it done so far, 1 once it is over (and always for KD)."""
        args = self.args
        if args.logit_loss != "dkd":
            return 1.0
        if args.dkd_warmup_epochs is not None:
            done, warmup = self.state.epoch or 0.0, args.dkd_warmup_epochs
        else:
            # max_steps is 0 before training starts (an evaluation first): no warm-up to be in.
            done, warmup = self.state.global_step, args.dkd_warmup_ratio * self.state.max_steps
        return min(1.0, done / warmup) if warmup > 0 else 1.0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The UniKD loss of one batch, a per-batch mean.

        ``num_items_in_batch`` is accepted for the Trainer's interface and not needed: every term is a mean
        over the images of the batch, and DDP averages gradients over processes, so the loss and the update
        are the same in one process and in several (see tests/test_multiprocess.py).
        """
        pixel_values = inputs["pixel_values"]
        labels = inputs.get("labels")
        teacher_input = inputs.get(TEACHER_INPUT, pixel_values)
        if labels is None and model.training and self.teacher_model is None:
            raise ValueError(
                "the training batch has no 'labels' and there is no teacher: training without a teacher (the "
                "scratch baseline) needs labels. Add 'labels' to the examples, or pass a teacher_model to distil "
                "unlabelled images."
            )
        extra = {}
        # Training distils every example, labelled or not; evaluation reaches here only with labels.
        if self.teacher_model is not None and (labels is not None or model.training):
            teacher_logits, teacher_features = self._teacher_outputs_for(inputs, teacher_input, model.training)
            extra = {
                "teacher_logits": teacher_logits,
                "teacher_features": teacher_features,
                "logit_weight": self._logit_weight(),
            }
        outputs = model(pixel_values=pixel_values, labels=labels, **extra)
        if outputs.loss is not None:
            self.loss_terms.add(outputs, pixel_values.shape[0], "train" if model.training else "eval",
                                self.state.global_step + 1)
        if return_outputs:
            # Only the logits: the Trainer hands every other output to compute_metrics as predictions.
            return outputs.loss, {"logits": outputs.logits}
        return outputs.loss

    # ---- logging of the loss terms -------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self.loss_terms.raise_if_non_finite()
            logs.update(self.loss_terms.reduce("train", self.args.device, self.accelerator, self.state.global_step))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self.loss_terms.clear("eval")
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        eval_terms = self.loss_terms.reduce("eval", self.args.device, self.accelerator, self.state.global_step)
        for name, value in eval_terms.items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    # ---- saving and loading --------------------------------------------------------------------------------

    @property
    def student(self) -> nn.Module:
        """The student being trained (unwrapped)."""
        return self.accelerator.unwrap_model(self.model).student

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """As [`~transformers.Trainer.train`]. `resume_from_checkpoint=True` takes the latest *complete* checkpoint
        in `output_dir`; an incomplete checkpoint, or one written with other distillation options, is refused
        before anything is loaded."""
        resume_from_checkpoint = checkpoint.resume_folder(resume_from_checkpoint, self.args)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, written in `_incomplete-checkpoint-N` and renamed to `checkpoint-N` once
        complete, so that a crash leaves a complete checkpoint or none. Refused when a loss term or a weight is not
        finite; rotation (`save_total_limit`) never deletes the checkpoint just written or the best one."""
        self.loss_terms.raise_if_non_finite()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        folder = checkpoint.folder_for(run_dir, self.state.global_step)
        staging = checkpoint.staging_folder(folder)
        writes_folders = checkpoint.writes_folders(self.args)
        if writes_folders:
            checkpoint.prepare_staging(run_dir, staging)
        self.accelerator.wait_for_everyone()
        self._saving_checkpoint = True
        try:
            self.save_model(staging, _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(staging)
                self._save_scaler(staging)
                self._save_rng_state(staging)
        finally:
            self._saving_checkpoint = False
        checkpoint.update_best_checkpoint(self.state, self.args, run_dir, folder)
        if self.args.should_save:
            checkpoint.save_trainer_state(self.state, self.callback_handler.callbacks + [self.control], staging)
        # Every process has written its files (RNG and noise states) before the folder is declared complete.
        self.accelerator.wait_for_everyone()
        if writes_folders:
            checkpoint.publish(staging, folder, checkpoint.distillation_options(self.args))
        if self.args.push_to_hub:
            self._push_from_checkpoint(folder)
        if writes_folders:
            checkpoint.rotate(run_dir, self.args.save_total_limit, [folder, self.state.best_model_checkpoint])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As [`~transformers.Trainer.save_model`]; refused when a loss term was not finite since training began."""
        self.loss_terms.raise_if_non_finite()
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the student alone in standard format; in checkpoints, the heads beside it. Refused inside the
        teacher's folder and for weights that are not finite; another model's files there are removed first."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # One writer per machine: under DeepSpeed on CPU every process has should_save, and one process's removal of
        # stale files would race with another's fresh ones.
        if not checkpoint.writes_folders(self.args):
            return
        checkpoint.refuse_teacher_folder(output_dir, self._teacher_folder)
        if state_dict is None:
            # Under torch_compile the distiller is compiled: its own state dict has the plain parameter names.
            state_dict = self.accelerator.unwrap_model(self.model, keep_torch_compile=False).state_dict()
        student_state, head_state = checkpoint.split_state(state_dict)
        checkpoint.refuse_non_finite_weights(student_state, "student", self.state.global_step, output_dir)
        if self._saving_checkpoint:
            checkpoint.refuse_non_finite_weights(head_state, "UniKD heads", self.state.global_step, output_dir)
        os.makedirs(output_dir, exist_ok=True)
        checkpoint.remove_stale_model_files(output_dir)
        labels = label_names(self.teacher_model) if self.teacher_model is not None else None
        checkpoint.save_student(self.student, student_state, output_dir, labels)
        if self._saving_checkpoint:
            checkpoint.save_heads(head_state, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        checkpoint.save_training_args(self.args, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        distiller = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
        checkpoint.load_student_and_heads(resume_from_checkpoint, distiller)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info(f"Loading best model from {self.state.best_model_checkpoint}")
        distiller = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        checkpoint.load_student_and_heads(self.state.best_model_checkpoint, distiller)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        checkpoint.save_noise_state(self.accelerator.unwrap_model(self.model).noise, output_dir, self.args.process_index)

    def _load_rng_state(self, resume_from: str | None) -> None:
        super()._load_rng_state(resume_from)
        if resume_from is not None:
            checkpoint.load_noise_state(self.accelerator.unwrap_model(self.model).noise, resume_from,
                                        self.args.process_index)

    # ---- model card and Hub --------------------------------------------------------------------------------

    def evaluate_teacher(self, eval_dataset=None, metric_key_prefix: str = "teacher_eval") -> dict[str, float]:
        """Score the frozen teacher on the student's evaluation data with the same ``compute_metrics``.

        The metrics (e.g. ``{"teacher_eval_accuracy": 0.97}``) are logged, so they land in ``state.log_history``
        and in the model card beside the student's. Call it on every process, like ``evaluate``.
        """
        if self.teacher_model is None:
            raise ValueError("evaluate_teacher() needs a teacher_model; this trainer trains the student alone")
        if self.compute_metrics is None:
            raise ValueError(
                "evaluate_teacher() scores the teacher with compute_metrics: pass one to UDKDTrainer "
                "(e.g. hf_udkd.metrics' accuracy)"
            )
        all_logits, all_labels = [], []
        for inputs in self.get_eval_dataloader(eval_dataset):
            inputs = self._prepare_inputs(inputs)
            logits, _ = self.teacher.outputs(inputs.get(TEACHER_INPUT, inputs["pixel_values"]))
            labels = inputs["labels"]
            if self.preprocess_logits_for_metrics is not None:
                logits = self.preprocess_logits_for_metrics(logits, labels)
            logits, labels = self.accelerator.gather_for_metrics((logits, labels))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
        prediction = EvalPrediction(predictions=torch.cat(all_logits).numpy(), label_ids=torch.cat(all_labels).numpy())
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in self.compute_metrics(prediction).items()}
        self.log(metrics)
        return metrics

    def _default_model_name(self) -> str:
        if self.args.hub_model_id is not None:
            return self.args.hub_model_id.split("/")[-1]
        return os.path.basename(os.path.abspath(self.args.output_dir))

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | None = None,
        dataset_split: str | None = None,
        teacher_name: str | None = None,
        template_path: str | None = None,
    ) -> None:
        """Write the student's model card (``README.md``) and its loss plot (``loss_terms.png``) to ``output_dir``.

        The card (template: ``model_card_template.md`` in this package) records the teacher and the UniKD settings
        as metadata fields of their own, the student's and the teacher's evaluation metrics (the latest
        ``evaluate()`` and ``evaluate_teacher()`` in ``state.log_history``) in the ``model-index``, parameter
        counts, hyperparameters, the loss terms over training, how to load the student and the paper.

        Args:
            language, license, tags, model_name:
                As for [`~transformers.Trainer.create_model_card`].
            finetuned_from (`str`, *optional*):
                The student's starting checkpoint; defaults to where the student was loaded from. It becomes
                `base_model` only when it is a Hub id. The teacher is never the base model.
            tasks (`str`, *optional*):
                Only `"image-classification"`, the task of every hf_udkd student.
            dataset_tags (`str` or `list[str]`, *optional*):
                Hub dataset ids, for the `datasets` metadata.
            dataset (`str` or `list[str]`, *optional*):
                Readable dataset names, which the `model-index` needs to list results. Default: the dataset tags,
                else the evaluation (or training) `datasets.Dataset`'s own name, else `"custom"`.
            dataset_args (`str`, *optional*):
                The dataset configuration the metrics were computed on.
            dataset_split (`str`, *optional*):
                The split the metrics were computed on.
            teacher_name (`str`, *optional*):
                The teacher's public name; defaults to its Hub id or its local directory's name.
            template_path (`str`, *optional*):
                A Jinja card template to use instead of the shipped one.
        """
        if not self.is_world_process_zero():
            return
        record = model_card.record_for(
            self, self._default_model_name(), language=language, license=license, tags=tags, model_name=model_name,
            finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
            dataset_args=dataset_args, dataset_split=dataset_split, teacher_name=teacher_name,
        )
        model_card.write_model_card(record, self.args.output_dir, template_path)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Push the clean student to `args.hub_model_id`: weights, config, image processor, card and loss plot.

        Exactly these files of `output_dir`; never the UniKD heads, checkpoints, `training_args.bin` or anything
        else there (a teacher's folder, say). Everything is written to `output_dir` before the Hub is contacted,
        so a refused push leaves a complete local copy. When the student has been evaluated and the teacher not
        yet, the teacher is evaluated once for the card. The token comes from `token`, `args.hub_token`,
        `HF_TOKEN` or the saved login, and is never written or logged.

        Args:
            commit_message, blocking, token, revision, private:
                As for [`~transformers.Trainer.push_to_hub`].
            kwargs:
                Passed to [`~UDKDTrainer.create_model_card`].
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        history = self.state.log_history
        if (
            self.teacher_model is not None
            and self.compute_metrics is not None
            and self.eval_dataset is not None
            and model_card.last_metrics(history, "eval")
            and not model_card.last_metrics(history, "teacher_eval")
        ):
            self.evaluate_teacher()
        # A push still running from training would land after this one, with older weights.
        self._finish_current_push()
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        kwargs.setdefault("model_name", self._default_model_name())
        self.create_model_card(**kwargs)
        files = model_card.student_files(self.args.output_dir)
        try:
            if self.hub_model_id is None:
                self.init_hf_repo(token=token, private=private)
            return model_card.commit_files(
                hf_api(), self.hub_model_id, {name: os.path.join(self.args.output_dir, name) for name in files},
                commit_message, token, revision if revision is not None else self.args.hub_revision, blocking,
            )
        except HfHubHTTPError as err:
            err.append_to_message(
                f"\n\nPushing the student to the Hub failed; it is complete in {self.args.output_dir} "
                f"({', '.join(files)}). Push it again with trainer.push_to_hub() or `hf upload <repo_id> "
                f"{self.args.output_dir}`."
            )
            raise

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The push at each save during training (`hub_strategy` other than `"end"`), in the background.

        One commit: the student's config, weights and image processor from `checkpoint_folder` with a card and
        plot of the run so far at the root, and for `"checkpoint"` / `"all_checkpoints"` the files resuming
        needs ([`model_card.checkpoint_files`], no `training_args.bin`) in `last-checkpoint/` / `checkpoint-N/`.
        Nothing else of `output_dir`, where the Trainer's own push would upload whatever lies there.
        """
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.create_model_card(model_name=self._default_model_name())
        folder_in_repo = {HubStrategy.CHECKPOINT: "last-checkpoint",
                          HubStrategy.ALL_CHECKPOINTS: Path(checkpoint_folder).name}.get(self.args.hub_strategy)
        files = model_card.training_push_files(checkpoint_folder, self.args.output_dir, folder_in_repo)
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        job = model_card.commit_files(hf_api(), self.hub_model_id, files, commit_message, self.args.hub_token,
                                      self.args.hub_revision, blocking=False)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)
