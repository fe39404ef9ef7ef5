"""The built-in run (`python examples/run_image_classification_udkd.py`, every Animal-MNIST label, AdamW) over
paired seeds, for the loss configurations of the accuracy study: does a default chosen for few labels also hold
where every image is labelled?

One teacher (the example's built-in one, trained once with its default seed and reused), then one student run of
the example per (configuration, seed), each in its own process with one torch thread (the example is
deterministic for a thread count). Seeds pair the runs: same initialisation, data order and augmentation. The
report: accuracy mean +- std and the paired difference to logit KD (mean +- std, mean/std), as markdown and JSON.

    python benchmarks/builtin_defaults.py --jobs 2                  # 5 configurations x 4 seeds, ~12 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "run_image_classification_udkd.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_study import METHODS  # noqa: E402


def _flags(options: dict) -> list[str]:
    return [flag for name, value in options.items() for flag in (f"--{name}", str(value))]


# The accuracy study's methods as flags of the example: each names its weights and standardization, so a change of
# the library's defaults does not change what a row means.
CONFIGS: dict[str, list[str]] = {
    **{name: _flags(METHODS[name].options) for name in ("kd", "unikd", "kd_ls_w9", "unikd_ls_w9")},
    "defaults": [],  # whatever UDKDTrainingArguments ships
}


def run(work: Path, teacher_dir: Path, name: str, seed: int) -> dict:
    out = work / f"{name}-s{seed}"
    results = out / "all_results.json"
    if not results.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, str(EXAMPLE), "--output_dir", str(out), "--teacher_output_dir",
                   str(teacher_dir), "--seed", str(seed), *CONFIGS[name]]
        log = out.with_suffix(".log")
        with open(log, "w") as handle:
            subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=True)
    data = json.loads(results.read_text())
    return {"config": name, "seed": seed, "accuracy": 100 * data["eval_accuracy"],
            "teacher_accuracy": 100 * data["teacher_eval_accuracy"]}


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def report(rows: list[dict], seeds: list[int]) -> str:
    by = {(r["config"], r["seed"]): r["accuracy"] for r in rows}
    teacher = rows[0]["teacher_accuracy"]
    lines = [
        f"Built-in run (every label, AdamW lr 2e-3, 5 epochs), teacher {teacher:.2f}%, seeds {seeds}. "
        "Accuracy (%) mean +- std; vs KD: paired difference, mean +- std, and mean/std.",
        "",
        "| configuration | accuracy | per seed | vs KD | mean/std |",
        "|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        values = [by[name, s] for s in seeds]
        cells = [f"{statistics.mean(values):.2f} +- {_spread(values):.2f}",
                 " / ".join(f"{v:.2f}" for v in values)]
        if name == "kd":
            cells += ["", ""]
        else:
            diffs = [by[name, s] - by["kd", s] for s in seeds]
            mean, std = statistics.mean(diffs), _spread(diffs)
            cells += [f"{mean:+.2f} +- {std:.2f}", f"{mean / std:+.1f}" if std > 0 else ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "out-builtin-defaults")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "builtin_defaults_cpu")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    teacher_dir = args.work_dir / "teacher"
    # The first run trains the teacher (the example's default seed); every other run reuses it.
    first = run(args.work_dir, teacher_dir, "kd", 42)
    jobs = [(name, seed) for seed in args.seeds for name in CONFIGS if (name, seed) != ("kd", 42)]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = [first, *pool.map(lambda job: run(args.work_dir, teacher_dir, *job), jobs)]
    if 42 not in args.seeds:
        rows = rows[1:]
    text = report(rows, args.seeds)
    args.output.with_suffix(".md").write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
