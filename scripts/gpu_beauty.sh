#!/usr/bin/env bash
# Run on a GPU machine from the repository root, with the Beauty LC-Rec folder copied to .devdata/Beauty and
# runs/Beauty/minilm (item embeddings + RQ-VAE IDs made on CPU) beside it; $OUT collects the logs and JSON files.
# Used once on an NVIDIA H200 (2026-11-26) for the README's Beauty UniSRec / TIGER rows and GPU benchmarks.
set -u
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
DEV=${DEV:-cuda}; M=${M:-5}; T=${T:-400}
D=.devdata/Beauty; R=/tmp/runs; E=$R/Beauty/minilm/item_emb-title+categories.npy
S=$R/Beauty/minilm/semantic_ids-rqvae-title+categories.npy
mkdir -p $R/Beauty && cp -r runs/Beauty/minilm $R/Beauty/
B=$OUT/bench.txt
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)"; } > $B 2>&1
python3 - <<'PY' >> $B 2>&1
import json; from data import load_dataset
ds = load_dataset(".devdata/Beauty", "/tmp/data")
p = "/tmp/runs/Beauty/minilm/semantic_ids-rqvae-title+categories.json"   # the CPU run's IDs, this copy's data path
d = json.load(open(p)); d["data_fingerprint"] = ds.fingerprint; open(p, "w").write(json.dumps(d))
print("sidecar fingerprint ->", ds.fingerprint)
PY
echo "== bench/unisrec.py fp32" >> $B; timeout 60 python3 bench/unisrec.py --device $DEV --threads 8 --data $D --emb $E >> $B 2>&1
echo "== bench/unisrec.py bf16" >> $B; timeout 40 python3 bench/unisrec.py --device $DEV --threads 8 --data $D --emb $E --amp bf16 >> $B 2>&1
echo "== bench/tiger.py" >> $B; timeout 60 python3 bench/tiger.py --device $DEV --threads 8 --dataset $D --data-dir /tmp/data --sem-ids $S --repeats 5 --decode-users 256 >> $B 2>&1
C="--dataset $D --data-dir /tmp/data --runs $R --device $DEV --seed 0"
[ $DEV = cuda ] && C="$C --amp bf16"
timeout $T python3 train.py --stage tiger $C --encoder minilm --fields title,categories --max-minutes $M --eval-every ${EV:-500} > $OUT/tiger.log 2>&1 &
timeout $T python3 train.py --stage unisrec $C --encoder none --max-minutes $M > $OUT/u_id.log 2>&1 &
timeout $T python3 train.py --stage unisrec $C --encoder minilm --fields title,categories --emb $E --max-minutes $M > $OUT/u_minilm.log 2>&1 &
timeout $T python3 train.py --stage unisrec $C --encoder encoderec-minilm-holdout0.1-len128 --fields title,categories --emb .devdata/encft_item_emb.npy --out $R/Beauty/unisrec-inductive-encoderec-minilm-holdout0.1-len128 --max-minutes $M > $OUT/u_ft.log 2>&1 &
( timeout $((T-40)) python3 train.py --stage tiger $C --encoder minilm --fields title,categories --compile --max-steps ${CS:-300} --eval-every ${CS:-300} --out $R/compile-tiger
  timeout 60 python3 train.py --stage unisrec $C --encoder minilm --fields title,categories --emb $E --compile --max-epochs 2 --out $R/compile-unisrec ) > $OUT/compile.log 2>&1 &
wait
cd $R && tar czf $OUT/results.tgz $(find . -name results.json -o -name history.json -o -name run.json) && ls -la $OUT
