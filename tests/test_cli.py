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
import report as rp
import train
from conftest import ROOT
from data import DataError, load_dataset, weights_folder

encoderec = pytest.importorskip("encoderec")


@pytest.fixture(scope="module")
def minilm():
    try:
        folder = weights_folder("minilm")
    except DataError as e:
        pytest.skip(f"real MiniLM weights unavailable: {e}")
    return encoderec.load_encoder(folder, device="cpu")


@pytest.fixture
def fixture_ds(tmp_path):
    return fx.write_lcrec(tmp_path / "Fix")


def _common(tmp_path):
    return ["--data-dir", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"), "--device", "cpu"]


def _one(folder, pattern):
    found = sorted(Path(folder).glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def test_embed_rows_follow_the_catalog(tmp_path, fixture_ds, minilm, capsys):
    argv = ["--stage", "embed", "--dataset", str(fixture_ds), "--encoder", "minilm",
            "--fields", "title,categories", *_common(tmp_path)]
    assert train.main(argv) == 0
    run = _one(tmp_path / "runs" / "Fix", "embed-minilm-*")
    emb = np.load(run / "item_emb.npy")
    ds = load_dataset(str(fixture_ds), tmp_path / "cache")
    texts = ds.item_texts(("title", "categories"))
    assert emb.shape == (6, 384) and emb.dtype == np.float32
    raw = minilm.encode(texts, show_progress=False, normalize=False)                # UniSRec's input: raw
    np.testing.assert_allclose(emb, raw, atol=1e-5)
    np.testing.assert_allclose(ev.l2_rows(emb), minilm.encode(texts, show_progress=False), atol=1e-5)
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1)
    assert json.loads((run / "run.json").read_text())["key"]["fields"] == ["title", "categories"]
    assert json.loads((run / "results.json").read_text())["shape"] == [6, 384]
    assert train.main(argv) == 0                       # second run: nothing to do
    assert "up to date" in capsys.readouterr().err
    # other fields: another folder; the first is untouched
    assert train.main(argv[:-6] + ["--fields", "title", *_common(tmp_path)]) == 0
    assert len(list((tmp_path / "runs" / "Fix").glob("embed-minilm-*"))) == 2 and (run / "item_emb.npy").exists()


def test_encoder_stage_then_retrieval_eval(tmp_path, fixture_ds, capsys):
    argv = ["--stage", "encoder", "--backbone", "minilm", "--dataset", str(fixture_ds),
            "--epochs", "1", "--batch-size", "4", "--chunk-size", "2", "--holdout", "0.2",
            "--doc-fields", "description,brand", *_common(tmp_path)]
    assert train.main(argv) == 0
    out = _one(tmp_path / "runs" / "Fix", "encoder-minilm-*")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "modules.json",
              "1_Pooling/config.json", "sentence_bert_config.json", "last.pt", "history.json", "results.json"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    assert res["n_pairs"] == 4 and len(res["holdout_items"]) == 1  # 5 items have title + document
    err = capsys.readouterr().err
    assert "before training" in err                                 # the held-out check, labelled
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and "recall@10" in history[-1]["valid"]
    assert train.main(argv) == 0 and "up to date" in capsys.readouterr().err   # finished: nothing to do
    results = (out / "results.json").read_text()
    (out / "results.json").unlink()                                # an unfinished run needs --resume
    assert train.main(argv) == 2 and "--resume" in capsys.readouterr().err
    retrieval = ["--task", "retrieval", "--dataset", str(fixture_ds), "--encoder", str(out), "--doc-fields",
                 "description,brand", "--data-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert ev.main(retrieval) == 2 and "unfinished run" in capsys.readouterr().err   # not "missing config.json"
    (out / "results.json").write_text(results)
    assert ev.main(retrieval + ["--ranks", str(tmp_path / "r.npy")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_queries"] == 5 and metrics["n_documents"] == 6  # C has no title, D a brand only
    assert 0 <= metrics["ndcg@10"] <= metrics["recall@10"] == 1.0  # 6 documents: all in the top 10
    ranks = np.load(tmp_path / "r.npy")                             # per query, for paired tests
    assert ranks.shape == (5,) and ev.metrics_from_ranks(ranks)["ndcg@10"] == metrics["ndcg@10"]


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
    fields = [] if encoder == "none" else ["--fields", "title,categories"]     # no text: --fields is refused
    argv = ["--stage", "unisrec", "--dataset", str(fixture_ds), "--encoder", encoder, *fields,
            "--max-epochs", "2", "--batch-size", "8", *_common(tmp_path)]
    assert train.main(argv) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = _one(tmp_path / "runs" / "Fix", "unisrec-id-*" if encoder == "none" else "unisrec-inductive-minilm-*")
    assert results["run"] == str(run) and results["epochs"] == 2 and results["max_epochs"] == 2
    assert results["test"]["n"] == 6 and set(results["test"]) >= {"recall@10", "ndcg@50", "cold_start"}
    assert results["test"]["recall@10"] == 1.0  # 6 items: every target is in the top 10
    if encoder == "minilm":  # the embeddings were produced on the way
        assert (_one(tmp_path / "runs" / "Fix", "embed-minilm-*") / "item_emb.npy").exists()
    common = ["--dataset", str(fixture_ds), "--data-dir", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"),
              "--device", "cpu"]
    for extra in (["--run", str(run)], []):                      # named, and the newest run by default
        assert ev.main(["--task", "unisrec", *common, *extra]) == 0
        again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert again["test"] == results["test"] and again["valid"] == results["valid"]
    assert ev.main(["--task", "tiger", *common, "--run", str(run)]) == 2          # a run of another task
    assert "is not a tiger run" in capsys.readouterr().err
    assert train.main([*argv, "--device", "gpu"]) == 2                             # no such device: one line
    assert "--device gpu" in capsys.readouterr().err


def test_vqrec_trains_on_product_codes_and_evaluates(tmp_path, fixture_ds, capsys):
    """--mode vqrec makes the OPQ codes on the way (fitted on the training items), trains, and eval.py
    --task vqrec scores the same best model; the codes' audit is in the collisions table."""
    argv = ["--stage", "unisrec", "--mode", "vqrec", "--dataset", str(fixture_ds), "--fields", "title,categories",
            "--max-epochs", "2", "--batch-size", "8", *_common(tmp_path)]
    assert train.main(argv) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = tmp_path / "runs" / "Fix"
    codes_run = _one(runs, "codes-opq-minilm-*")
    codes = np.load(codes_run / "codes.npy")
    audit = json.loads((codes_run / "results.json").read_text())
    assert codes.shape == (6, 32) and audit["fit_items"] == 6 and audit["tokenizer"] == "opq"
    assert results["mode"] == "vqrec" and results["run"] == str(_one(runs, "unisrec-vqrec-minilm-*"))
    assert ev.main(["--task", "vqrec", "--dataset", str(fixture_ds), *_common(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test"] == results["test"]
    recs = rp.collect_report(tmp_path / "runs", ["Fix"])
    assert any(r["table"] == "collisions" and r["row"] == "all-MiniLM-L6-v2 / opq" for r in recs)
    assert ev.main(["--task", "vqrec", "--dataset", str(fixture_ds), *_common(tmp_path), "--run",
                    str(codes_run)]) == 2                                            # not a VQ-Rec run
    capsys.readouterr()
    assert any(r["table"] == "unisrec" and r["row"] == "VQ-Rec on all-MiniLM-L6-v2" for r in recs)
    assert any(r["table"] == "cold" and r["row"] == "VQ-Rec: all-MiniLM-L6-v2" for r in recs)
    for bad, msg in ((["--normalize"], "--normalize is for the text modes"),):
        assert train.main([*argv, *bad]) == 2 and msg in capsys.readouterr().err
    assert train.main([*argv[:2], *argv[4:], "--tokenizer", "pq"]) == 2            # codes without vqrec
    assert "--tokenizer" in capsys.readouterr().err
    assert train.main([*argv, "--tokenizer", "rkmeans"]) == 2                        # IDs for VQ-Rec
    assert "VQ-Rec product codes (opq, pq)" in capsys.readouterr().err
    assert train.main(["--stage", "tiger", *argv[4:], "--tokenizer", "opq"]) == 2    # codes for TIGER
    assert "TIGER takes semantic IDs" in capsys.readouterr().err
    assert train.main([*argv, "--group-by-length", "2"]) == 0                        # length-grouped batches:
    assert len(list(runs.glob("unisrec-vqrec-minilm-*"))) == 2                       # another run, not a resume


def test_pipeline_smoke_then_everything_is_up_to_date(tmp_path, fixture_ds, minilm, capsys):
    """scripts/pipeline.py on the fixture catalog (real MiniLM), then a second call that only reads."""
    import pipeline
    argv = ["--dataset", str(fixture_ds), "--budget", "smoke", *_common(tmp_path)]
    assert pipeline.main(argv) == 0
    out = capsys.readouterr()
    runs = tmp_path / "runs" / "Fix"
    for pattern in ("encoder-minilm-*", "retrieval-minilm-*", "retrieval-encoder-minilm-*", "embed-minilm-*",
                    "embed-encoder-minilm-*", "unisrec-id-*", "unisrec-inductive-minilm-*",
                    "unisrec-inductive-encoder-minilm-*", "ids-rqvae-minilm-*", "ids-rqvae-encoder-minilm-*",
                    "tiger-rqvae-minilm-*", "tiger-rqvae-encoder-minilm-*", "ease-items-*", "codes-opq-minilm-*",
                    "codes-opq-encoder-minilm-*", "unisrec-vqrec-minilm-*", "unisrec-vqrec-encoder-minilm-*"):
        assert (_one(runs, pattern) / "results.json").exists(), pattern
    assert "[pipeline] python train.py --stage encoder --encoder minilm --epochs 1 --max-length 32" in out.err
    for table in ("Table 1 shape", "Table 2 shape", "Table 3 shape", "collisions", "cold-start"):
        assert table in out.out                                   # the report of what the pipeline made
    first = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}

    assert pipeline.main(argv) == 0                               # nothing left to do
    assert capsys.readouterr().err.count("up to date") >= 17
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == first

    # a longer TIGER history: a new TIGER folder on the same IDs, nothing else redone, moved or deleted
    tiger = ["--stage", "tiger", "--dataset", str(fixture_ds), "--encoder", "minilm", "--max-length", "256",
             "--rqvae-epochs", "20", "--max-steps", "30", "--eval-every", "30", "--warmup-steps", "10"]
    assert train.main([*tiger, "--max-history", "10", *_common(tmp_path)]) == 0
    assert len(list(runs.glob("tiger-*"))) == 3 and len(list(runs.glob("ids-*"))) == 2
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())


def test_weights_are_known_by_content_not_path(tmp_path, fixture_ds, minilm, capsys, monkeypatch):
    """Moving the weights (another cache folder, same bytes) retrains nothing; other bytes do."""
    import shutil
    common = ["--dataset", str(fixture_ds), "--encoder", "minilm", "--fields", "title", *_common(tmp_path)]
    base = weights_folder("minilm")
    first = shutil.copytree(base, tmp_path / "cache-a" / "all-MiniLM-L6-v2")
    monkeypatch.setenv("ENCODEREC_CACHE", str(tmp_path / "cache-a"))
    assert weights_folder("minilm") == first
    assert train.main(["--stage", "embed", *common]) == 0
    moved = shutil.move(first, tmp_path / "cache-b" / "all-MiniLM-L6-v2")
    monkeypatch.setenv("ENCODEREC_CACHE", str(tmp_path / "cache-b"))
    assert weights_folder("minilm") == moved
    capsys.readouterr()
    assert train.main(["--stage", "embed", *common]) == 0
    assert "up to date" in capsys.readouterr().err
    enc = encoderec.load_encoder(moved)  # other bytes in the same place: a new run
    with torch.no_grad():
        enc.bert.embeddings.word_embeddings.weight[0] += 1.0
    encoderec.save_pretrained(enc, moved)
    assert train.main(["--stage", "embed", *common]) == 0
    assert "up to date" not in capsys.readouterr().err


def test_eval_without_a_run_names_the_command_that_makes_it(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--task", "tiger", "--dataset", "beauty",
                        "--runs", str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "python train.py --stage tiger --dataset beauty" in r.stderr


@pytest.mark.parametrize("normalize", [False, True])
def test_unisrec_input_scale_is_kept_by_eval(tmp_path, fixture_ds, capsys, normalize):
    """Raw embeddings (UniSRec's own input) or --normalize: eval rebuilds the same model and ranks."""
    emb = tmp_path / "e.npy"
    np.save(emb, 5 * np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))
    flag = ["--normalize"] if normalize else []
    assert train.main(["--stage", "unisrec", "--dataset", str(fixture_ds), "--emb", str(emb), *flag,
                       "--max-epochs", "2", *_common(tmp_path)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = Path(trained["run"])
    assert np.load(run / "test_ranks.npy").shape == (6,) and trained["seed"] == 0
    assert ev.main(["--task", "unisrec", "--dataset", str(fixture_ds), "--run", str(run), "--ranks",
                    str(tmp_path / "r.npy"), "--data-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test"] == trained["test"]
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), np.load(run / "test_ranks.npy"))


def test_a_larger_tiger_batch_keeps_the_examples_and_scales_the_lr(tmp_path, fixture_ds, capsys):
    """--batch-size 1024 = 4 x TIGER's 256: the default schedule's steps / 4 (the same examples) and the
    peak lr x sqrt(4) (Adam's square-root rule), recorded in the run key; given values are kept."""
    argv = ["--stage", "tiger", "--dataset", str(fixture_ds), "--fields", "title", "--rqvae-epochs", "2",
            "--batch-size", "1024", "--max-epochs", "1", *_common(tmp_path)]
    assert train.main(argv) == 0
    run = _one(tmp_path / "runs" / "Fix", "tiger-*")
    key = json.loads((run / "run.json").read_text())["key"]
    assert key["loop"]["lr"] == pytest.approx(2e-3) and key["loop"]["max_steps"] == 50_000
    assert key["loop"]["eval_every"] == 250 and key["warmup"] == 250
    assert train.main([*argv, "--lr", "1e-3", "--eval-every", "7", "--out", str(tmp_path / "t2")]) == 0
    key = json.loads((tmp_path / "t2" / "run.json").read_text())["key"]
    assert key["loop"]["lr"] == 1e-3 and key["loop"]["eval_every"] == 7 and key["warmup"] == 250
