#!/usr/bin/env bash
# bench_serving against launch_server.py on dummy weights at a real shape (GPU host), for each given SP size.
#   benchmarks/runbooks/serve_bench.sh MODEL_SHAPE TOKENIZER_DIR OUT_DIR SP [SP ...]
# The shape directory gets the tokenizer files (any tokenizer: prompts are token ids within its vocabulary).
# 64 prompts at concurrency 32 by default; with SERVE_PER_GPU=1, 64 x SP prompts at concurrency 32 x SP (the same
# load per GPU: at sp > 1 short prompts are homed, each rank serving its own requests).
set -u
shape=$1 tok=$2 out=$3
shift 3
model=$(python -c "from benchmarks.model_shapes import shape_dir; print(shape_dir('$shape'))")
cp "$tok"/tokenizer* "$model"/
for sp in "$@"; do
    port=$((30100 + sp))
    scale=$([ "${SERVE_PER_GPU:-0}" = 1 ] && echo "$sp" || echo 1)
    python launch_server.py --model-path "$model" --load-format dummy --sp-size "$sp" --port "$port" \
        --max-running-requests $((64 * sp)) >"$out/server_sp$sp.log" 2>&1 &
    pid=$!
    for _ in $(seq 240); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        sleep 0.5
    done
    timeout 240 python benchmarks/bench_serving.py --base-url "http://127.0.0.1:$port" --num-prompts $((64 * scale)) \
        --input-len 256 --output-len 512 --max-concurrency $((32 * scale)) --num-warmup 2 --disable-tqdm \
        --output-file "$out/serving.jsonl" | tail -1 | sed "s/^/sp=$sp: /"
    kill -TERM $pid
    wait $pid
done
