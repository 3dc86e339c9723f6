"""Tests for unisrec.py: shapes in every mode, the causal and padding masks, the MoE gate at init,
the loss against a hand-computed cross-entropy, checkpoint round trips, and the training loop
(learning a tiny synthetic task, early stopping, exact resume). Tiny random configs, 1 thread."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import trainer
import unisrec as us

I, D_PLM = 30, 12
TINY = us.UniSRecConfig(hidden_size=16, n_layers=2, n_heads=2, inner_size=24, max_seq_len=8, n_exps=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def table(seed=0, n=I, d=D_PLM):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


CODES = np.random.default_rng(1).integers(0, 8, (I, 4))  # VQ-Rec: 4 sub-vectors of 8 codes per item


def build(mode="inductive", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = replace(TINY, mode=mode, **kw)
    if mode == "vqrec":
        return us.UniSRec(replace(cfg, code_cap=8), codes=CODES)
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


def all_states(m, h):
    """Every position's final state (B, W, D), the full pass that encode's last layer computes at one."""
    items, valid, _ = m.prepare(h)
    x = m.drop(m.ln(m.embed_items(items, valid) + m.pos_emb.weight[:items.shape[1]]))
    for blk in m.blocks:
        x = blk(x, valid)
    return x


SEQS = [[3, 7, 1, 4], [5], [2, 9, 11, 12, 13, 14], [0, 29]]
MODES = ["inductive", "transductive", "id", "vqrec"]


# ----------------------------------------------------------------------------- shapes / masks
@pytest.mark.parametrize("mode", MODES)
def test_shapes(mode):
    m = build(mode).eval()
    h = right_aligned(SEQS, 8)
    assert m.encode(h).shape == (4, 16)
    items, valid, lengths = m.prepare(h)
    assert items.shape == valid.shape == (4, 6) and lengths.tolist() == [4, 1, 6, 2]  # trimmed to the longest
    assert all_states(m, h).shape == (4, 6, 16)
    assert m.item_table().shape == (I, 16)
    s = us.score(m, h)
    assert s.shape == (4, I) and s.dtype == torch.float32 and torch.isfinite(s).all()
    m.train()
    loss = m.loss(h, [1, 2, 3, 4])
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    if mode in ("inductive", "transductive"):
        assert "plm_emb" in dict(m.named_buffers()) and "plm_emb" not in m.state_dict()
        assert all(p is not m.plm_emb for p in m.parameters())
        assert m.adaptor.experts[0].bias.grad is not None
    if mode == "vqrec":  # the codes are data (a buffer); each code's embedding learns
        assert "code_rows" not in m.state_dict() and m.code_emb.weight.grad.abs().sum(1).gt(0).any()


@pytest.mark.parametrize("mode", MODES)
def test_causal_mask(mode):
    m = build(mode).eval()
    a = np.array([[3, 7, 1, 4, 20, 21, 22, 23]])
    b = a.copy()
    b[0, 5:] = [9, 8, 2]  # change the items after position 4
    with torch.no_grad():
        ha, hb = all_states(m, a), all_states(m, b)
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


@pytest.mark.parametrize("group", [us.LENGTH_GROUP, 2])
@pytest.mark.parametrize("mode", MODES)
def test_padding_changes_no_gradient(mode, group, monkeypatch):
    """A batch padded to its longest history, or run in length groups of 2 rows (each padded to its own
    longest, rows put back in batch order), gives the gradients of its rows run alone, each at its own
    width: padding and grouping change no gradient."""
    monkeypatch.setattr(us, "LENGTH_GROUP", group)
    m = build(mode, max_seq_len=20, hidden_dropout=0.0, attn_dropout=0.0, adaptor_dropout=0.0, gate_noise=False)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, I, n)) for n in (1, 3, 5, 9, 17, 20, 0, 2, 30)]
    h, tgt = right_aligned(seqs, 24), rng.integers(0, I, len(seqs))
    m.zero_grad()
    loss = m.loss(h, tgt)
    loss.backward()
    batch = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    alone = sum(m.loss(right_aligned([s], 24), tgt[r:r + 1]).item() for r, s in enumerate(seqs)) / len(seqs)
    assert loss.item() == pytest.approx(alone, abs=1e-5)
    m.zero_grad()
    for r in range(len(seqs)):
        (m.loss(right_aligned([seqs[r]], 24), tgt[r:r + 1]) / len(seqs)).backward()
    for k, p in m.named_parameters():
        if k in batch:
            assert torch.allclose(batch[k], p.grad, atol=1e-5), k


def test_cpu_dropout_is_bernoulli():
    """The rand-drawn CPU keep mask: about p of the entries zeroed, the rest scaled by 1 / (1 - p); none in eval
    mode; p = 1 zeroes everything, as nn.Dropout."""
    torch.manual_seed(0)
    x = torch.ones(200_000)
    for p in (0.2, 0.5):
        y = us.Dropout(p)(x)
        assert abs((y == 0).float().mean().item() - p) < 0.01
        assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
        assert torch.equal(us.Dropout(p).eval()(x), x)
    assert torch.equal(us.Dropout(1.0)(x), torch.zeros_like(x))
    assert us.Dropout(0.5)(x.bfloat16()).dtype == torch.bfloat16


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
            items = m.adaptor(m.plm_emb) if mode != "vqrec" else torch.stack(  # the mean of its 4 codes' rows
                [m.code_emb.weight[[8 * s + CODES[i, s] for s in range(4)]].mean(0) for i in range(I)])
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


FAST = trainer.TrainConfig(lr=1e-2, batch_size=64, max_epochs=8, patience=10, seed=1)
LIGHT = dict(hidden_dropout=0.1, attn_dropout=0.1, adaptor_dropout=0.1)


def fit(model, hist, tgt, evaluate, out, cfg, resume=False):
    """UniSRec through the one training loop, as train.py wires it: Adam, full softmax, eval each epoch."""
    H, T = torch.as_tensor(hist), torch.as_tensor(tgt)
    return trainer.fit(model, lambda idx: model.loss(H[idx], T[idx]), len(T), torch.optim.Adam(model.parameters()),
                       out, cfg, evaluate=evaluate, resume=resume)


@pytest.mark.parametrize("mode", ["inductive", "id"])
def test_fit_learns(mode, tmp_path):
    hist, tgt, vh, vt = synthetic()
    m = build(mode, **LIGHT)
    ev = ndcg_eval(vh, vt)
    before = ev(m)["ndcg@10"]
    out = fit(m, hist, tgt, ev, tmp_path, FAST)
    after = ev(m)["ndcg@10"]
    assert after > before + 0.3, (before, after)
    assert after == pytest.approx(out["best_valid"]["ndcg@10"])  # best weights are loaded back
    assert out["epochs"] == 8 and not out["stopped_early"]


@pytest.mark.parametrize("mode", ["inductive", "id"])
def test_resume_is_exact(mode, tmp_path):
    """Dropout and the MoE gate noise draw from the RNG: a resumed run must draw what the whole one did."""
    hist, tgt, vh, vt = synthetic(n_users=20)
    ev = ndcg_eval(vh, vt)
    cfg = replace(FAST, max_epochs=4, batch_size=16)
    full = build(mode, seed=5)
    out_full = fit(full, hist, tgt, ev, tmp_path / "full", cfg)
    part = build(mode, seed=5)
    fit(part, hist, tgt, ev, tmp_path / "part", replace(cfg, max_epochs=2))
    again = build(mode, seed=99)  # a fresh process: the weights come from last.pt
    out_part = fit(again, hist, tgt, ev, tmp_path / "part", cfg, resume=True)
    for k in ("best_epoch", "epochs", "best_valid", "stopped_early"):
        assert out_part[k] == out_full[k]
    for k, v in full.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k

