#!/usr/bin/env bash
# The GPU figures of README's "Speed and benchmarks" in one run. Part "base": training throughput of
# the default U-Net (bf16, eager and torch.compile), the time of 10,000 DDIM-50 samples, and the real
# training loop of train_MNIST.py with its default flags for a few epochs (eager, compiled, and
# compiled with CUDA graphs and NHWC weights); on an H200 its first eight steps took 556 s and the
# last two about 155 s (run apart), much of it torch.compile. Part "large-batch": the fast flags
# (compiled, CUDA graphs, NHWC) at batch 512 and 1,024, in train_MNIST.py and throughput.py; with
# EPOCHS 8 it took 323 s on an H200 (each train_MNIST.py run compiled for about 60 s). Every
# step is logged to OUT_DIR/gpu.log; JSON and train_log.csv files land beside it.
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
throughput=(python benchmarks/throughput.py --networks ours $default_unet --dtype bfloat16
    --iters 20 --repeats 5 --warmup 5)
sampling=(python benchmarks/sampling_speed.py --batch-sizes 1000,10000 --repeats 2)

base_report() {  # eager, compiled and CUDA-graphed runs at the default batch of 128
    step throughput_eager 60 "${throughput[@]}" --batch-size 128 --json "$out/throughput_eager.json"
    step throughput_eager_channels_last 60 "${throughput[@]}" --batch-size 128 --channels-last
    step throughput_eager_batch_512 60 "${throughput[@]}" --batch-size 512
    step sampling_eager 120 "${sampling[@]}" --json "$out/sampling_eager.json"
    train_run train_eager 90
    step throughput_compiled 150 "${throughput[@]}" --batch-size 128 --compile \
        --json "$out/throughput_compiled.json"
    step sampling_compiled 150 "${sampling[@]}" --compile --json "$out/sampling_compiled.json"
    train_run train_compiled 150 --compile
    train_run train_fast 150 --compile --compile-mode reduce-overhead --channels-last
    step sampling_compiled_channels_last 120 "${sampling[@]}" --compile --channels-last \
        --json "$out/sampling_compiled_channels_last.json"
}

large_batch_report() {  # the fast flags at batch 512 and 1,024 (default lr: a speed run)
    local fast=(--compile --compile-mode reduce-overhead --channels-last)
    train_run train_fast_batch_512 200 --batch-size 512 --save-every 100 "${fast[@]}"
    train_run train_fast_batch_1024 170 --batch-size 1024 --save-every 100 "${fast[@]}"
    step throughput_fast_batch_1024 180 "${throughput[@]}" --batch-size 1024 "${fast[@]}" \
        --json "$out/throughput_fast_batch_1024.json"
}

case $part in
    base) base_report ;;
    large-batch) large_batch_report ;;
    all) base_report; large_batch_report ;;
    *) echo "PART must be base, large-batch or all, got $part" >&2; exit 2 ;;
esac
grep -E '^(==|ours|  +[0-9]+ +[0-9.]+ |[0-9]+,)' "$log"
