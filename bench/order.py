"""Benchmark: UniSRec training examples/s on the real Scientific data (../shared/data/lcrec/Scientific) in
the plain shuffle (train.py's default) and the length-grouped order (--group-by-length 50, trainer.epoch_order);
--against REV adds unisrec.py as committed at git revision REV in both orders: a change timed against the
code before it, in the same run.

Since issue 31 `UniSRec.encode` (CPU) sorts a batch's rows by history length and runs them in groups of
unisrec.LENGTH_GROUP, each padded to its own longest history; before, every batch was padded to its longest
(50 items in almost every plain-shuffled batch of 2,048, while the mean history is ~4). Every arm trains its
own copy of one model (UniSRec inductive, the paper's sizes, max history 50, batch 2048, Adam) on the first
--batches batches of epoch 1 of its order, interleaved batch by batch, each step timed (forward + backward +
Adam). Reported: examples/s of each arm, the mean padded width of its batches (what the code before pays
for), and the ratios to the plain shuffle at REV (without --against: this checkout's). Item embeddings:
--emb FILE.npy or random 384-d vectors (throughput does not depend on the values).

    python bench/order.py [--batches 8] [--threads N] [--emb item_emb.npy] [--against REV]
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import trainer  # noqa: E402
import unisrec as us  # noqa: E402
from data import load_dataset  # noqa: E402
from finetune import module_at  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "lcrec" / "Scientific"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8, help="timed batches per arm")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--group", type=int, default=50, help="the grouped order's spans")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--emb", help="item embeddings .npy (items x d); default random 384-d")
    ap.add_argument("--against", metavar="REV", help="also time unisrec.py at this git revision")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the benchmark needs the shared data beside the checkout")
    ds = load_dataset(str(DATA), ROOT / "data")
    hist, _ = ds.histories(ds.splits.train, 50)                                 # (N, 50), -1 = padding
    lengths, target = (hist >= 0).sum(1), ds.splits.train.target
    rng = np.random.default_rng(0)
    emb = np.load(args.emb).astype(np.float32) if args.emb else \
        rng.standard_normal((ds.n_items, 384), np.float32)
    torch.manual_seed(0)
    model = us.UniSRec(us.UniSRecConfig(), emb)
    codes = {"this checkout": us} | ({args.against: module_at(args.against, "unisrec")} if args.against else {})
    arms = {}
    for name, spans in (("plain shuffle", 0), (f"grouped (--group-by-length {args.group})", args.group)):
        order = trainer.epoch_order(lengths, args.batch_size, 0, 1, spans)
        batches = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.batches)]
        for rev, mod in codes.items():
            m = mod.UniSRec(mod.UniSRecConfig(), emb)
            m.load_state_dict(copy.deepcopy(model.state_dict()))
            arms[(rev, name)] = (m.train(), torch.optim.Adam(m.parameters(), lr=1e-3), batches, [])
    print(f"Scientific: {len(target)} training prefixes, {ds.n_items} items, batch {args.batch_size}, "
          f"{args.batches} batches of epoch 1 per arm, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for i in range(args.batches):
        for m, opt, batches, times in arms.values():
            idx = batches[i]
            t0 = time.perf_counter()
            loss = m.loss(torch.as_tensor(hist[idx]), torch.as_tensor(target[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    base = (args.against, "plain shuffle") if args.against else ("this checkout", "plain shuffle")
    eps = {k: sum(map(len, b)) / sum(t) for k, (_, _, b, t) in arms.items()}
    print(f"\n| code | order | examples/s | mean padded width | s / batch (median) | vs {' '.join(base)} |")
    print("|---|---|---|---|---|---|")
    for (rev, name), (_, _, batches, times) in arms.items():
        width = np.mean([lengths[b].max() for b in batches])
        print(f"| {rev} | {name} | {eps[rev, name]:,.0f} | {width:.1f} | {np.median(times):.2f} | "
              f"{eps[rev, name] / eps[base]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
