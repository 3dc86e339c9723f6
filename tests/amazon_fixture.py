"""A tiny hand-made Amazon catalog written in the LC-Rec layout data.py reads and the three raw release
formats (2014, 2018 with its csv variant, 2023) that scripts/prepare_data.py prepares.

The reviews below are in *file order* and exercise every processing rule:
  * u7 has 2 reviews -> dropped by the 5-core;
  * u8 reviews G, which nobody else reviews -> G dropped, then u8 has 4 -> dropped (cascade);
  * u2 reviews A twice -> the later one is a duplicate and goes;
  * u1's reviews appear newest first -> the chronological sort must reorder them;
  * u3 reviews B and A at the same second, B first in the file -> the tie keeps file order.

Expected result, worked out by hand (EXPECTED_INTER / EXPECTED_ITEMS below):
  users in order of their first review in the file: u4, u2, u1, u6, u3, u5  (u7, u8 dropped)
  sequences: u4 F E D B A | u2 B A D C F | u1 A B C D E | u6 B C D E F | u3 C B A E F | u5 A C D E F
  items in order of first appearance along those sequences: F E D B A C -> 0 1 2 3 4 5
"""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

REVIEWS = [  # (user, asin, unix seconds) in file order
    ("u4", "F", 10), ("u4", "E", 20), ("u4", "D", 30), ("u4", "B", 40), ("u4", "A", 50),
    ("u7", "A", 5), ("u7", "B", 6),
    ("u2", "B", 110), ("u2", "A", 120), ("u2", "D", 130), ("u2", "C", 140), ("u2", "F", 150),
    ("u2", "A", 160),
    ("u8", "A", 7), ("u8", "B", 8), ("u8", "C", 9), ("u8", "D", 10), ("u8", "G", 11),
    ("u1", "E", 500), ("u1", "D", 400), ("u1", "C", 300), ("u1", "B", 200), ("u1", "A", 100),
    ("u6", "B", 1), ("u6", "C", 2), ("u6", "D", 3), ("u6", "E", 4), ("u6", "F", 5),
    ("u3", "C", 50), ("u3", "B", 60), ("u3", "A", 60), ("u3", "E", 70), ("u3", "F", 80),
    ("u5", "A", 500), ("u5", "C", 600), ("u5", "D", 700), ("u5", "E", 800), ("u5", "F", 900),
]

# Canonical item content; None = the source has no such field.
META = {
    "A": dict(title="Alpha Lip Balm", description=["Soft &amp; gentle.", "Lasts all day."],
              brand="Acme", categories=["Beauty", "Lips"], price=12.5),
    "B": dict(title="Beta  Nail\tPolish", description=["Red."], brand=None,
              categories=["Beauty", "Nails"], price=None),
    "C": dict(title=None, description=["No title here."], brand="Cee",
              categories=["Beauty", "Skin Care, Face"], price=3.0),
    "D": dict(title="Delta Shampoo", description=None, brand="Dee", categories=None, price=7.25),
    "E": dict(title="Epsilon Brush", description=["A brush."], brand="Eee",
              categories=["Beauty", "Tools"], price=None),
    "F": dict(title="Phi Cream", description=["Rich cream."], brand="Eff",
              categories=["Beauty", "Skin Care, Face"], price=20.0),
    "G": dict(title="Gamma (only u8)", description=None, brand=None, categories=None, price=None),
    "Z": dict(title="Never reviewed", description=None, brand=None, categories=None, price=None),
}

EXPECTED_ASINS = ["F", "E", "D", "B", "A", "C"]
EXPECTED_USERS = ["u4", "u2", "u1", "u6", "u3", "u5"]
EXPECTED_INTER = {"0": [0, 1, 2, 3, 4], "1": [3, 4, 2, 5, 0], "2": [4, 3, 5, 2, 1],
                  "3": [3, 5, 2, 1, 0], "4": [5, 3, 4, 1, 0], "5": [4, 5, 2, 1, 0]}
EXPECTED_TITLES = ["Phi Cream", "Epsilon Brush", "Delta Shampoo", "Beta Nail Polish",
                   "Alpha Lip Balm", None]


def _gz_lines(path: Path, lines) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def write_lcrec(folder: Path) -> Path:
    """The expected result in the LC-Rec layout (what LC-Rec/LETTER would ship)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = {}
    for idx, asin in enumerate(EXPECTED_ASINS):
        m = META[asin]
        rec = {"asin": asin, "title": m["title"] or "",
               "description": " ".join(m["description"]) if m["description"] else "",
               "brand": m["brand"] or "", "categories": ",".join(m["categories"] or [])}
        if m["price"] is not None:
            rec["price"] = m["price"]
        items[str(idx)] = rec
    (folder / "Fix.item.json").write_text(json.dumps(items))
    (folder / "Fix.inter.json").write_text(json.dumps(EXPECTED_INTER))
    return folder


def write_2014(folder: Path) -> Path:
    """reviews_X_5.json.gz (JSON lines) + meta_X.json.gz (Python literals, as SNAP ships it)."""
    folder.mkdir(parents=True, exist_ok=True)
    _gz_lines(folder / "reviews_Fix_5.json.gz",
              [json.dumps({"reviewerID": u, "asin": a, "overall": 5.0, "unixReviewTime": t,
                           "reviewText": "ok"}) for u, a, t in REVIEWS])
    metas = []
    for asin, m in META.items():
        rec = {"asin": asin, "imUrl": "http://example/x.jpg"}
        if m["title"] is not None:
            rec["title"] = m["title"]
        if m["description"] is not None:
            rec["description"] = " ".join(m["description"])
        if m["brand"] is not None:
            rec["brand"] = m["brand"]
        if m["categories"] is not None:
            rec["categories"] = [m["categories"]]
        if m["price"] is not None:
            rec["price"] = m["price"]
        metas.append(repr(rec))  # Python literal, single quotes: json.loads would fail
    _gz_lines(folder / "meta_Fix.json.gz", metas)
    return folder


def _meta_2018(asin, m):
    return {"asin": asin, "title": m["title"] or "", "description": m["description"] or [],
            "brand": m["brand"] or "", "category": m["categories"] or [], "feature": [],
            "price": f"${m['price']:.2f}" if m["price"] is not None else ""}


def write_2018(folder: Path, csv_ratings: bool = False) -> Path:
    """Fix_5.json.gz (JSON lines) or Fix.csv (item,user,rating,timestamp) + meta_Fix.json.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    if csv_ratings:
        with open(folder / "Fix.csv", "w", newline="") as f:
            w = csv.writer(f)
            for u, a, t in REVIEWS:
                w.writerow([a, u, "5.0", t])
    else:
        _gz_lines(folder / "Fix_5.json.gz",
                  [json.dumps({"overall": 5.0, "verified": True, "reviewerID": u, "asin": a,
                               "unixReviewTime": t}) for u, a, t in REVIEWS])
    _gz_lines(folder / "meta_Fix.json.gz", [json.dumps(_meta_2018(a, m)) for a, m in META.items()])
    return folder


def write_2023(folder: Path) -> Path:
    """Fix.jsonl.gz (timestamps in ms, parent_asin) + meta_Fix.jsonl.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    _gz_lines(folder / "Fix.jsonl.gz",
              [json.dumps({"rating": 5.0, "title": "t", "text": "x", "asin": a + "-variant",
                           "parent_asin": a, "user_id": u, "timestamp": t * 1000})
               for u, a, t in REVIEWS])
    metas = []
    for asin, m in META.items():
        details = {"Brand": m["brand"]} if m["brand"] else {}
        metas.append(json.dumps({"main_category": "All Beauty", "title": m["title"] or "",
                                 "features": [], "description": m["description"] or [],
                                 "price": m["price"], "store": None, "categories": m["categories"] or [],
                                 "details": details, "parent_asin": asin}))
    _gz_lines(folder / "meta_Fix.jsonl.gz", metas)
    return folder
