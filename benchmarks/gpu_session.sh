#!/usr/bin/env bash
# One prepared session on a lent GPU machine (no network there): CUDA/bf16/fp16 check, the speed table in
# bf16, then the accuracy study with as many runs as the time left allows. Everything lands in one archive.
#
#   OUT=/path/to/out bash benchmarks/gpu_session.sh [seconds]
#
# The machine's image has torch but not our exact versions; wheels carried in .gpu_wheels/ (transformers,
# datasets, timm, evaluate and their pure-Python dependencies) are installed without touching the network.
set -u
budget=${1:-560}
start=$(date +%s)
out=${OUT:?set OUT to the output folder}
work=$(mktemp -d)
left() { echo $((budget - ($(date +%s) - start))); }

{
  python3 -m pip install --no-index --no-deps -q .gpu_wheels/*.whl 2>&1 | tail -3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, accelerate, timm, datasets; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, \
'timm', timm.__version__, 'datasets', datasets.__version__, 'bf16', torch.cuda.is_bf16_supported())"
} > "$work/env.txt" 2>&1

export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_HOME=$work/hf_home TOKENIZERS_PARALLELISM=false

echo "gpu_check start $(left)s left" >> "$work/env.txt"
timeout 150 python3 benchmarks/gpu_check.py "$work/gpu_check.json" > "$work/gpu_check.log" 2>&1
echo "bench start $(left)s left" >> "$work/env.txt"
timeout 120 python3 benchmarks/bench_speed.py --device cuda --bf16 --output-dir "$work/bench" > "$work/bench.log" 2>&1
echo "study start $(left)s left" >> "$work/env.txt"
study=(python3 benchmarks/accuracy_study.py --device cuda --jobs 12 --output-dir "$work/accuracy_study")
timeout $(( $(left) - 25 )) "${study[@]}" --methods primary > "$work/study_primary.log" 2>&1
if [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 25 )) "${study[@]}" --methods all > "$work/study_all.log" 2>&1
fi
# Summaries of whatever finished (the study caches every run, so a timed-out study still summarises).
timeout 20 "${study[@]}" --methods all --summarize-only > "$work/study_summary.log" 2>&1
echo "done $(left)s left" >> "$work/env.txt"
tar --exclude='*.safetensors' --exclude='hf_home' -czf "$out/gpu_results.tgz" -C "$work" .
cp "$work/env.txt" "$out/env.txt"
