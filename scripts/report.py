"""The paper's tables from train.py's finished runs, with their significance tests (EncodeRec marks p < 0.05).

    python scripts/report.py --dataset Scientific [Beauty ...] [--runs runs] [--csv PATH] [--curves]

Reads runs/<dataset>/*/results.json: a markdown table per TABLES entry on stdout, every cell in a CSV
(default runs/report-<datasets>.csv, long format), the summary as JSON on the last stdout line. Runs of one
setting that differ by seed are averaged; a fine-tuned encoder's row is tested against its backbone's row of
the same setting: a paired t-test over test users (paired_test on test_ranks.npy), Welch's over seeds for
collisions. --curves adds each run's validation curve (scripts/show.py curves). Other tools call
`report(runs, names)` (the markdown), or collect_report and report_markdown.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import BACKBONES, DataError, find_lcrec, read_json, verify  # noqa: E402
from eval import cli_error, encoder_label, one_line_errors, print_json, run_results  # noqa: E402
from trainer import atomic_write, digest  # noqa: E402


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
                verify(f.parent / "test_ranks.npy")  # edited ranks would fake a significance test
                source = _source(str(res.get("encoder", "?")))  # reads the encoder run's files once
                records, (sched, tag) = _records(f.parent, res, source), _setting(f.parent, res)
            except (DataError, OSError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                print(f"warning: report skips {f.parent}: unreadable results ({type(e).__name__}: {e})",
                      file=sys.stderr)
                continue
            if res.get("steps") == 0:
                print(f"warning: report skips {f.parent}: it trained 0 steps", file=sys.stderr)
                continue
            if str(res.get("dataset", name)).lower() != name.lower():  # copied or linked in from another
                print(f"warning: report skips {f.parent}: a run of dataset {res.get('dataset')!r}, not {name}",
                      file=sys.stderr)
                continue
            recipe = source[2]
            for table, row, base, metrics, keys in records:
                if odd := [m for m in keys if m in metrics and metrics[m] is not None
                           and not _number(metrics[m])]:  # None: no evaluation case (JSON null)
                    print(f"warning: {f.parent}: {table} metric {odd[0]} is {metrics[odd[0]]!r}, not a "
                          "number: shown as –", file=sys.stderr)
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
        data: dict[str, set] = {}
        for k, g in groups.items():
            for v in g.values() if k[1] == name else ():
                data.setdefault(_data_fingerprint(v[1]), set()).add(str(v[1]))
        data.pop(None, None)
        if len(data) > 1:
            print(f"warning: the {name} tables mix runs on {len(data)} versions of its data: "
                  + "; ".join(f"{fp}: {', '.join(sorted(fs))}" for fp, fs in sorted(data.items()))
                  + ": retrain the older runs or move them away", file=sys.stderr)
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
        out += [f"### {title}", "", "| " + " | ".join(map(_md, head)) + " |", "|" + "---|" * len(head)]
        for row, sched in sorted(dict.fromkeys((r["row"], r["schedule"]) for r in rs), key=order):
            vals = [_cell(cell.get((d, row, sched, m)), m) for d in datasets for m in metrics]
            label = f"{row} ({sched})" if sched and table != "retrieval" else row
            out.append("| " + " | ".join([_md(label), *vals]) + " |")
        srcs = sorted({(_md(r["dataset"]), _md(r["row"]), r["schedule"], _md(r["run"])) for r in rs})
        if any(r["n"] > 1 or r["p"] is not None for r in rs):
            out += ["", "Mean ± std over seeds (n); * p < 0.05 and better than the off-the-shelf encoder's "
                        "row (paired t-test over test users; collisions: Welch's over seeds; README)."]
        out += ["", "Sources: " + "; ".join(f"{d} / {row}{f' ({s})' if s else ''}: `{run}`"
                                            for d, row, s, run in srcs), ""]
    return "\n".join(out) or "(no results found)"


def _md(text: str) -> str:
    """Text from folder names in a markdown table cell: a `|` or a line break would end the cell or row."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _csv(rec: dict) -> dict:
    """A record's text cells as spreadsheets read them safely: one starting with = + - @ (or a tab or CR) is
    a formula there, so it gets a leading apostrophe (numbers stay numbers)."""
    return {k: "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v
            for k, v in rec.items()}


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
    if (path.parent / "run.json").is_file() or find_lcrec(path.parent):
        raise DataError(f"--csv {path}: write it outside run and dataset folders")
    print(report_markdown(recs))
    if args.curves:  # scripts/show.py: a text table, and a PNG when matplotlib is installed
        from show import curves
        print(curves(args.runs, names, path.with_name(f"curves-{'+'.join(names)}.png")))  # beside the CSV
    def write(tmp):  # long format: a row per (table, dataset, row, schedule, metric)
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_HEADER.split(","))
            w.writeheader()
            w.writerows(map(_csv, recs))
    atomic_write(path, write)
    return {"task": "report", "datasets": names, "cells": len(recs), "csv": str(path)}


def report(runs, names) -> str:
    """The markdown tables of the datasets `names` (folders under `runs`), for other tools to print."""
    return report_markdown(collect_report(runs, names))


def main(argv=None) -> int:
    ap = one_line_errors(argparse.ArgumentParser(
        description="The paper's tables from train.py's runs; the last stdout line is a JSON summary.",
        allow_abbrev=False))
    ap.add_argument("--dataset", required=True, nargs="+", help="names or folders (their runs/<name>/)")
    ap.add_argument("--runs", default="runs", help="the run folders of train.py")
    ap.add_argument("--csv", help="CSV path (default runs/report-<datasets>.csv)")
    ap.add_argument("--curves", action="store_true",
                    help="also the validation curves (curves-<datasets>.png beside the CSV, with matplotlib)")
    args = ap.parse_args(argv)
    try:
        print_json(run_report(args))
    except (Exception, KeyboardInterrupt) as e:  # one line, exit 2 for bad input, as eval.py
        return cli_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
