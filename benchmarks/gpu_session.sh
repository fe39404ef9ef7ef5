#!/usr/bin/env bash
# One prepared session on a lent GPU machine (no network there). Runs the parts asked for, in order, within
# a time budget, and leaves everything in one archive:
#   check  benchmarks/gpu_check.py: bf16/fp16 images/s at 224x224, FSDP2 and DeepSpeed ZeRO-3 runs
#   step   the step cost of issue "GPU step cost": student / KD / UniKD / store-fed UniKD at batch 64 and 256,
#          images on the GPU, bf16 and fp16 eager, then bf16 eager against compiled (about 7 minutes on an H200)
#   bench  benchmarks/bench_speed.py in bf16 (the README's speed table on CUDA)
#   study  benchmarks/accuracy_study.py, as many runs as the time left allows
#
#   OUT=/path/to/out bash benchmarks/gpu_session.sh [seconds] [part ...]      (default: 560 check bench study)
#
# The machine's image has torch but not our exact versions; wheels carried in .gpu_wheels/ (transformers,
# datasets, timm, evaluate, deepspeed and their pure-Python dependencies) are installed without the network.
set -u
budget=${1:-560}
shift || true
parts=${*:-check bench study}
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
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
  df -h /dev/shm | tail -1
  nproc
} > "$work/env.txt" 2>&1

export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_HOME=$work/hf_home TOKENIZERS_PARALLELISM=false
# DataLoader workers pass batches through /dev/shm; containers often give it 64 MB.
shm_kib=$(df --output=size -k /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
workers=0
if [ "${shm_kib:-0}" -gt 8000000 ]; then workers=6; fi

for part in $parts; do
  echo "$part start $(left)s left" >> "$work/env.txt"
  case $part in
    check)
      timeout $(( $(left) - 20 )) python3 benchmarks/gpu_check.py "$work/gpu_check.json" --workers $workers \
        --warmup 8 --steps 20 --engine-timeout 150 > "$work/gpu_check.log" 2>&1 ;;
    step)
      timeout $(( $(left) - 20 )) python3 benchmarks/gpu_check.py "$work/gpu_step_eager.json" --data-on-device \
        --batch-sizes 64 256 --precisions bf16 fp16 --engines --warmup 8 --steps 20 > "$work/gpu_step.log" 2>&1
      timeout $(( $(left) - 20 )) python3 benchmarks/gpu_check.py "$work/gpu_step_compiled.json" --data-on-device \
        --batch-sizes 64 256 --precisions bf16 --compile eager compiled --engines --warmup 8 --steps 20 \
        >> "$work/gpu_step.log" 2>&1 ;;
    bench)
      timeout 120 python3 benchmarks/bench_speed.py --device cuda --bf16 --output-dir "$work/bench" \
        > "$work/bench.log" 2>&1 ;;
    study)
      study=(python3 benchmarks/accuracy_study.py --device cuda --jobs 12 --output-dir "$work/accuracy_study")
      timeout $(( $(left) - 25 )) "${study[@]}" --methods primary > "$work/study_primary.log" 2>&1
      if [ "$(left)" -gt 60 ]; then
        timeout $(( $(left) - 25 )) "${study[@]}" --methods all > "$work/study_all.log" 2>&1
      fi
      # Summaries of whatever finished (the study caches every run, so a timed-out study still summarises).
      timeout 20 "${study[@]}" --methods all --summarize-only > "$work/study_summary.log" 2>&1 ;;
    *) echo "unknown part $part" >> "$work/env.txt" ;;
  esac
done
echo "done $(left)s left" >> "$work/env.txt"
tar --exclude='*.safetensors' --exclude='hf_home' -czf "$out/gpu_results.tgz" -C "$work" .
cp "$work/env.txt" "$out/env.txt"
for f in gpu_check.json gpu_check.md gpu_check.log gpu_step_eager.md gpu_step_compiled.md gpu_step.log; do [ -f "$work/$f" ] && cp "$work/$f" "$out/$f"; done
true
