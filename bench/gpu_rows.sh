#!/usr/bin/env bash
# Every GPU row of docs/benchmarks.md in one go, on a CUDA machine, from the repository root:
#   bash bench/gpu_rows.sh OUT_DIR [STEP ...]   (offline GPU image: bash .gpu/run.sh bash bench/gpu_rows.sh OUT_DIR)
# Each step runs under its own timeout and writes its log to OUT_DIR/<step>.log, so one hang cannot eat the
# rest; OUT_DIR/summary.txt gets one line per step (exit status, seconds). Steps, most informative first:
# bench_lora_overhead, bench_train_step, bench_merge (the three GPU benchmarks), bench_merge_overhead (the
# host's work per merge), main_job_gpu (the main job with trainer=gpu), pytest_gpu_world (the world configs
# of tests/test_gpu.py), pytest_gpu_dryruns (the other `gpu` tests: full-scale dry runs on CUDA),
# world_table2_batched (the world Table 2 from a cold cache with every cell batched: target 5 minutes),
# bench_batched_sd15 (4 SD1.5 LoRAs stacked at batch 1 against one after another: target 2.5x),
# pytest_gpu_batched (tests/test_batched.py's `gpu` tests), bench_lora_overhead_compile. Naming steps runs
# only those. All steps at their limits take about 44 minutes: more than one 15-minute device session, so
# name the steps a session should run (for issue 22: world_table2_batched bench_batched_sd15 pytest_gpu_batched).
set -u
out=${1:?usage: bash bench/gpu_rows.sh OUT_DIR [STEP ...]}
shift
only=" $* "
mkdir -p "$out"
py=${PYTHON:-python3}
export LORABENCH_OUTPUTS=${LORABENCH_OUTPUTS:-$out/outputs}

step() {
    local name=$1 limit=$2
    shift 2
    if [ "$only" != "  " ] && [[ "$only" != *" $name "* ]]; then return; fi
    local start=$SECONDS
    echo "== $name (at most ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"
    echo "$name exit=$rc seconds=$((SECONDS - start))" >> "$out/summary.txt"
}

{ nvidia-smi; "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
    > "$out/device.txt" 2>&1
step bench_lora_overhead 150 "$py" bench/bench_lora_overhead.py --device cuda --size sd15-like --batch 4 \
    --dtype bfloat16 --steps 15
step bench_train_step 100 "$py" bench/bench_train_step.py --device cuda --size sd15-like --batch 4 \
    --dtype bfloat16 --steps 15
step bench_merge 60 "$py" bench/bench_merge.py --device cuda --dtype bfloat16
step bench_merge_overhead 60 "$py" bench/bench_merge.py --device cuda --dtype bfloat16 --overhead
step main_job_gpu 240 "$py" -m lorabench trainer=gpu
step pytest_gpu_world 420 "$py" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
step pytest_gpu_dryruns 420 "$py" -m pytest -m gpu -q -p no:cacheprovider --ignore tests/test_gpu.py
step world_table2_batched 420 "$py" -m lorabench experiment=orthogonal_adaptation/world trainer=gpu \
    protocol.batch_cells=auto protocol.train_workers=1
step bench_batched_sd15 150 "$py" bench/bench_batched.py --mode step --device cuda --size sd15-like --concepts 4 \
    --batch 1 --dtype bfloat16 --steps 15
step pytest_gpu_batched 240 "$py" -m pytest -m gpu -q -p no:cacheprovider tests/test_batched.py
step bench_lora_overhead_compile 240 "$py" bench/bench_lora_overhead.py --device cuda --size sd15-like \
    --batch 4 --dtype bfloat16 --steps 10 --compile
cat "$out/summary.txt"
