"""Data layer: raw Amazon files (or an LC-Rec folder) -> catalog, sequences, splits, item text.

EncodeRec (arXiv 2601.10837) evaluates on Amazon review data under two protocols:

* Amazon 2014 (Beauty, Sports, Toys; the P5/TIGER data) and Amazon 2018 (Industrial_and_Scientific;
  UniSRec's downstream set): 5-core, chronological, leave-one-out (last item = test, second-to-last =
  valid, every earlier prefix -> next item = training examples).
* Amazon Reviews 2023 (BLaIR): one absolute-timestamp split for every domain.

Everything between the raw files and model-ready arrays lives here, with the standard library and
numpy only, so this file can be copied into another code base alone.

    ds = load_dataset("../shared/data/lcrec/Beauty")      # or a name: "beauty", "scientific", ...
    ds.n_users, ds.n_items, ds.n_interactions
    ds.splits.test.user, ds.splits.test.target             # one evaluation case per row
    hist, lens = ds.histories(ds.splits.test, max_len=50)  # (B, 50) item indices, -1 = padding
    ds.title_texts(), ds.document_texts(), ds.item_texts(("title", "categories"))

Command line: `python data.py --dataset D --stats` prints `users=U items=I interactions=N`, then the
text coverage and the sequence-length statistics.

Conventions (documented once, used everywhere):
* Item indices are 0-based rows of the catalog; a history pads with -1.
* Sequences are sorted by timestamp with a *stable* sort: interactions with the same timestamp keep
  the order in which they appear in the source file (LC-Rec folders are already sorted this way).
* Repeated (user, item) pairs keep the earliest interaction (ties: the first in the file).
* Raw releases number users by their first review in the file and items by their first appearance
  when walking the users' sorted sequences in user order (the P5 / LC-Rec numbering).
* Text fields are HTML-unescaped and whitespace-normalised; an empty field is missing (None).
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import html
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

CACHE_VERSION = 1  # bump when processing changes, so old caches are not reused
MAX_TEXT_CHARS = 5000  # cap per rendered text; far above what 256 WordPiece tokens cover
ITEM_FIELDS = ("asin", "title", "description", "features", "brand", "categories", "price")
TEXT_FIELDS = ("title", "description", "features", "brand", "categories", "price")
DOCUMENT_FIELDS = ("features", "description", "brand", "categories")  # the EncodeRec document
ITEM_TEXT_FIELDS = ("title", "categories", "brand")  # downstream text, UniSRec's order
# BLaIR's split of Amazon Reviews 2023 (ms): train < T1 <= valid < T2 <= test
BLAIR_T1, BLAIR_T2 = 1628643414042, 1658002729837


class DataError(Exception):
    """A problem with the user's data or options: the message names the file and the fix."""


# ----------------------------------------------------------------------------- item records
@dataclass(frozen=True)
class Item:
    """One catalog item. A field the source does not have is None, never invented."""
    asin: str | None = None
    title: str | None = None
    description: str | None = None
    features: tuple[str, ...] | None = None
    brand: str | None = None
    categories: tuple[str, ...] | None = None
    price: float | None = None


def clean_text(value) -> str | None:
    """HTML-unescape and collapse whitespace; empty -> None. Lists are joined with spaces."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v is not None)
    text = " ".join(html.unescape(str(value)).split())
    return text or None


def clean_list(values) -> tuple[str, ...] | None:
    """A list of strings (possibly nested one level, as 2014 categories are) -> cleaned, deduped."""
    if not values:
        return None
    flat = []
    for v in values:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    out = []
    for v in flat:
        t = clean_text(v)
        if t is not None and t not in out:
            out.append(t)
    return tuple(out) or None


def parse_price(value) -> float | None:
    """Prices come as floats (2014, 2023) or strings like '$12.99' (2018); ranges -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if np.isfinite(value) else None
    m = re.fullmatch(r"\s*\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*", str(value))
    return float(m.group(1).replace(",", "")) if m else None


def split_categories(value: str) -> tuple[str, ...] | None:
    """LC-Rec joins categories into one string: 'A, B, C' (Beauty) or 'A,B, with comma,C' (Scientific).

    When some comma is directly followed by a non-space, that is the separator and ', ' belongs to
    a name ('Tapes, Adhesives & Sealants'); otherwise the separator is ', '.
    """
    if not value or not value.strip():
        return None
    parts = re.split(r",(?=\S)", value) if re.search(r",\S", value) else value.split(", ")
    return clean_list(parts)


def render_text(item: Item, fields: Sequence[str], max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """Concatenate the item's fields in the given order; None when every field is missing.

    Lists (features, categories) are joined with ', '; parts are joined with '. ' unless a part
    already ends in punctuation. One field alone is returned exactly (after the length cap).
    """
    parts = []
    for name in fields:
        if name not in TEXT_FIELDS:
            raise DataError(f"unknown text field {name!r}; choose from {', '.join(TEXT_FIELDS)}")
        value = getattr(item, name)
        if value is None:
            continue
        if name == "price":
            value = f"${value:.2f}"
        elif isinstance(value, tuple):
            value = ", ".join(value)
        parts.append(value)
    if not parts:
        return None
    text = parts[0]
    for p in parts[1:]:
        text += (" " if text[-1] in ".!?;:" else ". ") + p
    if len(text) > max_chars:  # cut at a word boundary
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


# ----------------------------------------------------------------------------- splits
@dataclass
class Cases:
    """Evaluation or training cases: the history of `user` is its first `pos` items, the target
    is the item at `pos`. `cold` marks targets that never occur in the training interactions."""
    user: np.ndarray    # (C,) int64
    pos: np.ndarray     # (C,) int64, position of the target in the user's sequence
    target: np.ndarray  # (C,) int64 item index
    cold: np.ndarray    # (C,) bool

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, index) -> "Cases":
        return Cases(self.user[index], self.pos[index], self.target[index], self.cold[index])


@dataclass
class Splits:
    train: Cases      # every training prefix -> next item
    valid: Cases
    test: Cases
    train_items: np.ndarray  # (I,) bool: item occurs in the training interactions


# ----------------------------------------------------------------------------- the dataset
@dataclass
class Dataset:
    """A catalog plus chronological per-user sequences stored flat (CSR layout)."""
    name: str
    release: str                 # 'lcrec' | '2014' | '2018' | '2023'
    items: list[Item]
    user_ids: list[str]
    seq_offsets: np.ndarray      # (U+1,) int64: user u's items are seq_items[off[u]:off[u+1]]
    seq_items: np.ndarray        # (N,) int64 item indices, chronological per user
    seq_times: np.ndarray | None = None  # (N,) int64 timestamps (s, or ms for 2023), if known
    protocol: str = "loo"        # 'loo' (leave-one-out) | 'time' (BLaIR absolute timestamps)
    fingerprint: str = ""
    source: str = ""

    @property
    def n_users(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_interactions(self) -> int:
        return len(self.seq_items)

    @property
    def seq_lengths(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    def sequence(self, u: int) -> np.ndarray:
        return self.seq_items[self.seq_offsets[u]:self.seq_offsets[u + 1]]

    @cached_property
    def splits(self) -> Splits:
        return loo_splits(self) if self.protocol == "loo" else time_splits(self)

    def histories(self, cases: Cases, max_len: int, pad: int = -1,
                  align: str = "right") -> tuple[np.ndarray, np.ndarray]:
        """Padded histories of the cases: the last `max_len` items before each target.

        align='right' puts the most recent item in the last column (left padding);
        align='left' starts every row at column 0. Returns (B, max_len) int64 and lengths (B,).
        """
        lengths = np.minimum(cases.pos, max_len)                        # (B,)
        start = self.seq_offsets[cases.user] + cases.pos - lengths      # (B,) flat index of 1st item
        cols = np.arange(max_len)[None, :]                              # (1, L)
        if align == "right":
            rel = cols - (max_len - lengths)[:, None]                   # (B, L), <0 = padding
        elif align == "left":
            rel = np.broadcast_to(cols, (len(cases), max_len))
        else:
            raise ValueError("align must be 'right' or 'left'")
        valid = (rel >= 0) & (rel < lengths[:, None])
        flat = np.where(valid, start[:, None] + rel, 0)
        out = np.where(valid, self.seq_items[flat], pad)                # (B, L)
        return out.astype(np.int64), lengths.astype(np.int64)

    # -- item text
    def title_texts(self) -> list[str | None]:
        """The EncodeRec query of each item."""
        return [render_text(it, ("title",)) for it in self.items]

    def document_texts(self, fields: Sequence[str] = DOCUMENT_FIELDS) -> list[str | None]:
        """The EncodeRec document: features + description + attributes (brand, categories)."""
        return [render_text(it, fields) for it in self.items]

    def item_texts(self, fields: Sequence[str] = ITEM_TEXT_FIELDS) -> list[str | None]:
        """What downstream item embeddings see."""
        return [render_text(it, fields) for it in self.items]


def _cases(ds: Dataset, users: np.ndarray, pos: np.ndarray, train_items: np.ndarray) -> Cases:
    target = ds.seq_items[ds.seq_offsets[users] + pos]
    return Cases(users.astype(np.int64), pos.astype(np.int64), target.astype(np.int64),
                 ~train_items[target])


def _positions(lengths: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (user, pos) with lo[u] <= pos < hi[u], vectorised."""
    counts = np.maximum(hi - lo, 0)
    users = np.repeat(np.arange(len(lengths)), counts)
    first = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    pos = np.arange(counts.sum()) + first
    return users, pos


def loo_splits(ds: Dataset) -> Splits:
    """Leave-one-out: test = last item, valid = second-to-last, training examples are the targets
    at positions 1..n-3 (every earlier prefix -> next item). A user with fewer than 3 items has no
    valid case (and with 1 item no test case)."""
    n = ds.seq_lengths
    users = np.arange(ds.n_users)
    train_end = np.where(n >= 3, n - 2, np.minimum(n, 1))            # items [0, train_end) are train
    user_of = np.repeat(users, n)                                     # (N,)
    pos_of = np.arange(ds.n_interactions) - ds.seq_offsets[user_of]   # (N,)
    train_items = np.zeros(ds.n_items, dtype=bool)
    train_items[ds.seq_items[pos_of < train_end[user_of]]] = True
    tu, tp = _positions(n, np.ones_like(n), n - 2)
    has_valid, has_test = n >= 3, n >= 2
    return Splits(
        train=_cases(ds, tu, tp, train_items),
        valid=_cases(ds, users[has_valid], n[has_valid] - 2, train_items),
        test=_cases(ds, users[has_test], n[has_test] - 1, train_items),
        train_items=train_items,
    )


def time_splits(ds: Dataset, t1: int = BLAIR_T1, t2: int = BLAIR_T2) -> Splits:
    """BLaIR's absolute-timestamp split (Amazon Reviews 2023, timestamps in ms): an interaction
    with time < t1 is training, t1 <= time < t2 validation, time >= t2 test. Every interaction
    after a user's first is one case whose history is all of that user's earlier interactions."""
    if ds.seq_times is None:
        raise DataError(f"dataset {ds.name} has no timestamps: the time split needs them")
    t = ds.seq_times
    user_of = np.repeat(np.arange(ds.n_users), ds.seq_lengths)
    pos_of = np.arange(ds.n_interactions) - ds.seq_offsets[user_of]
    train_items = np.zeros(ds.n_items, dtype=bool)
    train_items[ds.seq_items[t < t1]] = True
    has_hist = pos_of >= 1

    def pick(mask):
        return _cases(ds, user_of[mask & has_hist], pos_of[mask & has_hist], train_items)
    return Splits(train=pick(t < t1), valid=pick((t >= t1) & (t < t2)), test=pick(t >= t2),
                  train_items=train_items)


# ----------------------------------------------------------------------------- reading files
def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_lines(path: Path, parse: Callable[[str], object]) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed record) for every non-empty line; bad input -> DataError."""
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = parse(line)
                except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                    raise DataError(f"{path}:{lineno}: malformed record ({type(e).__name__}: "
                                    f"{str(e)[:120]}). Fix or re-download the file.") from None
                if not isinstance(rec, (dict, list)):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield lineno, rec
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip after line {lineno} ({e}). "
                        f"Delete the file and download it again.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None


def _require(rec: dict, keys: Sequence[str], path: Path, lineno: int) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object (a record with keys), got a "
                        f"{type(rec).__name__}")
    missing = [k for k in keys if rec.get(k) in (None, "")]
    if missing:
        raise DataError(f"{path}:{lineno}: record lacks {', '.join(missing)} "
                        f"(keys present: {', '.join(sorted(rec)[:12])})")


def _read_json(path: Path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None


# ----------------------------------------------------------------------------- LC-Rec folders
def find_lcrec(folder: Path) -> tuple[Path, Path] | None:
    inters = sorted(folder.glob("*.inter.json"))
    for inter in inters:
        item = inter.with_name(inter.name[: -len(".inter.json")] + ".item.json")
        if item.exists():
            return inter, item
    return None


def load_lcrec(folder: Path) -> Dataset:
    """`X.inter.json` ({user_idx: [item_idx, ...]}, chronological) + `X.item.json`
    ({item_idx: {field: value}}). Already processed: loaded as is, never re-filtered."""
    found = find_lcrec(folder)
    if found is None:
        raise DataError(f"{folder}: no X.inter.json + X.item.json pair")
    inter_path, item_path = found
    raw_items, raw_inter = _read_json(item_path), _read_json(inter_path)
    if not isinstance(raw_items, dict) or not isinstance(raw_inter, dict):
        raise DataError(f"{folder}: item.json and inter.json must each hold one JSON object")
    try:
        keys = sorted(int(k) for k in raw_items)
    except ValueError:
        raise DataError(f"{item_path}: keys must be integer item indices") from None
    if keys != list(range(len(keys))):
        raise DataError(f"{item_path}: item indices must be 0..{len(keys) - 1} without gaps")
    items = []
    for k in range(len(keys)):
        r = raw_items[str(k)]
        if not isinstance(r, dict):
            raise DataError(f"{item_path}: item {k} is not an object")
        cats = r.get("categories")
        items.append(Item(
            asin=clean_text(r.get("asin")),
            title=clean_text(r.get("title")),
            description=clean_text(r.get("description")),
            features=clean_list(r.get("features") or r.get("feature")),
            brand=clean_text(r.get("brand")),
            categories=split_categories(cats) if isinstance(cats, str) else clean_list(cats),
            price=parse_price(r.get("price")),
        ))
    try:
        user_keys = sorted(raw_inter, key=int)
    except ValueError:
        raise DataError(f"{inter_path}: keys must be integer user indices") from None
    seqs = [raw_inter[u] for u in user_keys]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=int(lengths.sum())) \
        if len(seqs) else np.zeros(0, np.int64)
    bad = (flat < 0) | (flat >= len(items))
    if bad.any():
        uniq = np.unique(flat[bad])
        raise DataError(f"{inter_path}: {bad.sum()} interactions reference {len(uniq)} item indices "
                        f"missing from {item_path.name} (e.g. {uniq[:5].tolist()})")
    if len(flat) == 0:
        raise DataError(f"{inter_path}: the dataset is empty (no interactions)")
    return Dataset(name=folder.name, release="lcrec", items=items, user_ids=user_keys,
                   seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   seq_items=flat, protocol="loo", source=str(folder))


# ----------------------------------------------------------------------------- raw releases
@dataclass
class RawFiles:
    release: str       # '2014' | '2018' | '2023'
    reviews: Path
    meta: Path


def find_raw(folder: Path) -> RawFiles | None:
    """Recognise a folder of raw Amazon files by the release's file names."""
    def first(patterns):
        for p in patterns:
            hits = sorted(folder.glob(p))
            if hits:
                return hits[0]
        return None
    r14 = first(["reviews_*_5.json.gz", "reviews_*_5.json"])
    if r14 is not None:
        cat = r14.name[len("reviews_"):].split("_5.json")[0]
        meta = first([f"meta_{cat}.json.gz", f"meta_{cat}.json"])
        return RawFiles("2014", r14, meta) if meta else None
    meta23 = first(["meta_*.jsonl.gz", "meta_*.jsonl"])
    if meta23 is not None:
        cat = meta23.name[len("meta_"):].split(".jsonl")[0]
        rev = first([f"{cat}.jsonl.gz", f"{cat}.jsonl"])
        return RawFiles("2023", rev, meta23) if rev else None
    meta18 = first(["meta_*.json.gz", "meta_*.json"])
    if meta18 is not None:
        cat = meta18.name[len("meta_"):].split(".json")[0]
        rev = first([f"{cat}_5.json.gz", f"{cat}_5.json", f"{cat}.csv"])
        return RawFiles("2018", rev, meta18) if rev else None
    return None


def _parse_csv_rating(line: str):
    parts = line.rstrip("\n").split(",")
    if len(parts) != 4:
        raise ValueError(f"expected 4 comma-separated fields item,user,rating,timestamp, got {len(parts)}")
    return {"asin": parts[0], "reviewerID": parts[1], "unixReviewTime": int(parts[3])}


def read_reviews(files: RawFiles) -> tuple[list[str], list[str], np.ndarray]:
    """(user ids, item ids, timestamps) in file order."""
    path = files.reviews
    if files.release == "2023":
        ukey, ikey, tkey, parse = "user_id", "parent_asin", "timestamp", json.loads
    elif path.suffix == ".csv":
        ukey, ikey, tkey, parse = "reviewerID", "asin", "unixReviewTime", _parse_csv_rating
    else:
        ukey, ikey, tkey, parse = "reviewerID", "asin", "unixReviewTime", json.loads
    users, items, times = [], [], []
    for lineno, rec in read_lines(path, parse):
        _require(rec, (ukey, ikey, tkey), path, lineno)
        try:
            t = int(rec[tkey])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{lineno}: {tkey} is not an integer: {rec[tkey]!r}") from None
        users.append(str(rec[ukey]))
        items.append(str(rec[ikey]))
        times.append(t)
    if not users:
        raise DataError(f"{path}: no reviews in the file")
    return users, items, np.array(times, dtype=np.int64)


def read_meta(files: RawFiles, wanted: set[str]) -> dict[str, Item]:
    """Item records for the wanted asins. 2014 meta lines are Python literals (ast.literal_eval,
    never eval); 2018 and 2023 lines are JSON. The first record of a repeated asin wins."""
    path = files.meta
    parse = ast.literal_eval if files.release == "2014" else json.loads
    key = "parent_asin" if files.release == "2023" else "asin"
    out: dict[str, Item] = {}
    for lineno, r in read_lines(path, parse):
        _require(r, (key,), path, lineno)
        asin = str(r[key])
        if asin not in wanted or asin in out:
            continue
        if files.release == "2014":
            item = Item(asin=asin, title=clean_text(r.get("title")),
                        description=clean_text(r.get("description")), features=None,
                        brand=clean_text(r.get("brand")), categories=clean_list(r.get("categories")),
                        price=parse_price(r.get("price")))
        elif files.release == "2018":
            item = Item(asin=asin, title=clean_text(r.get("title")),
                        description=clean_text(r.get("description")),
                        features=clean_list(r.get("feature")), brand=clean_text(r.get("brand")),
                        categories=clean_list(r.get("category")), price=parse_price(r.get("price")))
        else:
            details = r.get("details") if isinstance(r.get("details"), dict) else {}
            item = Item(asin=asin, title=clean_text(r.get("title")),
                        description=clean_text(r.get("description")),
                        features=clean_list(r.get("features")),
                        brand=clean_text(details.get("Brand") or r.get("store")),
                        categories=clean_list(r.get("categories")), price=parse_price(r.get("price")))
        out[asin] = item
    return out


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Iterative k-core: drop users and items with fewer than k interactions until none is left.
    Returns a boolean mask over the interactions."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        uc = np.bincount(users[keep], minlength=users.max() + 1)
        ic = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (uc[users] >= k) & (ic[items] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def process_raw(files: RawFiles, name: str, kcore: int = 5) -> Dataset:
    """Reviews + meta -> deduplicated, k-core filtered, chronologically sorted sequences."""
    user_ids, item_ids, times = read_reviews(files)
    uvocab, uidx = np.unique(np.array(user_ids), return_inverse=True)
    ivocab, iidx = np.unique(np.array(item_ids), return_inverse=True)
    n_raw = len(uidx)
    order = np.arange(n_raw)
    # dedupe (user, item): keep the earliest, ties -> first in the file
    o = np.lexsort((order, times, iidx, uidx))
    pair = uidx[o].astype(np.int64) * len(ivocab) + iidx[o]
    first = np.ones(len(o), dtype=bool)
    first[1:] = pair[1:] != pair[:-1]
    keep = np.zeros(n_raw, dtype=bool)
    keep[o[first]] = True
    sel = np.flatnonzero(keep)
    if kcore > 1:
        sel = sel[k_core(uidx[sel], iidx[sel], kcore)]
    if len(sel) == 0:
        raise DataError(f"{files.reviews}: no interactions left after {kcore}-core filtering "
                        f"({n_raw} reviews in the file). Use a larger file or a smaller --kcore.")
    u, i, t, fo = uidx[sel], iidx[sel], times[sel], order[sel]
    # users numbered by their first review in the file; stable chronological sort inside a user
    first_seen = np.full(len(uvocab), n_raw)
    np.minimum.at(first_seen, u, fo)
    urank = np.argsort(np.argsort(first_seen[np.unique(u)], kind="stable"), kind="stable")
    unew = np.full(len(uvocab), -1)
    unew[np.unique(u)] = urank
    u = unew[u]
    o = np.lexsort((fo, t, u))
    u, i, t = u[o], i[o], t[o]
    # items numbered by first appearance along the sorted sequences
    _, first_pos = np.unique(i, return_index=True)
    present = np.unique(i)
    item_order = present[np.argsort(first_pos, kind="stable")]
    inew = np.full(len(ivocab), -1)
    inew[item_order] = np.arange(len(item_order))
    asins = [str(a) for a in ivocab[item_order]]
    meta = read_meta(files, set(asins))
    unknown = [a for a in asins if a not in meta]
    if unknown:
        raise DataError(f"{files.reviews}: {len(unknown)} reviewed items have no record in "
                        f"{files.meta} (e.g. {', '.join(unknown[:5])}). The two files must come "
                        f"from the same release and category.")
    n_users = int(u.max()) + 1
    offsets = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=n_users))]).astype(np.int64)
    kept = np.flatnonzero(unew >= 0)
    user_list = np.empty(n_users, dtype=object)
    user_list[unew[kept]] = uvocab[kept]
    return Dataset(name=name, release=files.release, items=[meta[a] for a in asins],
                   user_ids=[str(x) for x in user_list], seq_offsets=offsets,
                   seq_items=inew[i].astype(np.int64), seq_times=t.astype(np.int64),
                   protocol="time" if files.release == "2023" else "loo", source=str(files.reviews))


# ----------------------------------------------------------------------------- registry
SNAP14 = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
UCSD18 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/"
UCSD23 = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/"


def _urls14(cat):
    return [SNAP14 + f"reviews_{cat}_5.json.gz", SNAP14 + f"meta_{cat}.json.gz"]


def _urls23(cat):
    return [UCSD23 + f"review_categories/{cat}.jsonl.gz", UCSD23 + f"meta_categories/meta_{cat}.jsonl.gz"]


REGISTRY: dict[str, dict] = {
    "beauty": {"release": "2014", "category": "Beauty", "urls": _urls14("Beauty")},
    "sports": {"release": "2014", "category": "Sports_and_Outdoors", "urls": _urls14("Sports_and_Outdoors")},
    "toys": {"release": "2014", "category": "Toys_and_Games", "urls": _urls14("Toys_and_Games")},
    "scientific": {"release": "2018", "category": "Industrial_and_Scientific",
                   "urls": [UCSD18 + "categoryFilesSmall/Industrial_and_Scientific_5.json.gz",
                            UCSD18 + "metaFiles2/meta_Industrial_and_Scientific.json.gz"]},
    "baby": {"release": "2023", "category": "Baby_Products", "urls": _urls23("Baby_Products")},
    "games": {"release": "2023", "category": "Video_Games", "urls": _urls23("Video_Games")},
    "beauty2023": {"release": "2023", "category": "All_Beauty", "urls": _urls23("All_Beauty")},
}


# Copied from trainer.atomic_write (keeps this file copyable alone)
def atomic_write(path, write) -> Path:
    """write(tmp) into a temp file beside `path`, then rename it onto `path`: a crash or a kill never
    leaves half a file under the real name (at worst a stray `.name.*.part` that nothing reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> None:
    """Stream `url` into `dest` with a progress bar, atomically; a sha256 other than the given one is a
    ValueError (and leaves no file)."""
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
            raise ValueError(f"{url}: sha256 {h.hexdigest()} != expected {sha256}; the download is corrupt or "
                             f"the upstream file changed")
    atomic_write(dest, fetch)


def fetch_named(name: str, data_dir: Path) -> Path:
    """Make sure the raw files of a registered dataset are in data_dir/raw/<name>/; return it."""
    entry = REGISTRY[name]
    folder = data_dir / "raw" / name
    todo = [(u, folder / u.rsplit("/", 1)[1]) for u in entry["urls"]]
    if find_lcrec(folder):  # an LC-Rec copy of the dataset placed there by hand
        return folder
    todo = [(u, p) for u, p in todo if not p.exists()]
    offline = os.environ.get("ENCODEREC_OFFLINE", "") not in ("", "0")
    for url, path in todo:
        try:
            if offline:
                raise OSError("ENCODEREC_OFFLINE is set")
            download(url, path)
        except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: a bad sha256
            lines = "\n".join(f"  {p}   <- {u}" for u, p in todo)
            raise DataError(f"could not download {url} ({e}).\nPlace these files by hand:\n{lines}\n"
                            f"or pass a folder that holds them: --dataset PATH") from None
    return folder


# ----------------------------------------------------------------------------- loading + cache
def parse_fields(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list of text fields (a CLI flag) -> a tuple; None -> `default`."""
    if text is None:
        return tuple(default)
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in fields if f not in TEXT_FIELDS]
    if bad or not fields:
        raise DataError(f"unknown field(s) {', '.join(bad) or text!r}; choose from {', '.join(TEXT_FIELDS)}")
    return fields


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(paths: Sequence[Path], options: dict, memo: Path | None = None) -> str:
    """Identity of a dataset's inputs: the processing options and each file's name and CONTENT, so
    a copied or re-provisioned folder (new paths, new mtimes, same bytes) keeps its fingerprint and
    every stage keyed on it stays up to date, while any edit to the data changes it. With `memo` (a
    JSON file) each file's sha256 is remembered per (path, size, mtime), so an unchanged multi-GB raw
    file is read once, not at every load."""
    known: dict = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "options": options}, sort_keys=True).encode())
    new = False
    for p in sorted(paths, key=lambda q: q.name):
        st = p.stat()
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in known:
            known[key], new = file_sha256(p), True
        h.update(f"{p.name}|{known[key]}".encode())
    if memo is not None and new:
        try:
            atomic_write(memo, lambda tmp: Path(tmp).write_text(json.dumps(known)))
        except OSError:
            pass  # a read-only data dir only costs a re-read next time
    return h.hexdigest()[:16]


def _save_cache(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"name": ds.name, "release": ds.release, "protocol": ds.protocol, "source": ds.source,
              "fingerprint": ds.fingerprint, "user_ids": ds.user_ids,
              "items": [[getattr(it, f) for f in ITEM_FIELDS] for it in ds.items]}
    arrays = {"seq_offsets": ds.seq_offsets, "seq_items": ds.seq_items.astype(np.int32),
              "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    if ds.seq_times is not None:
        arrays["seq_times"] = ds.seq_times

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
    atomic_write(path, save)


def _load_cache(path: Path) -> Dataset:
    with np.load(path) as z:
        header = json.loads(z["header"].tobytes())
        times = z["seq_times"] if "seq_times" in z.files else None
        offsets, seq = z["seq_offsets"], z["seq_items"].astype(np.int64)

    def item(row):
        d = dict(zip(ITEM_FIELDS, row))
        for f in ("features", "categories"):
            d[f] = tuple(d[f]) if d[f] is not None else None
        return Item(**d)
    return Dataset(name=header["name"], release=header["release"],
                   items=[item(r) for r in header["items"]], user_ids=header["user_ids"],
                   seq_offsets=offsets, seq_items=seq, seq_times=times, protocol=header["protocol"],
                   fingerprint=header["fingerprint"], source=header["source"])


def resolve_source(dataset: str, data_dir: Path) -> tuple[str, Path]:
    """A registered name or a folder path -> (display name, folder)."""
    p = Path(dataset).expanduser()
    if p.is_dir():
        return p.resolve().name, p
    key = dataset.lower()
    if key in REGISTRY:
        return key, fetch_named(key, data_dir)
    if os.sep in dataset or dataset.startswith("."):
        raise DataError(f"dataset folder {dataset} does not exist")
    raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(REGISTRY)} "
                    f"or the path of a folder (LC-Rec layout or raw Amazon files)")


def load_dataset(dataset: str, data_dir: str | Path = "data", kcore: int = 5,
                 protocol: str | None = None, use_cache: bool = True, verbose: bool = False) -> Dataset:
    """Load a registered dataset (downloaded on first use) or a folder, through the cache.

    kcore applies to raw releases only (LC-Rec folders are already processed). protocol overrides
    the release's split ('loo' or 'time').
    """
    data_dir = Path(data_dir)
    name, folder = resolve_source(dataset, data_dir)
    lc = find_lcrec(folder)
    raw = None if lc else find_raw(folder)
    if lc is None and raw is None:
        raise DataError(f"{folder}: found neither an LC-Rec pair (X.inter.json + X.item.json) nor "
                        f"raw Amazon files (reviews_X_5.json.gz + meta_X.json.gz for 2014; "
                        f"X_5.json.gz or X.csv + meta_X.json.gz for 2018; X.jsonl.gz + "
                        f"meta_X.jsonl.gz for 2023)")
    paths = list(lc) if lc else [raw.reviews, raw.meta]
    options = {"kcore": kcore if raw else None, "protocol": protocol}
    fp = _fingerprint(paths, options, data_dir / "processed" / "digests.json")
    cache = data_dir / "processed" / f"{name}-{fp}.npz"
    t0 = time.perf_counter()
    if use_cache and cache.exists():
        try:
            ds = _load_cache(cache)
            if verbose:
                print(f"loaded {cache} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
            return ds
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache: rebuild it below
    ds = load_lcrec(folder) if lc else process_raw(raw, name, kcore)
    ds.name = name
    if protocol is not None:
        if protocol not in ("loo", "time"):
            raise DataError(f"unknown protocol {protocol!r}: use 'loo' or 'time'")
        ds.protocol = protocol
    ds.fingerprint = fp
    if use_cache:
        try:
            _save_cache(ds, cache)
        except OSError as e:
            print(f"warning: could not write the cache {cache}: {e}", file=sys.stderr)
    if verbose:
        print(f"processed {folder} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return ds


# ----------------------------------------------------------------------------- statistics
def stats_lines(ds: Dataset) -> list[str]:
    lines = [f"users={ds.n_users} items={ds.n_items} interactions={ds.n_interactions}"]
    n = ds.n_items
    lines.append(f"dataset={ds.name} release={ds.release} protocol={ds.protocol} fingerprint={ds.fingerprint}")
    lines.append("text coverage (items lacking the field):")
    for f in ITEM_FIELDS:
        missing = sum(getattr(it, f) is None for it in ds.items)
        lines.append(f"  {f:<14} missing {missing:>7} of {n} ({missing / n:.1%})")
    for label, texts in (("title_text", ds.title_texts()), ("document_text", ds.document_texts()),
                         ("item_text", ds.item_texts())):
        missing = sum(t is None for t in texts)
        words = [len(t.split()) for t in texts if t]
        mean = f", mean {np.mean(words):.1f} words" if words else ""
        lines.append(f"  {label:<14} missing {missing:>7} of {n} ({missing / n:.1%}){mean}")
    L = ds.seq_lengths
    lines.append(f"sequence length: min {L.min()} median {np.median(L):.0f} mean {L.mean():.2f} "
                 f"max {L.max()}")
    ic = np.bincount(ds.seq_items, minlength=n)
    lines.append(f"item frequency: min {ic.min()} median {np.median(ic):.0f} max {ic.max()}")
    s = ds.splits
    lines.append(f"splits: train examples {len(s.train)}, valid cases {len(s.valid)} "
                 f"({s.valid.cold.sum()} cold-start), test cases {len(s.test)} "
                 f"({s.test.cold.sum()} cold-start)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Load a dataset through the cache and describe it.")
    ap.add_argument("--dataset", required=True, help=f"{' | '.join(REGISTRY)} | PATH")
    ap.add_argument("--data-dir", default="data", help="download and cache folder (default ./data)")
    ap.add_argument("--kcore", type=int, default=5, help="k-core for raw releases (default 5)")
    ap.add_argument("--protocol", choices=["loo", "time"], default=None, help="override the split")
    ap.add_argument("--stats", action="store_true", help="print counts, text coverage, lengths")
    ap.add_argument("--no-cache", action="store_true", help="ignore and do not write the cache")
    args = ap.parse_args(argv)
    try:
        t0 = time.perf_counter()
        ds = load_dataset(args.dataset, args.data_dir, kcore=args.kcore, protocol=args.protocol,
                          use_cache=not args.no_cache)
        elapsed = time.perf_counter() - t0
        if args.stats:
            print("\n".join(stats_lines(ds)))
        else:
            print(f"users={ds.n_users} items={ds.n_items} interactions={ds.n_interactions}")
        print(f"load time {elapsed:.2f}s", file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
