"""Tests for tiger.py: semantic IDs (dedup code = rank in group, vocabularies), the token layout, the model's masks (causal decoder, encoder padding), the KV
cache, the loss against a hand-computed cross-entropy, constrained beam search against exhaustive
scoring, free decoding's invalid IDs, checkpoints, the training loop (early stopping, exact
resume), parity with Hugging Face T5 on the same weights, and eval.py's popularity baseline.
Tiny random configs, 1 thread."""

import math

import amazon_fixture as fx
import numpy as np
import pytest
import torch
from t5_helpers import exhaustive_scores, random_semantic_ids, t5_config_kwargs, t5_state_dict

import tiger as tg
import trainer
from data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"d_model": 16, "d_kv": 8, "n_heads": 2, "d_ff": 32, "n_encoder_layers": 2, "n_decoder_layers": 2}


def test_semantic_ids_dedup_code_is_the_rank_in_the_group():
    codes = np.array([[1, 2, 3], [1, 2, 3], [0, 0, 0], [1, 2, 3], [0, 0, 0], [5, 5, 5]])
    ids, vocab = tg.semantic_ids(codes)
    assert ids.dtype == np.int64 and ids.shape == (6, 4)
    assert ids[:, 3].tolist() == [0, 1, 0, 2, 1, 0] and np.array_equal(ids[:, :3], codes)
    assert len(np.unique(ids, axis=0)) == 6 and vocab == (256, 256, 256, 256)
    big = np.zeros((300, 3), dtype=np.int64)          # one group larger than a codebook
    ids, vocab = tg.semantic_ids(big)
    assert ids[:, 3].tolist() == list(range(300)) and vocab == (256, 256, 256, 300)


def test_semantic_ids_unique_on_random_codes():
    codes = np.random.default_rng(0).integers(0, 3, size=(500, 3))
    ids, vocab = tg.semantic_ids(codes, codebook_size=3)
    assert len(np.unique(ids, axis=0)) == 500
    _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    assert vocab == (3, 3, 3, max(int(counts.max()), 3)) and ids[:, 3].max() == counts.max() - 1
    for g in range(len(counts)):                       # ranks follow item order inside each group
        assert ids[inv.reshape(-1) == g, 3].tolist() == list(range(counts[g]))
    with pytest.raises(ValueError, match="outside a codebook"):
        tg.semantic_ids(codes, codebook_size=2)


def make_ids(n=30, vocab=(4, 4, 4), seed=0) -> tg.SemanticIDs:
    codes, v = random_semantic_ids(n, vocab, seed)
    return tg.SemanticIDs(codes, v)


def build(ids, seed=0, **kw) -> tg.Tiger:
    torch.manual_seed(seed)
    return tg.Tiger(tg.TigerConfig(vocab_sizes=ids.vocab_sizes, **{**TINY, **kw}))


def right_aligned(seqs, L):
    out = np.full((len(seqs), L), -1, dtype=np.int64)
    for r, s in enumerate(seqs):
        s = list(s)[-L:]
        if s:
            out[r, L - len(s):] = s
    return out


SEQS = [[3, 7, 1, 4], [5], [], [2, 9, 11, 12, 13, 14, 0, 1], [29, 0]]


# ----------------------------------------------------------------------------- tokens
def test_token_layout_offsets_padding_truncation():
    codes = np.array([[0, 0, 0, 0], [3, 2, 4, 1], [1, 2, 3, 0]])
    ids = tg.SemanticIDs(codes, [4, 3, 5, 2])
    assert (tg.PAD, tg.EOS) == (0, 1)
    assert ids.offsets == [2, 6, 9, 14] and ids.vocab_size == 16
    assert ids.tokens.tolist() == [[2, 6, 9, 14], [5, 8, 13, 15], [3, 8, 12, 14]]
    src = tg.tokenize_histories(right_aligned([[1, 2], [0], []], 4), ids)
    assert src.tolist() == [[5, 8, 13, 15, 3, 8, 12, 14, 1],
                            [2, 6, 9, 14, 1, 0, 0, 0, 0],
                            [1, 0, 0, 0, 0, 0, 0, 0, 0]]
    left = np.array([[1, 2, -1, -1], [0, -1, -1, -1], [-1, -1, -1, -1]])
    assert torch.equal(tg.tokenize_histories(left, ids), src)             # either alignment
    assert tg.target_tokens([2, 0], ids).tolist() == [[3, 8, 12, 14], [2, 6, 9, 14]]
    assert tg.decoder_inputs(tg.target_tokens([2], ids)).tolist() == [[0, 3, 8, 12]]  # start = PAD

    big = make_ids(40)
    seq = list(range(25))
    src = tg.tokenize_histories(right_aligned([seq, [7]], 30), big)        # 25 items -> the last 20
    assert src.shape == (2, 4 * 20 + 1)
    assert src[0, :80].tolist() == big.tokens[5:25].reshape(-1).tolist() and src[0, 80] == tg.EOS
    assert src[1, :5].tolist() == big.tokens[7].tolist() + [tg.EOS] and (src[1, 5:] == tg.PAD).all()
    assert tg.tokenize_histories(right_aligned([seq], 30), big, max_items=3).shape == (1, 13)


def test_semantic_ids_validation():
    with pytest.raises(ValueError, match="not unique"):
        tg.SemanticIDs(np.array([[0, 1], [0, 1]]), [2, 2])
    with pytest.raises(ValueError, match="outside"):
        tg.SemanticIDs(np.array([[0, 2]]), [2, 2])
    with pytest.raises(ValueError, match="array"):
        tg.SemanticIDs(np.zeros((3, 2), dtype=np.int64), [2, 2, 2])
    codes, vocab = random_semantic_ids(500, (3, 3, 3), seed=1)              # many collisions -> dedup level
    assert vocab[:3] == [3, 3, 3] and vocab[3] > 1 and len(np.unique(codes, axis=0)) == 500
    ids = make_ids(30)
    with pytest.raises(ValueError, match="semantic IDs cover"):
        tg.tokenize_histories(np.array([[30]]), ids)


# ----------------------------------------------------------------------------- model
def test_causal_decoder():
    ids = make_ids()
    m = build(ids).eval()
    src = tg.tokenize_histories(right_aligned(SEQS, 8), ids)
    tin = tg.decoder_inputs(tg.target_tokens([1, 2, 3, 4, 5], ids))
    base = m(src, tin)
    for j in range(1, 4):
        changed = tin.clone()
        changed[:, j] = ids.tokens[(np.arange(5) + 7) % 30, j - 1]
        assert not torch.equal(changed, tin)
        out = m(src, changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, j:], base[:, j:])


def test_encoder_padding_does_not_change_outputs():
    ids = make_ids()
    m = build(ids).eval()
    src = tg.tokenize_histories(right_aligned(SEQS, 8), ids)                # (5, 33), left-aligned tokens
    tin = tg.decoder_inputs(tg.target_tokens([1, 2, 3, 4, 5], ids))
    base = m(src, tin)
    padded = torch.cat([src, torch.zeros(5, 11, dtype=torch.long)], dim=1)  # trailing PAD columns
    torch.testing.assert_close(m(padded, tin), base, atol=1e-5, rtol=0)
    lengths = (src != tg.PAD).sum(1)
    right = torch.stack([torch.roll(r, int(src.shape[1] - n)) for r, n in zip(src, lengths, strict=True)])
    assert m.row_widths(right) is None                                     # not left-aligned: unbucketed
    torch.testing.assert_close(m(right, tin), base, atol=1e-5, rtol=0)     # relative positions only
    m.length_buckets = False
    torch.testing.assert_close(m(src, tin), base, atol=1e-5, rtol=0)       # buckets are exact
    for r in range(5):                                                     # a row alone = in a batch
        torch.testing.assert_close(m(src[r:r + 1, :int(lengths[r])], tin[r:r + 1]), base[r:r + 1],
                                   atol=1e-5, rtol=0)


def test_loss_is_hand_cross_entropy():
    ids = make_ids()
    m = build(ids).eval()
    src = tg.tokenize_histories(right_aligned(SEQS, 8), ids)
    tgt = tg.target_tokens([1, 2, 3, 4, 5], ids)
    logits = m(src, tg.decoder_inputs(tgt))                                # (5, 4, V)
    assert logits.shape == (5, 4, ids.vocab_size)
    logp = torch.log_softmax(logits.double(), -1)
    hand = -np.mean([logp[b, s, tgt[b, s]].item() for b in range(5) for s in range(4)])
    assert m.loss(src, tgt).item() == pytest.approx(hand, abs=1e-5)
    m.train()
    loss = m.loss(src, tgt)
    loss.backward()
    assert math.isfinite(loss.item()) and m.encoder.bias.emb.weight.grad.abs().sum() > 0


def test_kv_cache_decoding_equals_full_forward():
    ids = make_ids()
    m = build(ids).eval()
    src = tg.tokenize_histories(right_aligned(SEQS, 8), ids)
    tin = tg.decoder_inputs(tg.target_tokens([1, 2, 3, 4, 5], ids))
    with torch.no_grad():
        kvs, mem_mask = m.encode_memory(src)
        full = m.decoder(tin, kvs, mem_mask)[0]
        caches, steps = None, []
        for t in range(4):
            logits, caches = m.decoder(tin[:, t:t + 1], kvs, mem_mask, start=t, caches=caches)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("buckets", [True, False])
def test_constrained_beam_search_equals_exhaustive(buckets):
    ids = make_ids(30)
    m = build(ids)
    m.length_buckets = buckets
    src = tg.tokenize_histories(right_aligned(SEQS, 8), ids)
    ex = exhaustive_scores(m, src, ids)                                    # (5, 30)
    for beam, k in ((30, 30), (30, 10), (40, 30)):
        items, scores, codes = tg.beam_search(m, src, ids, beam=beam, k=k)
        top = ex.topk(k, dim=1)
        assert torch.equal(items, top.indices)
        torch.testing.assert_close(scores, top.values, atol=1e-5, rtol=0)
        assert torch.equal(codes, ids.codes[items])
    assert m.training                                                      # mode restored
    items, scores, _ = tg.beam_search(m, src, ids, beam=40)                # 10 more beams than items
    assert (items[:, 30:] == -1).all() and torch.isinf(scores[:, 30:]).all()
    rec, rec_scores = tg.recommend(m, right_aligned(SEQS, 8), ids, beam=30, k=10, batch_size=2)
    assert np.array_equal(rec, ex.topk(10, dim=1).indices.numpy())
    np.testing.assert_allclose(rec_scores, ex.topk(10, dim=1).values.numpy(), atol=1e-5)


def test_free_decoding_maps_invalid_ids_to_minus_one():
    ids = make_ids(6, vocab=(4, 4, 4))                                     # 6 of 64+ possible IDs
    m = build(ids)
    src = tg.tokenize_histories(right_aligned([[i % 6 for i in s] for s in SEQS], 8), ids)
    items, scores, codes = tg.beam_search(m, src, ids, beam=20, constrain=False)
    assert (scores[:, :-1] >= scores[:, 1:]).all() and torch.isfinite(scores).all()
    catalog = {tuple(c) for c in ids.codes.tolist()}
    for it, cs in zip(items.reshape(-1).tolist(), codes.reshape(-1, 4).tolist(), strict=True):
        if tuple(cs) in catalog:
            assert ids.codes[it].tolist() == cs
        else:
            assert it == -1
    assert (items == -1).any()
    flat = codes.reshape(-1, 4)
    assert len({tuple(c) for c in flat[:20].tolist()}) == 20                # distinct beams
    constrained = tg.beam_search(m, src, ids, beam=6)[0]
    assert (constrained >= 0).all()


# ----------------------------------------------------------------------------- training
def _task(n_items=12, n=96, seed=0):
    """Learnable toy task: the next item is (last item + 1) mod n_items."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        start = int(rng.integers(n_items))
        seqs.append([(start + j) % n_items for j in range(int(rng.integers(1, 4)) + 1)])
    hist = right_aligned([s[:-1] for s in seqs], 5)
    return hist, np.array([s[-1] for s in seqs])


def _ndcg_eval(ids, hist, target):
    def fn(model):
        items, _ = tg.recommend(model, hist, ids, beam=4, k=4)
        hit = items == target[:, None]
        ranks = np.where(hit.any(1), hit.argmax(1), 99)
        return {"ndcg@10": float(np.where(ranks < 4, 1 / np.log2(ranks + 2), 0).mean())}
    return fn


def test_learns_the_toy_task_through_the_loop(tmp_path):
    """TIGER as train.py trains it (trainer.fit, TIGER's schedule, length-grouped batches) learns the toy task."""
    ids = make_ids(12, vocab=(3, 3, 3), seed=2)
    hist, target = _task()
    eval_fn = _ndcg_eval(ids, hist[:24], target[:24])
    model = build(ids, seed=1)
    H, T = torch.as_tensor(hist), torch.as_tensor(target)
    lengths = (hist >= 0).sum(1)
    before = eval_fn(model.eval())["ndcg@10"]
    cfg = trainer.TrainConfig(lr=1e-2, batch_size=16, max_steps=400, eval_every=5, patience=4, grad_clip=1.0)
    s = trainer.fit(model, lambda idx: model.loss(tg.tokenize_histories(H[idx], ids), ids.tokens[T[idx]]), len(T),
                    torch.optim.AdamW(model.parameters()), tmp_path, cfg, schedule=lambda s: trainer.lr_factor(s, 5),
                    evaluate=eval_fn, order=lambda e: trainer.epoch_order(lengths, 16, 0, e, 2))
    assert s["stopped_early"] and s["steps"] == s["best_step"] + 4 * 5      # patience 4 validations after the best
    assert s["best_valid"]["ndcg@10"] > before + 0.1


def test_epoch_order_buckets_by_length():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(0.25, size=1000), 20)              # short-tailed, like Amazon
    plain = trainer.epoch_order(lengths, 64, seed=3, epoch=1, buckets=0)
    assert np.array_equal(plain, np.random.default_rng([3, 1]).permutation(1000))
    order = trainer.epoch_order(lengths, 64, seed=3, epoch=1, buckets=5)
    assert np.array_equal(np.sort(order), np.arange(1000))                 # a permutation: every example once
    assert np.array_equal(order, trainer.epoch_order(lengths, 64, seed=3, epoch=1, buckets=5))   # deterministic
    assert not np.array_equal(order, trainer.epoch_order(lengths, 64, seed=3, epoch=2, buckets=5))
    pad = lambda o: np.mean([lengths[o[i:i + 64]].max() for i in range(0, len(o), 64)])
    assert pad(order) < 0.6 * pad(plain)                                   # batches pad far less
    firsts = order[:15 * 64:64]                                            # batch order is shuffled, not sorted
    assert not np.all(np.diff(lengths[firsts]) >= 0)


# ----------------------------------------------------------------------------- Hugging Face parity
def test_parity_with_hugging_face_t5():
    transformers = pytest.importorskip("transformers")
    ids = make_ids()
    m = build(ids, seed=5).eval()
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**t5_config_kwargs(m.cfg))).eval()
    hf.load_state_dict(t5_state_dict(m))
    src = tg.tokenize_histories(right_aligned(SEQS, 8), ids)
    tin = tg.decoder_inputs(tg.target_tokens([1, 2, 3, 4, 5], ids))
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=(src != tg.PAD).long(), decoder_input_ids=tin).logits
    torch.testing.assert_close(m(src, tin), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- eval.py
def test_popularity_baseline_by_hand(tmp_path):
    from eval import popularity_ranks, training_counts
    ds = load_dataset(str(fx.write_lcrec(tmp_path / "Fix")), tmp_path / "cache")
    # sequences (items F=0 E=1 D=2 B=3 A=4 C=5), the first three of each are training:
    # u4 0 1 2 | 3 4, u2 3 4 2 | 5 0, u1 4 3 5 | 2 1, u6 3 5 2 | 1 0, u3 5 3 4 | 1 0, u5 4 5 2 | 1 0
    assert training_counts(ds).tolist() == [1, 1, 4, 4, 4, 4]
    test = ds.splits.test
    assert test.target.tolist() == [4, 0, 1, 0, 0, 0]
    assert popularity_ranks(ds, test).tolist() == [3, 5, 5, 5, 5, 5]    # ties pessimistic


def test_lr_schedule_warmup_then_inverse_sqrt():
    assert [trainer.lr_factor(s, 4) for s in range(3)] == [0.25, 0.5, 0.75]
    assert trainer.lr_factor(3, 4) == 1.0 and trainer.lr_factor(15, 4) == pytest.approx(0.5)   # sqrt(4 / 16)
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        trainer.lr_factor(0, 0)


def test_fixed_shape_step_equals_the_bucketed_step():
    """The GPU path (every history padded to the 20-item cap, one shape, unchecked tensors) gives the loss
    and gradients of the CPU path (length buckets, each at its own width) on the same batch: padding never
    changes a result."""
    ids = make_ids()
    rng = np.random.default_rng(0)
    hist = right_aligned([rng.integers(0, 30, n).tolist() for n in (0, 1, 3, 7, 20, 25, 2, 12)], 25)
    target = ids.tokens[torch.as_tensor(rng.integers(0, 30, 8))]
    grads, losses = [], []
    for fixed in (False, True):
        model = build(ids, dropout=0.0)
        model.length_buckets = not fixed
        src = tg.tokenize_histories(hist, ids, 20, fixed=fixed)
        loss = model.loss(src, target, checked=not fixed)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
    lv = ids.n_levels
    assert tg.tokenize_histories(hist[:4], ids, 20).shape[1] == 1 + lv * 7                # the longest kept
    assert tg.tokenize_histories(hist[:4], ids, 20, fixed=True).shape[1] == 1 + lv * 20  # the cap (81)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
