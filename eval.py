"""Evaluation as EncodeRec (arXiv 2601.10837) reports it; `python eval.py --task ...`.

Leave-one-out, each target ranked against *all* items: Recall@K = share of targets in the top K, NDCG@K =
mean of 1/log2(rank + 2) over them (rank 0 = first; one relevant item: ideal DCG 1). Ties are pessimistic;
history items are not masked (RecBole's convention) unless `mask_history`. Each task prints its metrics as
JSON on the last stdout line; `--task report` lays train.py's finished runs out as the paper's tables.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from data import BACKBONES, BLAIR_T1, DOCUMENT_FIELDS, DataError, file_sha256, load_dataset, parse_fields, \
    read_array, read_json, weights_folder
from encoderec import WeightsError, load_encoder
from rqvae import collision_stats, embedding_stats
from tiger import SemanticIDs, Tiger, TigerConfig, recommend
from trainer import atomic_write, check_device, digest, json_safe, load_checkpoint, load_weights, \
    save_npy
from unisrec import UniSRec, UniSRecConfig, score_fn

KS = (10,)
MISS = np.iinfo(np.int64).max // 2  # rank of a target absent from a top-K list


# ---- ranks
def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor,
                      counts: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all items, ties pessimistic: scores (B, I), targets (B,) -> (B,)
    int64 = #{j != target : score_j >= score_target}. With `counts` (I,), column j stands for counts[j]
    identical entries (one text shared by several items): it weighs counts[j] when ahead; the target's own
    copies never count. A NaN target score is a miss (rank = number of entries); another item's NaN ranks
    ahead."""
    t = scores.gather(1, targets[:, None])  # (B, 1)
    ahead = (scores >= t) | torch.isnan(scores)  # (B, I), includes the target; NaN = ahead
    if counts is None:
        ranks, total = ahead.sum(dim=1) - 1, scores.shape[1]
    else:
        ranks = (ahead * counts).sum(dim=1) - counts[targets]
        total = int(counts.sum())
    return torch.where(torch.isnan(t[:, 0]), total, ranks)


def mask_history(scores: torch.Tensor, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-inf (in place) on each row's history items (B, L; negative = padding) but the target; `scores`."""
    rows = torch.arange(len(history), device=history.device)[:, None].expand_as(history)
    keep = (history >= 0) & (history != targets[:, None])
    scores[rows[keep], history[keep]] = float("-inf")
    return scores


def ranks_from_topk(topk: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> np.ndarray:
    """Ranks from top-K item ids (B, K) of generative models: the target's position, else MISS (a miss
    at every cutoff, also above K)."""
    topk, targets = np.asarray(topk), np.asarray(targets)
    hit = topk == targets[:, None]  # (B, K)
    return np.where(hit.any(1), hit.argmax(1), MISS).astype(np.int64)


def full_ranking_ranks(score_fn: Callable[[np.ndarray], torch.Tensor], n_cases: int,
                       targets: np.ndarray, chunk_size: int = 1024,
                       histories: np.ndarray | None = None, progress: bool = False,
                       counts: np.ndarray | None = None) -> np.ndarray:
    """Ranks of every case by score_fn(indices) -> (len(indices), I), `chunk_size` cases at a time (all 22k x
    12k float32 scores would be 1 GB); `histories` (C, L): masked; `counts`: as in ranks_from_scores."""
    out = np.empty(n_cases, dtype=np.int64)
    for s in tqdm(range(0, n_cases, chunk_size), "ranking", unit="chunk", leave=False, disable=not progress):
        idx = np.arange(s, min(s + chunk_size, n_cases))
        with torch.inference_mode():
            scores = score_fn(idx).float()
            tgt = torch.as_tensor(targets[idx], device=scores.device)
            if histories is not None:
                scores = mask_history(scores, torch.as_tensor(histories[idx], device=scores.device), tgt)
            cnt = None if counts is None else torch.as_tensor(counts, device=scores.device)
            out[idx] = ranks_from_scores(scores, tgt, cnt).cpu().numpy()
    return out


# ---- metrics
def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K and NDCG@K from 0-based ranks (NaN without cases)."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else math.nan
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) \
            if len(ranks) else math.nan
    return out


def summarize(ranks: np.ndarray, ks: Sequence[int] = KS, cold: np.ndarray | None = None) -> dict:
    """Metrics over all cases, and over in-set and cold-start targets (`cold`)."""
    out = {**metrics_from_ranks(ranks, ks), "n": len(ranks)}
    if cold is not None:
        cold = np.asarray(cold, dtype=bool)
        for name, m in (("in_set", ~cold), ("cold_start", cold)):
            out[name] = {**metrics_from_ranks(ranks[m], ks), "n": int(m.sum())}
    return out


# ---- significance (the paper marks p < 0.05)
def per_user(ranks: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Each case's Recall@k (hit) and NDCG@k, the values metrics_from_ranks averages."""
    ranks = np.asarray(ranks)
    hit = ranks < k
    return {f"recall@{k}": hit.astype(float), f"ndcg@{k}": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)}


def paired_test(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> dict:
    """b vs a on the same cases: the mean difference, a two-sided paired t-test and a percentile bootstrap
    95 % interval of the mean difference (cases resampled with replacement)."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n, mean = len(d), float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    t = mean / (sd / math.sqrt(n)) if sd > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    p = 2 * student_t_sf(abs(t), n - 1) if n > 1 else math.nan
    rng, means, step = np.random.default_rng(seed), [np.empty(0)], max(1, 2 ** 22 // max(n, 1))
    for s in range(0, n_boot, step):  # `step` resamples at a time: (step, n) indices, ~32 MB
        means.append(d[rng.integers(0, n, (min(step, n_boot - s), n))].mean(1))
    ci = np.percentile(np.concatenate(means), [2.5, 97.5]).tolist() if n_boot else None
    return {"diff": mean, "t": t, "p": p, "ci95": ci, "n": n}


def welch_test(a, b) -> dict | None:
    """b vs a over independent runs (seeds): the mean difference and Welch's two-sided t-test; None when
    either side has one run or neither varies."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return None
    diff = float(b.mean() - a.mean())
    t, df = diff / math.sqrt(va + vb), (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"diff": diff, "t": t, "p": 2 * student_t_sf(abs(t), df), "df": df}


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (t >= 0): I_x(df/2, 1/2) / 2, x = df/(df + t^2)."""
    return 0.5 * _betainc(df / 2, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a)
                     - math.lgamma(b))
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * (f - 1.0) / a


def print_json(metrics: dict) -> None:
    print(json.dumps(json_safe(metrics), sort_keys=True), flush=True)  # NaN (no case) -> null: valid JSON


# ---- retrieval
def holdout_items(ds, fraction: float, seed: int = 0, doc_fields=None) -> np.ndarray:
    """A sorted seeded share of the items with a title and a document (kept out of fine-tuning)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {fraction}")
    titles, docs = ds.title_texts(), ds.document_texts(doc_fields or DOCUMENT_FIELDS)
    both = np.array([i for i in range(ds.n_items) if titles[i] and docs[i]], dtype=np.int64)
    n = int(round(fraction * len(both)))
    return np.sort(np.random.default_rng(seed).permutation(both)[:n])


def retrieval_eval(encoder, ds, doc_fields=None, query_items=None, ks: Sequence[int] = KS,
                   batch_size: int = 64, progress: bool = True, ranks_to=None) -> dict:
    """Title -> document retrieval against all documents (EncodeRec's alignment check). Items sharing a
    text share the answer: the rank counts the *other* texts scoring >= (each copy once). `query_items`
    restricts the queries (e.g. held-out items), never the corpus; ranks_to: save each query's rank."""
    titles, docs = ds.title_texts(), ds.document_texts(doc_fields or DOCUMENT_FIELDS)
    doc_id: dict[str, int] = {}
    item_doc = {i: doc_id.setdefault(d, len(doc_id)) for i, d in enumerate(docs) if d is not None}
    counts = np.bincount(list(item_doc.values()), minlength=len(doc_id))  # copies of each text
    pool = range(ds.n_items) if query_items is None else query_items
    queries = [int(i) for i in pool if titles[i] is not None and int(i) in item_doc]
    if not queries:
        raise ValueError(f"no (title, document) pairs in {ds.name} for fields {doc_fields}")
    D, Q = (torch.from_numpy(encoder.encode(t, batch_size=batch_size, show_progress=progress))
            for t in (list(doc_id), [titles[i] for i in queries]))
    targets = np.array([item_doc[i] for i in queries])
    ranks = full_ranking_ranks(lambda idx: Q[idx] @ D.T, len(queries), targets, counts=counts)  # (Q,)
    if ranks_to:
        save_npy(ranks_to, ranks)
    return {**metrics_from_ranks(ranks, ks), "n_queries": len(queries),
            "n_documents": int(counts.sum()), "n_distinct_documents": len(doc_id)}


# ---- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = one_line_errors(argparse.ArgumentParser(
        description="Evaluate; the last stdout line is the metrics as JSON.", allow_abbrev=False))
    ap.add_argument("--task", choices=list(TASKS), help="; ".join(f"{k}: {v}" for k, (_, v) in TASKS.items()))
    ap.add_argument("--report", action="store_true", help="= --task report")
    ap.add_argument("--dataset", required=True, nargs="+", help="a name or a folder (report: several)")
    ap.add_argument("--data-dir", default="data", help="data and cache folder")
    ap.add_argument("--runs", default="runs", help="the run folders of train.py")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0, help="also selects the --holdout items")
    r = ap.add_argument_group("retrieval (--encoder also: collisions)")
    r.add_argument("--encoder", default="minilm", help="minilm | mpnet | a fine-tuned run | a model folder")
    r.add_argument("--doc-fields", help="the document's fields (default: EncodeRec's)")
    r.add_argument("--holdout", type=float, default=0.0, help="query only this seeded share of items")
    r.add_argument("--max-length", type=int, help="token limit (default: the model's)")
    r.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch")
    u = ap.add_argument_group("unisrec / tiger / collisions")
    u.add_argument("--run", help="a run folder (default: the newest finished one)")
    u.add_argument("--mask-history", action="store_true", help="unisrec: mask history items")
    u.add_argument("--ranks", help="save each test case's (retrieval: query's) rank to this .npy")
    u.add_argument("--beam", type=int, default=10, help="tiger: beam width = returned IDs")
    u.add_argument("--no-constrain", action="store_true", help="tiger: free decoding (invalid IDs counted)")
    u.add_argument("--tokenizer", choices=["rqvae", "rkmeans"], default="rqvae", help="collisions: which IDs")
    p = ap.add_argument_group("report")
    p.add_argument("--csv", help="CSV path (default runs/report-<datasets>.csv)")
    return ap


def check_flags(ap, args, scope: str, allowed, positive=(), non_negative=(), fractions=(),
                upper=None) -> None:
    """Before anything runs: every numeric flag in its range (`upper`: name -> largest sensible value), and
    no flag given that `scope` ignores."""
    flag = "--{}".format
    if extra := [k for k, v in vars(args).items() if v != ap.get_default(k) and k not in allowed]:
        raise DataError(f"{flag(extra[0]).replace('_', '-')} does not apply to {scope}; drop it")
    for names, ok, want in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (fractions, lambda v: 0 <= v < 1, "in [0, 1)")):
        for k in names:
            if (v := getattr(args, k)) is not None and not (ok(v) and math.isfinite(v)):
                raise DataError(f"{flag(k).replace('_', '-')} must be {want}, got {v}")
    for k, high in (upper or {}).items():
        if (v := getattr(args, k)) is not None and v > high:
            raise DataError(f"{flag(k).replace('_', '-')} must be <= {high}, got {v}")


def one_line_errors(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse's own errors as the project's: one line, exit 2."""
    def error(message):
        print(f"error: {message} (--help lists the options)", file=sys.stderr)
        sys.exit(2)
    ap.error = error
    return ap


def sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler's kill) ends like Ctrl-C: one line


SEED_MAX = 2 ** 32 - 1  # numpy's and torch's seeds both take it


EVAL_FLAGS = {"common": {"task", "report", "dataset", "data_dir", "runs", "device", "seed"},
              "retrieval": {"encoder", "doc_fields", "holdout", "max_length", "batch_size", "ranks"},
              "unisrec": {"run", "mask_history", "ranks"}, "tiger": {"run", "beam", "no_constrain", "ranks"},
              "vqrec": {"run", "mask_history", "ranks"},
              "collisions": {"run", "encoder", "tokenizer"}, "report": {"csv"}}


def encoder_label(encoder: str) -> str:
    """The name of an embedding source in run folders: minilm, a folder's name, emb-<stem> of an .npy."""
    p = Path(encoder)
    if not p.exists():
        return str(encoder).lower()
    return f"emb-{p.stem}" if p.suffix == ".npy" else p.resolve().name


def find_run(args, task: str) -> Path:
    """--run, or the newest finished run of `task` for --dataset."""
    if args.run:
        run = Path(args.run)
        if not (run / "results.json").is_file():
            raise DataError(f"{run} is not a finished run of train.py (no results.json)")
        res = run_results(run)
        if res.get("task") != {"collisions": "rqvae", "vqrec": "unisrec"}.get(task, task) or \
                task == "vqrec" and res.get("mode") != "vqrec":
            raise DataError(f"{run} is not a {task} run")
        return run
    name = Path(args.dataset).name.lower()
    roots = [p for p in Path(args.runs).glob("*") if p.name.lower() == name]
    prefix, stage = {"collisions": ("ids", "rqvae"), "vqrec": ("unisrec-vqrec", "unisrec --mode vqrec")}.get(
        task, (task, task))  # run folder, train.py stage
    if task == "collisions":  # the IDs of --tokenizer on --encoder
        prefix += f"-{args.tokenizer}-{encoder_label(args.encoder)}"
    runs = [p.parent for r in roots for p in r.glob(f"{prefix}-*/results.json")
            if task != "unisrec" or not p.parent.name.startswith("unisrec-vqrec-")]  # --task vqrec
    if not runs:
        which = f" --encoder {args.encoder} --tokenizer {args.tokenizer}" if task == "collisions" else ""
        raise DataError(f"no finished {task} run for {args.dataset} under {args.runs}/: train one with "
                        f"`python train.py --stage {stage} --dataset {args.dataset}{which}`")
    run = max(runs, key=lambda p: (p / "results.json").stat().st_mtime)
    print(f"evaluating {run} (the newest of {len(runs)}; --run picks another)", file=sys.stderr)
    return run


def run_results(run: Path) -> dict:
    """A run folder's results.json (an object), read strictly."""
    res = read_json(Path(run) / "results.json", f"delete {run} and run its train.py command again")
    if not isinstance(res, dict):
        raise DataError(f"{run}/results.json holds {type(res).__name__}, not a JSON object")
    return res


def _load(args, task: str, build):
    """(run, dataset, model, meta): build(meta, run) loaded with find_run's best.pt, on the data it was
    trained on (else a DataError naming both)."""
    run = find_run(args, task)
    ds = load_dataset(args.dataset, args.data_dir)
    ck = load_checkpoint(run / "best.pt")
    meta = ck.get("meta", {})
    theirs = (meta.get("dataset"), meta.get("data_fingerprint"), meta.get("n_items", ds.n_items))
    if theirs[1:] != (ds.fingerprint, ds.n_items):
        raise DataError(f"{run / 'best.pt'} was trained on {theirs[0]} (fingerprint {theirs[1]}, {theirs[2]} "
                        f"items), not on {args.dataset} (fingerprint {ds.fingerprint}, {ds.n_items} items); "
                        "pass its data")
    key = read_json(run / "run.json", f"delete {run} and train again").get("key")
    if meta.get("run_key", digest(key)) != digest(key):
        raise DataError(f"{run / 'best.pt'} belongs to another run folder than {run} (its inputs differ); "
                        "evaluate the folder that made it")
    try:
        model = build(meta, run)
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise DataError(f"{run / 'best.pt'}: its model config is unusable ({type(e).__name__}: {e}); delete "
                        f"{run} and train again") from None
    load_weights(model, ck, run / "best.pt")
    return run, ds, model.to(args.device).eval(), meta


def read_semantic_ids(path: Path, n_items: int) -> tuple[np.ndarray, list[int]]:
    """An ids-* run's semantic_ids.npy (N, 4) int64 and vocab sizes (its results.json), checked."""
    fix = f"delete {path.parent} and run train.py --stage rqvae again"
    vocab = run_results(path.parent).get("vocab_sizes")
    ids = read_array(path, "semantic IDs", "i", rows=n_items, cols=4, fix=fix)
    if not (isinstance(vocab, list) and len(vocab) == 4 and all(type(v) is int and v > 0 for v in vocab)):
        raise DataError(f"{path.parent}/results.json: vocab_sizes {vocab!r} is not 4 positive integers; "
                        f"{fix}")
    if (ids < 0).any() or (ids >= np.array(vocab)).any():
        raise DataError(f"{path}: codes outside 0..vocab_sizes {vocab}; {fix}")
    if len(np.unique(ids, axis=0)) != len(ids):
        raise DataError(f"{path}: two items share a semantic ID (the 4th code must tell them apart); {fix}")
    return ids.astype(np.int64), vocab


def l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def read_run_embeddings(run: Path, path, n_items: int, what: str = "embeddings") -> np.ndarray:
    """The item embeddings (or VQ-Rec codes) a run was trained on: at their recorded path and with its
    content hash."""
    key = read_json(run / "run.json", f"delete {run} and train again").get("key", {})
    path = Path(path)
    if not path.is_file() or file_sha256(path) != key.get(what):
        raise DataError(f"{run} was trained on the {what} {path}, which are "
                        f"{'changed' if path.is_file() else 'gone'}; put them back or train the run again")
    return read_array(path, f"item {what}", "i" if what == "codes" else "f", rows=n_items)


def run_retrieval(args) -> dict:
    if (Path(args.encoder) / "run.json").is_file() and not (Path(args.encoder) / "results.json").is_file():
        raise DataError(f"{args.encoder} is an unfinished run: finish it (its command with --resume)")
    ds = load_dataset(args.dataset, args.data_dir)
    fields = parse_fields(args.doc_fields, DOCUMENT_FIELDS)
    enc = load_encoder(weights_folder(args.encoder), device=args.device, max_length=args.max_length)
    queries = holdout_items(ds, args.holdout, args.seed, fields) if args.holdout > 0 else None
    out = retrieval_eval(enc, ds, doc_fields=fields, query_items=queries, batch_size=args.batch_size,
                         ranks_to=args.ranks)
    return {"task": "retrieval", "dataset": ds.name, "encoder": str(args.encoder), "doc_fields": list(fields),
            "holdout": args.holdout, "max_length": enc.max_length, **out}


def evaluate_unisrec(model, ds, cases, max_len: int, mask_history: bool = False, ks=(10, 50),
                     ranks_to=None) -> dict:
    """summarize() of UniSRec's full ranking; ranks_to: save each case's rank (.npy, (C,))."""
    hist, _ = ds.histories(cases, max_len)  # (C, L), -1 = padding
    masked = ds.histories(cases, int(ds.seq_lengths.max()))[0] if mask_history else None
    ranks = full_ranking_ranks(score_fn(model, hist), len(cases), cases.target, histories=masked)
    if ranks_to:
        save_npy(ranks_to, ranks)
    return summarize(ranks, ks, cold=cases.cold)


def run_unisrec(args) -> dict:
    def build(meta, run):
        cfg = UniSRecConfig(**meta["model_config"])
        if cfg.mode == "vqrec":
            codes = read_run_embeddings(run, meta["codes_path"], meta.get("n_items"), "codes")
            return UniSRec(cfg, codes=codes)
        emb = read_run_embeddings(run, meta["item_emb_path"], meta.get("n_items")) if cfg.mode != "id" \
            else None
        return UniSRec(cfg, l2_rows(emb) if emb is not None and meta.get("normalize_input") else emb)
    run, ds, model, _ = _load(args, args.task, build)
    return {"task": "unisrec", "dataset": ds.name, "run": str(run), "mask_history": args.mask_history,
            **{s: evaluate_unisrec(model, ds, getattr(ds.splits, s), model.cfg.max_seq_len, args.mask_history,
                                   ranks_to=args.ranks if s == "test" else None) for s in ("valid", "test")}}


def run_collisions(args) -> dict:
    """Collision audit of an ids-* run (+ its embeddings' geometry if unchanged)."""
    run = find_run(args, "collisions")
    ds = load_dataset(args.dataset, args.data_dir)
    ids, vocab = read_semantic_ids(run / "semantic_ids.npy", ds.n_items)  # (N, 4)
    info, run_json = run_results(run), read_json(run / "run.json", f"delete {run} and train again")
    if info.get("dataset") != ds.name:
        raise DataError(f"{run} holds the semantic IDs of {info.get('dataset')}, not of {ds.name}")
    emb = Path(str(info.get("embeddings")))
    same = emb.is_file() and file_sha256(emb) == run_json.get("key", {}).get("embeddings")
    return {"task": "collisions", "dataset": ds.name, "encoder": info.get("encoder"),
            "tokenizer": info.get("tokenizer"), "semantic_ids": str(run / "semantic_ids.npy"),
            **collision_stats(ids[:, :3], vocab[0]), "ids_unique": True, "vocab_sizes": vocab,
            "max_dedup_code": int(ids[:, 3].max()),
            "embeddings": embedding_stats(l2_rows(read_array(emb, "item embeddings"))) if same else None}


def training_interactions(ds) -> np.ndarray:
    """(N,) bool over ds.seq_items: the interactions training may see (no valid or test target)."""
    train = np.ones(ds.n_interactions, dtype=bool)
    for cases in (ds.splits.valid, ds.splits.test):
        train[ds.seq_offsets[cases.user] + cases.pos] = False
    if ds.protocol == "time":
        train &= ds.seq_times < BLAIR_T1
    return train


def training_counts(ds) -> np.ndarray:
    """Training interactions per item (I,)."""
    return np.bincount(ds.seq_items[training_interactions(ds)], minlength=ds.n_items)


def popularity_ranks(ds, cases, chunk_size: int = 1024) -> np.ndarray:
    """Ranks with items scored by training count (popularity)."""
    counts = torch.as_tensor(training_counts(ds), dtype=torch.float32)  # (I,)
    return full_ranking_ranks(lambda idx: counts.expand(len(idx), -1), len(cases), cases.target,
                              chunk_size=chunk_size)


# ---- EASE (Steck, WWW 2019): the linear item-item anchor
EASE_LAMBDAS = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)  # the L2 weights tried on validation


def ease_weights(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """EASE's item-item weights B (I, I), the minimiser of ||X - XB||^2 + lam ||B||^2 with diag(B) = 0:
    B = I - P diag(1 / diag(P)), P = (X^T X + lam I)^-1; gram = X^T X of the 0/1 user-item matrix X.
    float32: lam >= 1 keeps the system well conditioned."""
    g = gram.float().clone()
    g.diagonal().add_(lam)
    p = torch.linalg.inv(g)
    b = p / -p.diagonal()  # (I, I): B_ij = -P_ij / P_jj
    b.fill_diagonal_(0.0)
    return b


def ease_run(ds, lambdas=EASE_LAMBDAS, ranks_to=None, device="cpu") -> dict:
    """EASE on the training interactions; lam = the best valid NDCG@10 of `lambdas`; scores = a case's
    history (0/1) times B."""
    need, have = 4 * ds.n_items ** 2 * 4, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise DataError(f"{ds.name}: EASE's dense inverse of {ds.n_items} items needs ~{need / 2**30:.0f} "
                        f"GiB of this machine's {have / 2**30:.0f}")
    train = training_interactions(ds)
    user, item = np.repeat(np.arange(ds.n_users), ds.seq_lengths)[train], ds.seq_items[train]
    gram = torch.zeros(ds.n_items, ds.n_items, device=device)  # (I, I) = X^T X, summed 4,096 users at a time
    for s in range(0, ds.n_users, 4096):
        x = torch.zeros(min(4096, ds.n_users - s), ds.n_items, device=device)
        sel = (user >= s) & (user < s + 4096)
        x[user[sel] - s, item[sel]] = 1.0  # a repeated item counts once
        gram += x.T @ x
    longest = int(ds.seq_lengths.max())

    def ranks(b, cases, to=None):
        def score(idx):
            hist, _ = ds.histories(cases.subset(idx), longest, pad=ds.n_items)  # (B, L)
            multi_hot = torch.zeros(len(idx), ds.n_items + 1, device=device).scatter_(
                1, torch.as_tensor(hist, device=device), 1.0)
            return multi_hot[:, :-1] @ b  # (B, I)
        r = full_ranking_ranks(score, len(cases), cases.target)
        if to is not None:
            save_npy(to, r)
        return r
    valid = {}
    for lam in tqdm(lambdas, "EASE", unit="lambda"):
        valid[lam] = metrics_from_ranks(ranks(ease_weights(gram, lam), ds.splits.valid), (10,))
    best = max(lambdas, key=lambda lam: valid[lam]["ndcg@10"])
    test = ds.splits.test
    return {"lambda": best, "valid": {f"{lam:g}": v for lam, v in valid.items()},
            "test": summarize(ranks(ease_weights(gram, best), test, ranks_to), (5, 10, 50), cold=test.cold)}


def evaluate_tiger(model, ds, cases, ids, beam: int = 10, constrain: bool = True,
                   ks=(5, 10), progress: bool = True, batch_size: int = 256, ranks_to=None) -> dict:
    """summarize() of TIGER's top-`beam` items; unconstrained: + the invalid share; ranks_to: as in
    evaluate_unisrec (MISS beyond the beam)."""
    hist, _ = ds.histories(cases, model.cfg.max_items)  # (C, L), -1 = padding
    items, _ = recommend(model, hist, ids, beam=beam, constrain=constrain, batch_size=batch_size,
                         progress=progress)  # (C, beam), -1 = invalid
    ranks = ranks_from_topk(items, cases.target)
    if ranks_to:
        save_npy(ranks_to, ranks)
    out = summarize(ranks, ks, cold=cases.cold)
    if not constrain:
        out["invalid_share"] = float((items < 0).mean()) if items.size else math.nan
    return out


def run_tiger(args) -> dict:
    run, ds, model, meta = _load(args, "tiger", lambda meta, run: Tiger(TigerConfig(**meta["model_config"])))
    try:
        ids = SemanticIDs(meta["semantic_ids"].numpy(), model.cfg.vocab_sizes, args.device)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise DataError(f"{run / 'best.pt'}: meta.semantic_ids is unusable ({type(e).__name__}: {e}); delete "
                        f"{run} and train again") from None
    if args.beam > max(ds.n_items, 10):
        raise DataError(f"--beam {args.beam} is more than the {ds.n_items} items")
    test = ds.splits.test
    return {"task": "tiger", "dataset": ds.name, "run": str(run), "beam": args.beam,
            "constrained": not args.no_constrain, "semantic_ids": meta.get("semantic_ids_path"),
            "test": evaluate_tiger(model, ds, test, ids, args.beam, not args.no_constrain,
                                   ranks_to=args.ranks),
            "popularity": summarize(popularity_ranks(ds, test), (5, 10), cold=test.cold)}


# ---- the results report
R5, R10, R50 = ((f"recall@{k}", f"ndcg@{k}") for k in (5, 10, 50))
TABLES = {  # table -> (title, metrics shown per dataset)
    "retrieval": ("Table 1 shape: title -> document retrieval (full ranking over all documents)", R10),
    "unisrec": ("Table 2 shape: UniSRec (and VQ-Rec) on frozen item embeddings, test set, full ranking", R10),
    "tiger": ("Table 3 shape: TIGER on semantic IDs, test set, constrained beam 10", R10),
    "collisions": ("Semantic-ID collisions (3-code prefixes; product codes: whole codes)",
                   ("collision_rate", "largest_group", "usage_l1", "usage_l2", "usage_l3")),
    "cold": ("Test targets seen in training (in-set) and never seen (cold-start): Recall@10",
             ("in_set_recall@10", "cold_start_recall@10", "cold_start_n")),
}


LOWER = ("collision_rate",)  # metrics where less is better


def _label(enc: str) -> str:
    names = {"none": "no text (SASRec-ID)", **BACKBONES}
    return names.get(enc.lower(), Path(enc).name)


def _source(enc: str) -> tuple[str, str | None, dict | None]:
    """(row label, the label of the backbone it was tuned from, the tuning recipe) of an embedding source.
    A fine-tuned encoder is an encoder run folder (any --out): its rows read 'EncodeRec (<backbone>)',
    whatever its seed, and are tested against the backbone's rows."""
    path, name = Path(enc), Path(enc).name
    try:
        res, key = run_results(path), read_json(path / "run.json")["key"]
        if res.get("task") != "encoder":
            return _label(enc), None, None
        backbone = str(res["backbone"])
        recipe = {k: v for k, v in key.items() if k not in ("seed", "weights")}
    except (DataError, OSError, KeyError, TypeError, AttributeError):  # moved away: its name tells
        if not (name.startswith("encoder-") and name.count("-") >= 2):
            return _label(enc), None, None
        backbone, recipe = name[len("encoder-"):].rsplit("-", 1)[0], None
    base = _label(encoder_label(backbone))
    return f"EncodeRec ({base})", base, recipe


def _records(run: Path, res: dict, source: tuple) -> list[tuple]:
    """(table, row, the row it is tested against, metrics, CSV keys) of a run's results.json; `source`:
    _source of its encoder."""
    task, (row, base, _) = res.get("task"), source
    if task == "unisrec":
        ids = (" + item IDs" if res.get("mode") == "transductive" else "") + \
            (" (L2-normalised input)" if res.get("normalize") else "")
        model = {"vqrec": "VQ-Rec", "id": "SASRec"}.get(res.get("mode"), "UniSRec")
        pre = "VQ-Rec on " if model == "VQ-Rec" else ""
        return [("unisrec", pre + row + ids, base and pre + base + ids, res["test"], R10 + R50),
                *_cold(res["test"], f"{model}: {row}{ids}", base and f"{model}: {base}{ids}")]
    if task == "tiger":
        tok = res.get("tokenizer")
        return [("tiger", f"{row} / {tok}", base and f"{base} / {tok}", res["test"], R5 + R10),
                ("tiger", "popularity", None, res["popularity"], R5 + R10),
                *_cold(res["test"], f"TIGER: {row} / {tok}", base and f"TIGER: {base} / {tok}")]
    if task == "ease":  # the anchor of every recommender table, on the same test cases
        return [("unisrec", "EASE", None, res["test"], R10 + R50),
                ("tiger", "EASE", None, res["test"], R5 + R10), *_cold(res["test"], "EASE", None)]
    if task == "retrieval":
        return [("retrieval", f"{row} (all items, {res.get('max_length')} tokens)", None, res, R10)]
    if task in ("rqvae", "codes"):  # product codes: the whole code
        col = res["collisions"]
        usage = {f"usage_l{i + 1}": u for i, u in enumerate(col.get("usage", [])[:3])}
        tok = res["tokenizer"] + (", unscaled" if res.get("standardize") is False else "") + \
            (", no dead-code restart" if res.get("dead_code_restart") is False else "")
        return [("collisions", f"{row} / {tok}", base and f"{base} / {tok}", {**col, **usage},
                 ("items", "unique_prefixes", "collision_rate", "largest_group", *usage))]
    history = read_json(run / "history.json", f"delete {run}") if task == "encoder" else []
    evals = [h for h in history if h.get("valid")]
    label = f"{run.name.rsplit('-', 1)[0]} (held-out items, epoch {evals[-1]['epoch']:g})" if evals else ""
    return [("retrieval", label, None, evals[-1]["valid"], R10)] if evals else []


def _cold(test: dict, row: str, base: str | None) -> list[tuple]:
    """The cold-start table's record of split test metrics."""
    if "cold_start" not in test:
        return []
    m = {"in_set_recall@10": test["in_set"]["recall@10"],
         "cold_start_recall@10": test["cold_start"]["recall@10"], "cold_start_n": test["cold_start"]["n"]}
    return [("cold", row, base, m, tuple(m))]


def _setting(run: Path, res: dict) -> tuple[str, str]:
    """(schedule, tag) of a run from its run.json key: the caps it trained under, and a digest of every
    input but the seed and the embeddings / IDs / weights (so that the seeds of one setting group, and a
    tuned encoder's row pairs with its backbone's)."""
    try:
        key = dict(read_json(run / "run.json")["key"])
    except (DataError, OSError, KeyError, TypeError):
        return "", "?"
    loop = {k: v for k, v in (key.pop("loop", None) or {}).items() if k != "seed"}
    sched = (f"capped at {loop['max_epochs']} epochs" if loop.get("max_epochs") else "") if \
        res.get("task") == "unisrec" else f"{loop['max_steps']} steps max" if loop.get("max_steps") else ""
    rest = {k: v for k, v in key.items()
            if k not in ("seed", "embeddings", "semantic_ids", "codes", "weights", "data")}
    return sched, digest({**rest, "loop": loop})


def collect_report(runs, names) -> list[dict]:
    """CSV records {table, dataset, row, schedule, metric, value, std, n, p, diff, run} of the datasets
    `names` (folders under runs/). Runs of one setting that differ by seed are averaged (mean, std, n; the
    newest run per seed). p, diff: paired t-test over test cases against the `base` row of the same
    setting (per-case metric averaged over its seeds), where both saved test_ranks.npy."""
    groups: dict[tuple, dict] = {}  # (table, dataset, row, schedule, tag, recipe) -> {seed: (mtime, run,
    #                                                                                   metrics, keys)}
    bases: dict[tuple, tuple] = {}  # group -> its base group
    for name in names:
        for f in sorted((Path(runs) / name).glob("*/results.json")):
            try:
                res = run_results(f.parent)
                source = _source(str(res.get("encoder", "?")))  # reads the encoder run's files once
                records, (sched, tag) = _records(f.parent, res, source), _setting(f.parent, res)
            except (DataError, OSError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                print(f"warning: report skips {f.parent}: unreadable results ({type(e).__name__}: {e})",
                      file=sys.stderr)
                continue
            if res.get("steps") == 0:
                print(f"warning: report skips {f.parent}: it trained 0 steps", file=sys.stderr)
                continue
            recipe = source[2]
            for table, row, base, metrics, keys in records:
                if not any(_number(metrics.get(m)) for m in keys):
                    print(f"warning: report skips {f.parent} ({row}): no {table} metrics (no evaluation "
                          "cases?)", file=sys.stderr)
                    continue
                pop = row == "popularity"  # the same for every seed and setting
                g = (table, name, row, "" if pop else sched, "" if pop else tag,
                     digest(recipe) if recipe and not pop else "")
                seeds, t = groups.setdefault(g, {}), f.stat().st_mtime
                if res.get("seed") not in seeds or t > seeds[res.get("seed")][0]:
                    seeds[res.get("seed")] = (t, f.parent, metrics, keys)
                if base:
                    bases[g] = (table, name, base, g[3], g[4], "")
    for name in names:  # the tables compare runs on one catalog: say when a folder mixes data versions
        data = {_data_fingerprint(v[1]) for k, g in groups.items() if k[1] == name for v in g.values()}
        data -= {None}
        if len(data) > 1:
            print(f"warning: the {name} tables mix runs on {len(data)} versions of its data (fingerprints "
                  f"{', '.join(sorted(data))}): retrain the older runs or move them away", file=sys.stderr)
    labels = {}  # a row label shared by several settings gets the setting's tag
    for g in groups:
        labels.setdefault(g[:4], set()).add(g[4:])
    out = []
    for g, seeds in groups.items():
        runs_, keys = [v[1] for v in seeds.values()], next(iter(seeds.values()))[3]
        other = groups.get(bases.get(g))
        row = g[2] + (f" [{g[4][:6]}{'/' + g[5][:6] if g[5] else ''}]" if len(labels[g[:4]]) > 1 else "")
        for m in keys:
            vals = [v[2][m] for v in seeds.values() if _number(v[2].get(m))]
            if not vals:
                continue
            test = (_significance(runs_, [v[1] for v in other.values()], m) if m in R10 else welch_test(
                [v[2][m] for v in other.values() if _number(v[2].get(m))], vals) if m in LOWER else None) \
                if other else None
            out.append({"table": g[0], "dataset": g[1], "row": row, "schedule": g[3], "metric": m,
                        "value": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1
                        else 0.0, "n": len(vals), "p": test and test["p"], "diff": test and test["diff"],
                        "run": "; ".join(map(str, runs_))})
    return out


def _significance(runs_: list[Path], base_runs: list[Path], metric: str) -> dict | None:
    """paired_test of runs_ vs base_runs on each case's `metric` (mean over seeds), if both have ranks."""
    def per_case(rs):
        try:
            ranks = [np.load(r / "test_ranks.npy", allow_pickle=False) for r in rs]
        except (OSError, ValueError):
            return None
        if len({x.shape for x in ranks}) != 1:
            return None
        return np.mean([per_user(x)[metric] for x in ranks], axis=0)
    a, b = per_case(base_runs), per_case(runs_)
    return None if a is None or b is None or a.shape != b.shape else paired_test(a, b, n_boot=0)


def _data_fingerprint(run: Path) -> str | None:
    try:
        return read_json(run / "run.json")["key"].get("data")
    except (DataError, OSError, KeyError, TypeError, AttributeError):
        return None


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)  # not True, not NaN, not a string


def report_markdown(recs: list[dict]) -> str:
    """A markdown table per TABLES entry, baselines first."""
    def order(row_sched):
        return next((i for i, p in enumerate(("popularity", "EASE", "no text", "all-MiniLM"))
                     if row_sched[0].startswith(p)), 3), *row_sched
    out = []
    for table, (title, metrics) in TABLES.items():
        rs = [r for r in recs if r["table"] == table]
        if not rs:
            continue
        datasets = list(dict.fromkeys(r["dataset"] for r in rs))
        cell = {(r["dataset"], r["row"], r["schedule"], r["metric"]): r for r in rs}
        head = ["encoder"] + [f"{d} {m}" for d in datasets for m in metrics]
        out += [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row, sched in sorted(dict.fromkeys((r["row"], r["schedule"]) for r in rs), key=order):
            vals = [_cell(cell.get((d, row, sched, m)), m) for d in datasets for m in metrics]
            label = f"{row} ({sched})" if sched and table != "retrieval" else row
            out.append("| " + " | ".join([label, *vals]) + " |")
        srcs = sorted({(r["dataset"], r["row"], r["schedule"], r["run"]) for r in rs})
        if any(r["n"] > 1 or r["p"] is not None for r in rs):
            out += ["", "Mean ± std over seeds (n); * p < 0.05 and better than the off-the-shelf encoder's "
                        "row (paired t-test over test users; collisions: Welch's over seeds; README)."]
        out += ["", "Sources: " + "; ".join(f"{d} / {row}{f' ({s})' if s else ''}: `{run}`"
                                            for d, row, s, run in srcs), ""]
    return "\n".join(out) or "(no results found)"


def _cell(r: dict | None, metric: str) -> str:
    if r is None:
        return "–"
    text = f"{r['value']:.0f}" if metric in ("largest_group", "cold_start_n") else f"{r['value']:.4f}"
    text += f" ± {r['std']:.4f} ({r['n']})" if r["n"] > 1 else ""
    better = r["p"] is not None and r["p"] < 0.05 and (r["diff"] < 0 if metric in LOWER else r["diff"] > 0)
    return text + (f"{'*' if better else ''} (p {r['p']:.2g})" if r["p"] is not None else "")


CSV_HEADER = "table,dataset,row,schedule,metric,value,std,n,p,diff,run"


def run_report(args) -> dict:
    have = {p.name.lower(): p.name for p in Path(args.runs).glob("*") if p.is_dir()}
    names = [Path(d).name.lower() for d in args.dataset]
    if missing := [d for d, n in zip(args.dataset, names) if n not in have]:
        raise DataError(f"no run folders for {', '.join(missing)} under {args.runs}/ (it holds: "
                        f"{', '.join(sorted(have.values())) or 'nothing'})")
    names = [have[n] for n in names]
    recs = collect_report(args.runs, names)
    path = Path(args.csv) if args.csv else Path(args.runs) / f"report-{'+'.join(names)}.csv"
    if path.suffix != ".csv" or path.exists() and (not path.is_file() or not path.read_bytes().startswith(
            b"table,dataset,row,")):  # this version's or an older report
        raise DataError(f"{path}: not a .csv, or a file other than a report: choose another --csv")
    print(report_markdown(recs))
    def write(tmp):  # long format: a row per (table, dataset, row, schedule, metric)
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_HEADER.split(","))
            w.writeheader()
            w.writerows(recs)
    atomic_write(path, write)
    return {"task": "report", "datasets": names, "cells": len(recs), "csv": str(path)}


TASKS = {  # --task -> (runner, help)
    "retrieval": (run_retrieval, "title -> document retrieval of --encoder"),
    "unisrec": (run_unisrec, "valid / test metrics of a UniSRec or SASRec-ID run"),
    "vqrec": (run_unisrec, "valid / test metrics of a VQ-Rec run (unisrec --mode vqrec)"),
    "tiger": (run_tiger, "test metrics of a TIGER run beside popularity"),
    "collisions": (run_collisions, "collision audit of an ids-* run's semantic IDs"),
    "report": (run_report, "the paper's tables from the finished runs of each --dataset"),
}


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    task = "report" if args.report else args.task
    sigterm = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        if task is None:
            raise DataError("pass --task TASK (or --report)")
        check_flags(ap, args, f"--task {task}", EVAL_FLAGS["common"] | EVAL_FLAGS[task],
                    positive=("max_length", "batch_size", "beam"), non_negative=("seed",),
                    fractions=("holdout",), upper={"seed": SEED_MAX})
        if task != "report":
            if len(args.dataset) != 1:
                raise DataError("--task takes one --dataset (several are for the report)")
            args.dataset = args.dataset[0]
        torch.manual_seed(args.seed)
        args.device = check_device(args.device)
        print_json(TASKS[task][0](args))
    except (DataError, WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a last resort, as in train.py
        if os.environ.get("ENCODEREC_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {str(e)[:300]} (a file edited by hand, or a bug: rerun "
              "with ENCODEREC_DEBUG=1 and report the traceback)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
