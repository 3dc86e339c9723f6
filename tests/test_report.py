"""eval.py --report: every kind of result file lands in its table, with its run folder."""
import json

import eval as ev


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_report_collects_every_table(tmp_path, capsys):
    root = tmp_path / "runs" / "Fix"
    m = {"recall@10": 0.5, "ndcg@10": 0.25, "recall@50": 0.75, "ndcg@50": 0.3, "recall@5": 0.4, "ndcg@5": 0.2}
    _write(root / "sasrec-id" / "results.json", {"task": "unisrec", "encoder": "none", "test": m})
    _write(root / "unisrec-inductive-minilm" / "results.json",
           {"task": "unisrec", "encoder": "minilm", "max_epochs": 1, "stopped_early": False,
            "test": {**m, "recall@10": 0.61}})
    _write(root / "tiger-rqvae-minilm" / "results.json",
           {"task": "tiger", "encoder": "minilm", "tokenizer": "rqvae", "steps_run": 30, "stopped_early": False,
            "test": {**m, "recall@10": 0.07}, "popularity": {**m, "recall@10": 0.02}})
    _write(root / "unisrec-inductive-enc" / "results.json",
           {"task": "unisrec", "encoder": "runs/Other/enc", "max_minutes": 5.0, "time_capped": True,
            "epochs_run": 44, "test": {**m, "recall@10": 0.63}})
    _write(root / "tiger-rqvae-enc" / "results.json",
           {"task": "tiger", "encoder": "enc", "tokenizer": "rqvae", "steps_run": 5500, "max_minutes": 5,
            "time_capped": True, "test": {**m, "recall@10": 0.08}, "popularity": {**m, "recall@10": 0.02}})
    _write(root / "minilm" / "semantic_ids-rqvae-e20-title+categories.json",
           {"encoder": "minilm", "tokenizer": "rqvae", "fields": ["title", "categories"],
            "collisions": {"items": 10, "unique_prefixes": 9, "collision_rate": 0.1, "largest_group": 2,
                           "usage": [1.0, 0.9, 0.8]}})
    _write(root / "enc" / "run.json", {"stage": "encoder", "args": {"backbone": "minilm", "holdout": 0.1,
                                                                     "max_length": 128}, "doc_fields": ["description"]})
    _write(root / "enc" / "history.json", [{"epoch": 0, "eval": {"recall@10": 0.7, "ndcg@10": 0.6}},
                                           {"epoch": 1, "loss": 1.0, "eval": {"recall@10": 0.9, "ndcg@10": 0.8}}])
    recs = ev.collect_report(tmp_path / "runs", ["Fix"])
    got = {(r["table"], r["row"], r["schedule"], r["metric"]): r["value"] for r in recs}
    assert got[("unisrec", "no text (SASRec-ID)", "", "recall@10")] == 0.5
    assert got[("unisrec", "all-MiniLM-L6-v2", "capped at 1 epochs", "recall@10")] == 0.61
    assert got[("tiger", "all-MiniLM-L6-v2 / rqvae", "30 steps", "recall@10")] == 0.07
    assert got[("tiger", "popularity", "", "recall@10")] == 0.02
    assert got[("unisrec", "enc", "5-min cap, 44 epochs", "recall@10")] == 0.63   # time-capped runs say so
    assert got[("tiger", "enc / rqvae", "5500 steps, 5-min cap", "recall@10")] == 0.08
    assert got[("collisions", "all-MiniLM-L6-v2 / rqvae", "e20", "usage_l3")] == 0.8
    assert got[("retrieval", "all-MiniLM-L6-v2 (held-out 10% of items, 128 tokens)", "docs: ['description']",
                "ndcg@10")] == 0.6
    assert got[("retrieval", "enc (held-out 10% of items, 128 tokens, epoch 1)", "docs: ['description']",
                "recall@10")] == 0.9
    md = ev.report_markdown(recs)
    for title in ("Table 1 shape", "Table 2 shape", "Table 3 shape", "collisions"):
        assert title in md
    assert "| all-MiniLM-L6-v2 (capped at 1 epochs) | 0.6100 |" in md
    assert "runs/Fix/tiger-rqvae-minilm" in md                             # each cell names its run


def test_report_skips_moved_aside_runs_and_names_custom_embeddings(tmp_path):
    root = tmp_path / "runs" / "Fix"
    m = {"recall@10": 0.5, "ndcg@10": 0.25, "recall@50": 0.75, "ndcg@50": 0.3}
    _write(root / "unisrec-inductive-minilm" / "results.json", {"task": "unisrec", "encoder": "minilm", "test": m})
    _write(root / "unisrec-inductive-minilm.replaced-20260101-000000" / "results.json",
           {"task": "unisrec", "encoder": "minilm", "test": {**m, "recall@10": 0.9}})
    _write(root / "unisrec-custom" / "results.json",
           {"task": "unisrec", "encoder": "minilm", "custom_emb": "/x/bge.npy", "test": {**m, "recall@10": 0.7}})
    got = {(r["row"], r["metric"]): r["value"] for r in ev.collect_report(tmp_path / "runs", ["Fix"])}
    assert got[("all-MiniLM-L6-v2", "recall@10")] == 0.5                  # not the moved-aside 0.9
    assert got[("all-MiniLM-L6-v2 (bge.npy)", "recall@10")] == 0.7         # not mixed into MiniLM's row
