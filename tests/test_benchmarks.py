"""Smoke run of benchmarks/bench_speed.py --quick, in-process: every configuration steps, reports and is written."""

from __future__ import annotations

import json

from conftest import load_script


def test_bench_speed_quick_run_reports_every_configuration(tmp_path):
    bench = load_script("benchmarks/bench_speed.py")
    lines: list[str] = []
    result = bench.main(["--quick", "--pairs", "resnet", "--output-dir", str(tmp_path)], log=lines.append)

    written = json.loads((tmp_path / "speed_cpu_quick.json").read_text())
    assert written["pairs"][0]["rows"] == result["pairs"][0]["rows"]
    pair = result["pairs"][0]
    rows = {row["name"]: row for row in pair["rows"]}
    default = f"unikd_m{bench.DEFAULT_WIDTH}"
    widths = {f"unikd_m{width}" for width in (64, 16, bench.DEFAULT_WIDTH)}
    assert set(rows) == {"student", "kd", "unikd_no_aff", "unikd_cached"} | widths
    for row in rows.values():
        assert row["median_ms"] > 0 and row["peak_memory_mib"] > 0 and row["step_gflop"] > 0
    assert rows["student"]["time_vs_student"] == 1.0 and rows["kd"]["time_vs_kd"] == 1.0

    # What each configuration computes shows in its FLOPs: the teacher adds its forward, the fusion adds
    # more at a larger width, and a filled cache removes the teacher's forward again.
    flops = pair["forward_gflop"]
    assert rows["kd"]["step_gflop"] - rows["student"]["step_gflop"] >= 0.99 * flops["teacher_forward"]
    assert rows[default]["step_gflop"] > rows["unikd_m16"]["step_gflop"] > rows["unikd_no_aff"]["step_gflop"]
    assert flops[f"aff_forward_m{bench.DEFAULT_WIDTH}"] > flops["aff_forward_m16"] > 0
    saved = rows[default]["step_gflop"] - rows["unikd_cached"]["step_gflop"]
    assert abs(saved - flops["teacher_forward"]) <= 0.01 * flops["teacher_forward"]
    # Holding the teacher and the heads costs memory over the student alone.
    assert rows[default]["peak_memory_mib"] > rows["student"]["peak_memory_mib"]

    assert set(pair["targets"]) == {
        "unikd_time_vs_kd", "unikd_memory_vs_kd", "outside_aff_overhead", "cached_step_ms",
        "cache_saving_vs_teacher_forward",
    }
    table = (tmp_path / "speed_cpu_quick.md").read_text()
    assert f"| UniKD, aff_channels={bench.DEFAULT_WIDTH} (default) |" in table and "teacher cache filled" in table


def test_gpu_check_runs_on_cpu_and_writes_its_table(tmp_path):
    """benchmarks/gpu_check.py is run on lent GPUs only; its CPU smoke mode keeps the script working."""
    gpu_check = load_script("benchmarks/gpu_check.py")
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main([str(out), "--device", "cpu", "--image-size", "64", "--batch-sizes", "4",
                             "--warmup", "1", "--steps", "1", "--workers", "0", "--precisions", "fp32", "--engines"])
    assert json.loads(out.read_text()) == report
    runs = {run["mode"]: run for run in report["runs"]}
    assert set(runs) == set(gpu_check.MODES)
    assert all(run["loss_finite"] and run["images_per_s"] > 0 for run in runs.values())
    assert runs["unikd"]["teacher_trainable"] is False and "teacher_device" not in runs["student_only"]
    table = out.with_suffix(".md").read_text()
    assert "| fp32 | 4 | no | unikd |" in table and "| fp32 | 4 | no | student_only | " in table
    # The store-fed row never ran the teacher in its steps; its losses are those of a live teacher's run.
    assert runs["unikd_stored"]["loss_finite"] and runs["unikd_stored"]["compiled"] is False


def test_builtin_defaults_configurations_parse_and_the_report_pairs_seeds(tmp_path):
    bench = load_script("benchmarks/builtin_defaults.py")
    example = load_script("examples/run_image_classification_udkd.py")
    # Every configuration is a valid set of the example's flags, and names its loss (except "defaults").
    for name, flags in bench.CONFIGS.items():
        _, _, args = example.parse_arguments(["--output_dir", str(tmp_path / name), *flags])
        if name != "defaults":
            assert args.logit_standardization is not None and args.w_ce is not None
    rows = [{"config": name, "seed": seed, "accuracy": 90.0 + seed + (0.5 if name == "unikd" else 0.0) * seed,
             "teacher_accuracy": 95.0} for name in bench.CONFIGS for seed in (1, 2, 3)]
    text = bench.report(rows, [1, 2, 3])
    # unikd - kd = 0.5, 1.0, 1.5 over the seeds: mean +1.00, std 0.50, mean/std +2.0.
    assert "| unikd | 93.00 +- 1.50 | 91.50 / 93.00 / 94.50 | +1.00 +- 0.50 | +2.0 |" in text
