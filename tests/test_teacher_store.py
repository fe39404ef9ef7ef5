"""The teacher store: replayable views, storage and lookup, refusals, reuse across runs, precompute, resume."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, TensorImageDataset, build, resnet_config
from safetensors.torch import load_file
from transformers import ViTImageProcessor

from hf_udkd import UDKDTrainer, UDKDTrainingArguments
from hf_udkd.constants import INDEX_KEY, VIEW_KEY
from hf_udkd.data import load_digits_dataset
from hf_udkd.image_processing import ImageClassificationTransform, collate_image_classification
from hf_udkd.teacher_store import (
    IndexedCollator,
    ReplayDataset,
    ReplayViews,
    TeacherStore,
    check_replayable,
)

N, V, C, K = 10, 2, 6, 4


# ---- replay ------------------------------------------------------------------------------------------------


def _processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def augmented():
    """32 real digits through the example script's random training transform (crop + flip), and 32 for eval."""
    splits = load_digits_dataset(split_seed=0)
    train = ImageClassificationTransform(_processor(), train=True, crop_scale=(0.3, 1.0))
    evaluation = ImageClassificationTransform(_processor(), train=False)
    return splits["train"].select(range(32)).with_transform(train), splits["validation"].select(range(32)).with_transform(
        evaluation
    )


def _read_in_workers(replay: ReplayDataset, view: int, num_workers: int) -> dict[int, torch.Tensor]:
    replay.views.set_epoch(view)
    loader = torch.utils.data.DataLoader(replay, batch_size=5, num_workers=num_workers, shuffle=True,
                                         collate_fn=IndexedCollator(collate_image_classification))
    return {int(i): x for batch in loader for i, x in zip(batch[INDEX_KEY], batch["pixel_values"], strict=True)}


def test_views_replay_exactly_across_workers_and_leave_the_generators_alone(augmented):
    train, _ = augmented
    replay = ReplayDataset(train, ReplayViews(seed=3, num_views=V))
    main = {v: {i: replay.example(i, v)["pixel_values"] for i in range(len(train))} for v in range(V)}
    # Reading leaves torch's generator as it was, and numpy's and Python's continuing on their own streams,
    # whatever was read.
    after = []
    for index in (0, 5):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        state = torch.get_rng_state()
        replay.example(index, 1)
        assert torch.equal(torch.get_rng_state(), state)
        after.append((np.random.random(), random.random()))
    assert after[0] == after[1]
    # The transform is random: the two views of an example differ (crop and flip), yet each replays exactly.
    assert sum(not torch.equal(main[0][i], main[1][i]) for i in main[0]) > len(train) // 2
    for view in range(V):
        in_workers = _read_in_workers(replay, view, num_workers=2)
        assert sorted(in_workers) == list(range(len(train)))
        for i, x in in_workers.items():
            assert torch.equal(x, main[view][i]), (i, view)
    # Another seed gives other views.
    other = ReplayDataset(train, ReplayViews(seed=4, num_views=V)).example(0, 0)["pixel_values"]
    assert not torch.equal(other, main[0][0])


class _OwnGenerator(torch.utils.data.Dataset):
    """A transform that draws from a generator of its own, which the trainer cannot seed."""

    def __init__(self):
        self.rng = np.random.default_rng()

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return {"pixel_values": torch.full((3, 4, 4), float(self.rng.random())), "labels": i % 2}


def _random_flip_collate(examples):
    images = torch.stack([e["pixel_values"] for e in examples])
    flip = torch.rand(len(examples)) < 0.5
    images[flip] = images[flip].flip(-1)
    return {"pixel_values": images, "labels": torch.tensor([int(e["labels"]) for e in examples])}


def test_unreplayable_transform_and_random_collator_are_refused(augmented):
    with pytest.raises(ValueError, match="cannot seed"):
        check_replayable(ReplayDataset(_OwnGenerator(), ReplayViews(0, 1)), IndexedCollator(_random_flip_collate))
    replay = ReplayDataset(augmented[0], ReplayViews(0, V))
    with pytest.raises(ValueError, match="data collator is random"):
        check_replayable(replay, IndexedCollator(_random_flip_collate))
    digest = check_replayable(replay, IndexedCollator(collate_image_classification))
    assert digest == check_replayable(replay, IndexedCollator(collate_image_classification))
    assert digest != check_replayable(ReplayDataset(augmented[0], ReplayViews(1, V)),
                                      IndexedCollator(collate_image_classification))


# ---- the store ---------------------------------------------------------------------------------------------


def _teacher_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in teacher whose outputs are a known function of the store row."""
    x = rows.float()[:, None]
    return x + torch.arange(K) / 8, 100 * x + torch.arange(C) / 8


class _Calls:
    """compute() for TeacherStore.fetch that records which store rows it was asked for."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.asked = rows, []

    def __call__(self, mask):
        picked = self.rows if mask is None else self.rows[mask]
        self.asked.append(picked.tolist())
        return _teacher_rows(picked)


FINGERPRINT = {"views": V}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fetch_computes_only_missing_rows_and_replays_them(dtype):
    store = TeacherStore(N, V, C, K, dtype, FINGERPRINT)
    assert store.nbytes == N * V * (C + K) * dtype.itemsize

    def fetch(indices, views):
        indices, views = torch.tensor(indices), torch.tensor(views)
        calls = _Calls(views * N + indices)
        logits, features = store.fetch(indices, views, calls, torch.device("cpu"))
        expected = _teacher_rows(views * N + indices)
        assert logits.dtype == features.dtype == torch.float32
        torch.testing.assert_close(logits, expected[0].to(dtype).float(), rtol=0, atol=0)
        torch.testing.assert_close(features, expected[1].to(dtype).float(), rtol=0, atol=0)
        return calls.asked

    assert fetch([0, 3, 5, 7], [0, 0, 0, 0]) == [[0, 3, 5, 7]]
    # The same examples in another view are other rows; a batch mixing stored and new rows computes the new.
    assert fetch([3, 5], [1, 0]) == [[13]]
    assert fetch([5, 3, 9, 0], [0, 1, 1, 0]) == [[19]]
    assert fetch([3, 9, 0], [1, 1, 0]) == []
    assert store.num_filled == 6 and not store.is_full


def test_store_on_disk_is_safetensors_shards_read_by_every_process(tmp_path):
    directory = str(tmp_path / "store")
    writers = [TeacherStore(N, V, C, K, torch.float32, FINGERPRINT, directory, process_index=r) for r in (0, 1)]
    for rank, store in enumerate(writers):
        rows = torch.arange(rank, N * V, 2)
        store.put(rows, *_teacher_rows(rows))
        store.save()
    manifest = json.loads((tmp_path / "store" / "store.json").read_text())
    assert manifest["fingerprint"] == FINGERPRINT and manifest["num_views"] == V
    shard = load_file(str(tmp_path / "store" / "shard-00001.safetensors"))
    assert shard["rows"].tolist() == list(range(1, N * V, 2)) and shard["logits"].shape == (N * V // 2, K)
    # A reader gets every shard's rows; rewriting its own shard keeps what the shard held.
    reader = TeacherStore(N, V, C, K, torch.float32, FINGERPRINT, directory, process_index=0)
    assert reader.is_full
    torch.testing.assert_close(reader.logits, _teacher_rows(torch.arange(N * V))[0], rtol=0, atol=0)
    reader.put(torch.tensor([1]), *_teacher_rows(torch.tensor([1])))
    reader.save()
    rewritten = load_file(str(tmp_path / "store" / "shard-00000.safetensors"))["rows"].tolist()
    assert rewritten == sorted([*range(0, N * V, 2), 1])
    with pytest.raises(ValueError, match="teacher_cache_views: stored 2, now 3"):
        TeacherStore(N, V, C, K, torch.float32, {"views": 3}, directory)


# ---- in UDKDTrainer ----------------------------------------------------------------------------------------


def _args(tmp_path, **kwargs) -> UDKDTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        num_train_epochs=2,
        learning_rate=0.01,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return UDKDTrainingArguments(**{**defaults, **kwargs})


def _count_teacher_batches(trainer: UDKDTrainer) -> list[int]:
    """Batch sizes of the teacher's forwards from now on."""
    sizes: list[int] = []
    trainer.teacher_model.register_forward_hook(
        lambda _module, _args, kwargs, _output: sizes.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    return sizes


def _losses(trainer: UDKDTrainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def _trainer(tmp_path, student, teacher, train, **kwargs) -> UDKDTrainer:
    return UDKDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
                       args=_args(tmp_path, **kwargs), train_dataset=train,
                       data_collator=collate_image_classification)


def test_deterministic_data_store_matches_the_uncached_run(tmp_path, digits, resnet_teacher, resnet_student):
    train = TensorImageDataset(digits[0].pixel_values[:32], digits[0].labels[:32])
    losses, students = {}, {}
    for cached in (False, True):
        trainer = _trainer(tmp_path, resnet_student, resnet_teacher, train, teacher_cache=cached)
        teacher_batches = _count_teacher_batches(trainer)
        trainer.train()
        # 32 examples, batch 16, 2 epochs: with the store the teacher runs in epoch 1 only.
        assert teacher_batches == [16] * (2 if cached else 4)
        losses[cached], students[cached] = _losses(trainer), trainer.student.state_dict()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    for name, value in students[False].items():
        torch.testing.assert_close(students[True][name], value, rtol=1e-5, atol=1e-6)


def test_random_augmentation_skips_the_teacher_after_v_epochs_and_across_runs(
    tmp_path, augmented, resnet_teacher, resnet_student
):
    train, evaluation = augmented
    store = dict(teacher_cache=True, teacher_cache_views=2, teacher_cache_dir=str(tmp_path / "store"),
                 num_train_epochs=4)
    first = _trainer(tmp_path, resnet_student, resnet_teacher, train, **store)
    first.eval_dataset = evaluation
    teacher_batches = _count_teacher_batches(first)
    first.train()
    # Views 0 and 1 in epochs 1 and 2 (two batches each); epochs 3 and 4 replay them from the store.
    assert teacher_batches == [16] * 4 and first.teacher_cache.is_full
    first.evaluate()
    assert teacher_batches[-1] == 32, "evaluation must always run the teacher"
    shards = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert shards == ["shard-00000.safetensors", "store.json"]

    # A later run with the same teacher, data, transform and views never runs the teacher in training, and
    # replays the losses of the run that filled the store (float32 rows).
    replayed = _trainer(tmp_path, resnet_student, resnet_teacher, train, **store)
    teacher_batches = _count_teacher_batches(replayed)
    replayed.train()
    assert teacher_batches == []
    np.testing.assert_allclose(_losses(replayed), _losses(first), rtol=1e-6)
    # Another student and other hyperparameters: still no teacher forward.
    other_student = build(resnet_config([8, 8, 16, 32]), tmp_path / "other_student")
    other = _trainer(tmp_path, other_student, resnet_teacher, train, learning_rate=0.003, **store)
    teacher_batches = _count_teacher_batches(other)
    other.train()
    assert teacher_batches == []


def test_a_stale_store_is_refused_naming_what_differs(tmp_path, augmented, resnet_teacher, resnet_student):
    train, _ = augmented
    store = dict(teacher_cache=True, teacher_cache_views=2, teacher_cache_dir=str(tmp_path / "store"))
    filled = _trainer(tmp_path, resnet_student, resnet_teacher, train, **store)
    filled.precompute_teacher_outputs()
    retrained = copy.deepcopy(resnet_teacher)
    with torch.no_grad():
        retrained.classifier[-1].bias.add_(0.1)
    with pytest.raises(ValueError, match="What differs: the teacher's weights"):
        _trainer(tmp_path, resnet_student, retrained, train, **store)
    with pytest.raises(ValueError, match="teacher_cache_views: stored 2, now 3"):
        _trainer(tmp_path, resnet_student, resnet_teacher, train, **{**store, "teacher_cache_views": 3})
    with pytest.raises(ValueError, match=r"the training data.*the training views"):
        _trainer(tmp_path, resnet_student, resnet_teacher, train.select(range(16)), **store)
    with pytest.raises(ValueError, match="view seed"):
        _trainer(tmp_path, resnet_student, resnet_teacher, train, data_seed=7, **store)


def test_trainer_refuses_a_random_collator(tmp_path, augmented, resnet_teacher, resnet_student):
    with pytest.raises(ValueError, match="data collator is random"):
        UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=_args(tmp_path, teacher_cache=True),
                    train_dataset=augmented[0], data_collator=_random_flip_collate)


def test_precompute_fills_every_view_and_training_never_runs_the_teacher(
    tmp_path, augmented, resnet_teacher, resnet_student
):
    trainer = _trainer(tmp_path, resnet_student, resnet_teacher, augmented[0], teacher_cache=True,
                       teacher_cache_views=3, teacher_cache_dtype="float16", num_train_epochs=3)
    teacher_batches = _count_teacher_batches(trainer)
    store = trainer.precompute_teacher_outputs()
    assert store.is_full and len(store) == 32 * 3 and teacher_batches == [32, 32, 32]
    assert store.logits.dtype == torch.float16
    # A stored row is the teacher's output for that example in that view.
    example = trainer._replay.example(5, 2)
    logits, _ = trainer.teacher.outputs(example["pixel_values"][None])
    torch.testing.assert_close(store.logits[2 * 32 + 5].float(), logits[0], rtol=2e-3, atol=2e-3)
    teacher_batches.clear()
    trainer.train()
    assert teacher_batches == []


class _ViewRecorder(UDKDTrainer):
    """Records the (index, view) pairs of every training batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen = getattr(self, "seen", []) + [list(zip(inputs[INDEX_KEY].tolist(), inputs[VIEW_KEY].tolist(),
                                                              strict=True))]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_a_resumed_run_continues_on_the_same_views(tmp_path, augmented, resnet_teacher, resnet_student):
    settings = dict(teacher_cache=True, teacher_cache_views=3, num_train_epochs=4, save_strategy="steps",
                    save_steps=3)
    runs = {}
    for resumed in (False, True):
        trainer = _ViewRecorder(model=copy.deepcopy(resnet_student), teacher_model=copy.deepcopy(resnet_teacher),
                                args=_args(tmp_path, **settings), train_dataset=augmented[0],
                                data_collator=collate_image_classification)
        # Step 3 ends in the middle of epoch 2 (view 1).
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3") if resumed else None)
        runs[resumed] = trainer
    uninterrupted, resumed = runs[False], runs[True]
    assert [sorted({v for _, v in batch}) for batch in uninterrupted.seen] == [[0], [0], [1], [1], [2], [2], [0], [0]]
    assert resumed.seen == uninterrupted.seen[3:]
    # The resumed history starts with the checkpoint's three steps.
    np.testing.assert_allclose(_losses(resumed), _losses(uninterrupted), rtol=1e-5)


def test_store_options_need_teacher_cache(tmp_path):
    with pytest.raises(ValueError, match="teacher_cache_dir is set but teacher_cache is False"):
        _args(tmp_path, teacher_cache_dir=str(tmp_path / "store"))
    with pytest.raises(ValueError, match="teacher_cache_views must be at least 1"):
        _args(tmp_path, teacher_cache=True, teacher_cache_views=0)
    with pytest.raises(ValueError, match="teacher_cache_dtype"):
        _args(tmp_path, teacher_cache=True, teacher_cache_dtype="int8")


# ---- two processes -----------------------------------------------------------------------------------------

SCRIPT = Path(__file__).parent / "scripts" / "store_two_processes.py"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_fill_one_store_and_read_each_others_rows(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    shards = {r: set(load_file(str(tmp_path / "store" / f"shard-{r:05d}.safetensors"))["rows"].tolist()) for r in (0, 1)}
    # Precompute split the rows between the processes; together they hold every row.
    assert shards[0] and shards[1] and shards[0] | shards[1] == set(range(ranks[0]["rows"]))
    for report in ranks:
        assert report["world_size"] == 2
        assert report["full_after_precompute"]
        # Each rank recomputed a row that only the other rank's shard holds and found the stored output.
        assert report["other_rank_row_error"] < 1e-5
        assert report["teacher_batches_in_training"] == 0
        # Filled live in memory (no precompute, one view), the rows of epoch 1 are shared at its end: epoch 2
        # (other examples on each rank under the shuffling sampler) never runs the teacher.
        assert report["live_teacher_batches"] == [report["live_batches_per_epoch"], 0]
