#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run. Part "base": training throughput of the default
# U-Net (bf16; eager, compiled, and the default fast path: compiled with CUDA graphs and NHWC), the
# time of 10,000 DDIM-50 samples, and train_MNIST.py's loop for a few epochs in the same set-ups.
# Part "large-batch": the default fast path at batch 512 and 1,024, in train_MNIST.py and
# throughput.py. Every step is logged to OUT_DIR/gpu.log; JSON and train_log.csv files land beside it.
#
# Usage: bash benchmarks/gpu_report.sh OUT_DIR DATA_DIR [EPOCHS] [PART]
#   DATA_DIR: MNIST-format IDX files of 60,000 training images (MNIST, or Fashion-MNIST offline)
#   EPOCHS:   epochs of each train_MNIST.py run (default 2)
#   PART:     base | large-batch | all (default all)
set -u
out=${1:?usage: gpu_report.sh OUT_DIR DATA_DIR [EPOCHS] [PART]}
data=${2:?usage: gpu_report.sh OUT_DIR DATA_DIR [EPOCHS] [PART]}
epochs=${3:-2}
part=${4:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/gpu.log"
default_unet="--model-channels 64 --channel-mult 1,2,2 --num-res-blocks 2 --attn-resolutions 14"

step() {  # step NAME TIME_LIMIT_S COMMAND...: run it, log its output, report its wall time
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s%N)
    echo "== $name: $*" | tee -a "$log"
    timeout -k 15 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -E '^sampled |/s\]$' >> "$log"
    echo "== $name: exit ${PIPESTATUS[0]}, $((($(date +%s%N) - start) / 1000000)) ms" | tee -a "$log"
}

train_run() {  # train_run NAME TIME_LIMIT_S EXTRA_FLAGS...: default train_MNIST.py for $epochs epochs
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" python train_MNIST.py --data-dir "$data" --epochs "$epochs" \
        --out-dir "/tmp/$name" "$@"
    cp "/tmp/$name/train_log.csv" "$out/$name.csv" 2>/dev/null
    tail -n 3 "/tmp/$name/train_log.csv" >> "$log" 2>/dev/null
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; python -c \
    "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } >> "$log" 2>&1
throughput=(python -m benchmarks.throughput --networks ours,trainer $default_unet --amp bf16
    --iters 20 --repeats 5 --warmup 5)
sampling=(python -m benchmarks.sampling_speed --batch-sizes 1000,10000 --repeats 2)

base_report() {  # eager, compiled and CUDA-graphed runs at the default batch of 128
    local eager=(--compile off --channels-last off)
    step throughput_eager 60 "${throughput[@]}" --batch-size 128 "${eager[@]}" --json "$out/throughput_eager.json"
    step throughput_eager_channels_last 60 "${throughput[@]}" --batch-size 128 --compile off --channels-last on
    step throughput_eager_batch_512 60 "${throughput[@]}" --batch-size 512 "${eager[@]}"
    step sampling_eager 120 "${sampling[@]}" "${eager[@]}" --json "$out/sampling_eager.json"
    train_run train_eager 90 "${eager[@]}"
    step throughput_compiled 150 "${throughput[@]}" --batch-size 128 --compile on --compile-mode default \
        --channels-last off --json "$out/throughput_compiled.json"
    step sampling_compiled 150 "${sampling[@]}" --compile on --compile-mode default --channels-last off \
        --json "$out/sampling_compiled.json"
    train_run train_compiled 150 --compile on --compile-mode default --channels-last off
    train_run train_default 150
    step sampling_default 120 "${sampling[@]}" --json "$out/sampling_default.json"
}

large_batch_report() {  # the default fast path at batch 512 and 1,024 (default lr: a speed run)
    train_run train_fast_batch_512 200 --batch-size 512 --save-every 100
    train_run train_fast_batch_1024 170 --batch-size 1024 --save-every 100
    step throughput_fast_batch_1024 180 "${throughput[@]}" --batch-size 1024 \
        --json "$out/throughput_fast_batch_1024.json"
}

case $part in
    base) base_report ;;
    large-batch) large_batch_report ;;
    all) base_report; large_batch_report ;;
    *) echo "PART must be base, large-batch or all, got $part" >&2; exit 2 ;;
esac
grep -E '^(==|ours|  +[0-9]+ +[0-9.]+ |[0-9]+,)' "$log"
