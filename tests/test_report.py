"""scripts/report.py: every kind of finished run lands in its table, with its run folder."""
import json
import os
from pathlib import Path

import numpy as np

import eval as ev
import report as rp


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


M = {"recall@10": 0.5, "ndcg@10": 0.25, "recall@50": 0.75, "ndcg@50": 0.3, "recall@5": 0.4, "ndcg@5": 0.2}


def test_report_collects_every_table(tmp_path, capsys):
    root = tmp_path / "runs" / "Fix"
    _write(root / "unisrec-id-1" / "results.json", {"task": "unisrec", "encoder": "none", "test": M})
    _write(root / "unisrec-inductive-minilm-2" / "results.json",
           {"task": "unisrec", "encoder": "minilm", "max_epochs": 1, "stopped_early": False,
            "test": {**M, "recall@10": 0.61}})
    _write(root / "unisrec-inductive-minilm-2" / "run.json", {"key": {"loop": {"max_epochs": 1}}})
    _write(root / "tiger-rqvae-minilm-3" / "results.json",
           {"task": "tiger", "encoder": "minilm", "tokenizer": "rqvae", "steps": 30, "stopped_early": False,
            "test": {**M, "recall@10": 0.07}, "popularity": {**M, "recall@10": 0.02}})
    _write(root / "tiger-rqvae-minilm-3" / "run.json", {"key": {"loop": {"max_steps": 30}}})
    _write(root / "ids-rqvae-minilm-4" / "results.json",
           {"task": "rqvae", "encoder": "minilm", "tokenizer": "rqvae",
            "collisions": {"items": 10, "unique_prefixes": 9, "collision_rate": 0.1, "largest_group": 2,
                           "usage": [1.0, 0.9, 0.8]}})
    _write(root / "retrieval-minilm-5" / "results.json",
           {"task": "retrieval", "encoder": "minilm", "max_length": 32, **M})
    _write(root / "encoder-minilm-6" / "results.json", {"task": "encoder", "backbone": "minilm"})
    _write(root / "encoder-minilm-6" / "history.json", [{"epoch": 1.0, "valid": {"recall@10": 0.9, "ndcg@10": 0.8}}])
    _write(root / "embed-minilm-7" / "results.json", {"task": "embed", "encoder": "minilm"})   # no table
    _write(root / "ease-items-8" / "results.json", {"task": "ease", "lambda": 30.0, "test": {**M, "recall@10": 0.3}})
    recs = rp.collect_report(tmp_path / "runs", ["Fix"])
    got = {(r["table"], r["row"], r["schedule"], r["metric"]): r["value"] for r in recs}
    assert got[("unisrec", "no text (SASRec-ID)", "", "recall@10")] == 0.5
    assert got[("unisrec", "all-MiniLM-L6-v2", "capped at 1 epochs", "recall@10")] == 0.61
    assert got[("tiger", "all-MiniLM-L6-v2 / rqvae", "30 steps max", "recall@10")] == 0.07
    assert got[("tiger", "popularity", "", "recall@10")] == 0.02
    assert got[("tiger", "EASE", "", "recall@10")] == got[("unisrec", "EASE", "", "recall@10")] == 0.3
    assert got[("collisions", "all-MiniLM-L6-v2 / rqvae", "", "usage_l3")] == 0.8
    assert got[("retrieval", "all-MiniLM-L6-v2 (all items, 32 tokens)", "", "ndcg@10")] == 0.25
    assert got[("retrieval", "encoder-minilm (held-out items, epoch 1)", "", "recall@10")] == 0.9
    md = rp.report_markdown(recs)
    for title in ("Table 1 shape", "Table 2 shape", "Table 3 shape", "collisions"):
        assert title in md
    assert "| all-MiniLM-L6-v2 (capped at 1 epochs) | 0.6100 |" in md
    assert "runs/Fix/tiger-rqvae-minilm-3" in md                           # each cell names its run
    assert rp.main(["--dataset", "fix", "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "Table 2 shape" in out and json.loads(out.strip().splitlines()[-1])["datasets"] == ["Fix"]
    assert (tmp_path / "runs" / "report-Fix.csv").is_file()


def test_report_keeps_the_newest_of_equal_rows_and_names_custom_embeddings(tmp_path):
    root = tmp_path / "runs" / "Fix"
    _write(root / "unisrec-inductive-minilm-a" / "results.json", {"task": "unisrec", "encoder": "minilm", "test": M})
    _write(root / "unisrec-inductive-minilm-b" / "results.json",
           {"task": "unisrec", "encoder": "minilm", "test": {**M, "recall@10": 0.9}})
    os.utime(root / "unisrec-inductive-minilm-a" / "results.json", (1, 1))   # a is older
    _write(root / "unisrec-custom" / "results.json",                          # --emb: the file is the source
           {"task": "unisrec", "encoder": "/x/bge.npy", "test": {**M, "recall@10": 0.7}})
    _write(root / "tiger-unfinished" / "last.pt", {})                        # no results.json: not reported
    got = {(r["row"], r["metric"]): r["value"] for r in rp.collect_report(tmp_path / "runs", ["Fix"])}
    assert got[("all-MiniLM-L6-v2", "recall@10")] == 0.9
    assert got[("bge.npy", "recall@10")] == 0.7                                # not mixed into MiniLM's row
    assert not any(r.startswith("tiger") for r, _ in got)


def test_seeds_are_averaged_and_encoderec_is_tested_against_its_backbone(tmp_path):
    """As train.py writes them: per seed an EncodeRec encoder folder (its own hash) and UniSRec runs that
    stop at different steps; per-user ranks in test_ranks.npy. The seeds of a row average, the tuned row is
    tested against all-MiniLM-L6-v2's with a paired t-test, the cell shows mean ± std (n) and the star."""
    root, rng = tmp_path / "runs" / "Fix", np.random.default_rng(0)
    base_ranks = rng.integers(0, 40, 300)
    loop = {"max_epochs": None, "patience": 10, "lr": 0.001}
    for seed in range(3):
        enc = root / f"encoder-minilm-{seed}aa"
        _write(enc / "results.json", {"task": "encoder", "backbone": "minilm"})
        _write(enc / "run.json", {"key": {"temperature": 0.05, "seed": seed, "weights": "w"}})
        for source, ranks in (("minilm", base_ranks + rng.integers(0, 2, 300)),
                              (str(enc), np.maximum(base_ranks - 3 - rng.integers(0, 2, 300), 0))):
            run = root / f"unisrec-{Path(source).name}-{seed}"
            _write(run / "results.json", {"task": "unisrec", "encoder": source, "seed": seed, "steps": 100 + seed,
                                          "stopped_early": True, "test": ev.summarize(ranks, (10, 50))})
            _write(run / "run.json", {"key": {"mode": "inductive", "embeddings": f"{source}{seed}",
                                              "loop": {**loop, "seed": seed}}})
            np.save(run / "test_ranks.npy", ranks)
    recs = {(r["row"], r["metric"]): r for r in rp.collect_report(tmp_path / "runs", ["Fix"])}
    tuned, base = recs[("EncodeRec (all-MiniLM-L6-v2)", "ndcg@10")], recs[("all-MiniLM-L6-v2", "ndcg@10")]
    assert tuned["n"] == base["n"] == 3 and tuned["std"] > 0 and tuned["value"] > base["value"]
    assert tuned["p"] < 1e-6 and tuned["diff"] > 0 and base["p"] is None
    assert recs[("EncodeRec (all-MiniLM-L6-v2)", "ndcg@50")]["p"] is None        # tested: @10 only
    md = rp.report_markdown(list(recs.values()))
    assert f"{tuned['value']:.4f} ± {tuned['std']:.4f} (3)* (p " in md and "paired t-test" in md


def test_vqrec_seeds_average_and_pair_with_the_backbone_although_their_codes_differ(tmp_path):
    """Each seed and encoder has its own codes file (its hash in the run key): a VQ-Rec row still averages
    its seeds and is tested against the backbone's VQ-Rec row, in Table 2 and the cold-start table."""
    root, rng = tmp_path / "runs" / "Fix", np.random.default_rng(0)
    base_ranks = rng.integers(0, 40, 200)
    for seed in range(2):
        enc = root / f"encoder-minilm-{seed}bb"
        _write(enc / "results.json", {"task": "encoder", "backbone": "minilm"})
        _write(enc / "run.json", {"key": {"temperature": 0.05, "seed": seed}})
        for source, ranks in (("minilm", base_ranks), (str(enc), np.maximum(base_ranks - 5, 0))):
            run = root / f"unisrec-vqrec-{Path(source).name}-{seed}"
            test = ev.summarize(ranks, (10, 50), cold=np.arange(200) < 20)
            _write(run / "results.json", {"task": "unisrec", "mode": "vqrec", "encoder": source, "seed": seed,
                                          "test": test})
            _write(run / "run.json", {"key": {"mode": "vqrec", "codes": f"{source}{seed}", "embeddings": None,
                                              "loop": {"seed": seed}}})
            np.save(run / "test_ranks.npy", ranks)
    recs = {(r["table"], r["row"], r["metric"]): r for r in rp.collect_report(tmp_path / "runs", ["Fix"])}
    tuned = recs[("unisrec", "VQ-Rec on EncodeRec (all-MiniLM-L6-v2)", "ndcg@10")]
    assert tuned["n"] == 2 and tuned["p"] < 1e-6 and tuned["diff"] > 0
    assert recs[("cold", "VQ-Rec: all-MiniLM-L6-v2", "cold_start_n")]["value"] == 20


def test_collision_rows_name_their_setting_and_fewer_collisions_earn_the_star(tmp_path):
    """Collision rates over seeds: Welch's t-test of the tuned encoder against its backbone in the same
    setting; a star only where the tuned one collides less; settings are rows of their own."""
    root = tmp_path / "runs" / "Fix"
    enc = root / "encoder-minilm-0aa"
    _write(enc / "results.json", {"task": "encoder", "backbone": "minilm"})
    _write(enc / "run.json", {"key": {"temperature": 0.05, "seed": 0}})
    rates = {("minilm", True): [0.080, 0.082, 0.081], (str(enc), True): [0.060, 0.061, 0.059],
             ("minilm", False): [0.20, 0.21, 0.22], (str(enc), False): [0.30, 0.29, 0.31]}
    for (source, std), rs in rates.items():
        for seed, rate in enumerate(rs):
            run = root / f"ids-rqvae-{Path(source).name}-{std}-{seed}"
            _write(run / "results.json", {"task": "rqvae", "encoder": source, "seed": seed, "tokenizer": "rqvae",
                                          "standardize": std, "dead_code_restart": True,
                                          "collisions": {"collision_rate": rate, "largest_group": 3}})
            _write(run / "run.json", {"key": {"tokenizer": "rqvae", "config": {"standardize": std},
                                              "embeddings": source, "seed": seed}})
    recs = {(r["row"], r["metric"]): r for r in rp.collect_report(tmp_path / "runs", ["Fix"])}
    fewer = recs[("EncodeRec (all-MiniLM-L6-v2) / rqvae", "collision_rate")]
    more = recs[("EncodeRec (all-MiniLM-L6-v2) / rqvae, unscaled", "collision_rate")]
    assert fewer["n"] == 3 and fewer["diff"] < 0 and fewer["p"] < 0.01
    assert more["diff"] > 0 and more["p"] < 0.05
    assert recs[("all-MiniLM-L6-v2 / rqvae, unscaled", "collision_rate")]["p"] is None
    md = rp.report_markdown(list(recs.values()))
    assert f"{fewer['value']:.4f} ± {fewer['std']:.4f} (3)* (p " in md
    assert f"{more['value']:.4f} ± {more['std']:.4f} (3) (p " in md and "Welch" in md


def test_collision_grid_runs_end_to_end(tmp_path, capsys):
    """scripts/collision_seeds.py on a random 30-item catalog: a tiny BERT and an encoder tuned from it,
    residual k-means with and without standardisation, two seeds; every row has both seeds."""
    import importlib.util
    from conftest import ROOT
    from test_encoderec import make_tiny
    from test_faults import synthetic_lcrec
    import train
    spec = importlib.util.spec_from_file_location("collision_seeds", ROOT / "scripts" / "collision_seeds.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    ds, tiny, runs = synthetic_lcrec(tmp_path / "Syn"), make_tiny(tmp_path / "tiny"), tmp_path / "runs"
    common = ["--runs", str(runs), "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    assert train.main(["--stage", "encoder", "--backbone", str(tiny), "--dataset", str(ds), "--epochs", "1",
                       "--batch-size", "8", "--out", str(runs / "Syn" / "encoder-tiny-0"), *common]) == 0
    capsys.readouterr()
    assert grid.main(["--datasets", str(ds), "--encoders", str(tiny), str(runs / "Syn" / "encoder-tiny-0"),
                      "--settings", "rkmeans", "rkmeans, unscaled", "--seeds", "0", "1", *common]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| tiny /", "| EncodeRec (tiny) /"))]
    assert len(rows) == 4 and all("(2)" in r for r in rows) and "effective rank" in out


def test_ablation_grid_runs_end_to_end(tmp_path, capsys):
    """scripts/ablations.py on a random 30-item catalog with a tiny BERT: every variant's row is filled."""
    import importlib.util
    from conftest import ROOT
    from test_encoderec import make_tiny
    from test_faults import synthetic_lcrec
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "scripts" / "ablations.py")
    ablations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablations)
    ds = synthetic_lcrec(tmp_path / "Syn")
    variants = ["base", "25 % of items"]
    assert ablations.main(["--dataset", str(ds), "--collisions", str(ds), "--budget", "cpu", "--variants", *variants,
                           "--backbone", str(make_tiny(tmp_path / "tiny")), "--runs", str(tmp_path / "runs"),
                           "--data-dir", str(tmp_path / "data"), "--device", "cpu"]) == 0
    table = (tmp_path / "runs" / "ablations-Syn-cpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split(" | ")[0][2:] for r in rows] == variants and "nan" not in table
    pairs = sorted(json.loads((f / "results.json").read_text())["n_pairs"]
                   for f in (tmp_path / "runs" / "Syn").glob("encoder-*"))
    assert pairs == [round(0.25 * pairs[1]), pairs[1]]                                 # one encoder each


def test_popularity_is_one_row_whatever_the_encoder(tmp_path):
    """Popularity rides along with every TIGER run; the tuned encoder's recipe must not split it."""
    root = tmp_path / "runs" / "Fix"
    enc = root / "encoder-minilm-0cc"
    _write(enc / "results.json", {"task": "encoder", "backbone": "minilm"})
    _write(enc / "run.json", {"key": {"temperature": 0.05, "seed": 0}})
    for source in ("minilm", str(enc)):
        _write(root / f"tiger-rqvae-{Path(source).name}" / "results.json",
               {"task": "tiger", "encoder": source, "tokenizer": "rqvae", "test": M, "popularity": M})
    rows = {r["row"] for r in rp.collect_report(tmp_path / "runs", ["Fix"]) if r["table"] == "tiger"}
    assert rows == {"popularity", "all-MiniLM-L6-v2 / rqvae", "EncodeRec (all-MiniLM-L6-v2) / rqvae"}


def test_an_encoder_run_under_any_out_name_is_encoderec(tmp_path):
    """`--out runs/Scientific/encoderec-minilm` (the README's commands) is still a fine-tuned encoder."""
    root = tmp_path / "runs" / "Fix"
    enc = root / "encoderec-minilm"
    _write(enc / "results.json", {"task": "encoder", "backbone": "minilm"})
    _write(enc / "run.json", {"key": {"temperature": 0.05}})
    _write(root / "unisrec-x" / "results.json", {"task": "unisrec", "encoder": str(enc), "test": M})
    _write(root / "unisrec-y" / "results.json", {"task": "unisrec", "encoder": str(root / "unisrec-x"), "test": M})
    rows = {r["row"] for r in rp.collect_report(tmp_path / "runs", ["Fix"])}
    assert rows == {"EncodeRec (all-MiniLM-L6-v2)", "unisrec-x"}                      # not every folder


def test_folder_names_and_odd_metrics_cannot_forge_cells(tmp_path, capsys):
    """A dataset folder or encoder name that holds `|`, a line break or a spreadsheet formula stays one
    escaped cell (markdown) or a quoted text (CSV); a metric stored as a string is warned about by name."""
    import csv
    name = "=1+2|x"
    root = tmp_path / "runs" / name
    _write(root / "unisrec-id-1" / "results.json", {"task": "unisrec", "encoder": "none", "test": M})
    _write(root / "unisrec-inductive-a-2" / "results.json",
           {"task": "unisrec", "encoder": "-a|b\n| fake | row |", "test": {**M, "ndcg@10": "0.9"}})
    assert rp.main(["--dataset", name, "--runs", str(tmp_path / "runs")]) == 0
    cap = capsys.readouterr()
    assert "metric ndcg@10 is '0.9', not a number" in cap.err and "unisrec-inductive-a-2" in cap.err
    table = cap.out.split("### Table 2 shape")[1].split("\n\n")[1].splitlines()
    assert len(table) == 4 and all(line.count(" | ") == 2 for line in table[2:])      # header, rule, 2 rows
    assert "\\| fake \\| row \\|" in cap.out and "=1+2\\|x recall@10" in cap.out
    with open(tmp_path / "runs" / f"report-{name}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["dataset"] for r in rows} == {"'=1+2|x"}                             # no formula
    assert all(not r["row"].startswith(("=", "+", "-", "@")) for r in rows)
    assert {r["row"] for r in rows} >= {"'-a|b\n| fake | row |"}
