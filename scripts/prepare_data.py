"""Prepare a dataset: raw Amazon release files -> the LC-Rec folder that data.py loads; its statistics.

    python scripts/prepare_data.py --dataset beauty [--data-dir data] [--kcore 5] [--stats]
    python scripts/prepare_data.py --dataset PATH/TO/RAW_FOLDER [--out DIR]
    python scripts/prepare_data.py --dataset ../shared/data/lcrec/Beauty --stats   # LC-Rec already: describe

A registered name (beauty, sports, toys: Amazon 2014 5-core; scientific: 2018 5-core; baby, games,
beauty2023: Amazon Reviews 2023) is downloaded into <data-dir>/raw/<name>/ when its files are missing
(ENCODEREC_OFFLINE=1: never; the error lists the files to place by hand), deduplicated, k-core filtered
and written to <data-dir>/<name>/; a folder of raw files is written to <data-dir>/<folder name>/ (or
--out). The prepared folder is the LC-Rec layout: `<name>.inter.json` ({user: [item, ...]},
chronological, users 0..U-1 in order of their first review), `<name>.item.json` ({item: {asin, title,
description, features, brand, categories, price}}, items in order of first appearance along the
sequences: the P5 / LC-Rec numbering) and, for the 2023 releases (BLaIR's absolute-timestamp split),
`<name>.time.json` ({user: [timestamp_ms, ...]}, aligned with inter.json). A complete prepared folder is
never rewritten. Then the folder is loaded through data.load_dataset and described.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import html
import json
import os
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import eval as ev  # noqa: E402
from data import (ITEM_FIELDS, DataError, Dataset, Item, _item, clean_list, clean_text,  # noqa: E402
                  find_lcrec)
from trainer import atomic_write  # noqa: E402


# ---- reading raw files
def read_lines(path: Path, parse: Callable, keys: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, dict) per non-empty line; bad input or a missing key -> DataError."""
    lineno = 0
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = parse(line)
                except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                    raise DataError(f"{path}:{lineno}: malformed record ({type(e).__name__}: "
                                    f"{str(e)[:120]}); fix or re-download it") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                if missing := [k for k in keys if rec.get(k) in (None, "")]:
                    raise DataError(f"{path}:{lineno}: record lacks {', '.join(missing)} "
                                    f"(keys present: {', '.join(sorted(rec)[:12])})")
                yield lineno, rec
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip after line {lineno} ({e}); download it "
                        "again") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None


# ---- raw releases
@dataclass
class RawFiles:
    release: str  # '2014' | '2018' | '2023'
    reviews: Path
    meta: Path


def find_raw(folder: Path) -> RawFiles | None:
    """A folder's raw Amazon files (recognised by name), else None."""
    def first(patterns):
        return next((h for p in patterns for h in sorted(folder.glob(p))), None)
    r14 = first(["reviews_*_5.json.gz", "reviews_*_5.json"])
    if r14 is not None:
        cat = r14.name[len("reviews_"):].split("_5.json")[0]
        meta = first([f"meta_{cat}.json.gz", f"meta_{cat}.json"])
        return RawFiles("2014", r14, meta) if meta else None
    for release, ext, reviews in (("2023", ".jsonl", ("{}.jsonl.gz", "{}.jsonl")),
                                  ("2018", ".json", ("{}_5.json.gz", "{}_5.json", "{}.csv"))):
        meta = first([f"meta_*{ext}.gz", f"meta_*{ext}"])
        if meta is not None:
            cat = meta.name[len("meta_"):].split(ext)[0]
            rev = first([p.format(cat) for p in reviews])
            return RawFiles(release, rev, meta) if rev else None
    return None


def _parse_csv_rating(line: str):
    parts = line.rstrip("\n").split(",")
    if len(parts) != 4:
        raise ValueError(f"expected 4 fields item,user,rating,timestamp, got {len(parts)}")
    return {"asin": parts[0], "reviewerID": parts[1], "unixReviewTime": int(parts[3])}  # never float("10.5")


def read_reviews(files: RawFiles) -> tuple[list[str], list[str], np.ndarray]:
    """(user ids, item ids, timestamps) in file order."""
    path, new = files.reviews, files.release == "2023"
    ukey, ikey, tkey = (("user_id", "parent_asin", "timestamp") if new
                        else ("reviewerID", "asin", "unixReviewTime"))
    parse = _parse_csv_rating if not new and path.suffix == ".csv" else json.loads
    users, items, times = [], [], []
    for lineno, rec in read_lines(path, parse, (ukey, ikey, tkey)):
        t, u, i = rec[tkey], rec[ukey], rec[ikey]
        if type(t) is not int or not (isinstance(u, str) and isinstance(i, str)):  # never coerced
            raise DataError(f"{path}:{lineno}: expected string {ukey} and {ikey} and an integer {tkey}, got "
                            f"{u!r}, {i!r}, {t!r}")
        users.append(u)
        items.append(i)
        times.append(t)
    if not users:
        raise DataError(f"{path}: no reviews")
    return users, items, np.array(times, dtype=np.int64)


def read_meta(files: RawFiles, wanted: set[str]) -> dict[str, Item]:
    """Items of the wanted asins (a repeated asin: the first record). 2014 lines are Python literals,
    2018 and 2023 lines JSON."""
    path, rel = files.meta, files.release
    parse = ast.literal_eval if rel == "2014" else json.loads
    key = "parent_asin" if rel == "2023" else "asin"
    out: dict[str, Item] = {}
    for _, r in read_lines(path, parse, (key,)):
        asin = str(r[key])
        if asin not in wanted or asin in out:
            continue
        # 2014 has no features, 2018 says 'feature' and 'category', 2023 keeps the brand in details
        f, c = ("feature", "category") if rel == "2018" else ("features", "categories")
        details = r.get("details") if isinstance(r.get("details"), dict) else {}
        brand = details.get("Brand") or r.get("store") if rel == "2023" else r.get("brand")
        out[asin] = _item(r, asin=asin, features=None if rel == "2014" else clean_list(r.get(f)),
                          brand=clean_text(brand), categories=clean_list(r.get(c)))
    return out


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Iterative k-core: the mask of interactions whose user and item have >= k of them."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        uc = np.bincount(users[keep], minlength=users.max() + 1)
        ic = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (uc[users] >= k) & (ic[items] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def process_raw(files: RawFiles, name: str, kcore: int = 5) -> Dataset:
    """Reviews + meta -> deduplicated, k-core filtered, chronological sequences."""
    user_ids, item_ids, times = read_reviews(files)
    uvocab, uidx = np.unique(np.array(user_ids), return_inverse=True)
    ivocab, iidx = np.unique(np.array(item_ids), return_inverse=True)
    n_raw = len(uidx)
    # dedupe (user, item): earliest, ties -> file order
    o = np.lexsort((np.arange(n_raw), times, iidx, uidx))
    pair = uidx[o].astype(np.int64) * len(ivocab) + iidx[o]
    sel = np.sort(o[np.concatenate([[True], pair[1:] != pair[:-1]])])  # kept rows, in file order
    if kcore > 1:
        sel = sel[k_core(uidx[sel], iidx[sel], kcore)]
    if len(sel) == 0:
        raise DataError(f"{files.reviews}: no interactions left after {kcore}-core filtering of {n_raw} "
                        f"reviews; use a larger file or a smaller --kcore")
    u, i, t, fo = uidx[sel], iidx[sel], times[sel], sel
    # number users by first review; stable chronological order inside a user
    first_seen = np.full(len(uvocab), n_raw)
    np.minimum.at(first_seen, u, fo)
    users = np.unique(u)
    unew = np.full(len(uvocab), -1)
    unew[users] = np.argsort(np.argsort(first_seen[users], kind="stable"), kind="stable")
    u = unew[u]
    o = np.lexsort((fo, t, u))
    u, i, t = u[o], i[o], t[o]
    # number items by first appearance along the sorted sequences
    present, first_pos = np.unique(i, return_index=True)
    item_order = present[np.argsort(first_pos, kind="stable")]
    inew = np.full(len(ivocab), -1)
    inew[item_order] = np.arange(len(item_order))
    asins = [str(a) for a in ivocab[item_order]]
    meta = read_meta(files, set(asins))
    if unknown := [a for a in asins if a not in meta]:
        raise DataError(f"{files.reviews}: {len(unknown)} reviewed items have no record in {files.meta} "
                        f"(e.g. {', '.join(unknown[:5])}); use both files of one release and category")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=len(users)))]).astype(np.int64)
    return Dataset(name=name, release=files.release, items=[meta[a] for a in asins],
                   user_ids=[str(x) for x in uvocab[users[np.argsort(unew[users])]]], seq_offsets=offsets,
                   seq_items=inew[i].astype(np.int64), seq_times=t.astype(np.int64),
                   protocol="time" if files.release == "2023" else "loo", source=str(files.reviews))


# ---- registry
SNAP14 = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
UCSD18 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
UCSD23 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/"

_URLS = {"2014": [SNAP14 + "reviews_{}_5.json.gz", SNAP14 + "meta_{}.json.gz"],  # {} = the category
         "2018": [UCSD18 + "categoryFilesSmall/{}_5.json.gz", UCSD18 + "metaFiles2/meta_{}.json.gz"],
         "2023": [UCSD23 + "review_categories/{}.jsonl.gz", UCSD23 + "meta_categories/meta_{}.jsonl.gz"]}
REGISTRY: dict[str, dict] = {
    name: {"release": r, "category": c, "urls": [u.format(c) for u in _URLS[r]]} for name, r, c in [
        ("beauty", "2014", "Beauty"), ("sports", "2014", "Sports_and_Outdoors"),
        ("toys", "2014", "Toys_and_Games"), ("scientific", "2018", "Industrial_and_Scientific"),
        ("baby", "2023", "Baby_Products"), ("games", "2023", "Video_Games"),
        ("beauty2023", "2023", "All_Beauty")]}


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> None:
    """Stream `url` into `dest` atomically, with a progress bar; a wrong sha256 is a ValueError (no file)."""
    from tqdm import tqdm

    def fetch(tmp):
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(dest).name, leave=False) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and h.hexdigest() != sha256:
            raise ValueError(f"{url}: sha256 {h.hexdigest()} != expected {sha256}; the download is corrupt "
                             f"or the upstream file changed")
    atomic_write(dest, fetch)


def fetch_named(name: str, data_dir: Path) -> Path:
    """data_dir/raw/<name>/ with the registered dataset's raw files (downloaded if missing)."""
    folder = data_dir / "raw" / name
    todo = [(u, p) for u in REGISTRY[name]["urls"] if not (p := folder / u.rsplit("/", 1)[1]).exists()]
    for url, path in todo:
        try:
            if os.environ.get("ENCODEREC_OFFLINE", "") not in ("", "0"):
                raise OSError("ENCODEREC_OFFLINE is set")
            download(url, path)
        except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: bad sha256
            files = "; ".join(f"{p} <- {u}" for u, p in todo)
            raise DataError(f"could not download {url} ({e}); place these files by hand: {files}; or pass "
                            f"their folder: --dataset PATH") from None
    return folder


def find_source(dataset: str, data_dir: Path) -> tuple[str, Path | None]:
    """A registered name or a folder -> (display name, folder); a registered name's folder is None."""
    p = Path(dataset).expanduser()
    if p.is_dir() and dataset.lower() in REGISTRY:
        raise DataError(f"--dataset {dataset} is both a registered name and a folder here: pass ./{dataset} "
                        f"for the folder, or run elsewhere for the registered dataset")
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise DataError(f"dataset folder {p}: permission denied")
        return p.resolve().name, p
    if p.exists():
        raise DataError(f"--dataset {dataset} is a file: pass the folder that holds the data files")
    key = dataset.lower()
    if key in REGISTRY:
        return key, None
    if os.sep in dataset or dataset.startswith("."):
        raise DataError(f"dataset folder {dataset} does not exist")
    raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(REGISTRY)} "
                    f"or a folder (LC-Rec layout or raw Amazon files)")


# ---- the prepared folder
def _json_text(value):
    """What data.load_lcrec cleans back to `value`: its HTML-unescaping is not idempotent, so text that
    still holds an entity ('&amp;' in a title) is written escaped once more."""
    if isinstance(value, tuple):
        return [_json_text(v) for v in value]
    if isinstance(value, str) and html.unescape(value) != value:
        return html.escape(value, quote=False)
    return value


def write_lcrec(ds: Dataset, folder: Path, record: dict) -> None:
    """`ds` as an LC-Rec folder that data.load_lcrec reads back to the same items, sequences and
    timestamps; `record` (what it was prepared from) goes to <name>.prepared.json. inter.json is written
    last: the folder counts as prepared only once the pair is complete."""
    stem = folder / ds.name

    def dump(suffix, obj):
        text = json.dumps(obj, allow_nan=False)
        atomic_write(f"{stem}.{suffix}.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    users = range(ds.n_users)
    dump("prepared", record)
    if ds.protocol == "time":  # (N,) -> per user, aligned with inter.json
        dump("time", {str(u): ds.seq_times[ds.seq_offsets[u]:ds.seq_offsets[u + 1]].tolist() for u in users})
    dump("item", {str(k): {f: _json_text(getattr(it, f)) for f in ITEM_FIELDS}
                  for k, it in enumerate(ds.items)})
    dump("inter", {str(u): ds.sequence(u).tolist() for u in users})
    back = data.load_lcrec(folder)
    if (bad := next((k for k, (a, b) in enumerate(zip(ds.items, back.items)) if a != b), None)) is not None:
        for suffix in ("inter", "item", "time"):
            Path(f"{stem}.{suffix}.json").unlink(missing_ok=True)
        raise DataError(f"{stem}.item.json: item {bad} reads back as {back.items[bad]}, not as prepared "
                        f"({ds.items[bad]}); its files were removed, report this")


def prepare(dataset: str, data_dir: str | Path = "data", kcore: int = 5,
            out: str | Path | None = None) -> Path:
    """The LC-Rec folder of `dataset`. A registered name (its raw files downloaded into
    data_dir/raw/<name>/ when missing) or a folder of raw Amazon files is processed into `out`, else
    data_dir/<name>/, unless that folder is already prepared; a folder holding an LC-Rec pair is itself."""
    data_dir = Path(data_dir)
    if dataset.lower() not in REGISTRY:  # a folder, or a name, that data.py loads as it is
        try:
            ready = data.resolve_source(dataset, data_dir)
        except DataError:
            ready = None
        if ready is not None:
            if out is not None or kcore != 5:
                raise DataError(f"{ready} is already an LC-Rec folder: --out and --kcore apply to raw files")
            return ready
    name, folder = find_source(dataset, data_dir)
    dest = Path(out) if out is not None else data_dir / name
    record = {"dataset": name if folder is None else str(folder.resolve()), "kcore": kcore}
    if find_lcrec(dest):
        known = dest / f"{name}.prepared.json"
        old = data.read_json(known) if known.is_file() else record  # a pair placed by hand: taken as is
        if old != record:
            raise DataError(f"{dest} was prepared from {json.dumps(old)[:200]}, not {json.dumps(record)}: "
                            f"pass --out DIR for this one, or delete {dest} to prepare it again")
        print(f"{dest}: up to date", file=sys.stderr)
        return dest
    folder = folder if folder is not None else fetch_named(name, data_dir)
    raw = find_raw(folder)
    if raw is None:
        raise DataError(f"{folder}: no LC-Rec pair (X.inter.json + X.item.json) and no raw Amazon files "
                        f"(reviews_X_5.json.gz, X_5.json.gz, X.csv or X.jsonl.gz, with meta_X.json[l].gz)")
    ds = process_raw(raw, name, kcore)
    write_lcrec(ds, dest, record)
    print(f"prepared {dest} from {raw.reviews} and {raw.meta}", file=sys.stderr)
    return dest


# ---- statistics
def stats_lines(ds: Dataset) -> list[str]:
    n, L, s = ds.n_items, ds.seq_lengths, ds.splits
    ic = np.bincount(ds.seq_items, minlength=n)

    def coverage(label, values, words=()):
        m = sum(v is None for v in values)
        mean = f", mean {np.mean(words):.1f} words" if words else ""
        return f"  {label:<14} missing {m:>7} of {n} ({m / n:.1%}){mean}"
    texts = {f"{k}_text": getattr(ds, f"{k}_texts")() for k in ("title", "document", "item")}
    return [f"users={ds.n_users} items={n} interactions={ds.n_interactions}",
            f"dataset={ds.name} release={ds.release} protocol={ds.protocol} fingerprint={ds.fingerprint}",
            "text coverage (items lacking the field):",
            *(coverage(f, [getattr(it, f) for it in ds.items]) for f in ITEM_FIELDS),
            *(coverage(k, t, [len(x.split()) for x in t if x]) for k, t in texts.items()),
            f"sequence length: min {L.min()} median {np.median(L):.0f} mean {L.mean():.2f} max {L.max()}",
            f"item frequency: min {ic.min()} median {np.median(ic):.0f} max {ic.max()}",
            f"splits: train examples {len(s.train)}, valid cases {len(s.valid)} ({s.valid.cold.sum()} "
            f"cold-start), test cases {len(s.test)} ({s.test.cold.sum()} cold-start)"]


def main(argv=None) -> int:
    ap = ev.one_line_errors(argparse.ArgumentParser(
        description="Prepare a dataset (raw Amazon files -> an LC-Rec folder), load it through the cache and "
        "describe it.", allow_abbrev=False))
    ap.add_argument("--dataset", required=True, help=f"{' | '.join(REGISTRY)} | PATH (raw files or LC-Rec)")
    ap.add_argument("--data-dir", default="data", help="download, prepared and cache folder (default ./data)")
    ap.add_argument("--out", help="the prepared folder (default <data-dir>/<name>)")
    ap.add_argument("--kcore", type=ev.COUNT, default=5, help="k-core for raw releases (default 5)")
    ap.add_argument("--stats", action="store_true", help="print counts, text coverage, lengths")
    ap.add_argument("--no-cache", action="store_true", help="ignore and do not write the cache")
    args = ap.parse_args(argv)
    try:
        t0 = time.perf_counter()
        folder = prepare(args.dataset, args.data_dir, args.kcore, args.out)
        ds = data.load_dataset(str(folder), args.data_dir, use_cache=not args.no_cache)
        elapsed = time.perf_counter() - t0
        print("\n".join(stats_lines(ds)) if args.stats
              else f"users={ds.n_users} items={ds.n_items} interactions={ds.n_interactions}")
        print(f"load time {elapsed:.2f}s", file=sys.stderr)
    except (Exception, KeyboardInterrupt) as e:
        return ev.cli_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
