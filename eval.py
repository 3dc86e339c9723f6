"""Evaluation: full-ranking Recall@K / NDCG@K and the `python eval.py --task ...` entry point.

The protocol is the one EncodeRec (arXiv 2601.10837) and its baselines report: leave-one-out, every
test target ranked against *all* items (no sampled negatives), Recall@K = share of cases whose target
ranks in the top K, NDCG@K = mean of 1/log2(rank + 2) over those cases (rank 0 = first place; one
relevant item per case, so the ideal DCG is 1).

Ties are counted pessimistically: every other item whose score is >= the target's ranks ahead of it,
so a model that scores everything equally gets no credit. History items are not masked by default
(RecBole's convention for sequential models); `mask_history` removes them (the target never).

Score matrices are built one chunk of users at a time: 22k users x 12k items in float32 is 1 GB,
so no function here ever materialises more than `chunk_size` rows.

Every task prints its metrics as one JSON object on the last line of stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, Sequence

import numpy as np
import torch

KS = (10,)


# ----------------------------------------------------------------------------- ranks
def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items, ties pessimistic.

    scores (B, I), targets (B,) -> (B,) int64 = #{j != target : score_j >= score_target}.
    A NaN target score counts as a miss (rank I).
    """
    t = scores.gather(1, targets[:, None])                 # (B, 1)
    ranks = (scores >= t).sum(dim=1) - 1                   # the target itself is >= itself
    return torch.where(torch.isnan(t[:, 0]), scores.shape[1], ranks)


def mask_history(scores: torch.Tensor, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Set the scores of items in each row's history (B, L; negative = padding) to -inf, except the
    target itself. Works in place and returns `scores`."""
    rows = torch.arange(len(history), device=history.device)[:, None].expand_as(history)
    keep = (history >= 0) & (history != targets[:, None])
    scores[rows[keep], history[keep]] = float("-inf")
    return scores


def ranks_from_topk(topk: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> np.ndarray:
    """Ranks from ranked lists (generative models): position of the target in its row of top-K
    item ids (B, K), or K when it is absent (a miss at any cutoff <= K)."""
    topk, targets = np.asarray(topk), np.asarray(targets)
    hit = topk == targets[:, None]                         # (B, K)
    return np.where(hit.any(1), hit.argmax(1), topk.shape[1]).astype(np.int64)


def full_ranking_ranks(score_fn: Callable[[np.ndarray], torch.Tensor], n_cases: int,
                       targets: np.ndarray, chunk_size: int = 1024,
                       histories: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """Ranks of every case, scoring `chunk_size` cases at a time.

    score_fn(indices) -> (len(indices), I) scores for those cases. With `histories` (C, L), the
    history items of each case are masked (RecBole's `--mask-history`)."""
    out = np.empty(n_cases, dtype=np.int64)
    starts = range(0, n_cases, chunk_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="ranking", unit="chunk", leave=False)
    for s in starts:
        idx = np.arange(s, min(s + chunk_size, n_cases))
        with torch.inference_mode():
            scores = score_fn(idx).float()
            tgt = torch.as_tensor(targets[idx], device=scores.device)
            if histories is not None:
                scores = mask_history(scores, torch.as_tensor(histories[idx], device=scores.device), tgt)
            out[idx] = ranks_from_scores(scores, tgt).cpu().numpy()
    return out


# ----------------------------------------------------------------------------- metrics
def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K and NDCG@K from 0-based ranks (one relevant item per case)."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else math.nan
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) \
            if len(ranks) else math.nan
    return out


def summarize(ranks: np.ndarray, ks: Sequence[int] = KS, cold: np.ndarray | None = None) -> dict:
    """Metrics over all cases, plus split into in-set and cold-start targets when `cold` is given."""
    out = {**metrics_from_ranks(ranks, ks), "n": int(len(ranks))}
    if cold is not None:
        cold = np.asarray(cold, dtype=bool)
        out["in_set"] = {**metrics_from_ranks(ranks[~cold], ks), "n": int((~cold).sum())}
        out["cold_start"] = {**metrics_from_ranks(ranks[cold], ks), "n": int(cold.sum())}
    return out


def print_json(metrics: dict) -> None:
    """The contract of every task: metrics as one JSON object on the last line of stdout."""
    print(json.dumps(metrics, sort_keys=True), flush=True)


# ----------------------------------------------------------------------------- CLI
TASKS = {
    "retrieval": "title -> document retrieval with an encoder (issue 3)",
    "unisrec": "UniSRec / SASRec full-ranking evaluation of a run (issue 4)",
    "tiger": "TIGER generative retrieval evaluation of a run (issue 5)",
    "collisions": "semantic-ID collision audit (issue 5)",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Evaluate a task; the last stdout line is JSON metrics.")
    ap.add_argument("--task", required=True, choices=list(TASKS))
    ap.add_argument("--dataset", required=True, help="registered name or folder")
    ap.add_argument("--data-dir", default="data", help="download and cache folder (default ./data)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask-history", action="store_true", help="mask history items when ranking")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(f"error: --task {args.task} ({TASKS[args.task]}) is not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
