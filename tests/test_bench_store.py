"""Smoke runs of benchmarks/bench_store.py: --quick (every configuration trains, reports and is written), --accuracy."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


def test_bench_store_quick_run_reports_epochs_and_precompute(tmp_path):
    bench = load_script("benchmarks/bench_store.py")
    lines: list[str] = []
    result = bench.main(["--quick", "--pairs", "resnet", "--output-dir", str(tmp_path)], log=lines.append)

    written = json.loads((tmp_path / "store_cpu_quick.json").read_text())
    pair = result["pairs"][0]
    assert written["pairs"][0]["epoch_seconds"] == pair["epoch_seconds"]
    assert set(pair["epoch_seconds"]) == {"student", "uncached", "store", "store_kd"}
    assert all(seconds > 0 for seconds in pair["epoch_seconds"].values())
    assert pair["precompute_seconds"] > 0 and pair["teacher_forward_seconds"] > 0
    # 32 images x 2 views x (10 logits + the 256-channel tap of the quick teacher), float32.
    assert pair["store_mib"] == 32 * 2 * (10 + 256) * 4 / 2**20
    assert set(pair["targets"]) == {"store_epoch_vs_student_epoch", "precompute_vs_teacher_forward"}
    table = (tmp_path / "store_cpu_quick.md").read_text()
    assert "| store x student |" in table and "| precompute x forward |" in table


@pytest.mark.slow
def test_bench_store_accuracy_mode_pairs_seeds(tmp_path):
    bench = load_script("benchmarks/bench_store.py")
    result = bench.main(["--accuracy", "--epochs", "4", "--accuracy-examples", "64", "--seeds", "0", "1",
                         "--output-dir", str(tmp_path)], log=lambda _line: None)
    assert result["views"] == 1 and set(result["accuracy"]) == {"uncached", "store"}
    assert all(len(values) == 2 and all(0 <= v <= 1 for v in values) for values in result["accuracy"].values())
    assert len(result["paired_differences"]) == 2
    assert "| store |" in (tmp_path / "store_accuracy_cpu.md").read_text()
