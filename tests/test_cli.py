"""train.py / eval.py end to end on the hand-made fixture catalog with the real MiniLM weights."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import amazon_fixture as fx
import eval as ev
import train
from conftest import ROOT
from data import load_dataset

encoderec = pytest.importorskip("encoderec")


@pytest.fixture(scope="module")
def minilm():
    try:
        folder = encoderec.resolve_backbone("minilm")
    except encoderec.BackboneError as e:
        pytest.skip(f"real MiniLM weights unavailable: {e}")
    return encoderec.load_encoder(folder, device="cpu")


@pytest.fixture
def fixture_ds(tmp_path):
    return fx.write_lcrec(tmp_path / "Fix")


def _common(tmp_path):
    return ["--data-dir", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"), "--device", "cpu"]


def test_embed_rows_follow_the_catalog(tmp_path, fixture_ds, minilm, capsys):
    argv = ["--stage", "embed", "--dataset", str(fixture_ds), "--encoder", "minilm",
            "--fields", "title,categories", *_common(tmp_path)]
    assert train.main(argv) == 0
    path = tmp_path / "runs" / "Fix" / "minilm" / "item_emb-title+categories.npy"
    emb = np.load(path)
    ds = load_dataset(str(fixture_ds), tmp_path / "cache")
    texts = ds.item_texts(("title", "categories"))
    assert emb.shape == (6, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, minilm.encode(texts, show_progress=False), atol=1e-5)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["fields"] == ["title", "categories"] and side["shape"] == [6, 384]
    assert train.main(argv) == 0                       # second run: nothing to do
    assert "up to date" in capsys.readouterr().err
    # other fields never overwrite the first file
    assert train.main(argv[:-6] + ["--fields", "title", *_common(tmp_path)]) == 0
    assert path.exists() and (path.parent / "item_emb-title.npy").exists()


def test_encoder_stage_then_retrieval_eval(tmp_path, fixture_ds, capsys):
    out = tmp_path / "runs" / "Fix" / "encoderec-minilm"
    argv = ["--stage", "encoder", "--backbone", "minilm", "--dataset", str(fixture_ds),
            "--epochs", "1", "--batch-size", "4", "--chunk-size", "2", "--holdout", "0.2",
            "--doc-fields", "description,brand", *_common(tmp_path)]
    assert train.main(argv) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "modules.json",
              "1_Pooling/config.json", "sentence_bert_config.json", "checkpoint.pt", "history.json"):
        assert (out / f).exists(), f
    run = json.loads((out / "run.json").read_text())
    assert run["n_pairs"] == 4 and len(run["holdout_items"]) == 1  # 5 items have title + document
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1] and "recall@10" in history[-1]["eval"]
    assert train.main(argv) == 2                       # an existing run is never overwritten
    assert "--resume" in capsys.readouterr().err
    capsys.readouterr()
    assert ev.main(["--task", "retrieval", "--dataset", str(fixture_ds), "--encoder", str(out),
                    "--doc-fields", "description,brand", "--data-dir", str(tmp_path / "cache"),
                    "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_queries"] == 5 and metrics["n_documents"] == 6  # C has no title, D a brand only
    assert 0 <= metrics["ndcg@10"] <= metrics["recall@10"] == 1.0  # 6 documents: all in the top 10


def test_retrieval_merges_identical_documents(tmp_path, minilm):
    """Two items with the same description share one document, and both count it as their answer."""
    folder = tmp_path / "Dup"
    folder.mkdir()
    items = {"0": {"title": "red pen", "description": "A pen."},
             "1": {"title": "blue pen", "description": "A pen."},
             "2": {"title": "green cup", "description": "A cup for tea."},
             "3": {"title": "no description"}}
    (folder / "Dup.item.json").write_text(json.dumps(items))
    (folder / "Dup.inter.json").write_text(json.dumps({"0": [0, 1, 2, 3]}))
    ds = load_dataset(str(folder), tmp_path / "cache")
    m = ev.retrieval_eval(minilm, ds, doc_fields=("description",), ks=(1, 10), progress=False)
    assert m["n_documents"] == 3 and m["n_distinct_documents"] == 2 and m["n_queries"] == 3
    assert m["recall@10"] == 1.0


def test_no_text_is_a_clear_error(tmp_path):
    folder = tmp_path / "NoText"
    folder.mkdir()
    (folder / "N.item.json").write_text(json.dumps({str(i): {"asin": f"A{i}"} for i in range(3)}))
    (folder / "N.inter.json").write_text(json.dumps({"0": [0, 1, 2]}))
    for stage in ("encoder", "embed"):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", stage, "--dataset",
                            str(folder), *_common(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "title" in r.stderr


def test_real_scientific_titles_find_their_descriptions(tmp_path, minilm):
    """Off-the-shelf MiniLM matches real Scientific titles to their descriptions far above chance
    (60 items against each other; the full-corpus number is the README's acceptance run)."""
    from conftest import lcrec_or_skip
    ds = load_dataset(str(lcrec_or_skip("Scientific")), tmp_path)
    sub = [it for it in ds.items if it.description and len(it.description) > 20][:60]
    q = torch.from_numpy(minilm.encode([it.title for it in sub], show_progress=False))
    d = torch.from_numpy(minilm.encode([it.description for it in sub], show_progress=False))
    ranks = ev.ranks_from_scores(q @ d.T, torch.arange(len(sub))).numpy()
    assert ev.metrics_from_ranks(ranks)["recall@10"] > 0.8  # chance: 10/60


@pytest.mark.parametrize("encoder", ["none", "minilm"])
def test_unisrec_stage_and_eval(tmp_path, fixture_ds, encoder, capsys):
    pytest.importorskip("unisrec")
    argv = ["--stage", "unisrec", "--dataset", str(fixture_ds), "--encoder", encoder,
            "--fields", "title,categories", "--max-epochs", "2", "--batch-size", "8", *_common(tmp_path)]
    assert train.main(argv) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = tmp_path / "runs" / "Fix" / ("sasrec-id" if encoder == "none" else "unisrec-inductive-minilm")
    assert results["run"] == str(run) and results["epochs_run"] == 2 and results["max_epochs"] == 2
    assert results["test"]["n"] == 6 and set(results["test"]) >= {"recall@10", "ndcg@50", "cold_start"}
    assert results["test"]["recall@10"] == 1.0  # 6 items: every target is in the top 10
    if encoder == "minilm":  # the embeddings were produced on the way
        assert (tmp_path / "runs" / "Fix" / "minilm" / "item_emb-title+categories.npy").exists()
    assert ev.main(["--task", "unisrec", "--dataset", str(fixture_ds), "--run", str(run),
                    "--data-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test"] == results["test"] and again["valid"] == results["valid"]


def test_stage_all_smoke_then_everything_is_up_to_date(tmp_path, fixture_ds, minilm, capsys):
    """The whole pipeline on the fixture catalog (real MiniLM), then a second call that only reads."""
    base = encoderec.resolve_backbone("minilm")       # --weights names the BASE model's files only
    argv = ["--stage", "all", "--dataset", str(fixture_ds), "--budget", "smoke", "--weights", str(base),
            *_common(tmp_path)]
    assert train.main(argv) == 0
    out = capsys.readouterr()
    runs = tmp_path / "runs" / "Fix"
    for enc, weights in (("minilm", base), ("encoderec-minilm-smoke", runs / "encoderec-minilm-smoke")):
        side = json.loads((runs / enc / "item_emb-title+categories+brand.json").read_text())
        assert Path(side["weights"]).resolve() == Path(weights).resolve(), enc  # fine-tuned embeds with its own
    for run in ("encoderec-minilm-smoke", "sasrec-id-smoke", "unisrec-inductive-minilm-smoke",
                "unisrec-inductive-encoderec-minilm-smoke", "tiger-rqvae-minilm-smoke",
                "tiger-rqvae-encoderec-minilm-smoke"):
        assert (runs / run / "pipeline-key.json").exists(), run
    for table in ("Table 1 shape", "Table 2 shape", "Table 3 shape", "collisions"):
        assert table in out.out
    first = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}

    assert train.main(argv) == 0                                  # nothing left to do
    err = capsys.readouterr().err
    assert "->" not in err.replace("up to date", "") and err.count("up to date") >= 11
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == first

    # a longer TIGER history: only the two TIGER runs are redone, the old ones are kept aside
    assert train.main(argv + ["--tiger-history", "10"]) == 0
    err = capsys.readouterr().err
    assert err.count("previous run moved to") == 2 and len(list(runs.glob("tiger-*.replaced-*"))) == 2


def test_stale_embeddings_are_remade_by_the_stages_that_read_them(tmp_path, fixture_ds, minilm, capsys):
    """An embedding file whose sidecar names other inputs (here another --max-length) is re-made before
    UniSRec reads it; a file placed by hand (no sidecar) is used as it is."""
    common = ["--dataset", str(fixture_ds), "--encoder", "minilm", "--fields", "title,categories", *_common(tmp_path)]
    assert train.main(["--stage", "embed", *common]) == 0
    emb = tmp_path / "runs" / "Fix" / "minilm" / "item_emb-title+categories.npy"
    assert json.loads(emb.with_suffix(".json").read_text())["max_length"] == 256
    capsys.readouterr()
    assert train.main(["--stage", "unisrec", *common, "--max-length", "8", "--max-epochs", "1", "--batch-size", "8"]) == 0
    assert "embedding the items first" not in capsys.readouterr().err              # it existed, but was stale:
    assert json.loads(emb.with_suffix(".json").read_text())["max_length"] == 8      # re-made at 8 tokens
    emb.with_suffix(".json").unlink()
    np.save(emb, np.zeros((load_dataset(str(fixture_ds), tmp_path / "cache").n_items, 5), np.float32))
    assert train.main(["--stage", "unisrec", *common, "--max-epochs", "1", "--batch-size", "8",
                       "--out", str(tmp_path / "hand")]) == 0
    assert "has no sidecar: used as it is" in capsys.readouterr().err and np.load(emb).shape[1] == 5


def test_time_capped_results_are_not_done(tmp_path):
    f = tmp_path / "results.json"
    f.write_text(json.dumps({"time_capped": True}))
    assert train._time_capped(f)
    f.write_text(json.dumps({"time_capped": False}))
    assert not train._time_capped(f)
