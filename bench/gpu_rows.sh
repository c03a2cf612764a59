#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md and `pytest -m gpu`, in one script sized for one lent GPU session.
#
#   bash bench/gpu_rows.sh [--dry] OUT_DIR [STEP ...]
#   (offline GPU image: bash .gpu/run.sh bash bench/gpu_rows.sh OUT_DIR)
#
# Each step runs under its own timeout and writes OUT_DIR/<step>.log, so one hang cannot eat the rest;
# OUT_DIR/summary.txt gets one line per step (exit status, seconds), and OUT_DIR/report.md issue 33's figures
# against their goals (bench/gpu_report.py; give it both calls' folders for one report). Naming steps runs only
# those, in the order below. Two phases:
#   alone (one at a time, nothing else on the GPU, so the ratios they print are clean):
#     device, lora_step (LoRA step / frozen base, eager and as CUDA graphs, operators a step, each layer
#     casting its factors or all cast together, the kernels LoRA adds and their time), layer_host (an eager step's host time per LoRA layer:
#     reference, fused, fused with the casts together), train_step (lorabench / PEFT,
#     eager and as CUDA graphs), merge (10 rank-64 adapters, stacked path), merge_overhead (the host's work
#     per merge), batched_sd15 (K = 4 SD1.5 LoRAs stacked at batch 1 against one after another, with the
#     members' equality to separate runs), world_cells (4 world LoRA cells x 100 steps: separate processes,
#     one batched pass, and one pass with module.cuda_graph), eval_batch (28 world settings sampled one by
#     one against in one pass: time and operators a setting, the images' difference), capture_batch (the same
#     for 28 cells' captures of their input statistics, the grams' difference), full_scale (each
#     full-scale table's training and sampling step, time and peak memory, at the real SD1.5 / SDXL sizes with
#     random weights, multiplied out to GPU hours per table), lora_step_compile (torch.compile rows: more
#     than 3 minutes of compiling on an H200, so only when named)
#   together (started at once, then waited for; their wall times share the GPU and the CPU):
#     world_table2 (the world Table 2, cold cache, trainer=gpu, cells and samples batched (batch_cells and
#     eval_batch auto), each step a CUDA graph unless WORLD_GRAPH=false: goal 5 minutes; in float32 with
#     TF32 off (NVIDIA_TF32_OVERRIDE=0) unless WORLD_PRECISION names another, e.g. bf16-mixed, trainer=gpu's
#     default: its table is compared with the CPU's float32 table to the rounding batched cells give, which
#     bf16's own rounding would swamp; the world model is launch-bound, so float32 costs it little time),
#     pytest_gpu_1 .. pytest_gpu_$SHARDS (`pytest -m gpu` split round-robin into shards, every outcome listed;
#     name pytest_gpu to run every shard)
# LIMIT_TOGETHER (s) bounds phase 2; SHARDS sets the pytest shards, SHARD_THREADS each one's CPU threads (2). DEADLINE (s, from the script's start)
# makes it end in time: each step's limit is cut to what is left (a step with under 20 s left is skipped and
# says so), so summary.txt is written before the caller's own timeout. Write OUT_DIR under the device's $OUT,
# so what ran comes back even if the call is cut. A lent GPU gives 900 s of device time in all, the machine's
# start (a minute or two) and every call included, at most 600 s a call. So two calls, the acceptance's figures
# first (on 2026-12-04's H200: lora_step 60 s, train_step 36, merge 33, batched_sd15 38; the gpu tests 293 s
# in 5 shards side by side), each call's timeout_s a little above its DEADLINE:
#   DEADLINE=300 bash .gpu/run.sh bash bench/gpu_rows.sh $OUT/g1 device lora_step train_step merge batched_sd15 \
#       eval_batch capture_batch
#   DEADLINE=420 LIMIT_TOGETHER=400 SHARDS=5 bash .gpu/run.sh bash bench/gpu_rows.sh $OUT/g2 world_table2 pytest_gpu
# and the rest (layer_host, merge_overhead, world_cells, full_scale, lora_step_compile) at the next lent GPU.
#
# --dry runs every step's setup on the CPU at toy sizes (benchmarks at --size tiny, the graph variants
# built and run eagerly, CapturedStep's CPU fallback, the world table at 3 steps for two concepts with cells, samplings and captures in passes of 2,
# pytest collecting the `gpu` tests only), to check
# the script before a GPU session spends minutes on it.
set -u
dry=0
if [ "${1:-}" = "--dry" ]; then dry=1; shift; fi
out=${1:?usage: bash bench/gpu_rows.sh [--dry] OUT_DIR [STEP ...]}
shift
only=" $* "
mkdir -p "$out"
: > "$out/summary.txt"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
export LORABENCH_OUTPUTS=${LORABENCH_OUTPUTS:-$out/outputs}
export PYTHONUNBUFFERED=1
SHARDS=${SHARDS:-4}
# CPU threads of each pytest shard and of the lorabench runs its tests start (OpenMP reads the variable once):
# the shards share the host's cores with the world Table 2 (its scoring, its LBFGS solver processes), and
# OpenMP threads beyond the cores made a step 6x slower on 2 cores. 5 shards x 2 leave 6 of a 16-core host.
# (Their runs' merge.workers=auto reads the same variable: SHARD_THREADS LBFGS solver processes a run, not 16.)
SHARD_THREADS=${SHARD_THREADS:-2}
LIMIT_TOGETHER=${LIMIT_TOGETHER:-300}
DEADLINE=${DEADLINE:-0}

if [ $dry = 1 ]; then
    dev=cpu; size=tiny; dtype=float32; graph=--graph; steps=2; trainer=trainer=cpu
    world_small=(protocol.concepts=[sks,twt] protocol.group_size=2 protocol.seeds=[0] trainer.max_steps=3
                 eval.images_per_prompt=1 eval.sampler.num_inference_steps=2 eval.concepts.n_references=2
                 protocol.capture.images_per_prompt=1 protocol.capture.num_inference_steps=2)
    collect=--collect-only; cells=(--cells 2 --steps 3); evals=(--settings 3 --steps 2 --repeats 1)
    world_batch=(protocol.batch_cells=2 protocol.eval_batch=2)  # auto is 1 on a CPU: the batched paths, at 2
else
    dev=cuda; size=sd15-like; dtype=bfloat16; graph=--graph; steps=15; trainer=trainer=gpu
    world_small=(); collect=""; cells=(--cells 4 --steps 100); evals=(--settings 28 --repeats 2)
    world_batch=(protocol.batch_cells=auto protocol.eval_batch=auto trainer.precision=${WORLD_PRECISION:-32-true})
fi
world_env=(); [ "${WORLD_PRECISION:-32-true}" = 32-true ] && world_env=(NVIDIA_TF32_OVERRIDE=0)
graph_opt=(); [ "${WORLD_GRAPH:-true}" = true ] && graph_opt=(module.cuda_graph=true)

stamp() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done; }  # each log line's time

wanted() { [ "$only" = "  " ] || [[ "$only" == *" $1 "* ]]; }

capped() {  # capped LIMIT: LIMIT cut to what DEADLINE leaves (5 s kept for the summary); 0: no time left
    local limit=$1 left
    if [ "$DEADLINE" -gt 0 ]; then
        left=$((DEADLINE - SECONDS - 5))
        if [ "$left" -lt 20 ]; then echo 0; return; fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "$limit"
}

skipped() {  # skipped NAME: the step did not start, for want of time
    echo "   $1: skipped, DEADLINE=${DEADLINE} s reached"
    echo "$1 skipped=deadline" >> "$out/summary.txt"
}

step() {  # step NAME LIMIT CMD...: in the foreground
    local name=$1 limit
    limit=$(capped "$2")
    shift 2
    wanted "$name" || return 0
    if [ "$limit" = 0 ]; then skipped "$name"; return 0; fi
    local start=$SECONDS
    echo "== $name (at most ${limit} s, $(date -u +%H:%M:%S)): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | stamp > "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "   $name: exit $rc after $((SECONDS - start)) s"
    echo "$name exit=$rc seconds=$((SECONDS - start))" >> "$out/summary.txt"
}

pids=()
bg() {  # bg NAME LIMIT CMD...: started in the background; `join` waits for every one
    local name=$1 limit
    limit=$(capped "$2")
    shift 2
    wanted "$name" || wanted "${name%_[0-9]*}" || return 0
    if [ "$limit" = 0 ]; then skipped "$name"; return 0; fi
    echo "== $name (at most ${limit} s, together, $(date -u +%H:%M:%S)): $*"
    (
        start=$SECONDS
        timeout --kill-after=15 "$limit" "$@" 2>&1 | stamp > "$out/$name.log"
        rc=${PIPESTATUS[0]}
        echo "   $name: exit $rc after $((SECONDS - start)) s"
        echo "$name exit=$rc seconds=$((SECONDS - start)) together" >> "$out/summary.txt"
    ) &
    pids+=($!)
}
join() { for p in "${pids[@]}"; do wait "$p"; done; pids=(); }

if wanted device; then
    { nvidia-smi 2>&1 || echo "no nvidia-smi"; "$py" -c "import torch, diffusers, transformers, lightning, peft
print('torch', torch.__version__, '| cuda', torch.version.cuda, '| diffusers', diffusers.__version__,
      '| transformers', transformers.__version__, '| lightning', lightning.__version__, '| peft', peft.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; } > "$out/device.txt" 2>&1
    echo "device exit=0 seconds=0" >> "$out/summary.txt"
fi

# -- phase 1: alone -------------------------------------------------------------------------------------
step lora_step 180 "$py" bench/bench_lora_overhead.py --device $dev --size $size --batch 4 --dtype $dtype --count \
    --kernels --steps $steps $graph
step layer_host 60 "$py" bench/bench_layer_host.py --device $dev
step train_step 150 "$py" bench/bench_train_step.py --device $dev --size $size --batch 4 --dtype $dtype \
    --steps $steps $graph
if [ $dry = 1 ]; then  # the GPU's code path (the fold at full layout, PEFT beside it) at a toy size
    step merge 60 "$py" bench/bench_merge.py --device $dev --dtype $dtype --size tiny --repeats 2
else
    step merge 60 "$py" bench/bench_merge.py --device $dev --dtype $dtype
fi
step merge_overhead 60 "$py" bench/bench_merge.py --device $dev --dtype $dtype --overhead
step batched_sd15 150 "$py" bench/bench_batched.py --mode step --device $dev --size $size --concepts 4 --batch 1 --count \
    --dtype $dtype --steps $steps
step world_cells 240 "$py" bench/bench_batched.py --mode cells --device $dev "${cells[@]}" \
    --ways "one pass,one pass graph"
step eval_batch 90 "$py" bench/bench_eval_batch.py --device $dev "${evals[@]}" --count
step capture_batch 60 "$py" bench/bench_eval_batch.py --device $dev "${evals[@]}" --count --capture
if [ $dry = 1 ]; then  # each full-scale table's stages at the real SD1.5 / SDXL sizes (issue 30's budget)
    step full_scale 120 "$py" bench/bench_full_scale.py --scaled-down --steps 1 --warmup 0
else
    step full_scale 240 "$py" bench/bench_full_scale.py --device cuda --steps 6 --warmup 2
fi
if [ $dry = 0 ] && [ "$only" != "  " ]; then  # minutes of compiling: only when named
    step lora_step_compile 300 "$py" bench/bench_lora_overhead.py --device $dev --size $size --batch 4 --dtype $dtype \
        --steps 10 --compile --only base,lora,base-compiled,lora-compiled
fi

# -- phase 2: together ----------------------------------------------------------------------------------
bg world_table2 "$LIMIT_TOGETHER" env "${world_env[@]}" "$py" -m lorabench experiment=orthogonal_adaptation/world $trainer \
    "${world_batch[@]}" protocol.train_workers=1 "hydra.run.dir=$out/world_table2" \
    "${world_small[@]}" "${graph_opt[@]}"
if [[ "$only" == "  " || "$only" == *" pytest_gpu"* ]]; then
    mapfile -t ids < <("$py" -m pytest -m gpu --collect-only -q -p no:cacheprovider 2>/dev/null | grep '::')
    echo "   pytest -m gpu: ${#ids[@]} tests in $SHARDS shards"
    for ((s = 0; s < SHARDS; s++)); do
        shard=()
        for ((i = s; i < ${#ids[@]}; i += SHARDS)); do shard+=("${ids[$i]}"); done
        [ ${#shard[@]} -gt 0 ] || continue
        bg "pytest_gpu_$((s + 1))" "$LIMIT_TOGETHER" env OMP_NUM_THREADS="$SHARD_THREADS" \
            MKL_NUM_THREADS="$SHARD_THREADS" OMP_WAIT_POLICY=PASSIVE "$py" -m pytest -m gpu -q -rA \
            -p no:cacheprovider --durations=0 $collect "${shard[@]}"
    done
fi
join

# the world run's cells: how long each batched pass took per step (from the cells' results.json)
if [ -d "$LORABENCH_OUTPUTS" ]; then
    "$py" - "$LORABENCH_OUTPUTS" > "$out/world_cells.txt" 2>&1 <<'PY'
import json, sys
from collections import defaultdict
from pathlib import Path
passes = defaultdict(list)
for f in Path(sys.argv[1]).glob("cache/orthogonal_adaptation/*/results.json"):
    r = json.loads(f.read_text())
    b = r["timings"].get("batched") or {}
    name = f.parent.name.split("-")[0]  # the adapter entry of the world config (lora, edlora, pplus, ...)
    key = (name, b.get("members", 1), round(b.get("fit_s", r["timings"]["fit_s"]), 1),
           b.get("s_per_step", r["timings"]["s_per_step"]), b.get("peak_memory_bytes", 0) / 2**30)
    passes[key].append(f.parent.name)
for (name, k, fit, sps, gib), cells in sorted(passes.items()):
    print(f"{name:>16}: {len(cells):2d} cells in a pass of {k}: fit {fit:.1f} s, {sps * 1000:.1f} ms a step, "
          f"peak {gib:.2f} GiB")
PY
fi
echo "== done $(date -u +%H:%M:%S)"
cat "$out/summary.txt"
# the figures against their goals (for both calls' folders at once: python bench/gpu_report.py g1 g2)
"$py" bench/gpu_report.py "$out" > "$out/report.md" 2>&1
echo "== $out/report.md"
