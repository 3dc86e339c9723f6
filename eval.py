"""Evaluation as EncodeRec (arXiv 2601.10837) reports it; `python eval.py --task ...`.

Leave-one-out, each target ranked against *all* items: Recall@K = share of targets in the top K, NDCG@K =
mean of 1/log2(rank + 2) over them (rank 0 = first; one relevant item: ideal DCG 1). Ties are pessimistic;
history items are not masked (RecBole's convention). Each task prints its metrics as JSON on the last
stdout line; scripts/report.py lays train.py's finished runs out as the paper's tables.

The CLI section also serves train.py and the tools in scripts/: argparse types (`bounded`), argument groups
per stage or task (`group`, `check_flags`), and one-line errors with their exit codes (`cli_error`).
"""
from __future__ import annotations

import argparse
import errno
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

from data import BLAIR_T1, DOCUMENT_FIELDS, DataError, file_sha256, find_lcrec, load_dataset, parse_fields, \
    read_array, read_json, record, verify, weights_folder
from encoderec import WeightsError, load_encoder
from tiger import SemanticIDs, Tiger, TigerConfig, recommend
from trainer import check_device, digest, json_safe, load_checkpoint, load_weights, save_npy
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


def ranks_from_topk(topk: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> np.ndarray:
    """Ranks from top-K item ids (B, K) of generative models: the target's position, else MISS (a miss
    at every cutoff, also above K)."""
    topk, targets = np.asarray(topk), np.asarray(targets)
    hit = topk == targets[:, None]  # (B, K)
    return np.where(hit.any(1), hit.argmax(1), MISS).astype(np.int64)


def full_ranking_ranks(score_fn: Callable[[np.ndarray], torch.Tensor], n_cases: int,
                       targets: np.ndarray, chunk_size: int = 1024, progress: bool = False,
                       counts: np.ndarray | None = None) -> np.ndarray:
    """Ranks of every case by score_fn(indices) -> (len(indices), I), `chunk_size` cases at a time (all 22k x
    12k float32 scores would be 1 GB); `counts`: as in ranks_from_scores."""
    out = np.empty(n_cases, dtype=np.int64)
    for s in tqdm(range(0, n_cases, chunk_size), "ranking", unit="chunk", leave=False, disable=not progress):
        idx = np.arange(s, min(s + chunk_size, n_cases))
        with torch.inference_mode():
            scores = score_fn(idx).float()
            tgt = torch.as_tensor(targets[idx], device=scores.device)
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


def print_json(metrics: dict) -> None:
    try:
        print(json.dumps(json_safe(metrics), sort_keys=True), flush=True)  # NaN (no case) -> null: valid JSON
    except OSError as e:  # a closed pipe or a full disk: name stdout, and let Python's exit flush nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise type(e)(e.errno, e.strerror, "stdout") from None


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
    """The flags, each in the group of the tasks it applies to (check_flags refuses it elsewhere)."""
    ap = one_line_errors(argparse.ArgumentParser(
        description="Evaluate; the last stdout line is the metrics as JSON.", allow_abbrev=False))
    ap.add_argument("--task", required=True, choices=list(TASKS),
                    help="; ".join(f"{k}: {v}" for k, (_, v) in TASKS.items()))
    ap.add_argument("--dataset", required=True, help="a name or a folder")
    ap.add_argument("--data-dir", default="data", help="data and cache folder")
    ap.add_argument("--runs", default="runs", help="the run folders of train.py")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=SEED, default=0, help="also selects the --holdout items")
    r = group(ap, "retrieval")
    r.add_argument("--encoder", default="minilm", help="minilm | mpnet | a fine-tuned run | a model folder")
    r.add_argument("--doc-fields", help="the document's fields (default: EncodeRec's)")
    r.add_argument("--holdout", type=bounded(float, 0, 1, open_high=True), default=0.0,
                   help="query only this seeded share of items")
    r.add_argument("--max-length", type=COUNT, help="token limit (default: the model's)")
    r.add_argument("--batch-size", type=COUNT, default=64, help="texts per encoder batch")
    group(ap, "unisrec vqrec tiger").add_argument(
        "--run", help="a run folder (default: the newest finished one)")
    ap.add_argument("--ranks", type=new_npy,
                    help="save each test case's (retrieval: query's) rank to this new .npy")
    t = group(ap, "tiger")
    t.add_argument("--beam", type=COUNT, default=10, help="beam width = returned IDs")
    t.add_argument("--no-constrain", action="store_true", help="free decoding (invalid IDs counted)")
    return ap


def bounded(kind, low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False):
    """An argparse type: a finite `kind` (int or float) between low and high (an open end excluded)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        above = v > low if open_low else v >= low
        below = v < high if open_high else v <= high
        if not (math.isfinite(v) and above and below):
            want = [f"{'>' if open_low else '>='} {low}"]
            want += [f"{'<' if open_high else '<='} {high}"] if high < math.inf else []
            raise argparse.ArgumentTypeError(f"must be {' and '.join(want)}, got {text}")
        return v
    return parse


COUNT, NON_NEGATIVE = bounded(int, 0, open_low=True), bounded(int, 0)
POSITIVE = bounded(float, 0, open_low=True)
SEED = bounded(int, 0, 2 ** 32 - 1)  # numpy's and torch's seeds both take it


def group(ap: argparse.ArgumentParser, names: str):
    """An argument group of the flags that apply to `names` (space-separated stages or tasks); its title
    lists them in --help."""
    g = ap.add_argument_group(names.replace(" ", ", "))
    g.names = set(names.split())  # argparse keeps no such field: read by flags_of
    return g


def flags_of(ap: argparse.ArgumentParser, name: str) -> set[str]:
    """The dests of the flags that apply to the stage or task `name`: its groups' and the ungrouped ones."""
    return {a.dest for g in ap._action_groups if name in getattr(g, "names", {name})
            for a in g._group_actions}


def check_flags(ap: argparse.ArgumentParser, args, flag: str, name: str) -> None:
    """No flag given that `flag name` (e.g. --stage ease) ignores: ignored silently, it would be a wrong
    result."""
    allowed = flags_of(ap, name)
    if extra := [k for k, v in vars(args).items() if v != ap.get_default(k) and k not in allowed]:
        raise DataError(f"--{extra[0].replace('_', '-')} does not apply to {flag} {name}; drop it")


def one_line_errors(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse's own errors as the project's: one line, exit 2."""
    def error(message):
        print(f"error: {message} (--help lists the options)", file=sys.stderr)
        sys.exit(2)
    ap.error = error
    return ap


def sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler's kill) ends like Ctrl-C: one line


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def cli_error(e: BaseException, resumable: bool = False) -> int:
    """In a CLI's `except`: one line on stderr naming what ended it, and the exit status: bad input or the
    machine's refusal 2, a non-finite loss 1, interrupted 130, anything else 1 (a bug: ENCODEREC_DEBUG=1
    raises it with its traceback). resumable: the CLI writes checkpoints that --resume continues from."""
    if isinstance(e, (DataError, WeightsError, ValueError, FloatingPointError)):
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, FloatingPointError) else 2  # a NaN/inf loss: the data or lr, not a flag
    if isinstance(e, BrokenPipeError):  # the reader of stdout left (`| head -1`): end quietly, as git does
        return 141
    if isinstance(e, OSError):  # the machine's, not the code's: one line naming the file
        hint = (" Free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else
                " Choose a writable --runs / --out" if e.errno in WRITE_ERRORS else "")
        hint += "; writes are atomic, so --resume continues from the last checkpoint." if hint and resumable \
            else "." if hint else ""
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}.{hint}", file=sys.stderr)
        return 2
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM; checkpoints are atomic: the last one stays
        print("error: interrupted" + ("; --resume continues from the last checkpoint, if one was written"
                                      if resumable else ""), file=sys.stderr)
        return 130
    if os.environ.get("ENCODEREC_DEBUG"):
        raise e
    print(f"error: unexpected {type(e).__name__}: {str(e)[:300]} (a file edited by hand, or a bug: rerun "
          "with ENCODEREC_DEBUG=1 and report the traceback)", file=sys.stderr)
    return 1


def new_npy(path: str) -> str:
    """An output flag's .npy (argparse type): new, or one this flag wrote (data.record); not in a run or
    dataset folder, whose files it would replace."""
    p = Path(path)
    if p.suffix != ".npy" or (p.parent / "run.json").is_file() or find_lcrec(p.parent):
        raise argparse.ArgumentTypeError(f"{p}: give a .npy path outside run and dataset folders")
    if os.path.lexists(p) and (p.is_symlink() or not p.is_file() or verify(p) is None):
        raise argparse.ArgumentTypeError(f"{p} exists and is not a file this flag wrote: choose a new path")
    return path


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
        if res.get("task") != {"vqrec": "unisrec"}.get(task, task) or \
                task == "vqrec" and res.get("mode") != "vqrec":
            raise DataError(f"{run} is not a {task} run")
        return run
    name = Path(args.dataset).name.lower()
    roots = [p for p in Path(args.runs).glob("*") if p.name.lower() == name]
    prefix, stage = {"vqrec": ("unisrec-vqrec", "unisrec --mode vqrec")}.get(task, (task, task))
    runs = [p.parent for r in roots for p in r.glob(f"{prefix}-*/results.json")
            if task != "unisrec" or not p.parent.name.startswith("unisrec-vqrec-")]  # --task vqrec
    if not runs:
        raise DataError(f"no finished {task} run for {args.dataset} under {args.runs}/: train one with "
                        f"`python train.py --stage {stage} --dataset {args.dataset}`")
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


def read_semantic_ids(path: Path, n_items: int, device="cpu") -> SemanticIDs:
    """An ids-* run's semantic_ids.npy (N, 4) with the vocab sizes of its results.json, checked by
    SemanticIDs (codes in range, every ID one item)."""
    fix = f"delete {path.parent} and run train.py --stage rqvae again"
    vocab = run_results(path.parent).get("vocab_sizes")
    if not (isinstance(vocab, list) and all(type(v) is int and v > 0 for v in vocab)):  # never coerced
        raise DataError(f"{path.parent}/results.json: vocab_sizes {vocab!r} is not a list of positive "
                        f"integers; {fix}")
    codes = read_array(path, "semantic IDs", "i", rows=n_items, cols=4, fix=fix)
    try:
        return SemanticIDs(codes, vocab, device)
    except ValueError as e:  # codes beyond the vocab, or two items sharing an ID
        raise DataError(f"{path}: {e}; {fix}") from None


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


def run_retrieval(args, ds=None) -> dict:
    ds = ds or load_dataset(args.dataset, args.data_dir)
    fields = parse_fields(args.doc_fields, DOCUMENT_FIELDS)
    enc = load_encoder(weights_folder(args.encoder), device=args.device, max_length=args.max_length)
    queries = holdout_items(ds, args.holdout, args.seed, fields) if args.holdout > 0 else None
    out = retrieval_eval(enc, ds, doc_fields=fields, query_items=queries, batch_size=args.batch_size,
                         ranks_to=args.ranks)
    return {"task": "retrieval", "dataset": ds.name, "encoder": str(args.encoder), "doc_fields": list(fields),
            "holdout": args.holdout, "max_length": enc.max_length, **out}


def evaluate_unisrec(model, ds, cases, max_len: int, ks=(10, 50), ranks_to=None) -> dict:
    """summarize() of UniSRec's full ranking; ranks_to: save each case's rank (.npy, (C,))."""
    hist, _ = ds.histories(cases, max_len)  # (C, L), -1 = padding
    ranks = full_ranking_ranks(score_fn(model, hist), len(cases), cases.target)
    if ranks_to:
        save_npy(ranks_to, ranks)
    return summarize(ranks, ks, cold=cases.cold)


def build_unisrec(meta: dict, run: Path) -> UniSRec:  # for _load: the model on the inputs it was trained on
    cfg = UniSRecConfig(**meta["model_config"])
    if cfg.mode == "vqrec":
        return UniSRec(cfg, codes=read_run_embeddings(run, meta["codes_path"], meta.get("n_items"), "codes"))
    emb = read_run_embeddings(run, meta["item_emb_path"], meta.get("n_items")) if cfg.mode != "id" else None
    return UniSRec(cfg, l2_rows(emb) if emb is not None and meta.get("normalize_input") else emb)


def run_unisrec(args) -> dict:
    run, ds, model, _ = _load(args, args.task, build_unisrec)
    return {"task": "unisrec", "dataset": ds.name, "run": str(run),
            **{s: evaluate_unisrec(model, ds, getattr(ds.splits, s), model.cfg.max_seq_len,
                                   ranks_to=args.ranks if s == "test" else None) for s in ("valid", "test")}}


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


def popularity_ranks(ds, cases) -> np.ndarray:
    """Ranks with items scored by training count (popularity)."""
    counts = torch.as_tensor(training_counts(ds), dtype=torch.float32)  # (I,)
    return full_ranking_ranks(lambda idx: counts.expand(len(idx), -1), len(cases), cases.target)


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
                   ks=(5, 10), ranks_to=None) -> dict:
    """summarize() of TIGER's top-`beam` items; unconstrained: + the invalid share; ranks_to: as in
    evaluate_unisrec (MISS beyond the beam)."""
    hist, _ = ds.histories(cases, model.cfg.max_items)  # (C, L), -1 = padding
    items, _ = recommend(model, hist, ids, beam=beam, constrain=constrain,
                         progress=True)  # (C, beam), -1 = invalid
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


TASKS = {  # --task -> (runner, help)
    "retrieval": (run_retrieval, "title -> document retrieval of --encoder"),
    "unisrec": (run_unisrec, "valid / test metrics of a UniSRec or SASRec-ID run"),
    "vqrec": (run_unisrec, "valid / test metrics of a VQ-Rec run (unisrec --mode vqrec)"),
    "tiger": (run_tiger, "test metrics of a TIGER run beside popularity"),
}


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    sigterm = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        check_flags(ap, args, "--task", args.task)
        torch.manual_seed(args.seed)
        args.device = check_device(args.device)
        result = TASKS[args.task][0](args)
        if args.ranks:
            record([Path(args.ranks)])  # then a later --ranks may replace it
        print_json(result)
    except (Exception, KeyboardInterrupt) as e:
        return cli_error(e)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
