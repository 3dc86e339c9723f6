"""Is the collision gap between two encoders larger than the tokenizer's own seed-to-seed spread?

For each item-embedding file given, trains the default RQ-VAE (`rqvae.RQVAEConfig()`, the recipe of
`train.py --stage rqvae`) and runs residual k-means with several seeds, and prints one table row per
(file, tokenizer): the collision rate of every seed, their mean and range, the largest group, and the
embeddings' own statistics (`rqvae.embedding_stats`: the collision floor set by identical embeddings,
mean pairwise cosine, effective rank). Nothing is written; the semantic IDs in runs/ are untouched.

    python scripts/collision_seeds.py runs/Scientific/embed-minilm-*/item_emb.npy \\
        runs/Scientific/embed-encoder-minilm-*/item_emb.npy --seeds 0 1 2

Seed 0 repeats what `train.py --stage rqvae` (default --seed 0) wrote; on CPU the run is deterministic.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rqvae as rq  # noqa: E402
import train  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("embeddings", nargs="+", help="item_emb-*.npy files written by train.py --stage embed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tokenizers", nargs="+", default=["rqvae", "rkmeans"], choices=["rqvae", "rkmeans"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.embeddings:
        emb = np.load(path)
        geo = rq.embedding_stats(emb)
        for tok in args.tokenizers:
            rates, groups, t0 = [], [], time.time()
            for seed in args.seeds:
                if tok == "rqvae":
                    with tempfile.TemporaryDirectory() as tmp:  # the checkpoints of fit_rqvae
                        cfg = rq.RQVAEConfig(input_dim=emb.shape[1])
                        codes = rq.tokenize(train.fit_rqvae(emb, cfg, Path(tmp), seed, "cpu", {}), emb)
                else:
                    codes = rq.residual_kmeans(emb, seed=seed)
                s = rq.collision_stats(codes)
                rates.append(s["collision_rate"])
                groups.append(s["largest_group"])
                print(f"{path} {tok} seed {seed}: collision rate {s['collision_rate']:.4f}, "
                      f"largest group {s['largest_group']}", file=sys.stderr, flush=True)
            rows.append((path, tok, rates, groups, geo, time.time() - t0))
    print(f"\nseeds {args.seeds}\n")
    print("| embeddings | tokenizer | collision rate per seed | mean | range | largest group | floor "
          "(identical embeddings) | mean cosine | effective rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, tok, rates, groups, geo, _ in rows:
        print(f"| `{path}` | {tok} | {' / '.join(f'{r:.4f}' for r in rates)} | {np.mean(rates):.4f} | "
              f"{max(rates) - min(rates):.4f} | {min(groups)}–{max(groups)} | {geo['collision_floor']:.4f} "
              f"({geo['repeated_embeddings']}) | {geo['mean_cosine']:.3f} | {geo['effective_rank']:.1f} |")


if __name__ == "__main__":
    main()
