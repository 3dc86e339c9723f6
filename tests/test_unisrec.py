"""Tests for unisrec.py: shapes in every mode, the causal and padding masks, the MoE gate at init,
the loss against a hand-computed cross-entropy, checkpoint round trips, and the training loop
(learning a tiny synthetic task, early stopping, exact resume). Tiny random configs, 1 thread."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import unisrec as us  # noqa: E402

I, D_PLM = 30, 12
TINY = us.UniSRecConfig(hidden_size=16, n_layers=2, n_heads=2, inner_size=24, max_seq_len=8, n_exps=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def table(seed=0, n=I, d=D_PLM):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(mode="inductive", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = replace(TINY, mode=mode, **kw)
    return us.SASRecID(I, cfg) if mode == "id" else us.UniSRec(cfg, table())


def right_aligned(seqs, L):
    out = np.full((len(seqs), L), -1, dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-L:]
        if len(s):
            out[r, L - len(s):] = s
    return out


def left_aligned(seqs, L):
    out = np.full((len(seqs), L), -1, dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-L:]
        out[r, :len(s)] = s
    return out


SEQS = [[3, 7, 1, 4], [5], [2, 9, 11, 12, 13, 14], [0, 29]]
MODES = ["inductive", "transductive", "id"]


# ----------------------------------------------------------------------------- shapes / masks
@pytest.mark.parametrize("mode", MODES)
def test_shapes(mode):
    m = build(mode).eval()
    h = right_aligned(SEQS, 8)
    assert m.encode(h).shape == (4, 16)
    states, lengths = m.hidden_states(h)
    assert states.shape == (4, 6, 16) and lengths.tolist() == [4, 1, 6, 2]  # trimmed to the longest
    assert m.item_table().shape == (I, 16)
    s = us.score(m, h)
    assert s.shape == (4, I) and s.dtype == torch.float32 and torch.isfinite(s).all()
    m.train()
    loss = m.loss(h, [1, 2, 3, 4])
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    if mode != "id":
        assert "plm_emb" in dict(m.named_buffers()) and "plm_emb" not in m.state_dict()
        assert all(p is not m.plm_emb for p in m.parameters())
        assert m.adaptor.experts[0].bias.grad is not None


@pytest.mark.parametrize("mode", MODES)
def test_causal_mask(mode):
    m = build(mode).eval()
    a = np.array([[3, 7, 1, 4, 20, 21, 22, 23]])
    b = a.copy()
    b[0, 5:] = [9, 8, 2]  # change the items after position 4
    with torch.no_grad():
        ha, _ = m.hidden_states(a)
        hb, _ = m.hidden_states(b)
    assert torch.allclose(ha[:, :5], hb[:, :5], atol=1e-6)
    assert not torch.allclose(ha[:, 5:], hb[:, 5:], atol=1e-4)
    # the last-position-only final layer equals the full computation at that position
    assert torch.allclose(m.encode(a), ha[:, -1], atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_padding_never_leaks(mode):
    m = build(mode).eval()
    ref = us.score(m, right_aligned(SEQS, 8))
    for h in (left_aligned(SEQS, 8), right_aligned(SEQS, 20), left_aligned(SEQS, 13)):
        assert torch.allclose(us.score(m, h), ref, atol=1e-5)
    weird = right_aligned(SEQS, 10)
    weird[weird < 0] = -7  # any negative value is padding
    weird[1] = [-1, 5, -3, -1, -1, -1, -1, -1, -1, -1]  # interior padding is skipped too
    assert torch.allclose(us.score(m, weird), ref, atol=1e-5)
    # a longer history keeps its most recent max_seq_len (8) items
    long = [list(range(20))]
    assert torch.allclose(us.score(m, right_aligned(long, 25)), us.score(m, right_aligned(long, 8)), atol=1e-5)
    # fully padded rows are finite, also in training mode with dropout
    empty = np.full((2, 5), -1)
    assert torch.isfinite(us.score(m, empty)).all()
    m.train()
    assert torch.isfinite(m.loss(np.concatenate([right_aligned(SEQS, 5), empty]), [0] * 6))


@pytest.mark.parametrize("mode", MODES)
def test_length_buckets_are_exact(mode):
    """Running each row at a power-of-two width >= its length changes no score and no gradient."""
    m = build(mode, max_seq_len=20, hidden_dropout=0.0, attn_dropout=0.0, adaptor_dropout=0.0, gate_noise=False)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, I, n)) for n in (1, 3, 5, 9, 17, 20, 0, 2, 30)]
    h, tgt = right_aligned(seqs, 24), rng.integers(0, I, len(seqs))
    grads = []
    for buckets in (True, False):
        m.length_buckets = buckets
        m.zero_grad()
        m.loss(h, tgt).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        m.eval()
        grads[-1]["scores"] = us.score(m, h)
        m.train()
    for k in grads[1]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k


def test_gates_start_uniform():
    m = build("inductive")
    x = torch.as_tensor(table(seed=3))
    m.eval()
    assert torch.allclose(m.adaptor.gates(x), torch.full((I, 8), 1 / 8))
    m.train()
    g = m.adaptor.gates(x)  # noisy in training, std softplus(0) + 1e-2 ...
    assert torch.allclose(g.sum(-1), torch.ones(I)) and not torch.allclose(g, torch.full((I, 8), 1 / 8))
    m.adaptor.noise = False  # ... and exactly uniform without the noise
    assert torch.allclose(m.adaptor.gates(x), torch.full((I, 8), 1 / 8))
    # the eval-mode adaptor output is the plain mean of the PW experts
    m.eval()
    want = sum(e.lin(x - e.bias) for e in m.adaptor.experts) / 8
    assert torch.allclose(m.adaptor(x), want, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_loss_matches_hand_computed(mode):
    m = build(mode).eval()
    h, tgt = right_aligned(SEQS, 8), np.array([4, 0, 29, 17])
    with torch.no_grad():
        seq = m.encode(h)                       # (4, D)
        if mode == "id":
            items = m.item_id_emb.weight[1:]
            logits = seq @ items.T
        else:
            items = m.adaptor(m.plm_emb)
            if mode == "transductive":
                items = items + m.item_id_emb.weight[1:]
            cos = (seq / seq.norm(dim=1, keepdim=True)) @ (items / items.norm(dim=1, keepdim=True)).T
            logits = cos / 0.07
        want = np.mean([torch.logsumexp(logits[r], 0).item() - logits[r, tgt[r]].item() for r in range(4)])
        got = m.loss(h, tgt).item()
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_scores_stay_float32_under_bf16_autocast(mode):
    """The full-catalog logits (and so the training cross-entropy) are float32 under autocast."""
    m = build(mode).eval()
    h = torch.as_tensor(right_aligned(SEQS, 8))
    with torch.no_grad():
        seq, tab = m.encode(h), m.item_table()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.logits(seq, tab)
        want = m.logits(seq, tab)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_shape_errors():
    with pytest.raises(ValueError, match="rows"):
        us.UniSRec(replace(TINY, n_items=31), table())
    with pytest.raises(ValueError, match="2-D"):
        us.UniSRec(TINY, np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="item-embedding table"):
        us.UniSRec(TINY)
    with pytest.raises(ValueError, match="mode"):
        us.UniSRec(replace(TINY, mode="bogus"), table())
    m = build()
    with pytest.raises(ValueError, match="item index 30"):
        m.encode(np.array([[1, 30]]))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        m.encode(np.array([1, 2]))


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_round_trip(mode, tmp_path):
    m = build(mode)
    h = right_aligned(SEQS, 8)
    ref = us.score(m, h)
    us.save_checkpoint(m, tmp_path / "m.pt", meta={"commit": "abc", "n": np.int64(3)})
    m2 = us.load_checkpoint(tmp_path / "m.pt", None if mode == "id" else table())
    assert m2.cfg == m.cfg
    assert torch.equal(us.score(m2, h), ref)
    if mode != "id":
        with pytest.raises(ValueError, match="SHA-1"):
            us.load_checkpoint(tmp_path / "m.pt", table(seed=1))
        with pytest.raises(ValueError, match="item-embedding table"):
            us.load_checkpoint(tmp_path / "m.pt")


# ----------------------------------------------------------------------------- training
def synthetic(n_users=60, length=9, seed=0):
    """Deterministic next-item rule: item i is followed by (3 i + 1) mod 30. Each user walks the
    rule from a random start; valid = last item of each walk."""
    rng = np.random.default_rng(seed)
    walks = []
    for _ in range(n_users):
        s = [int(rng.integers(I))]
        for _ in range(length - 1):
            s.append((3 * s[-1] + 1) % I)
        walks.append(s)
    train = [(w[:p], w[p]) for w in walks for p in range(1, length - 1)]
    hist = right_aligned([h for h, _ in train], 8)
    tgt = np.array([t for _, t in train])
    vh = right_aligned([w[:-1] for w in walks], 8)
    vt = np.array([w[-1] for w in walks])
    return hist, tgt, vh, vt


def ndcg_eval(vh, vt):
    def eval_fn(model):
        s = us.score(model, vh)
        t = torch.as_tensor(vt)
        rank = (s >= s.gather(1, t[:, None])).sum(1) - 1
        return {"ndcg@10": float(torch.where(rank < 10, 1 / torch.log2(rank + 2.0), 0.0).mean())}
    return eval_fn


FAST = us.TrainConfig(lr=1e-2, batch_size=64, max_epochs=8, patience=10, seed=1)
LIGHT = dict(hidden_dropout=0.1, attn_dropout=0.1, adaptor_dropout=0.1)


@pytest.mark.parametrize("mode", ["inductive", "id"])
def test_fit_learns(mode, tmp_path, capsys):
    hist, tgt, vh, vt = synthetic()
    m = build(mode, **LIGHT)
    ev = ndcg_eval(vh, vt)
    before = ev(m)["ndcg@10"]
    out = us.fit(m, hist, tgt, ev, tmp_path, FAST, meta={"test": True})
    after = ev(m)["ndcg@10"]
    assert after > before + 0.3, (before, after)
    assert after == pytest.approx(out["best_valid"]["ndcg@10"])  # best weights are loaded back
    assert out["epochs_run"] == 8 and not out["stopped_early"] and out["max_epochs"] == 8
    hist_json = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in hist_json] == list(range(1, 9))
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    m2 = us.load_checkpoint(tmp_path / "best.pt", None if mode == "id" else table())
    assert ev(m2)["ndcg@10"] == pytest.approx(after)
    assert "epoch 8 | loss" in capsys.readouterr().out


def test_early_stopping(tmp_path):
    hist, tgt, _, _ = synthetic(n_users=10)
    m = build("id")
    out = us.fit(m, hist, tgt, lambda model: {"ndcg@10": 0.5}, tmp_path,
                 replace(FAST, max_epochs=None, patience=3))
    assert out["stopped_early"] and out["best_epoch"] == 1 and out["epochs_run"] == 4
    with pytest.raises(ValueError, match="ndcg@10"):
        us.fit(build("id"), hist, tgt, lambda model: {"recall@10": 0.1}, tmp_path / "x", FAST)


@pytest.mark.parametrize("mode", ["inductive", "id"])
def test_resume_is_exact(mode, tmp_path):
    hist, tgt, vh, vt = synthetic(n_users=20)
    ev = ndcg_eval(vh, vt)
    cfg = replace(FAST, max_epochs=4, batch_size=16)
    full = build(mode, seed=5)
    out_full = us.fit(full, hist, tgt, ev, tmp_path / "full", cfg)

    part = build(mode, seed=5)
    us.fit(part, hist, tgt, ev, tmp_path / "part", replace(cfg, max_epochs=2))
    again = build(mode, seed=99)  # a fresh process: the weights come from last.pt
    out_part = us.fit(again, hist, tgt, ev, tmp_path / "part", cfg, resume=True)

    for k in ("best_epoch", "epochs_run", "best_valid", "stopped_early"):
        assert out_part[k] == out_full[k]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in full.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert [r["loss"] for r in a["state"]["history"]] == [r["loss"] for r in b["state"]["history"]]
    with pytest.raises(ValueError, match="lr"):
        us.fit(again, hist, tgt, ev, tmp_path / "part", replace(cfg, lr=0.5), resume=True)


def test_time_cap_stops_after_an_epoch_and_resumes(tmp_path):
    hist, tgt, vh, vt = synthetic(n_users=20)
    ev = ndcg_eval(vh, vt)
    cfg = replace(FAST, max_epochs=3, batch_size=16)
    full = us.fit(build("id", seed=5), hist, tgt, ev, tmp_path / "full", cfg)
    assert not full["time_capped"]
    capped = us.fit(build("id", seed=5), hist, tgt, ev, tmp_path / "cap", replace(cfg, max_minutes=0))
    assert capped["time_capped"] and capped["epochs_run"] == 1 and not capped["stopped_early"]
    again = us.fit(build("id", seed=9), hist, tgt, ev, tmp_path / "cap", cfg, resume=True)  # the cap may change
    assert not again["time_capped"]
    assert {k: again[k] for k in ("best_epoch", "epochs_run", "best_valid")} == \
           {k: full[k] for k in ("best_epoch", "epochs_run", "best_valid")}
