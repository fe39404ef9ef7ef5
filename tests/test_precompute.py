"""`python -m hf_udkd.precompute`: the example script's arguments fill the store that the script then reads."""

from __future__ import annotations

import pytest
from conftest import load_script

from hf_udkd import precompute


def test_precompute_fills_the_store_that_the_example_script_trains_on(tmp_path):
    arguments = [
        "--output_dir", str(tmp_path / "out"), "--max_train_samples", "48", "--max_eval_samples", "32",
        "--num_train_epochs", "2", "--teacher_num_train_epochs", "1", "--per_device_train_batch_size", "16",
        "--disable_tqdm", "true", "--teacher_cache", "--teacher_cache_views", "2",
        "--teacher_cache_dir", str(tmp_path / "store"),
    ]
    store = precompute.main(arguments)
    assert store.is_full and len(store) == 48 * 2
    shard = tmp_path / "store" / "shard-00000.safetensors"
    written = shard.stat().st_mtime_ns

    # Same arguments: the script reuses the teacher trained by precompute, and its fingerprint matches the store's
    # (an unmatched one is refused). A full store gives every training row: the shard gains nothing.
    summary = load_script("examples/run_image_classification_udkd.py").main(arguments)
    assert summary.trainer.teacher_cache.is_full and summary.student_accuracy is not None
    assert shard.stat().st_mtime_ns == written


def test_precompute_needs_the_store_option(tmp_path):
    with pytest.raises(ValueError, match="pass --teacher_cache"):
        precompute.main(["--output_dir", str(tmp_path), "--max_train_samples", "16"])
