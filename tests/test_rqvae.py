"""Tests for rqvae.py and its CLI wiring: the code -> latent round trip, k-means (no empty code on
separable data, determinism), the straight-through gradient, the collision audit on a hand example, a short training run, checkpoints,
and `train.py --stage rqvae` end to end on the fixture catalog.
Tiny random configs, 1 thread."""
import json
from dataclasses import replace

import amazon_fixture as fx
import numpy as np
import pytest
import torch

import eval as ev
import rqvae as rq
import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = rq.RQVAEConfig(input_dim=12, hidden_dims=(16, 8), latent_dim=4, levels=3, codebook_size=8,
                      batch_size=64, epochs=20, kmeans_iters=10)


def clusters(n_clusters=16, per=8, d=8, sep=20.0, seed=0) -> np.ndarray:
    """n_clusters tight, far-apart blobs: (n_clusters * per, d) float32."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)) * sep
    return (centers.repeat(per, 0) + 0.05 * rng.standard_normal((n_clusters * per, d))).astype(np.float32)


def build(seed=0, **kw) -> rq.RQVAE:
    torch.manual_seed(seed)
    return rq.RQVAE(replace(TINY, **kw)).eval()


# ----------------------------------------------------------------------------- model
def test_codes_round_trip_to_the_quantised_latent():
    m = build()
    m.set_standardization(np.random.default_rng(1).standard_normal((50, 12)) * 3 + 1)
    x = torch.randn(20, 12)
    with torch.no_grad():
        codes, z_q, losses = m.quantize(m.encode(x))
        assert codes.shape == (20, 3) and codes.dtype == torch.int64 and losses.shape == (3,)
        latent = m.codebooks[torch.arange(codes.shape[1]), codes].sum(1)      # the codes alone give z_q
        torch.testing.assert_close(latent, z_q, atol=1e-6, rtol=0)
        torch.testing.assert_close(m.decode(latent), m.decode(z_q), atol=1e-5, rtol=0)
        out = m(x)
        torch.testing.assert_close(out.x_hat, m.decode(z_q), atol=1e-5, rtol=0)
        assert torch.equal(out.codes, codes)
        # decode un-standardises: decoder output in z-scores, times std plus mean
        torch.testing.assert_close(m.decode(z_q), m.decoder(z_q) * m.std + m.mean)


def test_residuals_follow_the_chosen_codes():
    m = build()
    z = torch.randn(10, 4)
    with torch.no_grad():
        codes, _, _, res = m.quantize(z, return_residuals=True)
    assert res.shape == (3, 10, 4)
    torch.testing.assert_close(res[0], z)
    for lv in (1, 2):
        torch.testing.assert_close(res[lv], res[lv - 1] - m.codebooks[lv - 1, codes[:, lv - 1]])


def test_straight_through_gradient_reaches_the_encoder():
    m = build().train()
    x = torch.randn(16, 12)
    out = m(x)
    out.recon.backward()                         # reconstruction alone: only the STE links it to z
    g = m.encoder[0].weight.grad
    assert g is not None and g.abs().sum() > 0
    assert m.codebooks.grad is None or m.codebooks.grad.abs().sum() == 0   # codes move by their own loss
    m.zero_grad()
    out = m(x)
    out.quant.sum().backward()
    assert m.codebooks.grad.abs().sum() > 0 and m.encoder[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- k-means
def test_kmeans_leaves_no_empty_code_on_separable_data():
    x = torch.from_numpy(clusters())
    c, a = rq.kmeans(x, 16, iters=20, seed=3)
    assert c.shape == (16, 8) and np.bincount(a.numpy(), minlength=16).min() > 0
    truth = np.arange(16).repeat(8)
    assert len({(t, p) for t, p in zip(truth, a.tolist())}) == 16   # one code per true cluster


def test_kmeans_init_of_the_codebooks_uses_every_code():
    """init_codebooks = k-means on the latents of a batch: with an identity encoder on 16
    separable clusters and 16 codes, the first level uses every code."""
    m = build(input_dim=8, hidden_dims=(), latent_dim=8, codebook_size=16, standardize=False)
    with torch.no_grad():
        m.encoder[0].weight.copy_(torch.eye(8))
        m.encoder[0].bias.zero_()
    x = torch.from_numpy(clusters())
    m.init_codebooks(x, seed=0)
    codes = m.quantize(m.encode(x))[0]
    assert bool(m.initialized) and np.bincount(codes[:, 0].numpy(), minlength=16).min() > 0


def test_kmeans_with_fewer_points_than_codes():
    x = torch.randn(5, 3)
    c, a = rq.kmeans(x, 8, seed=0)
    assert c.shape == (8, 3) and a.tolist() == [0, 1, 2, 3, 4]


def test_residual_kmeans_is_deterministic_for_a_seed():
    emb = np.random.default_rng(0).standard_normal((300, 10)).astype(np.float32)
    a = rq.residual_kmeans(emb, levels=3, k=16, iters=20, seed=7)
    b = rq.residual_kmeans(emb, levels=3, k=16, iters=20, seed=7)
    assert a.shape == (300, 3) and a.dtype == np.int64 and np.array_equal(a, b)
    assert not np.array_equal(a, rq.residual_kmeans(emb, levels=3, k=16, iters=20, seed=8))
    codes, books = rq.residual_kmeans(emb, levels=3, k=16, iters=20, seed=7, return_codebooks=True)
    assert np.array_equal(codes, a) and books.shape == (3, 16, 10)
    z = (emb - emb.mean(0)) / emb.std(0)             # the standardised space the codebooks live in
    approx = sum(books[lv, codes[:, lv]] for lv in range(3))
    assert ((z - approx) ** 2).mean() < ((z - books[0, codes[:, 0]]) ** 2).mean() < (z ** 2).mean()


def test_embedding_stats_hand_example():
    e = np.eye(4, 8, dtype=np.float32)[[0, 1, 2, 3, 0, 0]]           # rows 4, 5 repeat row 0
    s = rq.embedding_stats(e)
    assert s["repeated_embeddings"] == 2 and s["collision_floor"] == pytest.approx(2 / 6, abs=1e-6)
    # pairs of distinct items: (0,4), (0,5), (4,5) have cosine 1, the other 12 have 0
    assert s["mean_cosine"] == pytest.approx(3 / 15, abs=1e-4)
    rank1 = np.outer(np.arange(1, 7), np.ones(8)).astype(np.float32)   # one direction of variance
    assert rq.embedding_stats(rank1)["effective_rank"] == pytest.approx(1.0, abs=0.05)
    assert rq.embedding_stats(rank1)["repeated_embeddings"] == 0
    iso = np.random.default_rng(0).standard_normal((4000, 8)).astype(np.float32)
    assert rq.embedding_stats(iso)["effective_rank"] == pytest.approx(8, abs=0.2)   # all directions alike
    assert abs(rq.embedding_stats(iso)["mean_cosine"]) < 0.01


def test_collision_stats_hand_example():
    codes = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1]])
    s = rq.collision_stats(codes, codebook_size=4)
    assert s["items"] == 6 and s["unique_prefixes"] == 4 and s["largest_group"] == 3
    assert s["collision_rate"] == pytest.approx(1 - 4 / 6, abs=1e-6) and s["items_in_collisions"] == 3
    assert s["usage"] == [0.5, 0.5, 0.5]
    p0 = np.array([4, 2]) / 6                           # level 0: code 0 four times, code 1 twice
    assert s["perplexity"][0] == pytest.approx(np.exp(-(p0 * np.log(p0)).sum()), abs=0.01)
    assert s["perplexity"][1] == pytest.approx(2.0, abs=0.01)    # level 1: 3 + 3
    assert rq.collision_stats(np.arange(6)[:, None].repeat(3, 1), 8)["collision_rate"] == 0


# ----------------------------------------------------------------------------- training
def _train(emb, cfg, out, seed=0):
    """train.fit_rqvae (the RQ-VAE through trainer.fit): (model, the per-epoch history)."""
    model = train.fit_rqvae(emb, cfg, out, seed, "cpu", {})
    return model, json.loads((out / "history.json").read_text())


def test_training_lowers_the_loss_and_is_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((20, 12)).repeat(10, 0) + 0.1 * rng.standard_normal((200, 12))).astype(np.float32)
    m, hist = _train(emb, TINY, tmp_path / "a")
    assert len(hist) == 20 and hist[-1]["loss"] < hist[0]["loss"]
    assert set(hist[-1]["valid"]) >= {"usage", "perplexity", "collision_rate", "largest_group", "restarted"}
    m2, hist2 = _train(emb, TINY, tmp_path / "b")
    assert [h["loss"] for h in hist2] == [h["loss"] for h in hist]
    assert np.array_equal(rq.tokenize(m, emb), rq.tokenize(m2, emb))


def test_dead_code_restart_revives_unused_codes(tmp_path):
    emb = np.random.default_rng(0).standard_normal((200, 12)).astype(np.float32)
    cfg = replace(TINY, epochs=3, kmeans_init=False, dead_code_restart=True, codebook_size=32)
    _, hist = _train(emb, cfg, tmp_path)
    assert sum(hist[0]["valid"]["restarted"]) > 0           # random codebooks: many codes unused at first
    assert hist[-1]["valid"]["usage"][0] > hist[0]["valid"]["usage"][0]


def test_the_recipe_copied_alone_trains_codes_that_tiger_alone_turns_into_ids(tmp_path):
    """rqvae.py and tiger.py copied into an empty folder: the docstring's plain loop over rqvae.Recipe trains
    the codes (k-means init, usage, dead-code restart) and tiger.semantic_ids makes them TIGER's IDs."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    for name in ("rqvae.py", "tiger.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    script = (
        "import numpy as np, torch, rqvae, tiger\n"
        "torch.manual_seed(0)\n"
        "rng = np.random.default_rng(0)\n"
        "emb = (rng.standard_normal((20, 12)).repeat(10, 0) + 0.1 * rng.standard_normal((200, 12)))"
        ".astype(np.float32)\n"
        "cfg = rqvae.RQVAEConfig(input_dim=12, hidden_dims=(16, 8), latent_dim=4, codebook_size=8, "
        "batch_size=64, epochs=5, kmeans_iters=10)\n"
        "model = rqvae.RQVAE(cfg)\n"
        "recipe = rqvae.Recipe(model, emb)\n"
        "opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)\n"
        "for epoch in range(cfg.epochs):\n"
        "    for idx in torch.randperm(len(emb)).split(cfg.batch_size):\n"
        "        opt.zero_grad(); recipe.loss(idx).backward(); opt.step()\n"
        "    rec = recipe.end_of_epoch()\n"
        "ids, vocab = tiger.semantic_ids(rqvae.tokenize(model, emb), cfg.codebook_size)\n"
        "tiger.SemanticIDs(ids, vocab)\n"
        "print(bool(model.initialized), sorted(rec), ids.shape, len(np.unique(ids, axis=0)))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "['collision_rate',", "'largest_group',", "'perplexity',",
                                  "'restarted',", "'usage']", "(200,", "4)", "200"]


def test_bad_embeddings_are_value_errors():
    with pytest.raises(ValueError, match="NaN"):
        rq.check_embeddings(np.full((4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        rq.residual_kmeans(np.zeros(5))


# ----------------------------------------------------------------------------- CLI
def _common(tmp_path):
    return ["--data-dir", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs")]


@pytest.mark.parametrize("tokenizer", ["rkmeans", "rqvae"])
def test_cli_stage_rqvae_then_its_ids_are_guarded(tmp_path, tokenizer, capsys):
    folder = fx.write_lcrec(tmp_path / "Fix")
    emb_path = tmp_path / "emb.npy"
    np.save(emb_path, np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32))
    epochs = ["--rqvae-epochs", "2"] if tokenizer == "rqvae" else []           # refused with rkmeans
    argv = ["--stage", "rqvae", "--dataset", str(folder), "--emb", str(emb_path), "--tokenizer", tokenizer,
            *epochs, "--device", "cpu", *_common(tmp_path)]
    assert train.main(argv) == 0
    run = next((tmp_path / "runs" / "Fix").glob(f"ids-{tokenizer}-emb-emb-*"))          # named by the file
    ids = np.load(run / "semantic_ids.npy")
    res = json.loads((run / "results.json").read_text())
    assert ids.shape == (6, 4) and ids.dtype == np.int64 and len(np.unique(ids, axis=0)) == 6
    assert res["vocab_sizes"] == [256, 256, 256, 256] and res["tokenizer"] == tokenizer
    assert res["collisions"]["items"] == 6 and res["ids_unique"] is True
    assert (run / "last.pt").exists() == (tokenizer == "rqvae")
    capsys.readouterr()
    assert train.main(argv) == 0                       # same inputs: nothing to do
    assert "up to date" in capsys.readouterr().err
    np.save(run / "semantic_ids.npy", ids[::-1])                                   # other items' IDs
    assert train.main(["--stage", "tiger", *argv[2:], "--max-steps", "1", "--warmup-steps", "1"]) == 2   # refused, not used
    assert "semantic_ids.npy is not the file this project wrote" in capsys.readouterr().err


def test_cli_errors_exit_2(tmp_path, capsys):
    folder = fx.write_lcrec(tmp_path / "Fix")
    # evaluation reads a finished folder and names the command that makes one
    assert ev.main(["--task", "tiger", "--dataset", str(folder), *_common(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "python train.py --stage tiger" in err and "Traceback" not in err
    # no text: the missing embedding cannot be made
    notext = tmp_path / "NoText"
    notext.mkdir()
    (notext / "N.item.json").write_text(json.dumps({str(i): {"asin": f"A{i}"} for i in range(3)}))
    (notext / "N.inter.json").write_text(json.dumps({"0": [0, 1, 2]}))
    assert train.main(["--stage", "rqvae", "--dataset", str(notext), *_common(tmp_path)]) == 2
    assert "title" in capsys.readouterr().err
    assert train.main(["--stage", "rqvae", "--dataset", str(folder), "--encoder", "none",
                       *_common(tmp_path)]) == 2
    assert "--encoder" in capsys.readouterr().err
    # an embedding of the wrong size, or of integers
    for bad in (np.zeros((4, 8), np.float32), np.zeros((6, 8), np.int64)):
        np.save(tmp_path / "bad.npy", bad)
        assert train.main(["--stage", "rqvae", "--dataset", str(folder), "--emb", str(tmp_path / "bad.npy"),
                           *_common(tmp_path)]) == 2
        assert "item embeddings must be float (6, d)" in capsys.readouterr().err


def test_training_is_reproducible_with_several_threads():
    """Same seed -> same codes for repeated trainings on 2 CPU threads (a gather's index_put backward
    summed in a thread-dependent order and made the codes drift between runs). In a fresh process:
    the suite's fixtures pin one thread, which hides the problem."""
    import subprocess
    import sys
    from pathlib import Path
    script = (
        "import numpy as np, torch, tempfile; from pathlib import Path; from dataclasses import replace\n"
        "import rqvae as rq, train\n"
        "torch.set_num_threads(2)\n"
        "emb = np.random.default_rng(0).standard_normal((3000, 48)).astype(np.float32)\n"
        "cfg = replace(rq.RQVAEConfig(input_dim=48), epochs=3)\n"
        "runs = [rq.tokenize(train.fit_rqvae(emb, cfg, Path(tempfile.mkdtemp()), 0, 'cpu', {}), emb)\n"
        "        for _ in range(3)]\n"
        "print(all(np.array_equal(runs[0], r) for r in runs[1:]))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    assert out.strip().splitlines()[-1] == "True"


# ----------------------------------------------------------------------------- product codes (VQ-Rec)
@pytest.mark.parametrize("rotate", [False, True])
def test_product_codes_invariants(rotate):
    """Codes in range per sub-vector, R orthogonal, reconstruction = centroids rotated back; OPQ's
    alternation never raises the distortion and ends below plain PQ on correlated data."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 16)) @ rng.standard_normal((16, 16))).astype(np.float32)  # correlated dims
    out = rq.product_codes(x, n_sub=4, k=8, rotate=rotate, opq_iters=8, fit_rows=np.arange(500))
    codes, r, books = out["codes"], out["rotation"], out["centroids"]
    assert codes.shape == (600, 4) and codes.min() >= 0 and codes.max() < 8 and books.shape == (4, 8, 4)
    np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-5)
    recon = books[np.arange(4), codes].reshape(600, 16) @ r.T + out["mean"]      # (N, 4, 4) -> (N, 16)
    d = out["distortion"]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(d, d[1:]))                       # monotone
    err = ((x[:500] - recon[:500]) ** 2).sum(1).mean()
    assert err == pytest.approx(d[-1], rel=0.05) if not rotate else err <= d[-1] * 1.0001
    if rotate:
        plain = rq.product_codes(x, n_sub=4, k=8, rotate=False, fit_rows=np.arange(500))["distortion"][0]
        assert d[-1] < 0.9 * plain
    stats = rq.collision_stats(codes, 8)  # of the whole code
    assert len(stats["usage"]) == 4 and 0 < min(stats["usage"]) <= 1 and 0 <= stats["collision_rate"] < 1


def test_product_codes_refuse_uneven_splits():
    with pytest.raises(ValueError, match="do not split"):
        rq.product_codes(np.ones((10, 10), np.float32), n_sub=3)
