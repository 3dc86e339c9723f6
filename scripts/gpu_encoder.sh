#!/usr/bin/env bash
# Run on a GPU machine from the repository root, with .devdata/Scientific, .devdata/Beauty, an fp16 copy of
# all-MiniLM-L6-v2 in .devdata/minilm16 and runs/Beauty/minilm/semantic_ids-rqvae-title+categories.*; $OUT
# collects the logs. Used once on an NVIDIA H200 (2026-11-26) for the README's GPU encoder rows and bench/tiger.py.
set -u
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
DEV=${DEV:-cuda}; R=/tmp/runs; W=/tmp/minilm
S=runs/Beauty/minilm/semantic_ids-rqvae-title+categories.npy
B=$OUT/bench_tiger.txt
mkdir -p $R && cp -r .devdata/minilm16 $W
python3 - <<'PY' > $B 2>&1
from safetensors.torch import load_file, save_file   # the carried fp16 copy of all-MiniLM-L6-v2 -> fp32
sd = load_file("/tmp/minilm/model.safetensors"); save_file({k: v.float() for k, v in sd.items()}, "/tmp/minilm/model.safetensors")
print("weights: fp16-rounded all-MiniLM-L6-v2 (max rel. error 4.9e-4), back in fp32")
PY
timeout ${TB:-60} python3 bench/tiger.py --device $DEV --threads 8 --dataset .devdata/Beauty --data-dir /tmp/data --sem-ids $S --repeats 5 --decode-users 256 >> $B 2>&1
C="--stage encoder --backbone minilm --weights $W --dataset .devdata/Scientific --data-dir /tmp/data --device $DEV --holdout 0.1 --seed 0"
timeout ${TE:-150} python3 train.py $C --max-length 256 ${AMP:---amp bf16} --out $R/enc-len256-bf16 ${X:-} > $OUT/enc256.log 2>&1
timeout ${TE:-150} python3 train.py $C --max-length 128 --out $R/enc-len128-fp32 ${X:-} > $OUT/enc128.log 2>&1
timeout ${TC:-110} python3 train.py $C --max-length 256 ${AMP:---amp bf16} --compile --epochs 1 --out $R/enc-len256-bf16-compile ${X:-} > $OUT/enccompile.log 2>&1
cd $R && tar czf $OUT/enc.tgz $(find . -name history.json -o -name run.json) ; ls -la $OUT
