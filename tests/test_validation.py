"""Bad input is refused when UDKDTrainer is built, before any training step, naming the role and the fix."""

import datasets
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import IMAGE_SIZE, build, resnet_config, vit_config
from transformers import ViTImageProcessor

from hf_udkd import UDKDTrainer, UDKDTrainingArguments
from hf_udkd.data import PixelValuesDataset, load_digits_dataset
from hf_udkd.image_processing import ImageClassificationTransform, collate_image_classification
from hf_udkd.validation import MAX_SCANNED_EXAMPLES, read_labels, smallest_batch


def make_args(tmp_path, **kwargs) -> UDKDTrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to=[], use_cpu=True,
                    save_strategy="no", remove_unused_columns=False, max_steps=-1)
    return UDKDTrainingArguments(**{**defaults, **kwargs})


def tensors(digits, n: int) -> PixelValuesDataset:
    """The first ``n`` real training digits, as a fresh dataset whose tensors a test may change."""
    train = digits[0]
    return PixelValuesDataset(train.pixel_values[:n].clone(), train.labels[:n].clone())


class CountingTransform(ImageClassificationTransform):
    """The library's transform, counting the examples it prepares."""

    prepared = 0

    def __call__(self, batch):
        type(self).prepared += len(batch[self.image_column])
        return super().__call__(batch)


@pytest.fixture(scope="module")
def digit_images():
    """Real digit images (PIL) and labels from the training split."""
    train = load_digits_dataset(split_seed=0)["train"]
    return train["image"][:64], list(train["label"][:64])


def image_dataset(digit_images, labels=None, processor_size: int = IMAGE_SIZE, teacher_processor=None):
    """A ``datasets.Dataset`` of real images with an int64 ``label`` column, prepared by ``with_transform``."""
    images, real_labels = digit_images
    raw = datasets.Dataset.from_dict(
        {"image": images, "label": labels if labels is not None else real_labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    processor = ViTImageProcessor(size={"height": processor_size, "width": processor_size})
    CountingTransform.prepared = 0
    return raw.with_transform(CountingTransform(processor, teacher_processor, train=False))


def test_empty_training_set(tmp_path, resnet_student, digits):
    empty = PixelValuesDataset(torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"training set \(train_dataset\) is empty: the student"):
        UDKDTrainer(model=resnet_student, args=make_args(tmp_path), train_dataset=empty, eval_dataset=digits[1])


def test_empty_evaluation_set_in_a_dict(tmp_path, resnet_student, digits):
    empty = tensors(digits, 0)
    with pytest.raises(ValueError, match=r"eval_dataset\['small'\] is empty"):
        UDKDTrainer(model=resnet_student, args=make_args(tmp_path), train_dataset=tensors(digits, 64),
                    eval_dataset={"full": digits[1], "small": empty})


def test_label_outside_the_students_classes_in_a_tensor_dataset(tmp_path, resnet_student, digits):
    train = tensors(digits, 64)
    train.labels[37] = 10
    with pytest.raises(ValueError, match=r"training set.* label 10 \(example 37.*student has num_labels=10.*"
                                         r"\[0, 10\).*num_labels, id2label"):
        UDKDTrainer(model=resnet_student, args=make_args(tmp_path), train_dataset=train)


def test_label_outside_the_classes_in_a_transformed_dataset_is_read_without_the_transform(
    tmp_path, resnet_student, resnet_teacher, digit_images
):
    labels = list(digit_images[1])
    labels[41] = -3
    evaluation = image_dataset(digit_images, labels)
    with pytest.raises(ValueError, match=r"evaluation set \(eval_dataset\) holds label -3 \(example 41"):
        UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(tmp_path),
                    train_dataset=image_dataset(digit_images), eval_dataset=evaluation,
                    data_collator=collate_image_classification)
    # Only the probe's two examples and one per data set (to learn its keys) went through the transform: the
    # labels of all 64 came from the column.
    assert CountingTransform.prepared == 4


def test_ignore_index_and_examples_without_labels_are_accepted(tmp_path, resnet_student, resnet_teacher, digits,
                                                               digit_images):
    train = tensors(digits, 64)
    train.labels[::2] = -100
    UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(tmp_path), train_dataset=train)
    images, _ = digit_images
    unlabelled = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    unlabelled = unlabelled.with_transform(ImageClassificationTransform(processor, train=True, label_column=None))
    trainer = UDKDTrainer(model=resnet_student, teacher_model=resnet_teacher, args=make_args(tmp_path),
                          train_dataset=unlabelled, data_collator=collate_image_classification)
    assert trainer.teacher is not None


def test_float_labels(tmp_path, resnet_student, digits):
    train = tensors(digits, 64)
    train.labels = train.labels.float()
    with pytest.raises(ValueError, match=r"training set.*'labels' of type torch.float32.*student.*integer class ids"):
        UDKDTrainer(model=resnet_student, args=make_args(tmp_path), train_dataset=train)


def test_labels_of_an_unknown_dataset_are_scanned_within_a_bound(digits):
    train = torch.utils.data.Subset(digits[0], range(2 * MAX_SCANNED_EXAMPLES))
    labels = read_labels(train, "labels")
    assert labels.tolist() == digits[0].labels[:MAX_SCANNED_EXAMPLES].tolist()


def test_labels_of_a_selected_transformed_dataset_follow_its_rows(digit_images):
    labels = list(range(10)) * 6 + [0, 1, 2, 3]
    rows = [63, 5, 12, 0]
    dataset = image_dataset(digit_images, labels).select(rows)
    assert read_labels(dataset, "labels").tolist() == [labels[i] for i in rows]
    assert CountingTransform.prepared == 0


def test_last_batch_of_one_with_a_batch_norm_student(tmp_path, resnet_student, digits):
    train = tensors(digits, 17)
    with pytest.raises(ValueError, match=r"17 training examples with per_device_train_batch_size=8.*batch of 1 "
                                         r"image.*the student has BatchNorm.*dataloader_drop_last=True"):
        UDKDTrainer(model=resnet_student, args=make_args(tmp_path), train_dataset=train)
    UDKDTrainer(model=resnet_student, args=make_args(tmp_path, dataloader_drop_last=True), train_dataset=train)
    # A run that stops before the first epoch's last batch never meets it.
    UDKDTrainer(model=resnet_student, args=make_args(tmp_path, max_steps=2), train_dataset=train)


def test_batch_size_one_with_a_batch_norm_student_asks_for_a_larger_batch(tmp_path, resnet_student, digits):
    with pytest.raises(ValueError, match=r"Raise per_device_train_batch_size to 2"):
        UDKDTrainer(model=resnet_student, args=make_args(tmp_path, per_device_train_batch_size=1),
                    train_dataset=tensors(digits, 16))


def test_last_batch_of_one_with_batch_norm_in_the_heads(tmp_path, resnet_teacher, digits):
    student = build(vit_config(), tmp_path / "vit_student")
    train = tensors(digits, 17)
    with pytest.raises(ValueError, match=r"the UniKD heads \(aff_batch_norm=True\) have BatchNorm \(fusion\..*aff_batch_norm=False"):
        UDKDTrainer(model=student, teacher_model=resnet_teacher, args=make_args(tmp_path, aff_batch_norm=True),
                    train_dataset=train)
    # Without BatchNorm anywhere a batch of one is fine.
    UDKDTrainer(model=student, teacher_model=resnet_teacher, args=make_args(tmp_path), train_dataset=train)


@pytest.mark.parametrize("num_processes", [1, 2, 3])
@pytest.mark.parametrize("split_batches", [False, True])
@pytest.mark.parametrize("even_batches", [True, False])
def test_smallest_batch_matches_accelerates_sharding(num_processes, split_batches, even_batches):
    batch_size = 6
    for num_examples in range(1, 40):
        for drop_last in (False, True):
            sampler = torch.utils.data.BatchSampler(range(num_examples), batch_size, drop_last)
            sizes = [
                len(batch)
                for index in range(num_processes)
                for batch in (
                    BatchSamplerShard(sampler, num_processes, index, split_batches, even_batches)
                    if num_processes > 1 else sampler
                )
            ]
            expected = min(sizes, default=None)
            if expected is None:
                continue
            got = smallest_batch(num_examples, batch_size, num_processes, 1, drop_last, split_batches, even_batches)
            assert got == expected, (num_examples, drop_last)


@pytest.mark.parametrize("num_devices", [2, 3, 4])
def test_smallest_batch_under_data_parallel_matches_tensor_chunk(num_devices):
    batch_size = 2 * num_devices
    for num_examples in range(1, 30):
        last = num_examples % batch_size or batch_size
        expected = min(len(chunk) for chunk in torch.arange(last).chunk(num_devices))
        assert smallest_batch(num_examples, batch_size, num_devices=num_devices) == expected


def test_images_without_a_channel_axis(tmp_path, resnet_student, digits):
    train = tensors(digits, 16)
    train.pixel_values = train.pixel_values[:, 0]
    with pytest.raises(ValueError, match=r"the student's input 'pixel_values' is \(2, 32, 32\).*student needs "
                                         r"\(B, C, H, W\).*image processor"):
        UDKDTrainer(model=resnet_student, args=make_args(tmp_path), train_dataset=train)


def test_channels_the_student_does_not_take(tmp_path, resnet_student, digits):
    train = tensors(digits, 16)
    train.pixel_values = train.pixel_values[:, :1]
    with pytest.raises(ValueError, match=r"student's input 'pixel_values' has 1 channel\(s\).*student's config has "
                                         r"num_channels=3.*num_channels=1"):
        UDKDTrainer(model=resnet_student, args=make_args(tmp_path), train_dataset=train)


def test_channels_the_teacher_does_not_take(tmp_path, resnet_student, digits):
    teacher = build(resnet_config([16, 32, 64, 128], num_channels=1), tmp_path / "grey_teacher")
    with pytest.raises(ValueError, match=r"teacher's input 'pixel_values' has 3 channel\(s\).*teacher's config has "
                                         r"num_channels=1.*teacher_pixel_values.*teacher's image processor"):
        UDKDTrainer(model=resnet_student, teacher_model=teacher, args=make_args(tmp_path),
                    train_dataset=tensors(digits, 16))


def test_teacher_pixel_values_of_the_wrong_shape(tmp_path, resnet_student, digit_images):
    teacher = build(resnet_config([16, 32, 64, 128], num_channels=1), tmp_path / "grey_teacher")
    teacher_processor = ViTImageProcessor(size={"height": 48, "width": 48})
    train = image_dataset(digit_images, teacher_processor=teacher_processor)
    with pytest.raises(ValueError, match=r"teacher's input 'teacher_pixel_values' has 3 channel\(s\) \(shape "
                                         r"\(2, 3, 48, 48\)\).*teacher's config has num_channels=1"):
        UDKDTrainer(model=resnet_student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=train,
                    data_collator=collate_image_classification)
