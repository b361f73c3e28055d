#!/usr/bin/env bash
# The GPU checks and benchmarks, step by step, from the repository root on a CUDA host (flashinfer installed).
# Logs and result files go to $WORK (default /tmp/gpu-suite); with $ARCHIVE set, they end up in that one .tgz.
#
#   benchmarks/runbooks/gpu_suite.sh warm tests kernels      # JIT builds in parallel, every GPU test, kernel benchmarks
#   benchmarks/runbooks/gpu_suite.sh prefill prefill-at-limit modes placement
#       # bench_prefill (2 GPUs): contexts up to the memory limit, comm modes, many short prompts
#   benchmarks/runbooks/gpu_suite.sh fp8 moe-ep families agents mla-kda decode-regression
#       # one GPU: the runs behind the FP8, expert-parallel, model-family, agent and MLA / KDA results
# A fresh host rebuilds flashinfer's modules (warm, ~100 s); the jit-cache step packs them as prebuilt modules to
# bring along, and the aot step unpacks them on the next host. Triton's kernels (ours, fla-core's) compile and fla's
# autotune on first use too (over 2 minutes for the GDN shapes): with TRITON_CACHE_AUTOTUNING=1 (set below) the
# tuning results are cached beside the compiled kernels, and the triton-cache step packs ~/.triton/cache; unpack it
# into ~ on the next host. That archive is large (23 MB with fla's GDN kernels); the autotune-cache step packs only
# the tuning results, which should spare a fresh host the tuning runs (not the compilation of the chosen configs;
# not tried yet).
# Results record $GIT_COMMIT (set it to the checkout's commit: the host's .git may be stale).
set -u
WORK=${WORK:-/tmp/gpu-suite}
export TRITON_CACHE_AUTOTUNING=1
mkdir -p "$WORK"
BP="python benchmarks/bench_prefill.py"
fi_dir() { python -c "import flashinfer, os; print(os.path.dirname(flashinfer.__file__))"; }

# bench_prefill in its own process with a time limit, so that a rank that runs out of memory mid-collective
# costs only its own config: $1 = seconds, $2 = result name, the rest = arguments.
prefill() {
    local limit=$1 name=$2
    shift 2
    timeout -k 10 "$limit" $BP "$@" --out "$WORK/pf_$name.json" >"$WORK/pf_$name.log" 2>&1
    echo "$name: exit $? ($(grep -c '"model"' "$WORK/pf_$name.log") rows)"
}

for step in "$@"; do
    echo "== $step $(date -u +%T)"
    case $step in
    warm)
        python benchmarks/runbooks/warm_flashinfer.py 2>&1 | tee "$WORK/warm.log"
        ;;
    tests)  # every GPU test that fits this host (benchmarks/runbooks/gpu_tests.sh), summary in $WORK/gpu_tests.md
        benchmarks/runbooks/gpu_tests.sh "$WORK/gpu_tests.md" 2>&1 | tail -40
        ;;
    kernel-tests)  # Triton lightning and merge_state kernels
        timeout 420 python -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/kernels 2>&1 |
            tee "$WORK/gpu_kernel_tests.log" | tail -20
        ;;
    aot)  # unpack prebuilt flashinfer modules (what jit-cache packs; default .fi/fi_aot.tgz): no JIT builds for them
        mkdir -p "$(fi_dir)/data/aot" && tar -xzf "${FI_AOT:-.fi/fi_aot.tgz}" -C "$(fi_dir)/data/aot" &&
            ls "$(fi_dir)/data/aot" | wc -l
        ;;
    jit-cache)  # the compiled flashinfer modules as prebuilt ("AOT") modules, to bring to a fresh host: unpack with
        # the aot step (flashinfer's data/aot/NAME/NAME.so)
        # (a copy of ~/.cache/flashinfer's .so files alone does not help: its modules are rebuilt unless ninja's own
        # records say they are fresh; a module in data/aot/NAME/NAME.so is loaded without building)
        aot=$(mktemp -d)
        for so in $(find ~/.cache/flashinfer "$(fi_dir)/data/aot" -name '*.so' 2>/dev/null); do
            name=$(basename "$so" .so)
            mkdir -p "$aot/$name" && cp -n "$so" "$aot/$name/"
        done
        tar -czf "${JIT_ARCHIVE:-$WORK/flashinfer_aot.tgz}" -C "$aot" .
        ls -la "${JIT_ARCHIVE:-$WORK/flashinfer_aot.tgz}"
        ;;
    triton-cache)  # the compiled Triton kernels and autotuning results, to bring to a fresh host (tar -xzf -C ~)
        (cd ~ && tar -czf "${TRITON_ARCHIVE:-$WORK/triton_cache.tgz}" .triton/cache)
        ls -la "${TRITON_ARCHIVE:-$WORK/triton_cache.tgz}"
        ;;
    autotune-cache)  # only the autotuning results (small JSON): a fresh host then compiles the chosen configs only
        (cd ~ && find .triton/cache -name "*.autotune.json" | tar -czf "${AUTOTUNE_ARCHIVE:-$WORK/autotune.tgz}" -T -)
        ls -la "${AUTOTUNE_ARCHIVE:-$WORK/autotune.tgz}"
        ;;
    kernels)
        timeout 120 python benchmarks/bench_kernels.py --out-dir "$WORK" --sections ceilings paged_attention \
            2>&1 | tail -30
        ;;
    prefill)  # contexts rise until the first that does not fit (one prefill step, default memory settings)
        prefill 240 llama_sp1 --model llama3-8b --sp-size 1 --repeat 1 --context 32768 98304 114688 131072 147456 163840
        prefill 300 llama_sp2 --model llama3-8b --sp-size 2 --repeat 1 \
            --context 32768 131072 196608 262144 294912 327680 360448
        prefill 180 minimax_sp1 --model minimax-hybrid --sp-size 1 --repeat 1 \
            --context 32768 131072 163840 196608 229376 262144 294912
        prefill 240 minimax_sp2 --model minimax-hybrid --sp-size 2 --repeat 1 \
            --context 32768 131072 262144 327680 393216 458752 524288
        ;;
    prefill-at-limit)  # sp = 2 at the longest contexts sp = 1 fitted (114688, 163840), and past sp = 2's first limit
        prefill 150 llama_sp2_limit --model llama3-8b --sp-size 2 --repeat 1 --context 114688 262144
        prefill 100 minimax_sp2_limit --model minimax-hybrid --sp-size 2 --repeat 1 --context 163840
        ;;
    placement)  # 64 short prompts at once: each whole on one SP rank (below --sp-min-tokens 1024) vs split
        prefill 100 place_home --model llama3-8b --sp-size 2 --context 1000 --num-prompts 64
        prefill 100 place_split --model llama3-8b --sp-size 2 --context 1000 --num-prompts 64 --sp-min-tokens 1
        prefill 100 place_sp1 --model llama3-8b --sp-size 1 --context 1000 --num-prompts 64
        ;;
    warm256)  # flashinfer modules for head dim 256 (the Qwen3.5 / Qwen3-Next shapes), in the background
        python benchmarks/runbooks/warm_flashinfer.py --dtypes bfloat16 --head-dims 256 >"$WORK/warm256.log" 2>&1 &
        ;;
    warm-gdn)  # fla-core's GDN kernels compiled and tuned for the benchmarked shapes, in the background
        python benchmarks/runbooks/warm_gdn.py >"$WORK/warm_gdn.log" 2>&1 &
        ;;
    gpu-tests)  # the engine on CUDA (every architecture, graphs, SP / TP / Ulysses over NCCL), GDN and Ulysses ops
        # GPU_TESTS_K: a pytest -k selection (default: all of them)
        timeout 360 python -m pytest -q -m gpu -p no:cacheprovider -rfEs ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} \
            tests/engine/test_gpu_engine.py tests/kernels/test_gdn.py tests/sp/test_ulysses.py 2>&1 |
            tee "$WORK/gpu_tests.log" | tail -25
        ;;
    gdn-debug)  # fla-core's GDN ops against the fp64 recurrence; Qwen3.5 bf16 parity; its SP case with blocking launches
        timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short \
            -k "ops_on_cuda or (bf16_cuda_within and qwen3_5)" tests/kernels/test_gdn.py tests/engine/test_gpu_engine.py \
            2>&1 | grep -v "^frame" | tee "$WORK/gdn_debug.log" | tail -40
        CUDA_LAUNCH_BLOCKING=1 timeout 90 python -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short \
            -k "nccl_sp_tp_bf16 and 2-1-ring-1-qwen3_5" tests/engine/test_gpu_engine.py 2>&1 | grep -v "^frame" |
            tee "$WORK/gdn_debug_sp.log" | grep -B3 -A10 -i "error" | head -50
        ;;
    uly-tests)  # Ulysses (U = 2) in bf16 over NCCL for Llama and MiniMax; the all-to-all attention over NCCL
        timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -rfEs --tb=short \
            -k "(nccl_sp_tp_bf16 and ring-2 and (llama or minimax)) or ulysses_over_nccl" \
            tests/engine/test_gpu_engine.py tests/sp/test_ulysses.py 2>&1 | grep -v "^frame" | tee "$WORK/uly_tests.log" |
            tail -15
        ;;
    pointwise)  # RMSNorm, SiLU-and-multiply, RoPE: torch vs Triton per call inside CUDA graphs, and their GPU tests
        timeout 120 python benchmarks/bench_kernels.py --sections ceilings pointwise --out-dir "$WORK" 2>&1 | tail -12
        timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_pointwise_kernels.py 2>&1 | tail -3
        ;;
    decode-profile)  # host time per stage of decode steps (rank 0 printed, rank 1 logged at shutdown)
        SERVER_STEP_PROFILE=1 timeout 200 python benchmarks/bench_decode.py --model llama3-8b --context 2048 131072 \
            --batch 1 --sp-size 1 2 --graphs on --decode-steps 32 --out "$WORK/decode_profile.json" \
            2>&1 | grep -E "profile|^\|" | tee "$WORK/decode_profile.log"
        ;;
    decode)  # the decode table: ITL beside the floor, overlapped steps on / off (graphs on)
        timeout 420 python benchmarks/bench_decode.py --model llama3-8b --context 2048 131072 --batch 1 32 \
            --sp-size ${DECODE_SP:-1 2} --graphs on --overlap ${DECODE_OVERLAP:-on off} --decode-steps 48 --out "$WORK/decode.json" \
            --plot "$WORK/decode.png" \
            2>&1 | grep -E "^\||bandwidth" | tee "$WORK/decode.log"
        ;;
    decode-eager)
        timeout 200 python benchmarks/bench_decode.py --model llama3-8b --context 2048 131072 --batch 1 32 \
            --sp-size 1 2 --graphs off --decode-steps 24 --out "$WORK/decode_eager.json" 2>&1 | grep -E "^\|"
        ;;
    serve)  # bench_serving through launch_server.py: sp 1, then sp 2 (short prompts homed: two workers)
        mkdir -p "$WORK/serve"
        timeout 400 benchmarks/runbooks/serve_bench.sh llama3-8b .tok "$WORK/serve" 1 2
        ;;
    chunked)  # 128K through the server's default 8192-token chunks, sp 1 and 2 (parallel efficiency)
        prefill 200 chunked --model llama3-8b --sp-size 1 2 --repeat 1 --context 131072 --chunk 8192
        ;;
    gdn)  # Qwen3.5-27B shape through the server's default 8192-token chunks: sp 1 and 2 at 128K, sp 2 at 512K
        # (one step of a whole 128K prompt does not fit beside the weights: fla's per-chunk states and the MLP).
        # Two runs each: on a fresh host the first run of a shape includes fla's compilation and tuning
        prefill 220 gdn_sp1 --model qwen3.5-27b --sp-size 1 --repeat 2 --context 131072 --chunk 8192
        prefill 240 gdn_sp2 --model qwen3.5-27b --sp-size 2 --repeat 1 --context 131072 524288 --chunk 8192
        ;;
    gdn-kernels)  # fla's GDN chunked prefill vs the SP chunk-affine pass at the Qwen3.5-27B layer shape
        timeout 200 python benchmarks/bench_kernels.py --sections ceilings gdn --out-dir "$WORK" 2>&1 | tail -8
        ;;
    gdn-ulysses)  # Qwen3.5-27B shape at sp = 2, 128K through the default chunks: Ulysses (U = 2) for every layer and
        # for the GDN layers only (softmax on the ring), against the GDN state passing of the gdn step
        prefill 300 gdn_uly --model qwen3.5-27b --sp-size 2 --ulysses-degree 2 --repeat 2 --context 131072 --chunk 8192
        prefill 240 gdn_uly_linear --model qwen3.5-27b --sp-size 2 --ulysses-degree 2 --ulysses-layers linear \
            --repeat 2 --context 131072 --chunk 8192
        ;;
    gdn-512k)  # Qwen3.5-27B shape, 512K through the default chunks on one GPU (its sp = 2 row: gdn_prefill_h200x2.md)
        prefill 400 gdn_512k_sp1 --model qwen3.5-27b --sp-size 1 --repeat 1 --context 524288 --chunk 8192
        ;;
    gdn-longest)  # a prompt that fits at sp = 2 and not at sp = 1 with the server's default memory plan (the
        # prefix cache on: 953,696 tokens of KV on one GPU), at the shape's 1M position limit
        prefill 580 gdn_longest --model qwen3.5-27b --sp-size 1 2 --repeat 1 --context 1000000 --chunk 8192 \
            --prefix-cache on
        ;;
    ulysses)  # ring vs Ulysses (U = 2) at sp = 2 against sp = 1, Llama-3-8B 128K in one step
        prefill 150 uly_llama --model llama3-8b --sp-size 1 2 --ulysses-degree 1 2 --repeat 1 --context 131072
        ;;
    ulysses-more)  # the all-gather KV mode, MiniMax and Qwen3-Next
        prefill 60 uly_llama_ag --model llama3-8b --sp-size 2 --ring-mode allgather --repeat 1 --context 131072
        prefill 120 uly_minimax --model minimax-hybrid --sp-size 1 2 --ulysses-degree 1 2 --repeat 1 --context 131072
        prefill 150 uly_qnext --model qwen3-next-like --sp-size 1 2 --ulysses-degree 1 2 --repeat 1 --context 131072
        ;;
    prefix)  # a 128K document + 5 questions + 1 follow-up, cache on vs off, sp 1 and 2, Llama and a hybrid
        timeout 420 python benchmarks/bench_prefix.py --model llama3-8b minimax-hybrid --doc-len 131072 \
            --questions 5 --follow-ups 1 --off-turns 2 --sp-size 1 2 --out "$WORK/prefix.json" 2>&1 |
            grep -E "^\|" | tee "$WORK/prefix.log"
        ;;
    prefix-off)  # the sp = 2 cache-off turns of both shapes (the cache-on rows are in prefix_h200x2.md)
        timeout 300 python benchmarks/bench_prefix.py --model minimax-hybrid llama3-8b --doc-len 131072 \
            --questions 5 --follow-ups 1 --off-turns 2 --cache off --warmup-len 16384 --sp-size 2 \
            --out "$WORK/prefix_off.json" 2>&1 | grep -E "^\||Error" | tee "$WORK/prefix_off.log"
        ;;
    prefix-profile)  # where a cached question's TTFT goes: every rank under torch.profiler, sp 1 and 2, hybrid
        timeout 300 python benchmarks/bench_prefix.py --model minimax-hybrid --doc-len 131072 --questions 2 \
            --follow-ups 0 --cache on --warmup-len 16384 --sp-size 1 2 --profile --out "$WORK/prefix_profile.json" \
            2>&1 | grep -E "^\||Error" | tee "$WORK/prefix_profile.log"
        ;;
    moe)  # Qwen3-30B-A3B shape (128 experts, top-8; 61 GB of bf16 weights, so 128K of KV beside them needs an H200):
        # prefill TTFT at 32K and 128K (sp 1, and sp 2 on two GPUs), decode ITL beside the floor at batch 1 (32K,
        # 128K of context) and batch 32 (2K, 8K: 32 x 32K of KV does not fit one GPU)
        prefill 300 moe_sp1 --model qwen3-30b-a3b --sp-size 1 --repeat 2 --context 32768 131072
        prefill 300 moe_sp2 --model qwen3-30b-a3b --sp-size 2 --repeat 2 --context 32768 131072
        timeout 420 python benchmarks/bench_decode.py --model qwen3-30b-a3b --context 32768 131072 --batch 1 \
            --sp-size 1 --graphs on off --decode-steps 32 --out "$WORK/decode_moe_b1.json" 2>&1 |
            grep -E "^\||bandwidth" | tee "$WORK/decode_moe_b1.log"
        timeout 420 python benchmarks/bench_decode.py --model qwen3-30b-a3b --context 2048 8192 --batch 32 \
            --sp-size 1 --graphs on off --decode-steps 32 --out "$WORK/decode_moe_b32.json" 2>&1 |
            grep -E "^\||bandwidth" | tee "$WORK/decode_moe_b32.log"
        ;;
    decode-regression)  # the decode rows of this tree and of an older one ($BASE: a `git archive REV server
        # benchmarks` unpacked there) back to back on this machine, 256 timed steps per cell
        for tree in . ${BASE:-}; do
            (cd "$tree" && timeout 300 python benchmarks/bench_decode.py --model llama3-8b --context 2048 --batch 1 32 \
                --sp-size 1 --graphs on --decode-steps 256 --out "$WORK/decode_regression_$(basename "$(realpath "$tree")").json" \
                2>&1 | grep -E "^\|" | tee -a "$WORK/decode_regression.log")
        done
        ;;
    fp8)  # FP8 weights and FP8 KV against bf16 in one call (Llama-3-8B shape): decode at 2K (batch 1, 32) and 128K
        # (batch 1), prefill at 32K, the FP8 GEMM / FP8 checkpoint GPU tests, the per-layer timings
        timeout 200 python benchmarks/bench_decode.py --model llama3-8b --context 2048 --batch 1 32 --sp-size 1 \
            --graphs on --decode-steps 64 --quantization none fp8 --out "$WORK/decode_fp8_2k.json" 2>&1 | grep -E "^\|"
        timeout 300 python benchmarks/bench_decode.py --model llama3-8b --context 131072 --batch 1 --sp-size 1 \
            --graphs on --decode-steps 64 --quantization none fp8 --kv-cache-dtype auto fp8_e4m3 \
            --out "$WORK/decode_fp8_128k.json" 2>&1 | grep -E "^\|"
        prefill 200 fp8_32k --model llama3-8b --sp-size 1 --repeat 2 --context 32768 --quantization none fp8
        timeout 300 python -m pytest -q -s tests/kernels/test_fp8_gemv.py tests/kernels/test_fp8_gemm.py \
            tests/models/test_fp8_gpu.py tests/kernels/test_fp8_moe_kernels.py tests/layers/test_moe_fp8.py 2>&1 |
            tail -15
        # per layer: bf16, the W8A8 path, the decode GEMV (default tiles, Triton's conversion, a tile sweep)
        timeout 300 python benchmarks/bench_kernels.py --sections ceilings fp8_linear --time-budget 280 \
            --out-dir "$WORK/kernels_fp8"
        ;;
    moe-ep)  # one MoE layer's expert-parallel dispatch / combine at EP size 1 vs the TP-sliced MoE, FP8 experts vs
        # bf16, then Qwen3-30B-A3B prefill at 32K and decode at 32K with expert parallelism off and on
        timeout 200 python benchmarks/bench_kernels.py --sections ceilings moe_ep moe_fp8 --out-dir "$WORK/kernels_moe"
        prefill 150 moe_ep_off --model qwen3-30b-a3b --sp-size 1 --repeat 2 --context 32768
        prefill 150 moe_ep_on --model qwen3-30b-a3b --sp-size 1 --repeat 2 --context 32768 --enable-expert-parallel
        timeout 300 python benchmarks/bench_decode.py --model qwen3-30b-a3b --context 32768 --batch 1 16 \
            --sp-size 1 --graphs on --decode-steps 32 --enable-expert-parallel off on \
            --out "$WORK/decode_moe_ep.json" 2>&1 | grep -E "^\|"
        ;;
    families)  # the 2026 families on one GPU: their GPU tests, gpt-oss-20b prefill / decode and its window share
        # (gpt-oss's head dim is 64: flashinfer builds those modules first, in parallel, or the runs below spend
        # their limits building them one by one)
        python benchmarks/runbooks/warm_flashinfer.py --dtypes bfloat16 --head-dims 64 >"$WORK/warm64.log" 2>&1
        timeout 400 python -m pytest -q -m gpu tests/engine/test_gpu_engine.py \
            -k "qwen3_moe or minimax_m2 or glm4_moe or gpt_oss or window_pages" 2>&1 | tail -15
        prefill 200 gptoss --model gpt-oss-20b --sp-size 1 --repeat 2 --context 32768 131000
        timeout 300 python benchmarks/bench_decode.py --model gpt-oss-20b --context 32768 131000 --batch 1 \
            --sp-size 1 --graphs on --decode-steps 32 --out "$WORK/decode_gptoss.json" 2>&1 | grep -E "^\|"
        timeout 200 python benchmarks/bench_window_share.py --model gpt-oss-20b --context 131000 2>&1 | tail -12
        ;;
    mla-kda)  # DeepSeek-V3 / Kimi-Linear on one GPU: their GPU tests, KDA against fla's kernel, Moonlight prefill
        timeout 300 python -m pytest -q -m gpu tests/kernels/test_kda.py tests/models/test_mla_models.py 2>&1 | tail -8
        timeout 200 python benchmarks/bench_kernels.py --sections kda --out-dir "$WORK/kernels_kda"
        prefill 300 moonlight --model moonlight-16b-a3b --sp-size 1 --repeat 1 --context 32768
        ;;
    agents)  # JSON-schema decoding at batch 32 vs unconstrained, a short turn over a 128K cached prefix (attention
        # kinds and KV splits, then through the engine with and without extend graphs), the agent trace
        timeout 200 python benchmarks/bench_decode.py --model llama3-8b --context 2048 --batch 32 --sp-size 1 \
            --graphs on --decode-steps 64 --structured json --out "$WORK/decode_json.json" 2>&1 | grep -E "^\|"
        timeout 200 python benchmarks/bench_kernels.py --sections ceilings short_turn_attention \
            --out-dir "$WORK/kernels_turns"
        for q in 64 1024 4096; do
            timeout 300 python benchmarks/bench_prefix.py --model llama3-8b --doc-len 131072 --question-len $q \
                --cuda-graph-max-extend-tokens 0 256 --out "$WORK/prefix_q$q.json" 2>&1 | grep -E "^\|"
        done
        timeout 600 python benchmarks/bench_agent.py --model llama3-8b --sessions 2 --max-context 131072 \
            --out "$WORK/agent.json" 2>&1 | grep -E "^\|"
        ;;
    modes)  # all-gather KV vs the ring (Llama), LASP-2 (all-gather of M) vs the LASP ring (MiniMax), at sp = 2
        prefill 120 llama_allgather --model llama3-8b --sp-size 2 --context 32768 131072 --ring-mode allgather
        prefill 100 minimax_lasp2 --model minimax-hybrid --sp-size 2 --context 32768 131072 --lasp-mode allgather
        ;;
    esac
done
ls "$WORK"/pf_*.json >/dev/null 2>&1 && $BP --merge "$WORK"/pf_*.json --out "$WORK/prefill_all.json" | tail -60
echo "== done $(date -u +%T)"
[ -n "${ARCHIVE:-}" ] && tar -czf "$ARCHIVE" -C "$WORK" .
