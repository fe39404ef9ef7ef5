"""The accuracy study's pipeline (benchmarks/accuracy_study.py --quick): real data, tiny models, few steps.

Checks the plumbing, not the numbers: a teacher is trained and cached, every method runs through
UDKDTrainer, identical configurations train once, finished runs are skipped on a rerun, and the report
(JSON, markdown, PNG) is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy_study  # noqa: E402


def test_methods_resolve_to_valid_options():
    schedule = accuracy_study.Schedule()
    for method in accuracy_study.METHODS:
        spec = accuracy_study.RunSpec("lpc30", method, 0, schedule, "/unused", "cpu", 1)
        distill = spec.config()["distill"]
        if method == "scratch":
            assert distill is None
            continue
        # Every option resolves against the library's fields and is accepted by them.
        accuracy_study.UDKDTrainingArguments(output_dir="/tmp/unused", use_cpu=True, **distill)
    dkd = accuracy_study.RunSpec("lpc30", "dkd", 0, schedule, "/unused", "cpu", 1).config()["distill"]
    # 1500 steps * 64 / 300 images = 320 epochs; the warm-up keeps the paper's 20/240 share.
    assert dkd["dkd_warmup_epochs"] == pytest.approx(320 * 20 / 240, abs=0.01)
    with pytest.raises(SystemExit):
        accuracy_study.parse_args(["--methods", "nope"])


@pytest.mark.slow
def test_quick_study_end_to_end_and_cache(tmp_path, capsys):
    argv = ["--quick", "--output-dir", str(tmp_path), "--settings", "lpc30", "--device", "cpu", "--threads", "1",
            "--methods", "scratch", "kd", "unikd", "aff64"]
    summary = accuracy_study.main(argv)

    rows = summary["settings"]["lpc30"]
    assert set(rows) == {"scratch", "kd", "unikd", "aff64"}
    for row in rows.values():
        assert 0.0 <= row["mean"] <= 1.0 and row["n"] == 1
    assert rows["unikd"]["vs_kd"]["n"] == 1
    assert 0.0 <= summary["teachers"][0]["accuracy"] <= 1.0
    assert (tmp_path / "teachers" / "split0" / "config.json").is_file()

    run = json.loads((tmp_path / "runs" / "lpc30-unikd-s0.json").read_text())
    # The UniKD run logged its feature terms; the KD run has none (use_fdp=False).
    assert "loss_supp" in run["train_log"][-1] and "loss_feat" in run["train_log"][-1]
    kd = json.loads((tmp_path / "runs" / "lpc30-kd-s0.json").read_text())
    assert "loss_logit" in kd["train_log"][-1] and "loss_feat" not in kd["train_log"][-1]
    assert run["train_size"] == 300 and run["steps"] == accuracy_study.Schedule.quick().student_steps

    out = capsys.readouterr().out
    # aff64 is the library default width: it is trained once, under both names, when they coincide.
    if run["config"]["distill"]["aff_channels"] == 64:
        assert "also written as aff64" in out
        assert rows["aff64"]["by_seed"] == rows["unikd"]["by_seed"]
    assert "| unikd |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    # A rerun finds every run cached and trains nothing; a new step count invalidates them.
    accuracy_study.main(argv)
    assert "0 teacher(s) and 0 student run(s) to train (4 cached)" in capsys.readouterr().out
    accuracy_study.main([*argv, "--steps", "3", "--dry-run"])
    assert "0 teacher(s) and 3 student run(s) to train (0 cached)" in capsys.readouterr().out
