"""The teacher-output cache: storage, lookup, refusal of random transforms, and its use by UDKDTrainer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, TensorImageDataset, to_pixel_values

from hf_udkd import UDKDTrainer, UDKDTrainingArguments
from hf_udkd.data import load_digits_dataset
from hf_udkd.teacher_cache import (
    INDEX_KEY,
    IndexedCollator,
    IndexedDataset,
    TeacherCache,
    check_deterministic,
)

N, C, K, B = 10, 6, 4, 4


def _teacher_rows(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in teacher whose outputs are a known function of the example index."""
    x = indices.float()[:, None]
    return x + torch.arange(K), 100 * x + torch.arange(C)


class _Calls:
    """compute() for TeacherCache.fetch that records which batch rows it was asked for."""

    def __init__(self, indices: torch.Tensor):
        self.indices, self.asked = indices, []

    def __call__(self, rows):
        picked = self.indices if rows is None else self.indices[rows]
        self.asked.append(picked.tolist())
        return _teacher_rows(picked)


@pytest.mark.parametrize("on_disk", [False, True])
def test_fetch_computes_only_missing_rows_and_replays_them(tmp_path, on_disk):
    cache = TeacherCache(N, C, K, str(tmp_path / "cache") if on_disk else None)
    assert cache.nbytes == N * (C + K) * 4

    first = torch.tensor([0, 3, 5, 7])
    calls = _Calls(first)
    logits, features = cache.fetch(first, calls, torch.device("cpu"))
    assert calls.asked == [[0, 3, 5, 7]]
    assert torch.equal(logits, _teacher_rows(first)[0]) and torch.equal(features, _teacher_rows(first)[1])

    # A batch mixing cached and new examples (what a rank sees in epoch 2 under a shuffling DDP sampler).
    mixed = torch.tensor([5, 1, 7, 9])
    calls = _Calls(mixed)
    logits, features = cache.fetch(mixed, calls, torch.device("cpu"))
    assert calls.asked == [[1, 9]]
    assert torch.equal(logits, _teacher_rows(mixed)[0]) and torch.equal(features, _teacher_rows(mixed)[1])

    # Everything cached: the teacher is not asked at all.
    again = torch.tensor([9, 0, 1, 3])
    calls = _Calls(again)
    logits, features = cache.fetch(again, calls, torch.device("cpu"))
    assert calls.asked == []
    assert torch.equal(logits, _teacher_rows(again)[0]) and torch.equal(features, _teacher_rows(again)[1])
    assert cache.num_filled == 6

    if on_disk:
        stored = np.load(tmp_path / "cache" / "teacher_features.npy", mmap_mode="r")
        assert stored.shape == (N, C)
        np.testing.assert_array_equal(stored[9], _teacher_rows(torch.tensor([9]))[1][0].numpy())


class _Flip(torch.utils.data.Dataset):
    """Examples with a random horizontal flip, like a training transform with augmentation."""

    def __init__(self, random: bool):
        self.random = random
        self.images = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        image = self.images[i]
        if self.random and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"pixel_values": image, "labels": i % 2}


def test_check_deterministic_refuses_random_transforms_without_touching_the_rng():
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    check_deterministic(_Flip(random=False))
    with pytest.raises(ValueError, match="deterministic training transform.*teacher_cache=False"):
        check_deterministic(_Flip(random=True))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_indexed_collator_keeps_the_index_through_a_collator_that_drops_unknown_keys():
    def guide_collate(examples):  # the transformers image-classification guide's collator
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
        }

    dataset = IndexedDataset(_Flip(random=False))
    batch = IndexedCollator(guide_collate)([dataset[i] for i in (6, 2, 4)])
    assert batch[INDEX_KEY].tolist() == [6, 2, 4]
    assert torch.equal(batch["pixel_values"][1], dataset.dataset.images[2])


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
    )
    return UDKDTrainingArguments(**{**defaults, **kwargs})


def _count_teacher_batches(trainer: UDKDTrainer) -> list[int]:
    """Batch sizes of the teacher's forwards from now on."""
    sizes: list[int] = []

    def record(_module, _args, kwargs, _output):
        sizes.append(len(kwargs["pixel_values"]))

    trainer.teacher_model.register_forward_hook(record, with_kwargs=True)
    return sizes


def test_trainer_skips_the_teacher_after_the_first_epoch_and_matches_the_uncached_run(
    tmp_path, digits, resnet_teacher, resnet_student
):
    train = TensorImageDataset(digits[0].pixel_values[:32], digits[0].labels[:32])
    evaluation = TensorImageDataset(digits[1].pixel_values[:32], digits[1].labels[:32])
    histories, students = {}, {}
    for cached in (False, True):
        trainer = UDKDTrainer(
            model=copy.deepcopy(resnet_student),
            teacher_model=copy.deepcopy(resnet_teacher),
            args=_args(tmp_path, teacher_cache=cached),
            train_dataset=train,
            eval_dataset=evaluation,
        )
        teacher_batches = _count_teacher_batches(trainer)
        trainer.train()
        # 32 examples, batch 16, 2 epochs: the cached run asks the teacher in epoch 1 only.
        assert teacher_batches == [16] * (2 if cached else 4)
        trainer.evaluate()
        assert teacher_batches[-1] == 32, "evaluation must always run the teacher"
        if cached:
            assert trainer.teacher_cache.num_filled == 32
        histories[cached] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        students[cached] = trainer.student.state_dict()
    assert len(histories[True]) == 4
    np.testing.assert_allclose(histories[True], histories[False], rtol=1e-4)
    for name, value in students[False].items():
        torch.testing.assert_close(students[True][name], value, rtol=1e-4, atol=1e-5)


def test_trainer_cache_on_disk_with_a_datasets_transform_and_a_guide_collator(
    tmp_path, resnet_teacher, resnet_student
):
    splits = load_digits_dataset(split_seed=0)
    train = splits["train"].select(range(32))

    def transform(batch):
        return {"pixel_values": list(to_pixel_values(batch["image"], IMAGE_SIZE)), "labels": batch["label"]}

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
        }

    cache_dir = tmp_path / "teacher_cache"
    trainer = UDKDTrainer(
        model=resnet_student,
        teacher_model=resnet_teacher,
        args=_args(tmp_path, num_train_epochs=1, remove_unused_columns=False, teacher_cache=True,
                   teacher_cache_dir=str(cache_dir)),
        train_dataset=train.with_transform(transform),
        data_collator=collate,
    )
    trainer.train()
    assert trainer.teacher_cache.num_filled == 32
    logits = np.load(cache_dir / "process_0" / "teacher_logits.npy")
    assert logits.shape == (32, 10) and np.isfinite(logits).all()


def test_trainer_refuses_the_cache_with_a_random_transform(tmp_path, resnet_teacher, resnet_student):
    with pytest.raises(ValueError, match="deterministic training transform"):
        UDKDTrainer(
            model=resnet_student,
            teacher_model=resnet_teacher,
            args=_args(tmp_path, teacher_cache=True),
            train_dataset=_Flip(random=True),
        )
