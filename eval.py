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
    print(json.dumps(metrics, sort_keys=True), flush=True)


# ----------------------------------------------------------------------------- retrieval
def holdout_items(ds, fraction: float, seed: int = 0, doc_fields=None) -> np.ndarray:
    """A seeded share of the items that have both a title and a document, kept out of EncodeRec
    fine-tuning so retrieval can be checked on unseen items. Sorted item indices."""
    from data import DOCUMENT_FIELDS
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
    from data import DOCUMENT_FIELDS
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
    "retrieval": "title -> document retrieval with an encoder (issue 3)",
    "unisrec": "UniSRec / SASRec full-ranking evaluation of a run (issue 4)",
    "tiger": "TIGER generative retrieval evaluation of a run (issue 5)",
    "collisions": "semantic-ID collision audit (issue 5)",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Evaluate a task; the last stdout line is JSON metrics.")
    ap.add_argument("--task", choices=list(TASKS))
    ap.add_argument("--report", action="store_true",
                    help="instead of a task: the paper-shaped tables of every run of the datasets "
                         "(Markdown on stdout, CSV + optional PNG next to --runs)")
    ap.add_argument("--dataset", required=True, nargs="+",
                    help="registered name or folder (--report: one or more)")
    ap.add_argument("--csv", default=None, help="--report: CSV path (default runs/report-<datasets>.csv)")
    ap.add_argument("--data-dir", default="data", help="download and cache folder (default ./data)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0, help="also selects the --holdout items")
    ap.add_argument("--mask-history", action="store_true", help="mask history items when ranking")
    r = ap.add_argument_group("retrieval")
    r.add_argument("--encoder", default="minilm", help="minilm | a fine-tuned run folder | a BERT folder")
    r.add_argument("--weights", default=None, help="folder with the backbone files (skips lookup)")
    r.add_argument("--doc-fields", default=None,
                   help="comma-separated fields forming the document (default: features,description,"
                        "brand,categories = the EncodeRec document)")
    r.add_argument("--holdout", type=float, default=0.0,
                   help="evaluate only the titles of this seeded share of items (as in training)")
    r.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's, 256)")
    r.add_argument("--batch-size", type=int, default=64)
    u = ap.add_argument_group("unisrec / tiger")
    u.add_argument("--run", default=None, help="run folder written by train.py")
    u.add_argument("--beam", type=int, default=10, help="tiger: beam width = returned IDs (TIGER: 10)")
    u.add_argument("--no-constrain", action="store_true",
                   help="tiger: free decoding (IDs may name no item; their share is reported)")
    c = ap.add_argument_group("collisions (semantic IDs written by train.py --stage rqvae; --encoder as above)")
    c.add_argument("--tokenizer", choices=["rqvae", "rkmeans"], default="rqvae")
    c.add_argument("--fields", default=None, help="item text fields (default: title,categories,brand)")
    c.add_argument("--runs", default="runs", help="run folders of train.py (default ./runs)")
    c.add_argument("--rqvae-epochs", type=int, default=None,
                   help="the IDs of a non-default RQ-VAE run (as given to train.py; e.g. 20 for --budget smoke)")
    c.add_argument("--no-dead-code-restart", action="store_true", help="the IDs of a run made with this flag")
    return ap


def parse_fields(text: str | None):
    from data import TEXT_FIELDS, DataError
    if text is None:
        return None
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in fields if f not in TEXT_FIELDS]
    if bad or not fields:
        raise DataError(f"unknown field(s) {', '.join(bad) or text!r}; choose from {', '.join(TEXT_FIELDS)}")
    return fields


def run_retrieval(args) -> dict:
    from data import load_dataset
    from encoderec import load_encoder
    ds = load_dataset(args.dataset, args.data_dir)
    fields = parse_fields(args.doc_fields)
    enc = load_encoder(args.encoder, weights=args.weights, device=args.device, max_length=args.max_length)
    queries = holdout_items(ds, args.holdout, args.seed) if args.holdout > 0 else None
    out = retrieval_eval(enc, ds, doc_fields=fields, query_items=queries, batch_size=args.batch_size)
    return {"task": "retrieval", "dataset": ds.name, "encoder": str(args.encoder),
            "doc_fields": list(fields) if fields else "document", "holdout": args.holdout,
            "max_length": enc.max_length, **out}


def evaluate_unisrec(model, ds, cases, max_len: int, mask_history: bool = False,
                     ks=(10, 50)) -> dict:
    """Full-ranking Recall/NDCG@K of a UniSRec/SASRec model on some cases (valid or test)."""
    from unisrec import score_fn
    hist, _ = ds.histories(cases, max_len)                                  # (C, L), -1 = padding
    masked = ds.histories(cases, int(ds.seq_lengths.max()))[0] if mask_history else None
    ranks = full_ranking_ranks(score_fn(model, hist), len(cases), cases.target, histories=masked)
    return summarize(ranks, ks, cold=cases.cold)


def run_unisrec(args) -> dict:
    """Full-ranking valid/test metrics (Recall/NDCG @10, @50) of a UniSRec/SASRec run's best model."""
    from pathlib import Path
    from data import DataError, load_dataset
    from unisrec import load_checkpoint
    if not args.run:
        raise DataError("--task unisrec needs --run RUN_DIR (a folder written by train.py --stage unisrec)")
    run = Path(args.run)
    if not (run / "run.json").exists() or not (run / "best.pt").exists():
        raise DataError(f"{run} is not a finished UniSRec run (run.json and best.pt expected)")
    info = json.loads((run / "run.json").read_text())
    ds = load_dataset(args.dataset, args.data_dir)
    if ds.fingerprint != info["data_fingerprint"]:
        print(f"warning: {ds.name} differs from the data {run} was trained on", file=sys.stderr)
    emb = np.load(info["item_emb"]) if info.get("item_emb") else None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_checkpoint(run / "best.pt", item_emb=emb, device=device)
    max_len = info["model_config"]["max_seq_len"]
    return {"task": "unisrec", "dataset": ds.name, "run": str(run), "mask_history": args.mask_history,
            "valid": evaluate_unisrec(model, ds, ds.splits.valid, max_len, args.mask_history),
            "test": evaluate_unisrec(model, ds, ds.splits.test, max_len, args.mask_history)}


def run_collisions(args) -> dict:
    """Collision audit of the semantic IDs that `train.py --stage rqvae` wrote (read, never re-made:
    a missing file is a user error that names the command making it)."""
    from pathlib import Path

    from data import ITEM_TEXT_FIELDS, DataError, file_sha256, load_dataset
    from rqvae import collision_stats, embedding_stats
    from train import embedding_path, semantic_ids_path
    ds = load_dataset(args.dataset, args.data_dir)
    fields = parse_fields(args.fields) or ITEM_TEXT_FIELDS
    path = semantic_ids_path(Path(args.runs), ds.name, args.encoder, args.tokenizer, fields, args.rqvae_epochs,
                             not args.no_dead_code_restart)
    side = path.with_suffix(".json")
    if not path.exists() or not side.exists():
        extra = "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k, d in
                        (("data_dir", "data"), ("runs", "runs")) if getattr(args, k) != d)
        extra += f" --rqvae-epochs {args.rqvae_epochs}" if args.rqvae_epochs is not None else ""
        extra += " --no-dead-code-restart" if args.no_dead_code_restart else ""
        raise DataError(f"{path} is missing: make the semantic IDs first with\n  python train.py --stage "
                        f"rqvae --dataset {args.dataset} --encoder {args.encoder} --fields "
                        f"{','.join(fields)} --tokenizer {args.tokenizer}{extra}")
    ids, info = np.load(path), json.loads(side.read_text())
    if ids.ndim != 2 or ids.shape != (ds.n_items, 4) or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{path} holds {ids.dtype} {ids.shape}, expected int64 ({ds.n_items}, 4): delete it "
                        f"and re-run train.py --stage rqvae")
    if info.get("data_fingerprint") != ds.fingerprint:
        print(f"warning: {path} was made from other data than {ds.name} now holds", file=sys.stderr)
    vocab = info.get("vocab_sizes") or [256] * 4
    stats = collision_stats(ids[:, :3], int(vocab[0]))                      # (N, 4) -> (N, 3) prefixes
    emb_path = embedding_path(Path(args.runs), ds.name, args.encoder, fields)    # the tokenizer's input
    geometry = None                                   # only for the very file the IDs were made from
    if emb_path.is_file() and file_sha256(emb_path) == info.get("embedding_sha256"):
        geometry = embedding_stats(np.load(emb_path))
    return {"task": "collisions", "dataset": ds.name, "encoder": str(args.encoder),
            "tokenizer": args.tokenizer, "fields": list(fields), "semantic_ids": str(path), **stats,
            "ids_unique": len(np.unique(ids, axis=0)) == len(ids), "vocab_sizes": vocab,
            "max_dedup_code": int(ids[:, 3].max()), "embeddings": geometry}


def training_counts(ds) -> np.ndarray:
    """Training-interaction count of every item (I,): all interactions except the validation and test
    targets (leave-one-out), or those before the first split time (BLaIR time split)."""
    from data import BLAIR_T1
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
    from tiger import recommend
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
    from pathlib import Path
    from data import DataError, load_dataset
    from tiger import load_checkpoint
    if not args.run:
        raise DataError("--task tiger needs --run RUN_DIR (a folder written by train.py --stage tiger)")
    run = Path(args.run)
    if not (run / "run.json").exists() or not (run / "best.pt").exists():
        raise DataError(f"{run} is not a finished TIGER run (run.json and best.pt expected)")
    if args.beam < 1:
        raise DataError(f"--beam must be >= 1, got {args.beam}")
    info = json.loads((run / "run.json").read_text())
    ds = load_dataset(args.dataset, args.data_dir)
    if ds.fingerprint != info.get("data_fingerprint"):
        print(f"warning: {ds.name} differs from the data {run} was trained on", file=sys.stderr)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, ids = load_checkpoint(run / "best.pt", device=device)
    if ids.n_items != ds.n_items:
        raise DataError(f"{run} has semantic IDs for {ids.n_items} items but {ds.name} has {ds.n_items}")
    test = ds.splits.test
    return {"task": "tiger", "dataset": ds.name, "run": str(run), "beam": args.beam,
            "constrained": not args.no_constrain, "semantic_ids": info.get("semantic_ids"),
            "test": evaluate_tiger(model, ds, test, ids, args.beam, not args.no_constrain),
            "popularity": summarize(popularity_ranks(ds, test), (5, 10), cold=test.cold)}


# ----------------------------------------------------------------------------- the results report
# `python eval.py --report --dataset A [B ...]` reads what train.py wrote under --runs and lays it out
# as the paper's tables. Only files are read (nothing is recomputed); each cell names its run folder.
#   results.json   (train.py --stage unisrec | tiger)          -> Table 2 (UniSRec), Table 3 (TIGER)
#   retrieval-*.json (train.py --stage all)                    -> Table 1 (title -> document retrieval)
#   encoder runs' history.json (train.py --stage encoder with --holdout): Table 1 rows before / after
#   semantic_ids-*.json sidecars (train.py --stage rqvae)      -> the collision table

def _live(paths):
    """Sorted paths, without those inside run folders the pipeline moved aside (`*.replaced-<time>`)."""
    return sorted(p for p in paths if ".replaced-" not in p.parent.name)


def encoder_label(encoder: str) -> str:
    """Row name of an encoder: 'none' -> SASRec-ID, 'minilm' -> off-the-shelf, a folder -> its name."""
    from pathlib import Path
    e = str(encoder)
    if e.lower() == "none":
        return "no text (SASRec-ID)"
    if e.lower() == "minilm":
        return "all-MiniLM-L6-v2"
    return Path(e).name


def _schedule(res: dict) -> str:
    """How long a run trained, for the row label: '' when it ran to early stopping."""
    cap = f"{res['max_minutes']:g}-min cap" if res.get("time_capped") else ""
    if res.get("task") == "tiger":
        stopped = ", early stop" if res.get("stopped_early") else f", {cap}" if cap else ""
        return f"{res.get('steps_run')} steps{stopped}"
    if cap:
        return f"{cap}, {res.get('epochs_run')} epochs"
    if res.get("max_epochs") and not res.get("stopped_early"):
        return f"capped at {res['max_epochs']} epochs"
    return ""


def collect_report(runs, names) -> list[dict]:
    """Every metric found for the datasets `names` (folder names under runs/) as flat records
    {table, dataset, row, run, schedule, metric, value} (the CSV rows)."""
    from pathlib import Path
    recs = []

    def add(table, ds, row, run, schedule, metrics: dict, keys):
        for k in keys:
            if isinstance(metrics.get(k), (int, float)):
                recs.append({"table": table, "dataset": ds, "row": row, "run": str(run),
                             "schedule": schedule, "metric": k, "value": float(metrics[k])})

    for name in names:
        root = Path(runs) / name
        for f in _live(root.glob("*/results.json")):
            try:
                res = json.loads(f.read_text())
            except ValueError:
                continue
            task = res.get("task")
            row = encoder_label(res.get("encoder", "?"))
            if res.get("custom_emb"):                          # --emb FILE: not the encoder's own embeddings
                row += f" ({Path(res['custom_emb']).name})"
            if task == "unisrec":
                if res.get("mode") == "transductive":
                    row += " + item IDs"
                add("unisrec", name, row, f.parent, _schedule(res), res.get("test", {}),
                    ("recall@10", "ndcg@10", "recall@50", "ndcg@50"))
            elif task == "tiger":
                row += f" / {res.get('tokenizer', 'rqvae')}"
                add("tiger", name, row, f.parent, _schedule(res), res.get("test", {}),
                    ("recall@5", "ndcg@5", "recall@10", "ndcg@10"))
                add("tiger", name, "popularity", f.parent, "", res.get("popularity", {}),
                    ("recall@5", "ndcg@5", "recall@10", "ndcg@10"))
        for f in _live(root.glob("*/retrieval-*.json")):
            res = json.loads(f.read_text())
            add("retrieval", name, f"{encoder_label(res.get('encoder', '?'))} (all items, {res.get('max_length')} "
                f"tokens)", f, f"docs: {res.get('doc_fields')}", res, ("recall@10", "ndcg@10"))
        for f in _live(root.glob("*/history.json")):  # EncodeRec runs: held-out retrieval before / after
            try:
                info, hist = json.loads((f.parent / "run.json").read_text()), json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            evals = [h for h in hist if isinstance(h, dict) and "eval" in h] if isinstance(hist, list) else []
            if info.get("stage") != "encoder" or not evals:
                continue
            a = info.get("args", {})
            note = f"held-out {a.get('holdout', 0):.0%} of items, {a.get('max_length')} tokens"
            docs = f"docs: {info.get('doc_fields')}"
            keys = ("recall@10", "ndcg@10")
            if evals[0].get("epoch") == 0:
                add("retrieval", name, f"{encoder_label(a.get('backbone', '?'))} ({note})", f, docs,
                    evals[0]["eval"], keys)
            if evals[-1].get("epoch", 0) > 0:
                add("retrieval", name, f"{f.parent.name} ({note}, epoch {evals[-1]['epoch']})", f, docs,
                    evals[-1]["eval"], keys)
        for f in _live(root.glob("*/semantic_ids-*.json")):
            side = json.loads(f.read_text())
            col = side.get("collisions") or {}
            usage = col.get("usage") or []
            tok, fields = side.get("tokenizer", "?"), "+".join(side.get("fields") or [])
            variant = f.stem[len(f"semantic_ids-{tok}"):-len(fields) - 1].strip("-")  # e.g. "e20", see train.py
            add("collisions", name, f"{encoder_label(side.get('encoder', '?'))} / {tok}", f,
                variant, {**col, **{f"usage_l{i + 1}": u for i, u in enumerate(usage)}},
                ("items", "unique_prefixes", "collision_rate", "largest_group",
                 *(f"usage_l{i + 1}" for i in range(len(usage)))))
    # one run per (table, dataset, row, schedule): the newest file wins (older duplicates dropped)
    newest: dict[tuple, str] = {}
    for r in recs:
        key = (r["table"], r["dataset"], r["row"], r["schedule"])
        t = Path(r["run"]).stat().st_mtime
        if key not in newest or t > Path(newest[key]).stat().st_mtime:
            newest[key] = r["run"]
    return [r for r in recs if newest[(r["table"], r["dataset"], r["row"], r["schedule"])] == r["run"]]


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
    from pathlib import Path
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


def run_report(args) -> str:
    from pathlib import Path

    from data import load_dataset
    names = [load_dataset(d, args.data_dir).name if not (Path(args.runs) / d).is_dir() else d
             for d in args.dataset]
    recs = collect_report(args.runs, names)
    text = report_markdown(recs)
    csv_path = Path(args.csv) if args.csv else Path(args.runs) / f"report-{'+'.join(names)}.csv"
    files = write_report_files(recs, csv_path, csv_path.with_suffix(".png"))
    print(text)
    print(f"wrote {', '.join(files)}", file=sys.stderr)
    return text


def main(argv=None) -> int:
    from data import DataError
    from encoderec import BackboneError, WeightsError
    args = build_parser().parse_args(argv)
    if args.report:
        try:
            run_report(args)
        except (DataError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.task:
        print("error: pass --task TASK or --report", file=sys.stderr)
        return 2
    if len(args.dataset) != 1:
        print("error: --task takes one --dataset (several are for --report)", file=sys.stderr)
        return 2
    args.dataset = args.dataset[0]
    runners = {"retrieval": run_retrieval, "unisrec": run_unisrec, "collisions": run_collisions,
               "tiger": run_tiger}
    if args.task not in runners:
        print(f"error: --task {args.task} ({TASKS[args.task]}) is not implemented yet", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    try:
        print_json(runners[args.task](args))
    except (DataError, BackboneError, WeightsError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
