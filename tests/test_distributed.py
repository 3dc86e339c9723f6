"""Two CPU processes with gloo = one process on the same global batch (issue 6: past one machine).

The distributed InfoNCE all-gathers the embeddings, so each query is scored against the whole
global batch, and sums the parameter gradients over ranks: loss and gradients must equal the
single-process computation, and a short fine-tuning run must end with the same weights.
TIGER trains under DistributedDataParallel with each rank's mean loss weighted by its share of
the global batch: the same equalities hold, and rank 0's early-stopping verdict stops both ranks."""
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import encoderec as er
import tiger as tg
from test_encoderec import TEXTS, make_tiny

WORLD = 2
QS, DS = TEXTS[:7], TEXTS[5:12]
Q_IDS, D_IDS = list(range(7)), [0, 1, 2, 3, 4, 5, 0]   # the last document repeats the first


def _grads(enc):
    return {k: p.grad.clone() for k, p in enc.bert.named_parameters() if p.grad is not None}


def _worker(rank, folder, rendezvous, out):
    """One rank: a single contrastive step, then a short fine-tuning run; then the same for TIGER
    (one spawn for both: start-up is the slow part of this test)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                         world_size=WORLD)
    try:
        enc = er.load_encoder(folder)
        enc.eval()  # dropout off: each rank draws its own masks, so compare deterministic math
        share = torch.arange(len(QS)).tensor_split(WORLD)[rank]  # ranks hold 4 and 3 pairs
        loss = er.contrastive_step(enc, [QS[i] for i in share], [DS[i] for i in share], 2, 0.05,
                                   False, torch.tensor(Q_IDS)[share], torch.tensor(D_IDS)[share])
        step = {"loss": loss, "grads": _grads(enc)}
        enc = er.load_encoder(folder)
        er.finetune(enc, list(zip(QS + DS, DS + QS)), f"{out}/run", FT)
        torch.save({"step": step, "state": enc.bert.state_dict()}, f"{out}/rank{rank}.pt")
        _tiger_rank(rank, out)
    finally:
        torch.distributed.destroy_process_group()


FT = er.FinetuneConfig(batch_size=6, chunk_size=2, epochs=2, lr=1e-3, max_length=32)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(tiny model folder, run folder, what each of the 2 gloo ranks returned)."""
    tmp = tmp_path_factory.mktemp("ddp")
    folder = make_tiny(tmp / "m", dropout=0.0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mp.spawn(_worker, args=(str(folder), str(tmp / "rdv"), str(tmp)), nprocs=WORLD, join=True)
    finally:
        torch.set_num_threads(n)
    return folder, tmp, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, one_thread):
    folder, _, got = two_ranks
    enc = er.load_encoder(folder)
    enc.eval()
    loss = er.contrastive_step(enc, QS, DS, None, 0.05, False, torch.tensor(Q_IDS), torch.tensor(D_IDS))
    ref = _grads(enc)
    for r in got:
        assert r["step"]["loss"] == pytest.approx(loss, abs=1e-6)
        assert r["step"]["grads"].keys() == ref.keys()
        for k, g in ref.items():
            torch.testing.assert_close(r["step"]["grads"][k], g, atol=1e-6, rtol=1e-5)
    # the negatives really span ranks: rank 0's pairs alone give another loss
    enc.zero_grad()
    local = er.contrastive_step(enc, QS[:4], DS[:4], None, 0.05, False, torch.tensor(Q_IDS[:4]),
                                torch.tensor(D_IDS[:4]))
    assert local != pytest.approx(loss, abs=1e-3)


def test_two_rank_finetune_matches_single_process(two_ranks, tmp_path, one_thread):
    folder, tmp, got = two_ranks
    enc = er.load_encoder(folder)
    er.finetune(enc, list(zip(QS + DS, DS + QS)), tmp_path / "single", FT)
    for r in got:
        for k, v in enc.bert.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, atol=2e-6, rtol=1e-5)
    # rank 0 alone wrote the run folder, with the per-epoch losses of the global batches
    hist = json.loads((tmp / "run" / "history.json").read_text())
    single = json.loads((tmp_path / "single" / "history.json").read_text())
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in single], abs=1e-6)
    assert (tmp / "run" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- TIGER under DDP
_rng = np.random.default_rng(0)
T_HIST, T_TARGET = _rng.integers(-1, 12, (22, 5)), _rng.integers(0, 12, 22)   # 22 prefixes: batches 7, 7, 7, 1
T_CFG = tg.TrainConfig(lr=1e-2, warmup_steps=2, batch_size=7, max_steps=12, eval_every=2, patience=2)
T_VALID = [0.1, 0.3, 0.2, 0.2, 0.9]   # best at step 4, then 2 validations without gain: stop at step 8


def _tiger():
    codes, vocab = tg.random_semantic_ids(12, (3, 3, 3), seed=1)
    ids = tg.SemanticIDs(codes, vocab)
    torch.manual_seed(0)
    return ids, tg.Tiger(tg.TigerConfig(vocab_sizes=ids.vocab_sizes, d_model=16, d_kv=8, n_heads=2, d_ff=32,
                                        n_encoder_layers=1, n_decoder_layers=1, dropout=0.0))


def _valid_sequence():
    values = iter(T_VALID)
    return lambda model: {"ndcg@10": next(values)}


def _tiger_step(model, ids, ddp=None):
    """Loss and gradients of one global batch (rows 0..6: shares of 4 and 3 rows under 2 ranks)."""
    loss, value = tg.global_batch_loss(model, ids, torch.as_tensor(T_HIST[:7]), torch.as_tensor(T_TARGET[:7]), ddp)
    loss.backward()
    return {"loss": float(value), "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}


def _tiger_rank(rank, out):
    ids, model = _tiger()
    step = _tiger_step(model, ids, torch.nn.parallel.DistributedDataParallel(tg.TrainLoss(model)))
    ids, model = _tiger()
    summary = tg.fit(model, ids, T_HIST, T_TARGET, _valid_sequence(), f"{out}/tiger", T_CFG)
    torch.save({"step": step, "state": model.state_dict(), "summary": summary}, f"{out}/tiger{rank}.pt")


def test_tiger_two_ranks_equal_one_process_on_the_global_batch(two_ranks, one_thread):
    _, tmp, _ = two_ranks
    ids, model = _tiger()
    ref = _tiger_step(model, ids)
    for r in range(WORLD):
        got = torch.load(tmp / f"tiger{r}.pt")["step"]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)
        assert got["grads"].keys() == ref["grads"].keys()
        for k, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][k], g, atol=1e-6, rtol=1e-5)
    # the weighting matters: rank 0's 4 rows alone give another loss
    local = model.loss(tg.tokenize_histories(T_HIST[:4], ids), ids.tokens[torch.as_tensor(T_TARGET[:4])])
    assert local.item() != pytest.approx(ref["loss"], abs=1e-3)


def test_tiger_two_rank_fit_matches_single_process(two_ranks, tmp_path, one_thread):
    _, tmp, _ = two_ranks
    ids, model = _tiger()
    single = tg.fit(model, ids, T_HIST, T_TARGET, _valid_sequence(), tmp_path / "single", T_CFG)
    assert single["stopped_early"] and (single["best_step"], single["steps_run"]) == (4, 8)
    pick = ("best_step", "steps_run", "stopped_early", "best_valid", "epochs_run")
    for r in range(WORLD):  # rank 1 never validated: rank 0's verdict stopped it, and it loaded best.pt
        got = torch.load(tmp / f"tiger{r}.pt")
        assert {k: got["summary"][k] for k in pick} == {k: single[k] for k in pick}
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["state"][k], v, atol=2e-6, rtol=1e-5)
    # rank 0 alone wrote the run folder: same global-batch losses, last.pt (step 8) has the same
    # weights under the model's own names, and every rank's RNG state
    hist = json.loads((tmp / "tiger" / "history.json").read_text())
    ref = json.loads((tmp_path / "single" / "history.json").read_text())
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in ref], abs=1e-6)
    a = torch.load(tmp / "tiger" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and len(a["rng_ranks"]) == WORLD and "rng_ranks" not in b
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, atol=2e-6, rtol=1e-5)
