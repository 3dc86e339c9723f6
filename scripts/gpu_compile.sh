#!/usr/bin/env bash
# Run on a GPU machine (same carried files as scripts/gpu_beauty.sh): UniSRec and TIGER on Beauty, each alone
# on the card, eager vs --compile (bf16), short schedules; $OUT collects the logs. Times per epoch / per step
# are read from the logs' summaries (history.json).
set -u
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
D=.devdata/Beauty; R=/tmp/rc; E=$R/Beauty/minilm/item_emb-title+categories.npy
mkdir -p $R/Beauty && cp -r runs/Beauty/minilm $R/Beauty/
C="--dataset $D --data-dir /tmp/data --runs $R --device cuda --seed 0 --amp bf16"
for X in "" "--compile"; do
  n=u${X:+-compile}; timeout 80 python3 train.py --stage unisrec $C --encoder minilm --fields title,categories --emb $E --max-epochs ${UE:-6} $X --out $R/$n > $OUT/$n.log 2>&1
  cp $R/$n/history.json $OUT/$n.history.json
  n=t${X:+-compile}; timeout 95 python3 train.py --stage tiger $C --encoder minilm --fields title,categories --max-steps ${TS:-2000} --eval-every ${TS:-2000} --warmup-steps 100 $X --out $R/$n > $OUT/$n.log 2>&1
  cp $R/$n/history.json $OUT/$n.history.json
done
ls -la $OUT
