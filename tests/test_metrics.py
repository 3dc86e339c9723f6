"""eval.py metrics against rankings worked out by hand, ties included."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as ev
import report as rp

from conftest import ROOT
from eval import (full_ranking_ranks, metrics_from_ranks, ranks_from_scores,
                  ranks_from_topk, summarize)


def test_ranks_pessimistic_ties():
    scores = torch.tensor([
        [0.9, 0.5, 0.1, 0.7],   # target 1: 0.9 and 0.7 beat it -> rank 2
        [0.3, 0.3, 0.3, 0.3],   # target 2: all tie -> three items ahead -> rank 3
        [0.1, 0.2, 0.3, 0.8],   # target 3: best -> rank 0
        [0.5, 0.5, 0.2, 0.1],   # target 0: one tie ahead -> rank 1
    ])
    ranks = ranks_from_scores(scores, torch.tensor([1, 2, 3, 0]))
    assert ranks.tolist() == [2, 3, 0, 1]


def test_nan_target_is_a_miss():
    scores = torch.tensor([[float("nan"), 0.1, 0.2]])
    assert ranks_from_scores(scores, torch.tensor([0])).tolist() == [3]


def test_nan_on_another_item_ranks_ahead():  # pessimistic: a diverged score never helps the target
    scores = torch.tensor([[0.9, float("nan"), 0.2]])
    assert ranks_from_scores(scores, torch.tensor([0])).tolist() == [1]
    assert ranks_from_scores(scores, torch.tensor([0]), counts=torch.tensor([1, 3, 1])).tolist() == [3]


def test_metrics_by_hand():
    ranks = np.array([0, 1, 2, 9, 10, 50])
    m = metrics_from_ranks(ranks, ks=(1, 10))
    assert m["recall@1"] == pytest.approx(1 / 6)
    assert m["ndcg@1"] == pytest.approx(1 / 6)
    assert m["recall@10"] == pytest.approx(4 / 6)
    expected = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(11)) / 6
    assert m["ndcg@10"] == pytest.approx(expected)


def test_summarize_splits_cold():
    out = summarize(np.array([0, 20, 3, 1]), ks=(10,), cold=np.array([False, True, False, True]))
    assert out["n"] == 4 and out["recall@10"] == pytest.approx(0.75)
    assert out["in_set"]["n"] == 2 and out["in_set"]["recall@10"] == 1.0
    assert out["cold_start"]["recall@10"] == 0.5
    assert out["cold_start"]["ndcg@10"] == pytest.approx(0.5 / math.log2(3))


def test_topk_ranks():
    topk = np.array([[5, 3, 1], [2, 4, 6], [7, 8, 9]])
    ranks = ranks_from_topk(topk, np.array([1, 2, 0]))
    assert ranks[:2].tolist() == [2, 0]
    m = metrics_from_ranks(ranks, ks=(1, 3, 10))
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@3"] == pytest.approx(2 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)  # a miss of a 3-item list stays a miss at 10
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(4) + 1) / 3)


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (37, 11), generator=g).float()  # many ties on purpose
    targets = np.random.default_rng(0).integers(0, 11, 37)
    full = ranks_from_scores(scores, torch.as_tensor(targets)).numpy()
    for chunk in (1, 5, 37, 100):
        got = full_ranking_ranks(lambda idx: scores[idx], 37, targets, chunk_size=chunk)
        np.testing.assert_array_equal(got, full)


def test_uniform_scores_get_no_credit():
    scores = torch.zeros(4, 100)
    ranks = ranks_from_scores(scores, torch.tensor([0, 1, 2, 3])).numpy()
    assert metrics_from_ranks(ranks)["recall@10"] == 0.0


@pytest.mark.parametrize("script,args", [
    ("scripts/pipeline.py", ["--dataset", "no-such-dataset"]),
    ("train.py", ["--stage", "unisrec", "--dataset", "no-such-dataset"]),
    ("eval.py", ["--task", "tiger", "--dataset", "no-such-dataset", "--run", "x"]),
    ("scripts/report.py", []),
    ("eval.py", ["--dataset", "x"]),
])
def test_user_errors_exit_cleanly(script, args):
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True)
    assert r.returncode == 2 and "error" in r.stderr and "Traceback" not in r.stderr


def test_ranks_with_repeated_entries():
    # column 1 stands for 3 identical documents, column 2 for 2
    scores = torch.tensor([[0.5, 0.9, 0.1], [0.5, 0.9, 0.7], [0.2, 0.9, 0.9]])
    counts = torch.tensor([1, 3, 2])
    ranks = ranks_from_scores(scores, torch.tensor([0, 2, 1]), counts)
    # row 0: the 3 copies of doc 1 are ahead; row 1: 3 copies ahead, its own copy never counts;
    # row 2: doc 2 ties (2 copies, pessimistic), the target's other 2 copies do not count
    assert ranks.tolist() == [3, 3, 2]
    expanded = torch.tensor([[0.5, 0.9, 0.9, 0.9, 0.1, 0.1]])  # row 0 written out in full
    assert ranks_from_scores(expanded, torch.tensor([0])).tolist() == [3]


# ---- significance
def test_paired_t_test_and_incomplete_beta_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(0.5, 0.5, 0.3), (2, 3, 0.7), (10, 0.5, 0.99), (1000, 0.5, 0.999), (3.5, 0.5, 0.01)]:
        assert rp._betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-9, abs=1e-15)
    rng = np.random.default_rng(0)
    for n, shift in [(5, 0.3), (500, 0.02), (20_000, 0.001)]:
        x = rng.random(n)
        y = x + rng.normal(shift, 0.2, n)
        ours, ref = rp.paired_test(x, y, n_boot=2000), stats.ttest_rel(y, x)
        assert ours["t"] == pytest.approx(ref.statistic, rel=1e-9)
        assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
        lo, hi = ours["ci95"]
        assert lo < ours["diff"] < hi


def test_welch_test_matches_scipy_and_refuses_what_it_cannot_test():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for na, nb in [(3, 3), (2, 5), (10, 4)]:
        a, b = rng.normal(0.09, 0.004, na), rng.normal(0.095, 0.01, nb)
        ours, ref = rp.welch_test(a, b), stats.ttest_ind(b, a, equal_var=False)
        assert ours["t"] == pytest.approx(ref.statistic, rel=1e-9)
        assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-6)
        assert ours["diff"] == pytest.approx(b.mean() - a.mean())
    assert rp.welch_test([0.1], [0.2, 0.3]) is None                      # one run: no variance to test
    assert rp.welch_test([0.1, 0.1], [0.2, 0.2]) is None                 # deterministic: nothing to test


def test_paired_test_edges_and_per_user_metrics():
    same = rp.paired_test(np.ones(10), np.ones(10))
    assert same["diff"] == 0 and same["t"] == 0 and same["p"] == 1.0 and same["ci95"] == [0.0, 0.0]
    better = rp.paired_test(np.zeros(10), np.ones(10))                 # constant gain: t = inf, p = 0
    assert better["t"] == float("inf") and better["p"] == 0.0
    u = rp.per_user(np.array([0, 1, 9, 10, ev.MISS]))
    np.testing.assert_allclose(u["recall@10"], [1, 1, 1, 0, 0])
    np.testing.assert_allclose(u["ndcg@10"], [1, 1 / np.log2(3), 1 / np.log2(11), 0, 0])
    assert u["ndcg@10"].mean() == pytest.approx(ev.metrics_from_ranks(np.array([0, 1, 9, 10, ev.MISS]))["ndcg@10"])


def test_ease_weights_solve_each_columns_ridge_regression():
    """EASE's closed form against a brute force: column j of B is the ridge regression of item j's
    column of X on the other items' columns (penalty lam), with B_jj = 0."""
    rng = np.random.default_rng(0)
    x = (rng.random((40, 9)) < 0.3).astype(np.float64)                   # (U, I) 0/1
    lam = 2.5
    b = ev.ease_weights(torch.as_tensor(x.T @ x), lam).double().numpy()
    for j in range(x.shape[1]):
        others = np.delete(np.arange(x.shape[1]), j)
        a = x[:, others]
        want = np.linalg.solve(a.T @ a + lam * np.eye(len(others)), a.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], want, rtol=1e-4, atol=1e-5)
        assert b[j, j] == 0


def test_ease_run_picks_lambda_on_validation_and_ranks_the_test(tmp_path):
    from test_faults import synthetic_lcrec
    from data import load_dataset
    ds = load_dataset(str(synthetic_lcrec(tmp_path / "Syn")), tmp_path / "data")
    res = ev.ease_run(ds, lambdas=(1.0, 100.0), ranks_to=tmp_path / "ranks.npy")
    best = max((1.0, 100.0), key=lambda lam: res["valid"][f"{lam:g}"]["ndcg@10"])
    assert res["lambda"] == best and set(res["valid"]) == {"1", "100"}
    ranks = np.load(tmp_path / "ranks.npy")
    assert len(ranks) == len(ds.splits.test) == res["test"]["n"]
    assert res["test"]["ndcg@10"] == pytest.approx(ev.metrics_from_ranks(ranks)["ndcg@10"])
