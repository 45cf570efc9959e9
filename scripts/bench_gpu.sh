#!/usr/bin/env bash
# The GPU benchmark in one command (issue 21, item 5): BERT-base at batch 32 x 128 and the Llama-1B
# shape at 8 x 512, bf16 autocast, each setting alone on the GPU with its own peak memory: ideal,
# full fine-tuning, our lora, seq_bn and prefix_tuning, and PEFT's LoRA (r 8 on q and v, as ours).
# Writes one JSON and one markdown table (default bench_gpu/bench_gpu.{json,md}); a few minutes on
# one H100 or H200.
#
#   scripts/bench_gpu.sh                    # on the GPU machine
#   scripts/bench_gpu.sh --dry-run          # anywhere: CPU, tiny shapes, seconds (the tests run this)
#   scripts/bench_gpu.sh --out DIR
#
# The GPU machine has torch, transformers, accelerate and peft but no package registry: what
# adaptercli needs beyond them (omegaconf) is installed from wheels/ if it is not importable
# (`make gpu-wheels` downloads them here; carry wheels/ to the machine). PEFT is timed when it is
# importable; the JSON says when it was not.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=bench_gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: scripts/bench_gpu.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if ! "$python" -c "import omegaconf" 2>/dev/null; then
  if ! ls wheels/*.whl >/dev/null 2>&1; then
    echo "omegaconf is missing and there is no wheels/ folder: run 'make gpu-wheels' where pip reaches a registry" >&2
    exit 1
  fi
  site=$(mktemp -d)  # not under --out, which holds only the results (six files)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's adaptercli

peft=()
if "$python" -c "import peft" 2>/dev/null; then
  peft=(--peft --peft-methods lora)
else
  echo "note: peft is not importable here: PEFT's LoRA is left out" >&2
fi

if [ "$dry_run" = 1 ]; then
  device=(--device cpu --threads 1 --warmup 1 --steps 2)
  runs=("tiny-bert-shape 2 16" "tiny-llama-shape 2 16")
else
  device=(--device cuda --warmup 5 --steps 20)
  runs=("bert-base-shape 32 128" "llama-1b-shape 8 512")
fi

parts=()
for run in "${runs[@]}"; do
  read -r model batch seq <<<"$run"
  "$python" scripts/bench.py --model "$model" --batch "$batch" --seq "$seq" --bf16 --schedule sequential \
    --methods lora,seq_bn,prefix_tuning "${peft[@]}" --skip infer "${device[@]}" --out "$out/$model.json" \
    >"$out/$model.md"
  parts+=("$out/$model.json")
done
"$python" scripts/bench_gpu_report.py "$out/bench_gpu.json" "$out/bench_gpu.md" "${parts[@]}"
cat "$out/bench_gpu.md"
