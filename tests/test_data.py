"""data.py and scripts/prepare_data.py: raw formats prepared into LC-Rec folders agree, processing rules,
the round trip, splits, text, errors, real data."""
import gzip
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

import amazon_fixture as fx
import data
import prepare_data as pd
from conftest import ROOT, lcrec_or_skip
from data import DataError, Item, load_dataset

FORMATS = {"2014": fx.write_2014, "2018": fx.write_2018,
           "2018csv": lambda f: fx.write_2018(f, csv_ratings=True), "2023": fx.write_2023}


def _load(folder, tmp_path, kcore=5, **kw):
    """A raw folder is prepared (into tmp_path/cache/<name>/) first; an LC-Rec folder loads as it is."""
    folder = pd.prepare(str(folder), tmp_path / "cache", kcore=kcore)
    return load_dataset(str(folder), data_dir=tmp_path / "cache", **kw)


def _raw(folder, kcore=5):
    """The raw folder processed in memory, as prepare_data writes it."""
    return pd.process_raw(pd.find_raw(folder), folder.name, kcore)


def _assert_same_splits(a, b):
    for split in ("train", "valid", "test"):
        x, y = getattr(a.splits, split), getattr(b.splits, split)
        for f in ("user", "pos", "target", "cold"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    np.testing.assert_array_equal(a.splits.train_items, b.splits.train_items)


def _sequences(ds):
    return {str(u): ds.sequence(u).tolist() for u in range(ds.n_users)}


# ----------------------------------------------------------------------------- formats agree
@pytest.fixture
def lcrec(tmp_path):
    return _load(fx.write_lcrec(tmp_path / "lcrec"), tmp_path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_raw_formats_match_lcrec(fmt, tmp_path, lcrec):
    ds = _raw(FORMATS[fmt](tmp_path / fmt))
    assert ds.release == fmt[:4]
    assert _sequences(ds) == fx.EXPECTED_INTER
    assert ds.user_ids == fx.EXPECTED_USERS
    assert ds.items == lcrec.items  # same catalog, field by field
    ds.protocol = "loo"  # 2023's own split is the time split
    _assert_same_splits(ds, lcrec)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_prepared_folder_round_trip(fmt, tmp_path):
    """process_raw(raw) and load_lcrec(the prepared folder) agree on everything the library uses, text
    that HTML-unescaping would change again included."""
    folder = FORMATS[fmt](tmp_path / fmt)
    meta = next(folder.glob("meta_*"))
    lines = gzip.decompress(meta.read_bytes()).decode().splitlines()
    tricky = "Tom &amp;amp; Jerry &lt;b&gt;  \u00e9t\u00e9"  # one unescape leaves '&amp;' and '<b>'
    lines[0] = lines[0].replace("Alpha Lip Balm", tricky)
    meta.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    raw = _raw(folder)
    assert raw.items[4].title == "Tom &amp; Jerry <b> \u00e9t\u00e9"
    prepared = pd.prepare(str(folder), tmp_path / "data")
    assert prepared == tmp_path / "data" / fmt and sorted(p.name for p in prepared.iterdir()) == sorted(
        f"{fmt}.{s}.json" for s in ("inter", "item", "prepared", *(["time"] if fmt == "2023" else [])))
    ds = load_dataset(fmt, tmp_path / "data")
    assert ds.name == fmt and ds.protocol == raw.protocol == ("time" if fmt == "2023" else "loo")
    assert ds.items == raw.items
    np.testing.assert_array_equal(ds.seq_offsets, raw.seq_offsets)
    np.testing.assert_array_equal(ds.seq_items, raw.seq_items)
    if fmt == "2023":
        np.testing.assert_array_equal(ds.seq_times, raw.seq_times)
    else:
        assert ds.seq_times is None
    _assert_same_splits(ds, raw)
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    assert pd.prepare(str(folder), tmp_path / "data") == prepared  # up to date: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before
    with pytest.raises(DataError, match="pass --out DIR for this one, or delete"):
        pd.prepare(str(folder), tmp_path / "data", kcore=1)  # never a stale folder for other options


def test_lcrec_fixture_by_hand(lcrec):
    assert (lcrec.n_users, lcrec.n_items, lcrec.n_interactions) == (6, 6, 30)
    assert [it.asin for it in lcrec.items] == fx.EXPECTED_ASINS
    assert [it.title for it in lcrec.items] == fx.EXPECTED_TITLES
    a = lcrec.items[4]  # A: HTML unescaped, list description joined, price kept
    assert a.description == "Soft & gentle. Lasts all day."
    assert a.categories == ("Beauty", "Lips") and a.brand == "Acme" and a.price == 12.5
    assert lcrec.items[5].categories == ("Beauty", "Skin Care, Face")  # comma inside a name
    assert lcrec.items[3].brand is None and lcrec.items[3].price is None  # missing stays missing
    assert lcrec.items[2].categories is None and lcrec.items[2].description is None


def test_2023_timestamps_kept_in_ms(tmp_path):
    ds = _load(fx.write_2023(tmp_path / "r23"), tmp_path)
    assert ds.protocol == "time"
    u1 = fx.EXPECTED_USERS.index("u1")
    assert ds.seq_times[ds.seq_offsets[u1]:ds.seq_offsets[u1 + 1]].tolist() == \
        [100000, 200000, 300000, 400000, 500000]


# ----------------------------------------------------------------------------- splits
def test_loo_splits_by_hand(lcrec):
    s = lcrec.splits
    # 6 users x 5 items: train targets at positions 1, 2 -> 12 examples
    assert len(s.train) == 12 and len(s.valid) == 6 and len(s.test) == 6
    np.testing.assert_array_equal(s.test.target, [4, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(s.valid.target, [3, 5, 2, 1, 1, 1])
    np.testing.assert_array_equal(s.train.pos, [1, 2] * 6)
    assert not s.test.cold.any()  # every item occurs in some user's first 3


def test_cold_start_flags(tmp_path):
    folder = tmp_path / "cold"
    folder.mkdir()
    (folder / "C.item.json").write_text(json.dumps({str(i): {"title": f"t{i}"} for i in range(6)}))
    # item 5 appears only as a test target, item 4 only as a valid target
    (folder / "C.inter.json").write_text(json.dumps({"0": [0, 1, 2, 4, 5], "1": [1, 2, 3, 0, 1]}))
    s = _load(folder, tmp_path).splits
    np.testing.assert_array_equal(s.test.target, [5, 1])
    np.testing.assert_array_equal(s.test.cold, [True, False])
    np.testing.assert_array_equal(s.valid.cold, [True, False])
    assert s.train_items.tolist() == [True, True, True, True, False, False]


def test_time_split_by_hand(tmp_path):
    ds = _load(fx.write_2023(tmp_path / "r23"), tmp_path)
    s = data.time_splits(ds, t1=150_000, t2=600_000)
    # worked out in amazon_fixture's order: u2's F is valid, u1's B..E valid, u5's A valid (no
    # history: dropped), u5's C..F test
    assert sorted(zip(s.valid.user.tolist(), s.valid.pos.tolist())) == \
        [(1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert sorted(zip(s.test.user.tolist(), s.test.pos.tolist())) == [(5, 1), (5, 2), (5, 3), (5, 4)]
    assert len(s.train) == 4 + 3 + 0 + 4 + 4


def test_histories_alignment(lcrec):
    cases = lcrec.splits.test
    h, n = lcrec.histories(cases, max_len=6)
    assert h.shape == (6, 6) and n.tolist() == [4] * 6
    assert h[1].tolist() == [-1, -1, 3, 4, 2, 5]
    h, _ = lcrec.histories(cases, max_len=3, align="left", pad=0)
    assert h[1].tolist() == [4, 2, 5]  # the last 3 items before the target
    h, n = lcrec.histories(lcrec.splits.train.subset(slice(0, 2)), max_len=4, align="left")
    assert h.tolist() == [[0, -1, -1, -1], [0, 1, -1, -1]] and n.tolist() == [1, 2]


# ----------------------------------------------------------------------------- text
def test_item_text_rendering():
    it = Item(title="Alpha.", description="Soft.", features=("a", "b"), brand="Acme",
              categories=("Beauty", "Lips"), price=2.0)
    assert data.render_text(it, ("title",)) == "Alpha."
    assert data.render_text(it, data.DOCUMENT_FIELDS) == "a, b. Soft. Acme. Beauty, Lips"
    assert data.render_text(it, ("title", "categories", "price")) == "Alpha. Beauty, Lips. $2.00"
    assert data.render_text(Item(), ("title", "description")) is None
    long = replace(it, description="word " * 3000)
    assert len(data.render_text(long, ("description",))) <= data.MAX_TEXT_CHARS
    with pytest.raises(DataError, match="unknown text field"):
        data.render_text(it, ("colour",))


def test_clean_text_and_price():
    assert data.clean_text("  a&amp;b \n\t c  ") == "a&b c"
    assert data.clean_text("   ") is None and data.clean_text(None) is None
    assert data.parse_price("$1,299.00") == 1299.0 and data.parse_price("$1.00 - $2.00") is None
    assert data.split_categories("Beauty, Makeup, Nails") == ("Beauty", "Makeup", "Nails")
    assert data.split_categories("A,Tapes, Glue,B") == ("A", "Tapes, Glue", "B")


# ----------------------------------------------------------------------------- cache
def test_cache_round_trip(tmp_path):
    folder = fx.write_2018(tmp_path / "r18")
    first = _load(folder, tmp_path)
    cached = list((tmp_path / "cache" / "processed").glob("*.npz"))
    assert len(cached) == 1
    again = _load(folder, tmp_path)
    assert again.items == first.items and again.user_ids == first.user_ids
    np.testing.assert_array_equal(again.seq_items, first.seq_items)
    np.testing.assert_array_equal(again.seq_times, first.seq_times)
    # different options -> a different cache entry, never a stale one
    k1 = pd.prepare(str(folder), tmp_path / "cache", kcore=1, out=tmp_path / "k1")
    load_dataset(str(k1), tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "processed").glob("*.npz"))) == 2


def test_kcore_option(tmp_path):
    ds = _load(fx.write_2014(tmp_path / "r14"), tmp_path, kcore=1)
    assert ds.n_users == 8 and ds.n_items == 7  # nobody dropped; duplicate still removed
    assert ds.n_interactions == len(fx.REVIEWS) - 1


# ----------------------------------------------------------------------------- errors
def test_truncated_gzip(tmp_path):
    folder = fx.write_2014(tmp_path / "r14")
    path = folder / "reviews_Fix_5.json.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        _load(folder, tmp_path)


def test_malformed_json_line_names_file_and_line(tmp_path):
    folder = fx.write_2018(tmp_path / "r18")
    path = folder / "Fix_5.json.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines[2] = lines[2][:-5]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"Fix_5\.json\.gz:3: malformed record"):
        _load(folder, tmp_path)


def test_a_record_that_is_not_an_object_names_file_and_line(tmp_path):
    folder = fx.write_2018(tmp_path / "r18")
    path = folder / "Fix_5.json.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines[2] = "[1, 2]"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"Fix_5\.json\.gz:3: expected a JSON object"):
        _load(folder, tmp_path)


def test_malformed_2014_meta_literal(tmp_path):
    folder = fx.write_2014(tmp_path / "r14")
    path = folder / "meta_Fix.json.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines[1] = "__import__('os').system('echo pwned')"  # never evaluated: literal_eval refuses it
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"meta_Fix\.json\.gz:2: malformed record"):
        _load(folder, tmp_path)


def test_meta_without_title_is_missing_not_an_error(tmp_path):
    ds = _load(fx.write_2014(tmp_path / "r14"), tmp_path)
    assert ds.items[5].asin == "C" and ds.items[5].title is None
    assert ds.title_texts()[5] is None


def test_meta_record_without_asin(tmp_path):
    folder = fx.write_2023(tmp_path / "r23")
    path = folder / "meta_Fix.jsonl.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    rec = json.loads(lines[3])
    del rec["parent_asin"]
    lines[3] = json.dumps(rec)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"meta_Fix\.jsonl\.gz:4: record lacks parent_asin"):
        _load(folder, tmp_path)


def test_reviews_of_unknown_items(tmp_path):
    folder = fx.write_2018(tmp_path / "r18")
    path = folder / "meta_Fix.json.gz"
    lines = [l for l in gzip.decompress(path.read_bytes()).decode().splitlines()
             if json.loads(l)["asin"] != "D"]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"1 reviewed items have no record in .*meta_Fix.*\(e\.g\. D\)"):
        _load(folder, tmp_path)


def test_lcrec_unknown_item_index(tmp_path):
    folder = fx.write_lcrec(tmp_path / "lc")
    (folder / "Fix.inter.json").write_text(json.dumps({"0": [0, 1, 99]}))
    with pytest.raises(DataError, match=r"user 0, position 2: 99 is not an item index .*Fix\.item\.json"):
        _load(folder, tmp_path)


def test_empty_after_filtering(tmp_path):
    folder = fx.write_2014(tmp_path / "r14")
    with pytest.raises(DataError, match="no interactions left after 50-core"):
        _load(folder, tmp_path, kcore=50)


def test_unknown_name_lists_valid_ones(tmp_path):
    with pytest.raises(DataError, match="beauty, sports, toys, scientific, baby, games, beauty2023"):
        pd.prepare("beuaty", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"unknown dataset 'beuaty': .*prepare_data\.py --dataset beuaty"):
        load_dataset("beuaty", data_dir=tmp_path)


def test_offline_download_names_files_to_place(tmp_path):
    with pytest.raises(DataError) as e:
        pd.prepare("scientific", data_dir=tmp_path)
    msg = str(e.value)
    assert "Industrial_and_Scientific_5.json.gz" in msg and "meta_Industrial_and_Scientific.json.gz" in msg
    assert str(tmp_path / "raw" / "scientific") in msg
    with pytest.raises(DataError, match=r"scripts/prepare_data\.py --dataset scientific"):
        load_dataset("scientific", data_dir=tmp_path)


def test_a_raw_folder_is_prepared_not_loaded(tmp_path):
    folder = fx.write_2018(tmp_path / "r18")
    with pytest.raises(DataError, match=r"r18: no LC-Rec pair .*scripts/prepare_data\.py --dataset .*r18"):
        load_dataset(str(folder), tmp_path / "cache")
    pd.prepare(str(folder), tmp_path / "cache")
    assert load_dataset("R18", tmp_path / "cache").name == "r18"  # a prepared name, any case
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no LC-Rec pair .* and no raw Amazon files"):
        pd.prepare(str(tmp_path / "empty"), tmp_path / "cache")


def test_prepare_cli_prints_counts_then_is_up_to_date(tmp_path, capsys):
    argv = ["--dataset", str(fx.write_2014(tmp_path / "r14")), "--data-dir", str(tmp_path / "d")]
    assert pd.main(argv) == 0
    out = capsys.readouterr()
    assert out.out == "users=6 items=6 interactions=30\n" and "prepared " in out.err
    assert pd.main(argv) == 0 and "r14: up to date" in capsys.readouterr().err


def test_cli_error_is_a_message_not_a_traceback(tmp_path):
    folder = fx.write_lcrec(tmp_path / "lc")
    (folder / "Fix.inter.json").write_text("{\"0\": [0, 1,")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--dataset", str(folder),
                        "--data-dir", str(tmp_path / "c"), "--stats"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "Fix.inter.json:1: malformed JSON" in r.stderr


# ----------------------------------------------------------------------------- real data
REAL = {"Beauty": (22363, 12101, 198502), "Sports": (35598, 18357, 296337),
        "Scientific": (8317, 4344, 58492)}


@pytest.mark.parametrize("name", list(REAL))
def test_real_counts(name, tmp_path):
    folder = lcrec_or_skip(name)
    ds = _load(folder, tmp_path)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == REAL[name]
    assert len(ds.splits.test) == ds.n_users == len(ds.splits.valid)
    assert len(ds.splits.train) == ds.n_interactions - 3 * ds.n_users
    assert ds.seq_lengths.min() >= 5 and np.bincount(ds.seq_items).min() >= 5
    # the test target is the last item, and its history is everything before it
    u = 17
    h, n = ds.histories(ds.splits.test.subset([u]), max_len=500, align="left")
    seq = ds.sequence(u)
    assert ds.splits.test.target[u] == seq[-1] and h[0, :n[0]].tolist() == seq[:-1].tolist()


def test_real_cli_stats_first_line(tmp_path):
    folder = lcrec_or_skip("Beauty")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--dataset", str(folder),
                        "--data-dir", str(tmp_path), "--stats"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "users=22363 items=12101 interactions=198502"
    assert any(l.strip().startswith("title ") and "missing       7 of 12101" in l for l in lines)


def test_real_text_coverage(tmp_path):
    sci = _load(lcrec_or_skip("Scientific"), tmp_path)
    assert sum(it.description is not None for it in sci.items) == 4221
    assert sum(it.title is not None for it in sci.items) == 4344
    assert sum(it.brand is not None for it in sci.items) == 4332
    assert sum(it.categories is not None for it in sci.items) == 4213
    assert all(it.asin is None for it in sci.items)  # the source has none: never invented
    beauty = _load(lcrec_or_skip("Beauty"), tmp_path)
    texts = beauty.item_texts(("title", "categories"))
    assert texts[0] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce. Beauty, Makeup, Nails, Nail Polish"
    assert sum(t is None for t in beauty.title_texts()) == 7


def test_fingerprint_follows_content_not_path_or_mtime(tmp_path):
    import os
    import shutil
    a = fx.write_lcrec(tmp_path / "a" / "Fix")
    fp = data.load_dataset(str(a), tmp_path / "cache").fingerprint
    b = tmp_path / "b" / "Fix"
    shutil.copytree(a, b)                                                  # new path, new mtimes, same bytes
    for f in b.iterdir():
        os.utime(f, (1e9, 1e9))
    assert data.load_dataset(str(b), tmp_path / "cache2").fingerprint == fp
    inter = next(b.glob("*.inter.json"))
    inter.write_text(inter.read_text() + " ")                              # any edit of the bytes
    assert data.load_dataset(str(b), tmp_path / "cache2").fingerprint != fp


def test_lcrec_category_paths_may_nest_one_level(tmp_path):
    """LC-Rec folders made from 2014 metadata keep categories as a list of paths."""
    folder = fx.write_lcrec(tmp_path / "lc")
    items = json.loads((folder / "Fix.item.json").read_text())
    items["0"]["categories"] = [["Beauty", "Makeup"], ["Beauty", "Nails"]]
    (folder / "Fix.item.json").write_text(json.dumps(items))
    assert _load(folder, tmp_path).items[0].categories == ("Beauty", "Makeup", "Nails")
