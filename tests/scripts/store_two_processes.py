"""Two processes and one teacher store, for tests/test_teacher_store.py (run under torchrun on the CPU).

    torchrun --nproc_per_node 2 tests/scripts/store_two_processes.py OUT_DIR

1. Both processes precompute a store in ``OUT_DIR/store`` (random training transform, two views), each its
   share of the rows, in its own shard; each then checks a row that only the other's shard holds against its
   own teacher forward, and trains two epochs on the store, counting teacher forwards.
2. A store in memory, filled live in a two-epoch run with one view, counting teacher forwards per epoch.

Each rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TrainerCallback, ViTImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import IMAGE_SIZE, resnet_config  # noqa: E402

from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.data import load_digits_dataset  # noqa: E402
from hf_udkd.image_processing import ImageClassificationTransform, collate_image_classification  # noqa: E402

EXAMPLES, VIEWS = 24, 2


def _model(hidden_sizes: list[int]):
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(resnet_config(hidden_sizes))


def _trainer(out_dir: Path, **options) -> UDKDTrainer:
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
    train = load_digits_dataset(split_seed=0)["train"].select(range(EXAMPLES))
    args = UDKDTrainingArguments(
        output_dir=str(out_dir / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
        num_train_epochs=2, learning_rate=1e-3, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        remove_unused_columns=False, disable_tqdm=True, teacher_cache=True, **options,
    )
    return UDKDTrainer(
        model=_model([8, 16, 32, 64]), teacher_model=_model([16, 32, 64, 128]), args=args,
        train_dataset=train.with_transform(ImageClassificationTransform(processor, train=True, crop_scale=(0.3, 1))),
        data_collator=collate_image_classification,
    )


class _TeacherCount(TrainerCallback):
    """Teacher forwards per epoch."""

    def __init__(self, trainer: UDKDTrainer):
        self.total, self.per_epoch = 0, []
        trainer.teacher_model.register_forward_pre_hook(lambda *_: setattr(self, "total", self.total + 1))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.per_epoch.append(self.total - sum(self.per_epoch))


def main() -> None:
    out_dir = Path(sys.argv[1])
    trainer = _trainer(out_dir, teacher_cache_views=VIEWS, teacher_cache_dir=str(out_dir / "store"))
    rank, world = trainer.args.process_index, trainer.args.world_size
    store = trainer.precompute_teacher_outputs()
    other_rows = load_file(str(out_dir / "store" / f"shard-{1 - rank:05d}.safetensors"))["rows"]
    own_rows = load_file(str(out_dir / "store" / f"shard-{rank:05d}.safetensors"))["rows"]
    only_other = sorted(set(other_rows.tolist()) - set(own_rows.tolist()))
    view, index = divmod(only_other[0], EXAMPLES)
    example = trainer._replay.example(index, view)
    logits, features = trainer.teacher.outputs(example["pixel_values"][None])
    error = max((store.logits[only_other[0]] - logits[0]).abs().max().item(),
                (store.features[only_other[0]] - features[0]).abs().max().item())
    count = _TeacherCount(trainer)
    trainer.add_callback(count)
    trainer.train()

    live = _trainer(out_dir)
    live_count = _TeacherCount(live)
    live.add_callback(live_count)
    live.train()
    report = {
        "world_size": world,
        "rows": len(store),
        "full_after_precompute": store.is_full,
        "other_rank_row_error": error,
        "teacher_batches_in_training": count.total,
        "live_teacher_batches": live_count.per_epoch,
        "live_batches_per_epoch": EXAMPLES // (4 * world),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    # As the example script ends: a process that exits with the group open while another still works can
    # abort at exit ("terminate called without an active exception").
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()
