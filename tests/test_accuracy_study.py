"""The accuracy study's pipeline (benchmarks/accuracy_study.py): real data, tiny teacher, few steps.

Checks the plumbing, not the numbers: methods resolve to valid options, paired runs replay the same views,
the teacher store holds what the teacher computes, scratch trains once for both of its settings, finished runs
are skipped on a rerun, and the report (JSON, markdown, PNGs) is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy_study  # noqa: E402


def _spec(method: str, setting: str = "lpc30u", schedule=None) -> accuracy_study.RunSpec:
    schedule = schedule or accuracy_study.Schedule()
    return accuracy_study.RunSpec("student", 0, schedule, "/unused", "cpu", 1, setting, method, "r20k")


def test_methods_resolve_to_valid_options():
    for method in accuracy_study.METHODS:
        distill = _spec(method).config()["distill"]
        if method == "scratch":
            assert distill is None
            continue
        # Every option resolves against the library's fields and is accepted by them.
        accuracy_study.UDKDTrainingArguments(output_dir="/tmp/unused", use_cpu=True, **distill)
    # Scratch ignores the unlabelled rest: one run serves both settings. KD does not.
    assert _spec("scratch", "lpc30u").config() == _spec("scratch", "lpc30").config()
    assert _spec("kd", "lpc30u").config() != _spec("kd", "lpc30").config()
    assert _spec("unikd_lr0.02").config()["learning_rate"] == 0.02
    with pytest.raises(SystemExit):
        accuracy_study.parse_args(["--methods", "nope"])
    assert accuracy_study.parse_args(["--methods", "unikd"]).methods == ["unikd"]
    assert accuracy_study.parse_args(["--methods", "unikd", "scratch"]).methods == ["scratch", "kd", "unikd"]


def test_views_replay_per_seed():
    images, labels = torch.randn(5, 1, 32, 32), torch.arange(5)

    def reads(seed: int) -> list[torch.Tensor]:
        data = accuracy_study.AugmentedImages(images, labels, augment=True, seed=seed, num_views=2)
        data.start_replay()
        return [data[i]["pixel_values"] for i in [3, 1, 3, 1]]

    first, again, other = reads(0), reads(0), reads(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    data = accuracy_study.AugmentedImages(images, labels, augment=True, seed=0, num_views=2)
    # Before training, reads (the Trainer's checks) see view 0 and do not count.
    assert torch.equal(data[3]["pixel_values"], data.view(0, 3)) and data[3][accuracy_study.INDEX_KEY] == 3
    data.start_replay()
    # The k-th read of example i is view k, stored at row k * N + i.
    assert [data[3][accuracy_study.INDEX_KEY] for _ in range(2)] == [3, 5 + 3]
    assert torch.equal(data.view(1, 3), first[2])
    with pytest.raises(RuntimeError, match="only 2 views"):
        data[3]


def test_paired_statistics_match_scipy():
    diffs = [0.012, -0.004, 0.02, 0.008, 0.015]
    out = accuracy_study.paired(diffs)
    assert out["p"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert out["ci95"] == pytest.approx([low, high])
    assert out["mean_over_std"] == pytest.approx(np.mean(diffs) / np.std(diffs, ddof=1))


@pytest.mark.slow
def test_quick_study_end_to_end_and_cache(tmp_path, capsys):
    argv = [
        "--quick",
        "--output-dir",
        str(tmp_path),
        "--settings",
        "lpc30u",
        "lpc30",
        "--students",
        "r20k",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--methods",
        "scratch",
        "unikd",
    ]
    summary = accuracy_study.main(argv)

    out = capsys.readouterr().out
    # kd joins as the reference; scratch is trained once for both settings.
    assert "1 teacher(s), 2 store(s) and 5 student run(s) to train (0 cached)" in out
    rows = summary["results"]["r20k"]["lpc30u"]
    assert set(rows) == {"scratch", "kd", "unikd"}
    assert rows["scratch"]["by_seed"] == summary["results"]["r20k"]["lpc30"]["scratch"]["by_seed"]
    assert rows["unikd"]["vs_kd"]["n"] == 1 and rows["unikd"]["same_data_as_kd"]
    assert 0.0 <= summary["teachers"][0]["accuracy"] <= 1.0

    run = json.loads((tmp_path / "runs" / "r20k-lpc30u-unikd-s0.json").read_text())
    assert run["teacher_store"] and run["labelled"] == 300 and run["train_size"] == 500
    # The UniKD run logged its feature terms and FDP's noise scale; the KD run has neither.
    assert {"loss_supp", "loss_feat", "sigma_student", "mu_spread_teacher"} <= set(run["train_log"][-1])
    kd = json.loads((tmp_path / "runs" / "r20k-lpc30u-kd-s0.json").read_text())
    assert "loss_logit" in kd["train_log"][-1] and "loss_feat" not in kd["train_log"][-1]
    assert kd["order_digest"] == run["order_digest"]

    # The store holds what the teacher computes on the views the students read.
    store_spec = accuracy_study.RunSpec(
        "store", 0, accuracy_study.Schedule.quick(), str(tmp_path), "cpu", 1, "lpc30u"
    )
    logits, features = accuracy_study._store_arrays(store_spec)
    probe = accuracy_study.RunSpec(
        "student", 0, store_spec.schedule, str(tmp_path), "cpu", 1, "lpc30u", "kd", "r20k"
    )
    train, _, _ = accuracy_study._load_data(probe)
    assert logits.shape[0] == train.num_views * len(train)
    teacher = accuracy_study.Teacher.from_probe(
        accuracy_study._load_teacher(probe), torch.stack([train.view(0, 0), train.view(0, 1)]), None, -1
    )
    n = len(train)
    rows_to_check = [0, 7, logits.shape[0] - 1]
    expected_logits, expected_features = teacher.outputs(
        torch.stack([train.view(r // n, r % n) for r in rows_to_check])
    )
    torch.testing.assert_close(torch.from_numpy(logits[rows_to_check]), expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        torch.from_numpy(features[rows_to_check]), expected_features, rtol=1e-4, atol=1e-4
    )

    report = (tmp_path / "summary.md").read_text()
    assert "| r20k | lpc30u | unikd |" in report
    assert "| r20k | lpc30u | unikd | 0 |" in (tmp_path / "diagnostics.md").read_text()
    for name in ["accuracy.png", "vs_kd.png"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"

    # A rerun finds every run cached and trains nothing; a new step count invalidates the students and stores.
    accuracy_study.main(argv)
    assert "0 teacher(s), 0 store(s) and 0 student run(s) to train (6 cached)" in capsys.readouterr().out
    accuracy_study.main([*argv, "--steps", "3", "--dry-run"])
    assert "0 teacher(s), 2 store(s) and 5 student run(s) to train (0 cached)" in capsys.readouterr().out
