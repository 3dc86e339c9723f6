"""Benchmark: UniSRec training examples/s in the default epoch order (histories grouped by length,
trainer.epoch_order with --group-by-length 50) against the plain shuffle (--group-by-length 0), on the real
Scientific data (../shared/data/lcrec/Scientific).

Both orders train their own copy of one model (UniSRec inductive, the paper's sizes, max history 50, batch
2048, Adam) on the first --batches batches of epoch 1 of their order, interleaved (plain, grouped, plain,
...), each step timed (forward + backward + Adam). A batch pads to its longest history, so the grouped order
pays for less padding; the examples, the model and the loss are the same. Reported: examples/s of each
order, the mean padded width, and the ratio. Item embeddings: --emb FILE.npy or random unit-norm 384-d
vectors (throughput does not depend on the values).

    python bench/order.py [--batches 8] [--threads N] [--emb item_emb.npy]
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

DATA = ROOT.parent / "shared" / "data" / "lcrec" / "Scientific"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8, help="timed batches per order")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--group", type=int, default=50, help="the grouped order's spans (train.py's default)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--emb", help="item embeddings .npy (items x d); default random 384-d")
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
    orders = {"plain": 0, "grouped": args.group}
    runs = {}
    for name, spans in orders.items():
        m = copy.deepcopy(model).train()
        order = trainer.epoch_order(lengths, args.batch_size, 0, 1, spans)
        batches = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.batches)]
        runs[name] = (m, torch.optim.Adam(m.parameters(), lr=1e-3), batches, [])
    print(f"Scientific: {len(target)} training prefixes, {ds.n_items} items, batch {args.batch_size}, "
          f"{args.batches} batches of epoch 1 per order, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    for i in range(args.batches):
        for name, (m, opt, batches, times) in runs.items():
            idx = batches[i]
            t0 = time.perf_counter()
            loss = m.loss(torch.as_tensor(hist[idx]), torch.as_tensor(target[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    print("\n| order | examples/s | mean padded width | s / batch (median) |\n|---|---|---|---|")
    eps = {}
    for name, (_, _, batches, times) in runs.items():
        eps[name] = sum(map(len, batches)) / sum(times)
        width = np.mean([lengths[b].max() for b in batches])
        print(f"| {name} (--group-by-length {orders[name]}) | {eps[name]:,.0f} | {width:.1f} | "
              f"{np.median(times):.2f} |")
    print(f"\ngrouped / plain examples/s: {eps['grouped'] / eps['plain']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
