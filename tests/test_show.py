"""scripts/show.py on tiny runs the tests train: every title printed is the catalog's title of the item it
stands for, in the order the run ranks (its test_ranks.npy, the retrieval ranks); curves as a text table
without matplotlib and as a PNG with it."""
import json
import re
import sys

import numpy as np
import pytest

import eval as ev
import report as rp
import show
import train
from data import load_dataset
from test_encoderec import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ("relay capacitor staples steel glass beaker flask pipette glove tape meter sensor valve brass pump "
         "motor").split()


def catalog(folder, items=30, users=60, seed=0):
    """Titles and descriptions in the tiny BERT's vocabulary; each title unique, none a prefix of another."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {str(i): {"title": f"{WORDS[i % 16]} {WORDS[(3 * i + 5) % 16]} kit {chr(97 + i % 26)}{i // 26}x",
                     "description": " ".join(rng.choice(WORDS, 6)), "categories": "a,b"}
            for i in range(items)}
    inter = {str(u): rng.choice(items, size=int(rng.integers(5, 12)), replace=False).tolist()
             for u in range(users)}
    (folder / "Tiny.item.json").write_text(json.dumps(meta))
    (folder / "Tiny.inter.json").write_text(json.dumps(inter))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A catalog, a tiny BERT fine-tuned on it with items held out, and one finished run of each kind."""
    root = tmp_path_factory.mktemp("show")
    data, runs = catalog(root / "Tiny"), root / "runs"
    common = ["--dataset", str(data), "--data-dir", str(root / "cache"), "--runs", str(runs),
              "--device", "cpu"]
    emb = root / "emb.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((30, 64)).astype(np.float32))
    backbone = make_tiny(root / "bert")
    for argv in (["--stage", "encoder", "--backbone", str(backbone), "--holdout", "0.2", "--epochs", "2",
                  "--batch-size", "8"],
                 ["--stage", "unisrec", "--encoder", "none", "--max-epochs", "2"],
                 ["--stage", "unisrec", "--emb", str(emb), "--max-epochs", "2"],
                 ["--stage", "unisrec", "--mode", "vqrec", "--emb", str(emb), "--max-epochs", "2"],
                 ["--stage", "tiger", "--emb", str(emb), "--rqvae-epochs", "2", "--max-steps", "4",
                  "--eval-every", "2", "--warmup-steps", "1"],
                 ["--stage", "ease"]):
        assert train.main([*argv, *common]) == 0, argv
    folder = runs / "Tiny"
    recs = [next(folder.glob(p)) for p in ("unisrec-id-*", "unisrec-inductive-*", "unisrec-vqrec-*",
                                           "tiger-*", "ease-*")]
    return {"data": data, "runs": runs, "common": common[:4] + common[6:], "recs": recs,
            "encoder": next(folder.glob("encoder-*")), "ds": load_dataset(str(data), root / "cache"),
            "backbone": backbone}


CELL = re.compile(r"(\[T\]|\[h\]|   )#(\d+) (.*)")


def test_recs_print_each_runs_top10_as_the_catalogs_titles(tiny, capsys):
    """All 60 test users, five runs side by side: every cell is '#item title' with the catalog's title, the
    target [T] sits where the run's test_ranks.npy ranks it (absent beyond 10), [h] marks history items."""
    ds, runs = tiny["ds"], tiny["recs"]
    argv = ["recs", *tiny["common"], "--run", *map(str, runs), "--users", "60", "--width", "600"]
    assert show.main(argv) == 0
    out = capsys.readouterr().out
    titles, test = ds.title_texts(), ds.splits.test
    ranks = [np.load(r / "test_ranks.npy") for r in runs]
    blocks = out.split("\nuser ")[1:]
    assert len(blocks) == len(test) == 60 and "A: SASRec-ID" in out and "E: EASE" in out and "D: TIGER" in out
    seen_target = 0
    for block in blocks:
        user = block.split(":")[0]
        c = ds.user_ids.index(user)          # the test case of this user (one per user)
        u, pos, target = test.user[c], test.pos[c], test.target[c]
        history = set(ds.sequence(u)[:pos].tolist())
        assert f"  target: #{target} {titles[target]}" in block
        rows = [line for line in block.splitlines() if re.match(r"\s+\d+ \| ", line)]
        assert len(rows) == 10
        for col, r in enumerate(ranks):
            cells = [CELL.fullmatch(row.split(" | ")[1 + col].rstrip()) for row in rows]
            items = [int(m.group(2)) for m in cells]
            assert len(set(items)) == 10
            for m, i in zip(cells, items):
                assert m.group(3) == titles[i]                                   # the catalog's title
                assert m.group(1) == ("[T]" if i == target else "[h]" if i in history else "   ")
            where = [k for k, m in enumerate(cells) if m.group(1) == "[T]"]
            assert where == ([int(r[c])] if r[c] < 10 else [])                   # as the run ranked it
            seen_target += bool(where)
    assert seen_target > 60                                                      # the check had cases


def test_neighbours_print_each_encoders_top_documents_and_the_retrieval_ranks(tiny, capsys, tmp_path):
    """The held-out titles' top documents under the backbone and the tuned encoder: the catalog's titles of
    the documents' items, ordered by each encoder's scores, ranks as eval.retrieval_eval counts them."""
    import torch
    from encoderec import load_encoder
    ds, enc_run = tiny["ds"], tiny["encoder"]
    res = json.loads((enc_run / "results.json").read_text())
    held = res["holdout_items"]
    assert show.main(["neighbours", *tiny["common"], "--runs", str(tiny["runs"]), "--titles", "6",
                      "--width", "600"]) == 0                                   # newest encoder run
    out = capsys.readouterr().out
    titles, docs = ds.title_texts(), ds.document_texts()
    fields = json.loads((enc_run / "run.json").read_text())["key"]["doc_fields"]
    assert fields == ["features", "description", "brand", "categories"]
    blocks = out.split("\n#")[1:]
    assert len(blocks) == len(held) == 6 and f"{len(held)} of the {len(held)} titles held out" in out
    recall = {}
    for side, folder in (("backbone", tiny["backbone"]), ("fine-tuned", enc_run)):
        enc = load_encoder(folder, max_length=json.loads((enc_run / "run.json").read_text())["key"]["max"])
        recall[side] = ev.retrieval_eval(enc, ds, query_items=held, progress=False,
                                         ranks_to=tmp_path / "r.npy")["recall@10"]
        ranks = dict(zip(held, np.load(tmp_path / "r.npy")))
        D = torch.from_numpy(enc.encode(docs, show_progress=False))
        for block in blocks:
            item = int(block.split(" ")[0])
            assert block.startswith(f"{item} {titles[item]}\n") and item in held
            part = block.split(f"  {side} (rank ")[1]
            assert int(part.split(")")[0]) == ranks[item] + 1
            rows = re.findall(r"\n    \d\. (\[=\]|   ) #(\d+) (.*?) \| (.*)", part)[:5]
            shown = [int(i) for _, i, _, _ in rows]
            for mark, i, title, doc in rows:
                assert title == titles[int(i)] and doc == docs[int(i)]          # the catalog's texts
                assert (mark == "[=]") == (docs[int(i)] == docs[item])
            q = torch.from_numpy(enc.encode([titles[item]], show_progress=False))[0]
            scores = (D @ q).numpy()
            assert np.all(np.diff(scores[shown]) <= 1e-6)                        # in the encoder's order
            assert scores[shown[-1]] >= np.sort(scores)[-5] - 1e-6               # and its top 5
    assert f"all 6: recall@10 {recall['backbone']:.4f} -> {recall['fine-tuned']:.4f}" in out


def test_curves_text_without_matplotlib_png_with_it_and_in_the_report(tiny, capsys, monkeypatch, tmp_path):
    runs = tiny["runs"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)                     # as if not installed
    assert show.main(["curves", "--dataset", "Tiny", "--runs", str(runs), "--out",
                      str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "matplotlib, an optional extra, is not installed" in out and not (tmp_path / "c.png").exists()
    unisrec = tiny["recs"][0]
    for h in json.loads((unisrec / "history.json").read_text()):               # each evaluation, its values
        v = h["valid"]
        assert re.search(rf"\n\s+{h['epoch']:g} \|.*{v['recall@10']:.4f} / {v['ndcg@10']:.4f}", out)
    assert f"Tiny/{unisrec.name}" in out and f"Tiny/{tiny['encoder'].name}" in out
    assert "encoders: held-out title -> document" in out
    monkeypatch.delitem(sys.modules, "matplotlib")
    pytest.importorskip("matplotlib")
    assert rp.main(["--dataset", "Tiny", "--runs", str(runs), "--csv", str(tmp_path / "r.csv"),
                    "--curves"]) == 0
    out = capsys.readouterr().out
    assert f"curves: {tmp_path / 'curves-Tiny.png'}" in out and "Table 2 shape" in out
    assert (tmp_path / "curves-Tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_runs_are_one_line_errors(tiny, capsys):
    assert show.main(["recs", *tiny["common"], "--run", str(tiny["encoder"])]) == 2
    assert "recs shows unisrec, tiger and ease runs" in capsys.readouterr().err
    assert show.main(["neighbours", *tiny["common"], "--run", str(tiny["recs"][0])]) == 2
    assert "is not a encoder run" in capsys.readouterr().err
    assert show.main(["recs", *tiny["common"], "--run", str(tiny["recs"][0]), "--user", "nobody"]) == 2
    assert "--user nobody is not among" in capsys.readouterr().err


def test_ties_list_the_target_below_its_equals_as_the_metric_ranks_it():
    import torch
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.5], [3.0, 2.0, 2.0, 2.0]])
    targets = np.array([1, 3])
    assert show._top(scores, targets, 3).tolist() == [[2, 1, 0], [0, 1, 2]]   # pessimistic ties
    assert ev.ranks_from_scores(scores, torch.as_tensor(targets)).tolist() == [1, 3]


def test_moved_shows_the_titles_whose_document_moved_most(tiny, capsys, tmp_path):
    from encoderec import load_encoder
    ds, enc_run = tiny["ds"], tiny["encoder"]
    held = json.loads((enc_run / "results.json").read_text())["holdout_items"]
    ranks, max_len = [], json.loads((enc_run / "run.json").read_text())["key"]["max"]
    for folder in (tiny["backbone"], enc_run):
        ev.retrieval_eval(load_encoder(folder, max_length=max_len), ds, query_items=held, progress=False,
                          ranks_to=tmp_path / "r.npy")
        ranks.append(np.load(tmp_path / "r.npy"))
    change = np.abs(np.log1p(ranks[1]) - np.log1p(ranks[0]))
    assert show.main(["neighbours", *tiny["common"], "--run", str(enc_run), "--moved", "--titles", "2"]) == 0
    out = capsys.readouterr().out
    shown = [int(b.split(" ")[0]) for b in out.split("\n#")[1:]]
    assert "(the ones fine-tuning moved most)" in out and len(shown) == 2
    assert sorted(change[[held.index(i) for i in shown]]) == sorted(change)[-2:]
