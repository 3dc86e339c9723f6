"""Benchmark: what `--compile` (torch.compile of Tiger's encoder and decoder stacks, dynamic shapes,
as train.py does it) costs and gains on TIGER training steps, against eager, in one run.

Both models get the same seeded random batches: --batch-size rows (every 7th batch smaller, as the
last batch of an epoch is) of histories of 2..20 items (9..81 tokens), one AdamW step each. The
table shows the first step (where compilation happens), the largest later step (a recompilation,
if one happens), the median of the last half of the steps (the steady state), the total, and how
many graphs Dynamo compiled. By default the model is tiny (d_model 32, 2 + 2 layers) so that the
run takes minutes on one thread; --full uses TIGER's size.

    python bench/compile.py [--steps 40] [--threads 1] [--device cpu|cuda] [--full]
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
import tiger as tg  # noqa: E402


def run(compiled: bool, args) -> dict:
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    size = {} if args.full else dict(d_model=32, d_kv=16, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2)
    cfg = tg.TigerConfig(vocab_sizes=[256, 256, 256, 256], **size)
    model = tg.Tiger(cfg).to(args.device)
    model.length_buckets = False  # one graph per batch shape, as on a GPU
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        model.compile_core()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    times = []
    for step in range(args.steps):
        T = int(rng.integers(2, 21)) * cfg.n_levels + 1
        B = args.batch_size if step % 7 else args.batch_size * 3 // 5
        src = torch.randint(tg.N_SPECIAL, cfg.vocab_size, (B, T), device=args.device)
        tgt = torch.randint(tg.N_SPECIAL, cfg.vocab_size, (B, cfg.n_levels), device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.loss(src, tgt).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    graphs = counters["stats"]["unique_graphs"] if compiled else 0
    return {"first": times[0], "max_later": max(times[1:]), "steady": statistics.median(times[len(times) // 2:]),
            "total": sum(times), "graphs": graphs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="TIGER's size instead of the tiny config")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), "
          f"{'TIGER size' if args.full else 'tiny config'}, batch {args.batch_size}, {args.steps} steps")
    rows = {"eager": run(False, args), "compile": run(True, args)}
    print("| mode | first step s | largest later step s | steady step s (median) | total s | graphs compiled |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['first']:.3f} | {r['max_later']:.3f} | {r['steady']:.4f} | {r['total']:.1f} | {r['graphs']} |")
    e, c = rows["eager"], rows["compile"]
    verdict = (f"compile breaks even after {(c['total'] - e['total']) / (e['steady'] - c['steady']):.0f} more steps"
               if c["steady"] < e["steady"] else "compile never breaks even here")
    print(f"steady-state ratio eager/compile: {e['steady'] / c['steady']:.2f}x; {verdict}")

if __name__ == "__main__":
    main()
