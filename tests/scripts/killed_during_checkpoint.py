"""A distillation run that is killed (SIGKILL) in the middle of writing a checkpoint, for tests/test_checkpoint.py.

    python tests/scripts/killed_during_checkpoint.py TEACHER_DIR STUDENT_DIR OUTPUT_DIR KILL_STEP

Trains on 128 digits with a checkpoint every 2 steps. While the checkpoint of KILL_STEP is being written (the
student, heads, optimizer and scheduler already on disk, the RNG states and trainer state not yet), the process
kills itself, as the OOM killer or a preempted job would.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TensorImageDataset, to_pixel_values  # noqa: E402

from hf_udkd import UDKDTrainer, UDKDTrainingArguments  # noqa: E402
from hf_udkd.data import load_digits_dataset  # noqa: E402


class KilledTrainer(UDKDTrainer):
    kill_step = 0

    def _save_rng_state(self, output_dir: str) -> None:
        if self.state.global_step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_rng_state(output_dir)


def checkpoint_args(output_dir: str, max_steps: int) -> UDKDTrainingArguments:
    """The arguments of the killed run and of the run that resumes it."""
    return UDKDTrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=16, learning_rate=3e-3,
        logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )


def digits_subset(n: int = 128) -> TensorImageDataset:
    train = load_digits_dataset(split_seed=0)["train"]
    return TensorImageDataset(to_pixel_values(train["image"][:n]), torch.tensor(train["label"][:n]))


def main() -> None:
    teacher, student, output_dir, kill_step = sys.argv[1:5]
    KilledTrainer.kill_step = int(kill_step)
    trainer = KilledTrainer(model=student, teacher_model=teacher, args=checkpoint_args(output_dir, 6),
                            train_dataset=digits_subset())
    trainer.train()


if __name__ == "__main__":
    main()
