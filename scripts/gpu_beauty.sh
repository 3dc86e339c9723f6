#!/usr/bin/env bash
# Run on a GPU machine from the repository root, with the Beauty LC-Rec folder copied to .devdata/Beauty,
# runs/Beauty/minilm (item embeddings + RQ-VAE IDs made on CPU) beside it, and the Beauty item embeddings of
# the EncodeRec encoder (made on CPU) in .devdata/encoderec-minilm_item_emb.npy; $OUT collects logs and JSON.
# Runs side by side: the three UniSRec/SASRec rows under one epoch cap (EP) with early stopping, and TIGER
# under a time cap (M minutes). BENCH=1 also runs bench/unisrec.py and bench/tiger.py first.
# Used on an NVIDIA H200 (2026-11-26, twice: the first time with a 5-minute cap and the 90 % encoder).
set -u
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
DEV=${DEV:-cuda}; T=${T:-530}; M=${M:-7.5}; TM=${TM:-6.5}; EP=${EP:-60}; EV=${EV:-1000}
D=.devdata/Beauty; R=/tmp/runs; E=$R/Beauty/minilm/item_emb-title+categories.npy
S=$R/Beauty/minilm/semantic_ids-rqvae-title+categories.npy; FT=.devdata/encoderec-minilm_item_emb.npy
mkdir -p $R/Beauty && cp -r runs/Beauty/minilm $R/Beauty/
B=$OUT/bench.txt
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch;print('torch',torch.__version__)"; } > $B 2>&1
if [ "${BENCH:-0}" = 1 ]; then
  echo "== bench/unisrec.py fp32" >> $B; timeout 60 python3 bench/unisrec.py --device $DEV --threads 8 --data $D --emb $E >> $B 2>&1
  echo "== bench/unisrec.py bf16" >> $B; timeout 40 python3 bench/unisrec.py --device $DEV --threads 8 --data $D --emb $E --amp bf16 >> $B 2>&1
  echo "== bench/tiger.py" >> $B; timeout 60 python3 bench/tiger.py --device $DEV --threads 8 --dataset $D --data-dir /tmp/data --sem-ids $S --repeats 5 --decode-users 256 >> $B 2>&1
fi
C="--dataset $D --data-dir /tmp/data --runs $R --device $DEV --seed 0"
[ $DEV = cuda ] && C="$C --amp bf16"
U="--stage unisrec $C --max-epochs $EP --max-minutes $M"
timeout $T python3 train.py --stage tiger $C --encoder minilm --fields title,categories --max-minutes $TM --eval-every $EV > $OUT/tiger.log 2>&1 &
timeout $T python3 train.py $U --encoder none > $OUT/u_id.log 2>&1 &
timeout $T python3 train.py $U --encoder minilm --fields title,categories --emb $E > $OUT/u_minilm.log 2>&1 &
timeout $T python3 train.py $U --encoder encoderec-minilm --fields title,categories --emb $FT \
  --out $R/Beauty/unisrec-inductive-encoderec-minilm > $OUT/u_ft.log 2>&1 &
wait
cd $R && tar czf $OUT/results.tgz $(find . -name results.json -o -name history.json -o -name run.json) && ls -la $OUT
