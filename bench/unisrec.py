"""Benchmark: UniSRec (inductive) vs SASRec-ID training throughput and full-ranking evaluation time
on the real Beauty data (../shared/data/lcrec/Beauty, 22,363 users, 12,101 items).

Training examples = every training prefix -> next item (ds.histories(ds.splits.train, 50)).
Training: a warm-up step, then the median of --steps timed steps (forward + backward + Adam),
each on a seeded random batch of --batch-size examples; reported as examples/s. Evaluation: all
test users (or --eval-users), scored in chunks of --chunk-size with unisrec.score_fn and ranked
with eval.full_ranking_ranks (full ranking over every item). Item embeddings: --emb FILE.npy
(I x d, row i = item i) or random unit-norm 384-d vectors (MiniLM's width; throughput does not
depend on the values). Paper/UniSRec default model sizes (hidden 300, 2 layers, max length 50).

    python bench/unisrec.py [--device cpu|cuda] [--steps 5] [--threads N] [--emb item_emb.npy]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import unisrec as us
from data import load_dataset
from eval import full_ranking_ranks, metrics_from_ranks

DATA = ROOT.parent / "shared" / "data" / "lcrec" / "Beauty"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(model, hist, target, steps, batch_size, amp, seed=0):
    """Median examples/s over `steps` timed optimizer steps after one warm-up step."""
    device = model.device
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    H = torch.as_tensor(hist, device=device)
    T = torch.as_tensor(target, device=device)
    dtype = {"bf16": torch.bfloat16}.get(amp)     # bf16 needs no GradScaler
    model.train()
    times = []
    for i in range(steps + 1):
        idx = torch.as_tensor(rng.integers(0, len(T), batch_size), device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model.loss(H[idx], T[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i:  # step 0 = warm-up
            times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times), loss.item()


def eval_time(model, hist, target, chunk_size):
    device = model.device
    sync(device)
    t0 = time.perf_counter()
    ranks = full_ranking_ranks(us.score_fn(model, hist), len(target), target, chunk_size=chunk_size,
                               progress=True)
    sync(device)
    return time.perf_counter() - t0, metrics_from_ranks(ranks)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per model (median)")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--chunk-size", type=int, default=1024, help="users scored at once in evaluation")
    ap.add_argument("--eval-users", type=int, default=None, help="first N test users (default: all)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--emb", default=None, help="item embeddings .npy (I x d); default random 384-d")
    ap.add_argument("--amp", choices=["off", "bf16"], default="off")
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not Path(args.data).is_dir():
        sys.exit(f"{args.data} not found: the benchmark needs the shared Beauty data "
                 "(../shared/data beside the checkout).")

    ds = load_dataset(args.data)
    train_hist, _ = ds.histories(ds.splits.train, 50)
    train_target = ds.splits.train.target
    test = ds.splits.test if args.eval_users is None else ds.splits.test.subset(slice(0, args.eval_users))
    test_hist, _ = ds.histories(test, 50)
    if args.emb:
        emb = np.load(args.emb).astype(np.float32)
        source = args.emb
    else:
        emb = np.random.default_rng(0).standard_normal((ds.n_items, 384)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        source = "random unit-norm"
    print(f"Beauty: {ds.n_users} users, {ds.n_items} items, {len(train_target)} training examples, "
          f"{len(test.target)} test users; item embeddings {emb.shape[1]}-d ({source})")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{args.threads} threads, torch {torch.__version__}, amp {args.amp}, batch {args.batch_size}, "
          f"median of {args.steps} steps after 1 warm-up, eval chunk {args.chunk_size}")

    rows = []
    for name, build in (("SASRec-ID", lambda: us.SASRecID(ds.n_items)),
                        ("UniSRec-inductive", lambda: us.UniSRec(us.UniSRecConfig(), emb))):
        torch.manual_seed(0)
        model = build().to(device)
        n_params = sum(p.numel() for p in model.parameters())
        eps, loss = train_throughput(model, train_hist, train_target, args.steps, args.batch_size, args.amp)
        secs, metrics = eval_time(model, test_hist, test.target, args.chunk_size)
        rows.append((name, n_params, eps, secs, metrics["ndcg@10"], loss))
        del model
    print()
    print(f"{'model':<20}{'params':>10}{'train ex/s':>12}{'s/epoch':>10}{'eval s':>9}{'ndcg@10':>9}")
    for name, n_params, eps, secs, ndcg, _ in rows:
        print(f"{name:<20}{n_params:>10,}{eps:>12,.0f}{len(train_target) / eps:>10.1f}{secs:>9.2f}{ndcg:>9.4f}")
    (_, _, e0, s0, _, _), (_, _, e1, s1, _, _) = rows
    print(f"UniSRec / SASRec-ID: training throughput x{e1 / e0:.2f}, evaluation time x{s1 / s0:.2f} "
          "(untrained models: ndcg@10 is a sanity check only)")


if __name__ == "__main__":
    main()
