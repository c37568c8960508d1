#!/usr/bin/env bash
# GPU tagging check (bench/gpu/gpu_tag.py, the "GPU tagging" section of bench/RESULTS.md) on the lent GPU machine.
# That machine has torch (CUDA 13) and the CPU build of onnxruntime, no faiss, polars or internet, and one call
# carries at most 64 MiB. So the packages (onnxruntime-gpu unpacked and xz-compressed, polars, faiss-cpu, typer and
# its dependencies, pillow), an fp16-only copy of a bundle and the CPU reference travel as one tar split into 59 MB
# parts, one part per call. Run from the repository root:
#   bash bench/gpu/gpu_tag.sh prepare BUNDLE CATALOG  # here: -> .gpu/tag/part-aa, -ab, ... and .gpu/tag/SHA256
#   bash bench/gpu/gpu_tag.sh part                    # there, one call per part but the last (carry that part)
#   bash bench/gpu/gpu_tag.sh run CATALOG             # there, carrying the last part and SHA256: assemble, install,
#                                                     # `xmctag tag/eval --device cuda`, then gpu_tag.py check
# CATALOG is a fused catalog inside the repository (it travels with the working tree), e.g.
# catalogs/myntra-sample/dev.parquet; BUNDLE a bundle exported from a run trained on its train split.
set -euo pipefail
# Paths below (.gpu/tag, bench/gpu/gpu_tag.py, $PWD on PYTHONPATH for the xmctag package) are relative to the
# repository root.
[ -f bench/gpu/gpu_tag.sh ] || { echo "run from the repository root: bash bench/gpu/gpu_tag.sh ..." >&2; exit 2; }
G=${GPU_HOME:-$HOME/gpu-tag}
T=.gpu/tag

case "$1" in
prepare)
    bundle=$2 catalog=$3 work=${WORK:-/tmp/gpu-tag-prepare}
    rm -rf "$work" && mkdir -p "$work/wheels" "$work/payload/wheels" "$work/payload/ref"
    get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$work/wheels" "$@"; }
    get onnxruntime-gpu==1.31.1 faiss-cpu==1.15.1 polars==2.1.0 polars-runtime-32==2.1.0 typer rich click \
        shellingham markdown-it-py mdurl pygments pillow pydantic pydantic-core annotated-types typing-inspection \
        typing-extensions annotated-doc
    # The onnxruntime-gpu wheel is 256 MB zipped; unpacked and xz-compressed it is 203 MB (one call fewer).
    mkdir "$work/ort" && python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
        "$work"/wheels/onnxruntime_gpu-*.whl "$work/ort"
    tar cf - -C "$work/ort" . | xz -9 -T2 > "$work/payload/ort.tar.xz"
    find "$work/wheels" -name '*.whl' ! -name 'onnxruntime_gpu-*' -exec cp {} "$work/payload/wheels/" \;
    # The bundle without its fp32 and int8 text graphs (the GPU runs the fp16 one): 64 MB instead of 176.
    cp -r "$bundle" "$work/payload/bundle"
    rm -f "$work/payload/bundle/encoder.onnx" "$work/payload/bundle/encoder.int8.onnx"
    python3 - "$work/payload/bundle/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for name in ("encoder.onnx", "encoder.int8.onnx"):
    m["files"].pop(name, None)
    m["graph"]["files"] = [f for f in m["graph"]["files"] if f != name]
json.dump(m, open(sys.argv[1], "w"), indent=1)
EOF
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
        ${PYTHON:-python3} bench/gpu/gpu_tag.py reference --bundle "$bundle" --catalog "$catalog" --out "$work/ref"
    cp "$work"/ref/*.npy "$work/payload/ref/"
    rm -rf "$T" && mkdir -p "$T"
    tar cf "$work/payload.tar" -C "$work" payload
    (cd "$T" && split -b 59000000 "$work/payload.tar" part- && sha256sum "$work/payload.tar" | cut -d' ' -f1 > SHA256)
    ls -l "$T"
    ;;
part)
    mkdir -p "$G/parts" && cp "$T"/part-* "$G/parts/" && ls "$G/parts"
    ;;
run)
    catalog=$2 out=${OUT:-$G/out}
    mkdir -p "$G/parts" "$out" && cp "$T"/part-* "$G/parts/"
    cat "$G"/parts/part-* > "$G/payload.tar"
    [ "$(sha256sum "$G/payload.tar" | cut -d' ' -f1)" = "$(cat $T/SHA256)" ] \
        || { echo "payload: sha256 mismatch"; exit 1; }
    tar xf "$G/payload.tar" -C "$G" && rm "$G/payload.tar"
    mkdir -p "$G/ortpkg" && xz -dc "$G/payload/ort.tar.xz" | tar xf - -C "$G/ortpkg"
    wheels=$(ls "$G"/payload/wheels/*.whl | grep -v pillow)
    python3 -c "import PIL" 2>/dev/null || wheels="$wheels $(ls "$G"/payload/wheels/pillow-*.whl)"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$G/site" $wheels
    export PYTHONPATH="$G/ortpkg:$G/site:$PWD" PYTHONUNBUFFERED=1
    (nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true) | tee "$out/gpu.txt"
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
        | tee -a "$out/gpu.txt"
    bundle="$G/payload/bundle" train=$(dirname "$catalog")/train.parquet
    # The CLI as a user runs it (nothing imports torch first); if CUDA cannot start, once more with torch loaded
    # first (torch's CUDA libraries are then in the process), to tell a packaging problem from a code one.
    xmctag() { python3 -m xmctag.cli "$@"; }
    torch_first=""
    if ! xmctag tag "$catalog" --model "$bundle" --device cuda --output "$out/dev.cuda.parquet" \
            --cache-dir "$G/cli-cache" --show 3 2>&1 | tee "$out/cli.txt"; then
        echo "--- retry with torch imported first" | tee -a "$out/cli.txt"
        torch_first=1
        xmctag() { python3 -c "import sys, torch; from xmctag.cli import main; sys.argv[0] = 'xmctag'; main()" "$@"; }
        xmctag tag "$catalog" --model "$bundle" --device cuda --output "$out/dev.cuda.parquet" \
            --cache-dir "$G/cli-cache" --show 3 2>&1 | tee -a "$out/cli.txt"
    fi
    xmctag tag "$catalog" --model "$bundle" --output "$out/dev.auto.parquet" --cache-dir "$G/cli-cache" 2>&1 \
        | tail -5 | tee -a "$out/cli.txt"  # --device auto: must pick CUDA (and the cache is warm now)
    xmctag eval "$out/dev.cuda.parquet" --truth "$catalog" --train "$train" 2>&1 | tee -a "$out/cli.txt"
    check=(bench/gpu/gpu_tag.py check --bundle "$bundle" --catalog "$catalog" --ref "$G/payload/ref" --out "$G/check")
    if [ -n "$torch_first" ]; then
        python3 -c "import runpy, sys, torch; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"\
            "${check[@]}" ${CHECK_ARGS:-} 2>&1 | tee "$out/check.txt"
    else
        python3 "${check[@]}" ${CHECK_ARGS:-} 2>&1 | tee "$out/check.txt"
    fi
    cp "$G/check/gpu_tag.json" "$out/" 2>/dev/null || true
    ;;
*)
    echo "usage: bash bench/gpu/gpu_tag.sh prepare BUNDLE CATALOG | part | run CATALOG" >&2; exit 2
    ;;
esac
