#!/usr/bin/env bash
# benchmarks/gpu_study.py on a lent GPU machine (the device tool), whose Python lacks `datasets` and has older
# transformers / timm. Prepare here (see docs/robust_default.md, "On a GPU"), carry `runs/gpu_carry`, then run
#   bash benchmarks/gpu_study.sh            # writes the results and models as tar files into $OUT
# runs/gpu_carry holds: cifar10/ (the shared copy, re-compressed with zstd: same rows, 17 MiB), site.tar.xz
# (transformers, timm, datasets, dill, multiprocess wheels unpacked), site_alt.tar.xz (datasets 4.0 for an older
# pyarrow), authors/ and nad/ (the MEDIC authors' checkpoints without optimizer state, NAD's SIG mask).
# BUDGET: seconds from the start of this script to the study's deadline (then it packs, ~10 s).
set -u -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
START=$(date +%s)
OUT=${OUT:-runs/gpu/out}
mkdir -p "$OUT" /tmp/site
tar xJf "runs/gpu_carry/${SITE:-site.tar.xz}" -C /tmp/site || exit 3
export PYTHONPATH=/tmp/site:$PWD

check() {
    timeout 120 python3 - <<'EOF'
import importlib.metadata as m
print({p: m.version(p) for p in ("torch", "transformers", "timm", "datasets", "accelerate", "pyarrow", "huggingface_hub")})
from medic_hf.data import load_image_dataset
data = load_image_dataset("runs/gpu_carry/cifar10")
assert len(data["train"]) == 50000 and len(data["test"]) == 10000
print(data["train"].select(range(8)).map(lambda row: {"label": row["label"]})[0]["label"], "data ok")
EOF
}
if ! check; then
    echo "datasets 5.2 failed here: trying datasets 4.0"
    rm -rf /tmp/site/datasets* /tmp/site/dill* /tmp/site/multiprocess* /tmp/site/_multiprocess
    tar xJf runs/gpu_carry/site_alt.tar.xz -C /tmp/site && check || exit 4
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc

# CUDA MPS lets the many small processes' kernels run at once; without it they time-share the card.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
mkdir -p /tmp/mps /tmp/mpslog
if nvidia-cuda-mps-control -d && timeout 60 python3 -c "import torch; torch.zeros(1, device='cuda'); print('MPS ok')"; then
    echo "MPS on"
else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS off"
fi

# Preflight: a tiny trojaned model and a tiny MEDIC run on the GPU, so a broken environment costs a minute
# (SKIP_PREFLIGHT=1 once this environment is known to work).
rm -rf /tmp/pre
if [ -z "${SKIP_PREFLIGHT:-}" ] && ! { timeout 150 python3 -m medic_hf.scripts.poison --config recipes/poison_cifar10_small.yaml \
        --dataset_name runs/gpu_carry/cifar10 --attack badnets --max_train_samples 512 --max_eval_samples 256 \
        --num_train_epochs 1 --output_dir /tmp/pre/teacher --save_strategy no --disable_tqdm true &&
    timeout 150 python3 recipes/clone.py --model_name_or_path /tmp/pre/teacher --dataset_name runs/gpu_carry/cifar10 \
        --clean_fraction 0.01 --max_eval_samples 256 --max_steps 20 --output_dir /tmp/pre/clone \
        --allow_accuracy_drop true --disable_tqdm true; } > "$OUT/preflight.log" 2>&1; then
    tail -60 "$OUT/preflight.log"
    exit 5
fi
[ -z "${SKIP_PREFLIGHT:-}" ] && grep -h '"timing"' -A8 /tmp/pre/clone/results.json | head -9
echo "preflight ok after $(( $(date +%s) - START )) s"

python3 benchmarks/gpu_study.py --dataset runs/gpu_carry/cifar10 --deadline_s $(( ${BUDGET:-540} - $(date +%s) + START )) \
    --jobs "${JOBS:-15}" --pack "$OUT" ${STUDY_ARGS:-} 2>&1 | tee "$OUT/study.log"
