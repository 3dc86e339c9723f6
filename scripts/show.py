"""See what a run learned, as text (and one picture): recommendations as titles, a title's nearest documents
before and after fine-tuning, and the validation curves of a dataset's runs.

    python scripts/show.py recs --dataset D --run RUN [RUN ...] [--users N | --user ID ...] [--seed S]
    python scripts/show.py neighbours --dataset D [--run RUN] [--titles N] [--seed S | --moved | --item I ...]
    python scripts/show.py curves --dataset NAME [NAME ...] [--runs runs] [--out PNG]

recs: a finished UniSRec, SASRec-ID, VQ-Rec, TIGER or EASE run (several: side by side) and a few test users:
the last items of each history, the held-out target and each run's top 10 by title, with [T] the target and
[h] an item of the user's history; below, the target's rank as the run's test_ranks.npy holds it.
neighbours: for a few titles (seeded, or those whose document moved most, among the ones the encoder run held
out of fine-tuning if it held any) the top 5 documents of the backbone and of the fine-tuned encoder over all
documents, [=] marking the title's own, and a summary line over all those titles.
curves: validation Recall@10 / NDCG@10 per evaluation (history.json) of every run of the datasets, one line
per run: a text table, and a PNG when matplotlib (an optional extra) is installed.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as ev  # noqa: E402
from data import DataError, load_dataset, read_json, verify, weights_folder  # noqa: E402
from encoderec import load_encoder  # noqa: E402
from tiger import SemanticIDs, Tiger, TigerConfig, recommend  # noqa: E402
from trainer import check_device  # noqa: E402
from unisrec import score_fn  # noqa: E402

K = 10  # the recommendations shown: the cutoff of the reported metrics


def _title(titles, i: int) -> str:
    return " ".join(titles[i].split()) if titles[i] else "(no title)"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


# ---- recommendations as titles
def _ease(ds, lam: float, device: str):
    """EASE's weights B (I, I) refitted as eval.ease_run fits them (no run folder keeps them)."""
    train = ev.training_interactions(ds)
    user, item = np.repeat(np.arange(ds.n_users), ds.seq_lengths)[train], ds.seq_items[train]
    gram = torch.zeros(ds.n_items, ds.n_items, device=device)  # (I, I) = X^T X, 4,096 users at a time
    for s in range(0, ds.n_users, 4096):
        x = torch.zeros(min(4096, ds.n_users - s), ds.n_items, device=device)
        sel = (user >= s) & (user < s + 4096)
        x[user[sel] - s, item[sel]] = 1.0
        gram += x.T @ x
    return ev.ease_weights(gram, lam)


def _top(scores: torch.Tensor, targets: np.ndarray, k: int = K) -> np.ndarray:
    """The top k ids (C, k) of scores (C, I), ties ordered as the metric counts them (eval.ranks_from_scores:
    pessimistic): the target just below every item that scores the same."""
    scores, rows = scores.float().clone(), torch.arange(len(targets))
    t = torch.as_tensor(targets, device=scores.device)
    scores[rows, t] = torch.nextafter(scores[rows, t], torch.tensor(-torch.inf, device=scores.device))
    return scores.topk(min(k, scores.shape[1])).indices.cpu().numpy()


def recommender(run: Path, args):
    """(kind, ds, top(cases) -> (C, K) item ids) of a finished recommender run, scored as eval.py does."""
    res = ev.run_results(run)
    task, a = res.get("task"), argparse.Namespace(run=str(run), dataset=args.dataset, data_dir=args.data_dir,
                                                  runs=None, device=args.device)
    if task == "unisrec":
        _, ds, model, _ = ev._load(a, "unisrec", ev.build_unisrec)
        kind = {"id": "SASRec-ID", "vqrec": "VQ-Rec"}.get(model.cfg.mode, f"UniSRec ({model.cfg.mode})")

        def top(cases):
            with torch.inference_mode():
                scores = score_fn(model, ds.histories(cases, model.cfg.max_seq_len)[0])(np.arange(len(cases)))
            return _top(scores, cases.target)
        return kind, ds, top
    if task == "tiger":
        _, ds, model, meta = ev._load(a, "tiger", lambda meta, _: Tiger(TigerConfig(**meta["model_config"])))
        try:
            ids = SemanticIDs(meta["semantic_ids"].numpy(), model.cfg.vocab_sizes, args.device)
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise DataError(f"{run / 'best.pt'}: meta.semantic_ids is unusable ({type(e).__name__}: {e})") \
                from None
        beam = int(res.get("beam", K))
        return "TIGER", ds, lambda cases: recommend(model, ds.histories(cases, model.cfg.max_items)[0], ids,
                                                    beam=beam, k=min(K, beam))[0]
    if task == "ease":
        ds = load_dataset(args.dataset, args.data_dir)
        if read_json(run / "run.json", f"delete {run} and train again").get("key", {}).get("data") \
                != ds.fingerprint:
            raise DataError(f"{run} was fitted on other data than {args.dataset}; pass its data")
        b = _ease(ds, float(res["lambda"]), args.device)
        longest = int(ds.seq_lengths.max())

        def top(cases):
            hist = torch.as_tensor(ds.histories(cases, longest, pad=ds.n_items)[0], device=args.device)
            multi_hot = torch.zeros(len(cases), ds.n_items + 1, device=args.device).scatter_(1, hist, 1.0)
            return _top(multi_hot[:, :-1] @ b, cases.target)
        return f"EASE (lambda {res['lambda']:g})", ds, top
    raise DataError(f"{run} is a {task} run; recs shows unisrec, tiger and ease runs")


def lookup(ids: list[str], given: list[str], what: str) -> np.ndarray:
    """The positions of `given` in ids (users, items named on the command line)."""
    where = {u: i for i, u in enumerate(ids)}
    if bad := [g for g in given if g not in where]:
        raise DataError(f"{what} {bad[0]} is not among the {len(ids)} candidates (e.g. {', '.join(ids[:3])})")
    return np.array([where[g] for g in given], dtype=np.int64)


def choose(size: int, n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(size, min(n, size), replace=False))


def _test_ranks(path: Path, n: int) -> np.ndarray | None:
    """A run's saved rank of each test case (train.py writes it; older runs may lack it: None)."""
    if not path.is_file():
        return None
    verify(path)  # an edited file would misplace the target's mark
    try:
        ranks = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy ({type(e).__name__})") from None
    if ranks.shape != (n,) or ranks.dtype.kind not in "iu":
        raise DataError(f"{path} holds {ranks.dtype} {ranks.shape}, not the rank of each of {n} test cases")
    return ranks


def recs(args) -> None:
    runs = [Path(r) for r in args.run]
    models = [recommender(r, args) for r in runs]
    ds = models[0][1]
    test, titles = ds.splits.test, ds.title_texts()
    cases = lookup([ds.user_ids[u] for u in test.user], args.user, "--user") if args.user else \
        choose(len(test), args.users, args.seed)
    sub = test.subset(cases)
    tops = [top(sub) for _, _, top in models]
    ranks = [_test_ranks(r / "test_ranks.npy", len(test)) for r in runs]
    col = max(24, (args.width - 9) // len(runs) - 3)  # characters per run

    def row(label, cells):
        print((f"  {label:>4} | " + " | ".join(_cut(x, col).ljust(col) for x in cells)).rstrip())
    print(f"{ds.name}: {len(cases)} of {len(test)} test users "
          f"({'given' if args.user else f'seed {args.seed}'}); [T] the target, [h] in the user's history, "
          "row T: the target's rank in the run's test_ranks.npy (1 = first)")
    for i, (kind, _, _) in enumerate(models):
        print(f"  {chr(65 + i)}: {kind}: {runs[i]}")
    for c, (u, pos, target) in enumerate(zip(sub.user, sub.pos, sub.target)):
        seq = ds.sequence(u)
        history = set(seq[:pos].tolist())
        print(f"\nuser {ds.user_ids[u]}: {pos} items before the target; the last {min(args.history, pos)}:")
        for j in seq[max(0, pos - args.history):pos]:
            print(f"    #{j} {_title(titles, j)}")
        cold = " (never in training)" if sub.cold[c] else ""
        print(f"  target: #{target} {_title(titles, target)}{cold}")
        row("rank", [f"{chr(65 + i)}: {r.name}" for i, r in enumerate(runs)])
        for k in range(K):
            items = [int(top[c, k]) if k < top.shape[1] else -1 for top in tops]  # TIGER: -1 = no valid ID
            marks = ["[T]" if j == target else "[h]" if j in history else "   " for j in items]
            row(k + 1, [f"{m}#{j} {_title(titles, j)}" if j >= 0 else "   (no item)"
                        for m, j in zip(marks, items)])
        row("T", ["–" if r is None else "beyond the beam" if r[cases[c]] >= ev.MISS else
                  str(int(r[cases[c]]) + 1) for r in ranks])


# ---- neighbours before and after fine-tuning
def _encode(folder, device, max_len: int, queries: list[str], docs: list[str]):
    enc = load_encoder(folder, device=device, max_length=max_len)
    return tuple(torch.from_numpy(enc.encode(t, show_progress=False)) for t in (queries, docs))  # unit rows


def neighbours(args) -> None:
    run = ev.find_run(args, "encoder")  # --run, else the newest finished encoder run of --dataset
    res = ev.run_results(run)
    key = read_json(run / "run.json", f"delete {run} and train again").get("key", {})
    ds = load_dataset(args.dataset, args.data_dir)
    if key.get("data") != ds.fingerprint:
        raise DataError(f"{run} was fine-tuned on other data than {args.dataset}; pass its data")
    fields, max_len = tuple(key["doc_fields"]), args.max_length or key.get("max")
    titles, docs = ds.title_texts(), ds.document_texts(fields)
    doc_id: dict[str, int] = {}  # retrieval_eval's corpus: each distinct document once, its copies counted
    item_doc = {i: doc_id.setdefault(d, len(doc_id)) for i, d in enumerate(docs) if d is not None}
    counts = np.bincount(list(item_doc.values()), minlength=len(doc_id))
    owner = {d: i for i, d in sorted(item_doc.items(), reverse=True)}  # a document's first item
    held = [int(i) for i in res.get("holdout_items") or []]
    pairs = [i for i in range(ds.n_items) if titles[i] and i in item_doc]  # any of them may be --item
    pool = held or pairs
    given = [pairs[j] for j in lookup([str(i) for i in pairs], args.item, "--item")] if args.item else []
    every = sorted(set(pool) | set(given))  # all ranked (the summary line), a few shown in detail
    targets, doc_texts = np.array([item_doc[i] for i in every]), list(doc_id)
    vectors = {side: _encode(folder, args.device, max_len, [titles[i] for i in every], doc_texts)
               for side, folder in (("backbone", weights_folder(res["backbone"])), ("fine-tuned", run))}
    ranks = {side: ev.full_ranking_ranks(lambda idx: Q[idx] @ D.T, len(every), targets, counts=counts)
             for side, (Q, D) in vectors.items()}  # as retrieval_eval ranks them
    if given:
        shown = [every.index(i) for i in given]
    elif args.moved:  # the largest rank ratios, up or down: a move near the top counts more than far below
        moved = np.abs(np.log1p(ranks["fine-tuned"]) - np.log1p(ranks["backbone"]))
        shown = sorted(np.argsort(-moved, kind="stable")[:args.titles].tolist())
    else:
        shown = choose(len(every), args.titles, args.seed).tolist()
    queries = [every[q] for q in shown]
    tops = {side: _top(Q[shown] @ D.T, targets[shown], args.k) for side, (Q, D) in vectors.items()}
    kind = "held out of fine-tuning" if held else "of the catalog (this run held none out: seen in training)"
    how = "given" if args.item else "the ones fine-tuning moved most" if args.moved else f"seed {args.seed}"
    print(f"{ds.name}: {len(queries)} of the {len(pool)} titles {kind} ({how}); each searched {len(doc_id)} "
          f"distinct documents ({int(counts.sum())} items) at {max_len} tokens; [=] the title's own document")
    print(f"  backbone: {res['backbone']} ({weights_folder(res['backbone'])})\n  fine-tuned: {run}")
    in_pool = np.isin(every, pool)
    m = {side: ev.metrics_from_ranks(r[in_pool]) for side, r in ranks.items()}
    moved = np.sign(ranks["fine-tuned"][in_pool] - ranks["backbone"][in_pool])
    print(f"  all {len(pool)}: " + ", ".join(f"{k} {m['backbone'][k]:.4f} -> {m['fine-tuned'][k]:.4f}"
                                             for k in METRICS)
          + f"; fine-tuning moved the own document up for {(moved < 0).sum()}, down for {(moved > 0).sum()}, "
          f"kept {(moved == 0).sum()}")
    width = args.width - 14
    for n, (q, item) in enumerate(zip(shown, queries)):
        r = {side: int(ranks[side][q]) + 1 for side in ranks}
        print(f"\n#{item} {_title(titles, item)}\n  its document, rank {r['backbone']} -> {r['fine-tuned']}: "
              f"{_cut(' '.join(docs[item].split()), width)}")
        for side, top in tops.items():
            print(f"  {side} (rank {r[side]}):")
            for k, d in enumerate(top[n].tolist()):
                more = f" (+{int(counts[d]) - 1} items)" if counts[d] > 1 else ""
                text = f"#{owner[d]} {_title(titles, owner[d])}{more} | {' '.join(doc_texts[d].split())}"
                print(f"    {k + 1}. {'[=]' if d == targets[q] else '   '} {_cut(text, width)}")


# ---- curves
GROUPS = {"recommenders: next item, validation": ("unisrec", "tiger"),
          "encoders: held-out title -> document": ("encoder",)}
METRICS = ("recall@10", "ndcg@10")


def collect_curves(runs, names) -> dict[str, dict[str, list[tuple]]]:
    """{group: {run folder: [(epoch, recall@10, ndcg@10), ...]}} from each history.json of the datasets."""
    out: dict[str, dict[str, list]] = {g: {} for g in GROUPS}
    for name in names:
        for f in sorted((Path(runs) / name).glob("*/history.json")):
            try:
                stage = read_json(f.parent / "run.json").get("key", {}).get("stage")
                points = [(float(h["epoch"]), *(float(h["valid"][m]) for m in METRICS))
                          for h in read_json(f) if METRICS[0] in (h.get("valid") or {})]
            except (DataError, OSError, KeyError, TypeError, ValueError, AttributeError) as e:
                print(f"warning: curves skip {f}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            group = next((g for g, stages in GROUPS.items() if stage in stages), None)
            if points and group:
                done = "" if (f.parent / "results.json").is_file() else " (unfinished)"
                out[group][f"{name}/{f.parent.name}{done}"] = points
    return {g: c for g, c in out.items() if c}


def curves_table(curves: dict, rows: int = 15) -> str:
    """Each group as a text table: a row per evaluated epoch (at most `rows`, evenly spaced), a column per
    run (a letter, named below), cells 'Recall@10 / NDCG@10'."""
    out = []
    for group, runs in curves.items():
        epochs = sorted({p[0] for pts in runs.values() for p in pts})
        shown = [epochs[i] for i in sorted(set(np.linspace(0, len(epochs) - 1, rows).round().astype(int)))] \
            if len(epochs) > rows else epochs
        cell = [{p[0]: f"{p[1]:.4f} / {p[2]:.4f}" for p in pts} for pts in runs.values()]
        letters = [chr(65 + i) if i < 26 else f"R{i}" for i in range(len(runs))]
        some = f"; {len(shown)} of {len(epochs)} epochs" if shown != epochs else ""
        out += [f"{group} (Recall@10 / NDCG@10{some})",
                ("  epoch | " + " | ".join(x.ljust(15) for x in letters)).rstrip()]
        out += [(f"  {e:>5g} | " + " | ".join(c.get(e, "–").ljust(15) for c in cell)).rstrip()
                for e in shown]
        out += [f"  {x}: {r}" for x, r in zip(letters, runs)] + [""]
    return "\n".join(out)


def curves_png(curves: dict, path: Path) -> bool:
    """The curves as a PNG (a row per group, a column per metric); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(curves), 2, figsize=(15, 4.2 * len(curves)), squeeze=False)
    for row, (group, runs) in zip(axes, curves.items()):
        for m, ax in enumerate(row):
            for name, pts in runs.items():
                ax.plot([p[0] for p in pts], [p[1 + m] for p in pts], marker="o", ms=3, label=name)
            ax.set(title=f"{group}: {METRICS[m]}", xlabel="epoch", ylabel=METRICS[m])
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def curves(runs, names, png) -> str:
    """The text table, and a line naming the PNG written (or why none was): report.py --curves prints it."""
    c = collect_curves(runs, names)
    if not c:
        return "(no run has a validation history)"
    note = f"curves: {png}" if curves_png(c, Path(png)) else \
        "curves: text only (matplotlib, an optional extra, is not installed: pip install matplotlib)"
    return curves_table(c) + "\n" + note


def run_curves(args) -> None:
    have = {p.name.lower(): p.name for p in Path(args.runs).glob("*") if p.is_dir()}
    if missing := [d for d in args.dataset if Path(d).name.lower() not in have]:
        raise DataError(f"no run folders for {', '.join(missing)} under {args.runs}/")
    names = [have[Path(d).name.lower()] for d in args.dataset]
    print(curves(args.runs, names, args.out or Path(args.runs) / f"curves-{'+'.join(names)}.png"))


def build_parser() -> argparse.ArgumentParser:
    ap = ev.one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False))
    sub = ap.add_subparsers(dest="tool", required=True)
    tools = {}
    for name, text in (("recs", "a run's top 10 for test users, as titles"),
                       ("neighbours", "a title's top documents before and after fine-tuning"),
                       ("curves", "validation Recall@10 / NDCG@10 per epoch of a dataset's runs")):
        tools[name] = ev.one_line_errors(sub.add_parser(name, help=text, description=text,
                                                        allow_abbrev=False))
    for name in ("recs", "neighbours"):
        p = tools[name]
        p.add_argument("--dataset", required=True, help="the runs' data: a name or a folder")
        p.add_argument("--data-dir", default="data", help="data and cache folder")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        p.add_argument("--seed", type=ev.SEED, default=0, help="chooses the users / titles")
        p.add_argument("--width", type=ev.COUNT, default=shutil.get_terminal_size((160, 40)).columns,
                       help="characters per line")
    r = tools["recs"]
    r.add_argument("--run", required=True, nargs="+", help="finished unisrec / tiger / ease run folders")
    r.add_argument("--users", type=ev.COUNT, default=3, help="how many seeded test users")
    r.add_argument("--user", nargs="+", help="these users (the dataset's user ids) instead")
    r.add_argument("--history", type=ev.COUNT, default=5, help="history items shown")
    n = tools["neighbours"]
    n.add_argument("--run", help="a fine-tuned encoder's run folder (default: the newest finished one)")
    n.add_argument("--runs", default="runs", help="where to look for it: the run folders of train.py")
    n.add_argument("--titles", type=ev.COUNT, default=3, help="how many seeded titles")
    n.add_argument("--item", nargs="+", help="these items' titles (catalog indices) instead")
    n.add_argument("--moved", action="store_true", help="the titles whose document's rank changed most")
    n.add_argument("--k", type=ev.COUNT, default=5, help="documents shown per encoder")
    n.add_argument("--max-length", type=ev.COUNT, help="token limit (default: the run's own)")
    c = tools["curves"]
    c.add_argument("--dataset", required=True, nargs="+", help="names or folders (their runs/<name>/)")
    c.add_argument("--runs", default="runs", help="the run folders of train.py")
    c.add_argument("--out", help="the PNG (default runs/curves-<datasets>.png)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sigterm = signal.signal(signal.SIGTERM, ev.sigterm_as_interrupt)
    try:
        if args.tool != "curves":
            args.device = check_device(args.device)
        {"recs": recs, "neighbours": neighbours, "curves": run_curves}[args.tool](args)
    except (Exception, KeyboardInterrupt) as e:
        return ev.cli_error(e)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
