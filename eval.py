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
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from data import BLAIR_T1, DOCUMENT_FIELDS, DataError, file_sha256, load_dataset, parse_fields
from encoderec import BackboneError, WeightsError, load_encoder
from rqvae import collision_stats, embedding_stats
from tiger import SemanticIDs, Tiger, TigerConfig, recommend
from trainer import json_safe, load_checkpoint
from unisrec import UniSRec, UniSRecConfig, score_fn

KS = (10,)
MISS = np.iinfo(np.int64).max // 2  # rank of a target absent from a top-K list


# ----------------------------------------------------------------------------- ranks
def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor,
                      counts: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all items, ties pessimistic.

    scores (B, I), targets (B,) -> (B,) int64 = #{j != target : score_j >= score_target}.
    With `counts` (I,), column j stands for counts[j] identical entries (e.g. one document text
    shared by several items): it weighs counts[j] when it ranks ahead, and the target's own copies
    never count against it. A NaN target score counts as a miss (rank = number of entries); a NaN
    score of another item ranks ahead of the target.
    """
    t = scores.gather(1, targets[:, None])                 # (B, 1)
    ahead = (scores >= t) | torch.isnan(scores)            # (B, I), includes the target; NaN = ahead
    if counts is None:
        ranks, total = ahead.sum(dim=1) - 1, scores.shape[1]
    else:
        ranks = (ahead * counts).sum(dim=1) - counts[targets]
        total = int(counts.sum())
    return torch.where(torch.isnan(t[:, 0]), total, ranks)


def mask_history(scores: torch.Tensor, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Set the scores of items in each row's history (B, L; negative = padding) to -inf, except the
    target itself. Works in place and returns `scores`."""
    rows = torch.arange(len(history), device=history.device)[:, None].expand_as(history)
    keep = (history >= 0) & (history != targets[:, None])
    scores[rows[keep], history[keep]] = float("-inf")
    return scores


def ranks_from_topk(topk: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> np.ndarray:
    """Ranks from ranked lists (generative models): position of the target in its row of top-K
    item ids (B, K), or MISS when it is absent: a miss at EVERY cutoff, also cutoffs above K (a
    5-item list has no 7th item to hit with)."""
    topk, targets = np.asarray(topk), np.asarray(targets)
    hit = topk == targets[:, None]                         # (B, K)
    return np.where(hit.any(1), hit.argmax(1), MISS).astype(np.int64)


def full_ranking_ranks(score_fn: Callable[[np.ndarray], torch.Tensor], n_cases: int,
                       targets: np.ndarray, chunk_size: int = 1024,
                       histories: np.ndarray | None = None, progress: bool = False,
                       counts: np.ndarray | None = None) -> np.ndarray:
    """Ranks of every case, scoring `chunk_size` cases at a time.

    score_fn(indices) -> (len(indices), I) scores for those cases. With `histories` (C, L), the
    history items of each case are masked (RecBole's `--mask-history`); `counts` as in
    ranks_from_scores."""
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
            cnt = None if counts is None else torch.as_tensor(counts, device=scores.device)
            out[idx] = ranks_from_scores(scores, tgt, cnt).cpu().numpy()
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
    print(json.dumps(json_safe(metrics), sort_keys=True), flush=True)  # NaN (no case) -> null: valid JSON


# ----------------------------------------------------------------------------- retrieval
def holdout_items(ds, fraction: float, seed: int = 0, doc_fields=None) -> np.ndarray:
    """A seeded share of the items that have both a title and a document, kept out of EncodeRec
    fine-tuning so retrieval can be checked on unseen items. Sorted item indices."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {fraction}")
    titles, docs = ds.title_texts(), ds.document_texts(doc_fields or DOCUMENT_FIELDS)
    both = np.array([i for i in range(ds.n_items) if titles[i] and docs[i]], dtype=np.int64)
    n = int(round(fraction * len(both)))
    return np.sort(np.random.default_rng(seed).permutation(both)[:n])


def retrieval_eval(encoder, ds, doc_fields=None, query_items=None, ks: Sequence[int] = KS,
                   batch_size: int = 64, progress: bool = True) -> dict:
    """Title -> document retrieval with full ranking (EncodeRec's alignment check).

    The corpus holds the document of every item that has one. Each query (an item's title) is
    answered by its item's document, and by every copy of the same text: items that share a
    description share the right answer, and the rank is the number of *other* documents scoring
    at least as high (ties pessimistic), each copy of a repeated other text counting once.
    `query_items` restricts the queries (e.g. held-out items), never the corpus. Each distinct
    text is encoded once.
    """
    titles, docs = ds.title_texts(), ds.document_texts(doc_fields or DOCUMENT_FIELDS)
    doc_id: dict[str, int] = {}
    item_doc = {i: doc_id.setdefault(d, len(doc_id)) for i, d in enumerate(docs) if d is not None}
    counts = np.bincount(list(item_doc.values()), minlength=len(doc_id))   # copies of each text
    pool = range(ds.n_items) if query_items is None else query_items
    queries = [int(i) for i in pool if titles[i] is not None and int(i) in item_doc]
    if not queries or not doc_id:
        raise ValueError(f"no (title, document) pairs in {ds.name} for fields {doc_fields}")
    D = torch.from_numpy(encoder.encode(list(doc_id), batch_size=batch_size, show_progress=progress))
    Q = torch.from_numpy(encoder.encode([titles[i] for i in queries], batch_size=batch_size,
                                        show_progress=progress))
    targets = np.array([item_doc[i] for i in queries])
    ranks = full_ranking_ranks(lambda idx: Q[idx] @ D.T, len(queries), targets,
                               counts=counts)                               # (Q,) ranks
    return {**metrics_from_ranks(ranks, ks), "n_queries": len(queries),
            "n_documents": int(counts.sum()), "n_distinct_documents": len(doc_id)}


# ----------------------------------------------------------------------------- CLI
TASKS = {
    "retrieval": "title -> document retrieval of an encoder (--encoder)",
    "unisrec": "valid / test metrics of a UniSRec or SASRec-ID run (--run; default: the newest)",
    "tiger": "test metrics of a TIGER run beside popularity (--run; default: the newest)",
    "collisions": "collision audit of semantic IDs (--run: an ids-* folder; default: the newest)",
    "report": "the paper-shaped tables of every finished run of the datasets (one or more --dataset)",
}
TRAIN_STAGE = {"unisrec": "unisrec", "tiger": "tiger", "collisions": "ids"}  # task -> run folder prefix


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Evaluate; the last stdout line is the metrics as JSON.")
    ap.add_argument("--task", choices=list(TASKS), help="; ".join(f"{k}: {v}" for k, v in TASKS.items()))
    ap.add_argument("--report", action="store_true", help="the same as --task report")
    ap.add_argument("--dataset", required=True, nargs="+", help="a registered name or a folder (report: several)")
    ap.add_argument("--data-dir", default="data", help="download and processed-cache folder (default ./data)")
    ap.add_argument("--runs", default="runs", help="where train.py wrote its run folders (default ./runs)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0, help="also selects the --holdout items")
    r = ap.add_argument_group("retrieval")
    r.add_argument("--encoder", default="minilm", help="minilm | a fine-tuned run folder | a BERT folder")
    r.add_argument("--weights", default=None, help="folder with the files of a named backbone (offline)")
    r.add_argument("--doc-fields", default=None, help="the document's fields (default: the EncodeRec document)")
    r.add_argument("--holdout", type=float, default=0.0,
                   help="evaluate only the titles of this seeded share of items (as in training)")
    r.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's, 256)")
    r.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch")
    u = ap.add_argument_group("unisrec / tiger / collisions")
    u.add_argument("--run", default=None, help="a run folder of train.py (default: the newest finished one)")
    u.add_argument("--mask-history", action="store_true", help="unisrec: mask history items when ranking")
    u.add_argument("--beam", type=int, default=10, help="tiger: beam width = returned IDs (TIGER: 10)")
    u.add_argument("--no-constrain", action="store_true",
                   help="tiger: free decoding (IDs may name no item; their share is reported)")
    p = ap.add_argument_group("report")
    p.add_argument("--csv", default=None, help="CSV path (default runs/report-<datasets>.csv)")
    return ap


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def find_run(args, task: str) -> Path:
    """--run, or the newest finished run of `task` for --dataset under --runs; when there is none, an error
    that names the command making it."""
    if args.run:
        run = Path(args.run)
        if not (run / "results.json").is_file():
            raise DataError(f"{run} is not a finished run of train.py (no results.json)")
        return run
    name = Path(args.dataset).name if Path(args.dataset).is_dir() else str(args.dataset).lower()
    roots = [p for p in Path(args.runs).glob("*") if p.name.lower() == name.lower()]
    runs = [p.parent for r in roots for p in r.glob(f"{TRAIN_STAGE[task]}-*/results.json")]
    if not runs:
        stage = "rqvae" if task == "collisions" else task
        raise DataError(f"no finished {task} run for {args.dataset} under {args.runs}/: train one with\n"
                        f"  python train.py --stage {stage} --dataset {args.dataset}")
    run = max(runs, key=lambda p: (p / "results.json").stat().st_mtime)
    print(f"evaluating {run} (the newest of {len(runs)}; --run picks another)", file=sys.stderr)
    return run


def _load(run: Path, ds):
    """(model built from run/best.pt, the run's checkpoint meta); the data must be the run's."""
    ck = load_checkpoint(run / "best.pt")
    meta = ck.get("meta", {})
    if meta.get("data_fingerprint") != ds.fingerprint:
        raise DataError(f"{run} was trained on other data than {ds.name} holds now (data fingerprint differs)")
    return ck, meta


def run_retrieval(args) -> dict:
    ds = load_dataset(args.dataset, args.data_dir)
    fields = parse_fields(args.doc_fields, DOCUMENT_FIELDS)
    enc = load_encoder(args.encoder, weights=args.weights, device=args.device, max_length=args.max_length)
    queries = holdout_items(ds, args.holdout, args.seed, fields) if args.holdout > 0 else None
    out = retrieval_eval(enc, ds, doc_fields=fields, query_items=queries, batch_size=args.batch_size)
    return {"task": "retrieval", "dataset": ds.name, "encoder": str(args.encoder), "doc_fields": list(fields),
            "holdout": args.holdout, "max_length": enc.max_length, **out}


def evaluate_unisrec(model, ds, cases, max_len: int, mask_history: bool = False,
                     ks=(10, 50)) -> dict:
    """Full-ranking Recall/NDCG@K of a UniSRec/SASRec model on some cases (valid or test)."""
    hist, _ = ds.histories(cases, max_len)                                  # (C, L), -1 = padding
    masked = ds.histories(cases, int(ds.seq_lengths.max()))[0] if mask_history else None
    ranks = full_ranking_ranks(score_fn(model, hist), len(cases), cases.target, histories=masked)
    return summarize(ranks, ks, cold=cases.cold)


def run_unisrec(args) -> dict:
    """Full-ranking valid/test metrics (Recall/NDCG @10, @50) of a UniSRec/SASRec run's best model."""
    run = find_run(args, "unisrec")
    ds = load_dataset(args.dataset, args.data_dir)
    ck, meta = _load(run, ds)
    cfg = UniSRecConfig(**meta["model_config"])
    emb = np.load(meta["item_emb"], allow_pickle=False) if cfg.mode != "id" else None
    model = UniSRec(cfg, emb)
    model.load_state_dict(ck["model"])
    model.to(_device(args.device)).eval()
    return {"task": "unisrec", "dataset": ds.name, "run": str(run), "mask_history": args.mask_history,
            **{split: evaluate_unisrec(model, ds, getattr(ds.splits, split), cfg.max_seq_len, args.mask_history)
               for split in ("valid", "test")}}


def run_collisions(args) -> dict:
    """Collision audit of the semantic IDs in an ids-* run folder of train.py (read, never re-made), with the
    geometry of the very embeddings they were made from when that file is still there unchanged."""
    run = find_run(args, "collisions")
    ds = load_dataset(args.dataset, args.data_dir)
    ids, info = np.load(run / "semantic_ids.npy", allow_pickle=False), json.loads((run / "results.json").read_text())
    if ids.ndim != 2 or ids.shape != (ds.n_items, 4) or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{run}/semantic_ids.npy holds {ids.dtype} {ids.shape}, expected int64 ({ds.n_items}, 4)")
    key = json.loads((run / "run.json").read_text())["key"]
    emb = Path(info["embeddings"])
    same = emb.is_file() and file_sha256(emb) == key["embeddings"]
    return {"task": "collisions", "dataset": ds.name, "encoder": info["encoder"], "tokenizer": info["tokenizer"],
            "semantic_ids": str(run / "semantic_ids.npy"), **collision_stats(ids[:, :3], info["vocab_sizes"][0]),
            "ids_unique": len(np.unique(ids, axis=0)) == len(ids), "vocab_sizes": info["vocab_sizes"],
            "max_dedup_code": int(ids[:, 3].max()), "embeddings": embedding_stats(np.load(emb)) if same else None}


def training_counts(ds) -> np.ndarray:
    """Training-interaction count of every item (I,): all interactions except the validation and test
    targets (leave-one-out), or those before the first split time (BLaIR time split)."""
    train = np.ones(ds.n_interactions, dtype=bool)
    for cases in (ds.splits.valid, ds.splits.test):
        train[ds.seq_offsets[cases.user] + cases.pos] = False
    if ds.protocol == "time":
        train &= ds.seq_times < BLAIR_T1
    return np.bincount(ds.seq_items[train], minlength=ds.n_items)


def popularity_ranks(ds, cases, chunk_size: int = 1024) -> np.ndarray:
    """Ranks of the cases' targets when every item is scored by its training-interaction count
    (the popularity baseline; full ranking, ties pessimistic, the same for every user)."""
    counts = torch.as_tensor(training_counts(ds), dtype=torch.float32)      # (I,)
    return full_ranking_ranks(lambda idx: counts.expand(len(idx), -1), len(cases), cases.target,
                              chunk_size=chunk_size)


def evaluate_tiger(model, ds, cases, ids, beam: int = 10, constrain: bool = True,
                   ks=(5, 10), progress: bool = True, batch_size: int = 256) -> dict:
    """Recall/NDCG@K of TIGER's beam search (top-`beam` generated IDs) on some cases, overall and
    for in-set / cold-start targets; with constrain=False also the share of generated IDs (of all
    returned top-`beam` slots) that name no item."""
    hist, _ = ds.histories(cases, model.cfg.max_items)                      # (C, L), -1 = padding
    items, _ = recommend(model, hist, ids, beam=beam, constrain=constrain, batch_size=batch_size,
                         progress=progress)                                # (C, beam), -1 = invalid
    out = summarize(ranks_from_topk(items, cases.target), ks, cold=cases.cold)
    if not constrain:
        out["invalid_share"] = float((items < 0).mean()) if items.size else math.nan
    return out


def run_tiger(args) -> dict:
    """Test metrics (Recall/NDCG @5, @10, all / in-set / cold-start) of a TIGER run's best model, the
    invalid-ID share with --no-constrain, and the popularity baseline on the same test cases."""
    if args.beam < 1:
        raise DataError(f"--beam must be >= 1, got {args.beam}")
    run = find_run(args, "tiger")
    ds = load_dataset(args.dataset, args.data_dir)
    ck, meta = _load(run, ds)
    device = _device(args.device)
    model = Tiger(TigerConfig(**meta["model_config"]))
    model.load_state_dict(ck["model"])
    model.to(device).eval()
    ids = SemanticIDs(meta["semantic_ids"].numpy(), model.cfg.vocab_sizes, device)
    test = ds.splits.test
    return {"task": "tiger", "dataset": ds.name, "run": str(run), "beam": args.beam,
            "constrained": not args.no_constrain, "semantic_ids": meta.get("semantic_ids_path"),
            "test": evaluate_tiger(model, ds, test, ids, args.beam, not args.no_constrain),
            "popularity": summarize(popularity_ranks(ds, test), (5, 10), cold=test.cold)}


# ----------------------------------------------------------------------------- the results report
# `python eval.py --task report --dataset A [B ...]` reads the results.json of every finished run folder under
# runs/<dataset>/ and lays them out as the paper's tables; nothing is recomputed, each cell names its folder.
#   retrieval-*, encoder-* (held-out retrieval before / after) -> Table 1;  unisrec-* -> Table 2;
#   tiger-* -> Table 3;  ids-* -> the collision table

def encoder_label(encoder: str) -> str:
    """Row name of an encoder: 'none' -> SASRec-ID, 'minilm' -> off-the-shelf, a folder -> its name."""
    e = str(encoder)
    return {"none": "no text (SASRec-ID)", "minilm": "all-MiniLM-L6-v2"}.get(e.lower(), Path(e).name)


def _schedule(res: dict) -> str:
    """How long a run trained, for the row label: '' when it ran to early stopping."""
    if res.get("task") == "tiger":
        return f"{res.get('steps')} steps" + (", early stop" if res.get("stopped_early") else "")
    if res.get("max_epochs") and not res.get("stopped_early"):
        return f"capped at {res['max_epochs']} epochs"
    return ""


def _records(name: str, run: Path, res: dict) -> list[tuple]:
    """(table, row, schedule, metrics, keys) of one finished run's results.json."""
    task, row = res.get("task"), encoder_label(res.get("encoder", "?"))
    if task == "unisrec":
        row += (" + item IDs" if res.get("mode") == "transductive" else "") + (
            f" ({Path(res['custom_emb']).name})" if res.get("custom_emb") else "")
        return [("unisrec", row, _schedule(res), res["test"], ("recall@10", "ndcg@10", "recall@50", "ndcg@50"))]
    if task == "tiger":
        keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
        return [("tiger", f"{row} / {res.get('tokenizer')}", _schedule(res), res["test"], keys),
                ("tiger", "popularity", "", res["popularity"], keys)]
    if task == "retrieval":
        return [("retrieval", f"{row} (all items, {res.get('max_length')} tokens)", "", res, ("recall@10", "ndcg@10"))]
    if task == "rqvae":
        col = res["collisions"]
        usage = {f"usage_l{i + 1}": u for i, u in enumerate(col.get("usage", []))}
        return [("collisions", f"{row} / {res['tokenizer']}", "", {**col, **usage},
                 ("items", "unique_prefixes", "collision_rate", "largest_group", *usage))]
    evals = [h for h in res.get("history", []) if h.get("valid")] if task == "encoder" else []
    if not evals:
        return []
    return [("retrieval", f"{run.name} (held-out items, epoch {evals[-1]['epoch']:g})", "", evals[-1]["valid"],
             ("recall@10", "ndcg@10"))]


def collect_report(runs, names) -> list[dict]:
    """Every metric of the datasets `names` (folder names under runs/) as flat records
    {table, dataset, row, run, schedule, metric, value} (the CSV rows); of several runs with the same
    (table, row, schedule) the newest is kept."""
    newest = {}
    for name in names:
        for f in sorted((Path(runs) / name).glob("*/results.json")):
            try:
                res = json.loads(f.read_text())
            except ValueError:
                continue
            if res.get("task") == "encoder":
                res["history"] = json.loads((f.parent / "history.json").read_text())
            for table, row, sched, metrics, keys in _records(name, f.parent, res):
                key, t = (table, name, row, sched), f.stat().st_mtime
                if key not in newest or t > newest[key][0]:
                    newest[key] = (t, f.parent, metrics, keys)
    return [{"table": k[0], "dataset": k[1], "row": k[2], "run": str(run), "schedule": k[3], "metric": m,
             "value": float(metrics[m])}
            for k, (_, run, metrics, keys) in newest.items() for m in keys if isinstance(metrics.get(m), (int, float))]


TABLES = {  # table -> (title, metrics shown per dataset)
    "retrieval": ("Table 1 shape: title -> document retrieval (full ranking over all documents)",
                  ("recall@10", "ndcg@10")),
    "unisrec": ("Table 2 shape: UniSRec on frozen item embeddings, test set, full ranking",
                ("recall@10", "ndcg@10")),
    "tiger": ("Table 3 shape: TIGER on semantic IDs, test set, constrained beam 10",
              ("recall@10", "ndcg@10")),
    "collisions": ("Semantic-ID collisions (3-code prefixes)",
                   ("collision_rate", "largest_group", "usage_l1", "usage_l2", "usage_l3")),
}


def _row_order(row_schedule: tuple) -> tuple:
    """Baselines first (popularity, SASRec-ID), then the off-the-shelf encoder, then fine-tuned ones."""
    row, sched = row_schedule
    rank = next((i for i, p in enumerate(("popularity", "no text", "all-MiniLM")) if row.startswith(p)), 3)
    return rank, row, sched


def report_markdown(recs: list[dict]) -> str:
    out = []
    for table, (title, metrics) in TABLES.items():
        rs = [r for r in recs if r["table"] == table]
        if not rs:
            continue
        datasets = list(dict.fromkeys(r["dataset"] for r in rs))
        rows = sorted(dict.fromkeys((r["row"], r["schedule"]) for r in rs), key=_row_order)
        cell = {(r["dataset"], r["row"], r["schedule"], r["metric"]): r["value"] for r in rs}
        head = ["encoder"] + [f"{d} {m}" for d in datasets for m in metrics]
        out += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row, sched in rows:
            label = f"{row} ({sched})" if sched and table != "retrieval" else row
            vals = []
            for d in datasets:
                for m in metrics:
                    v = cell.get((d, row, sched, m))
                    vals.append("–" if v is None else (f"{v:.0f}" if m == "largest_group" else f"{v:.4f}"))
            out.append("| " + " | ".join([label, *vals]) + " |")
        srcs = sorted({(r["dataset"], r["row"], r["schedule"], r["run"]) for r in rs})
        out += ["", "Sources: " + "; ".join(f"{d} / {row}{f' ({s})' if s else ''}: `{run}`"
                                            for d, row, s, run in srcs), ""]
    return "\n".join(out) if out else "(no results found)"


def write_report_files(recs: list[dict], csv_path, png_path=None) -> list[str]:
    """The long-format CSV (always) and, when matplotlib is installed, a PNG of Recall@10 per
    encoder and recommender. Returns the paths written."""
    import csv
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["table", "dataset", "row", "schedule", "metric", "value", "run"])
        w.writeheader()
        w.writerows(recs)
    written = [str(csv_path)]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    bars = [r for r in recs if r["table"] in ("unisrec", "tiger") and r["metric"] == "recall@10"]
    if bars and png_path:
        labels = [f"{r['dataset']} {r['table']}\n{r['row']}" for r in bars]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(bars)), 4))
        ax.bar(range(len(bars)), [r["value"] for r in bars])
        ax.set_xticks(range(len(bars)), labels, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("Recall@10 (test)")
        fig.tight_layout()
        fig.savefig(png_path, dpi=120)
        plt.close(fig)
        written.append(str(png_path))
    return written


def run_report(args) -> dict:
    names = [Path(d).name if Path(d).is_dir() else d.lower() for d in args.dataset]
    names = [next((p.name for p in Path(args.runs).glob("*") if p.name.lower() == n.lower()), n) for n in names]
    recs = collect_report(args.runs, names)
    csv_path = Path(args.csv) if args.csv else Path(args.runs) / f"report-{'+'.join(names)}.csv"
    files = write_report_files(recs, csv_path, csv_path.with_suffix(".png"))
    print(report_markdown(recs))
    print(f"wrote {', '.join(files)}", file=sys.stderr)
    return {"task": "report", "datasets": names, "cells": len(recs), "files": files}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    task = "report" if args.report else args.task
    if task is None:
        print("error: pass --task TASK (or --report)", file=sys.stderr)
        return 2
    if task != "report":
        if len(args.dataset) != 1:
            print("error: --task takes one --dataset (several are for the report)", file=sys.stderr)
            return 2
        args.dataset = args.dataset[0]
    torch.manual_seed(args.seed)
    runners = {"retrieval": run_retrieval, "unisrec": run_unisrec, "collisions": run_collisions,
               "tiger": run_tiger, "report": run_report}
    try:
        print_json(runners[task](args))
    except (DataError, BackboneError, WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
