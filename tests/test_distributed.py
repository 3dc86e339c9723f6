"""Two CPU processes with gloo = one process on the same global batch (torchrun, past one machine).

trainer.fit sums the gradients over the ranks; each rank's loss is its part of the global batch loss.
The encoder's InfoNCE all-gathers the embeddings, so each query is scored against the whole global batch;
TIGER weights each rank's mean loss by its share of the rows. Loss and gradients of one step must equal
the single-process ones, and short runs of the loop must end with the same weights; rank 0's
early-stopping verdict stops both ranks."""
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import encoderec as er
import tiger as tg
import trainer
from t5_helpers import random_semantic_ids
from test_encoderec import TEXTS, make_tiny

WORLD = 2
QS, DS = TEXTS[:7], TEXTS[5:12]
Q_IDS, D_IDS = list(range(7)), [0, 1, 2, 3, 4, 5, 0]   # the last document repeats the first


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _reduce(loss, model):
    """What trainer.fit does after backward under torchrun: sum values and gradients over the ranks."""
    value = loss.detach().reshape(1)
    if trainer.rank_world()[1] > 1:
        torch.distributed.all_reduce(value)
        trainer._all_reduce_grads(model)
    return float(value)


def _encoder_step(enc):
    """One InfoNCE step over the 7 pairs with GradCache chunks of 2 (each rank: its share)."""
    idx, _ = trainer.rank_share(torch.arange(len(QS)))                 # ranks hold 4 and 3 pairs
    loss = er.cached_info_nce(enc, [QS[i] for i in idx], [DS[i] for i in idx], 2, 0.05, False,
                              torch.tensor(Q_IDS)[idx], torch.tensor(D_IDS)[idx])
    loss.backward()
    return {"loss": _reduce(loss, enc.bert), "grads": _grads(enc.bert)}


def _encoder_fit(folder, out):
    enc = er.load_encoder(folder, max_length=32)
    pairs = list(zip(QS + DS, DS + QS))

    def loss_fn(idx):
        share, w = trainer.rank_share(idx)
        share = share if w > 0 else share[:0]
        return er.cached_info_nce(enc, [pairs[i][0] for i in share], [pairs[i][1] for i in share], 2)
    cfg = trainer.TrainConfig(lr=1e-3, batch_size=6, max_epochs=2, metric=None, grad_clip=1.0)
    trainer.fit(enc, loss_fn, len(pairs), torch.optim.AdamW(enc.parameters()), out, cfg)
    return enc.bert.state_dict()


# TIGER: 22 prefixes, batches 7, 7, 7, 1 (the last: 1 row, so rank 1 holds none)
_rng = np.random.default_rng(0)
T_HIST, T_TARGET = torch.as_tensor(_rng.integers(-1, 12, (22, 5))), torch.as_tensor(_rng.integers(0, 12, 22))
T_VALID = [0.1, 0.3, 0.2, 0.2, 0.9]   # best at step 4, then 2 validations without gain: stop at step 8


def _tiger():
    codes, vocab = random_semantic_ids(12, (3, 3, 3), seed=1)
    ids = tg.SemanticIDs(codes, vocab)
    torch.manual_seed(0)
    return ids, tg.Tiger(tg.TigerConfig(vocab_sizes=ids.vocab_sizes, d_model=16, d_kv=8, n_heads=2, d_ff=32,
                                        n_encoder_layers=1, n_decoder_layers=1, dropout=0.0))


def _tiger_loss(model, ids):
    def loss_fn(idx):
        share, w = trainer.rank_share(idx)
        return w * model.loss(tg.tokenize_histories(T_HIST[share], ids), ids.tokens[T_TARGET[share]])
    return loss_fn


def _tiger_step():
    ids, model = _tiger()
    loss = _tiger_loss(model, ids)(torch.arange(7))                  # shares of 4 and 3 rows
    loss.backward()
    return {"loss": _reduce(loss, model), "grads": _grads(model)}


def _tiger_fit(out):
    ids, model = _tiger()
    values = iter(T_VALID)
    cfg = trainer.TrainConfig(lr=1e-2, batch_size=7, max_steps=12, eval_every=2, patience=2)
    summary = trainer.fit(model, _tiger_loss(model, ids), len(T_TARGET), torch.optim.AdamW(model.parameters()),
                          out, cfg, evaluate=lambda m: {"ndcg@10": next(values)})
    return summary, model.state_dict()


def _worker(rank, folder, rendezvous, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        enc = er.load_encoder(folder).eval()  # dropout off: each rank draws its own masks
        got = {"enc_step": _encoder_step(enc), "enc_fit": _encoder_fit(folder, f"{out}/enc"),
               "tiger_step": _tiger_step(), "tiger_fit": _tiger_fit(f"{out}/tiger")}
        torch.save(got, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


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
    return folder, tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _same_step(got, ref):
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-6)
    assert got["grads"].keys() >= ref["grads"].keys()                 # the loop gives unused parameters zeros
    assert all(not g.any() for k, g in got["grads"].items() if k not in ref["grads"])
    for k, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][k], g, atol=1e-6, rtol=1e-5)


def test_encoder_step_two_ranks_equal_one_process(two_ranks, one_thread):
    folder, _, got = two_ranks
    ref = _encoder_step(er.load_encoder(folder).eval())
    for r in got:
        _same_step(r["enc_step"], ref)
    # the negatives really span ranks: rank 0's pairs alone give another loss
    local = er.info_nce_loss(*(er.load_encoder(folder).eval()(t[:4]) for t in (QS, DS)), 0.05)
    assert local.item() != pytest.approx(ref["loss"], abs=1e-3)


def test_encoder_fit_two_ranks_matches_one_process(two_ranks, tmp_path, one_thread):
    folder, tmp, got = two_ranks
    ref = _encoder_fit(folder, tmp_path / "single")
    for r in got:
        for k, v in ref.items():
            torch.testing.assert_close(r["enc_fit"][k], v, atol=1e-5, rtol=1e-4)  # Adam amplifies rounding
    hist = json.loads((tmp / "enc" / "history.json").read_text())      # rank 0 alone wrote the folder
    single = json.loads((tmp_path / "single" / "history.json").read_text())
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in single], abs=1e-6)


def test_tiger_step_two_ranks_equal_one_process(two_ranks, one_thread):
    _, _, got = two_ranks
    ref = _tiger_step()
    for r in got:
        _same_step(r["tiger_step"], ref)


def test_tiger_fit_two_ranks_matches_one_process(two_ranks, tmp_path, one_thread):
    _, tmp, got = two_ranks
    single, state = _tiger_fit(tmp_path / "single")
    assert single["stopped_early"] and (single["best_step"], single["steps"]) == (4, 8)
    for r in got:  # rank 1 never evaluated: rank 0's verdict stopped it, and it loaded best.pt
        assert r["tiger_fit"][0] == {**single, "wall_time_s": r["tiger_fit"][0]["wall_time_s"],
                                     "examples_per_s": r["tiger_fit"][0]["examples_per_s"]}
        for k, v in state.items():
            torch.testing.assert_close(r["tiger_fit"][1][k], v, atol=2e-6, rtol=1e-5)
    a = trainer.load_checkpoint(tmp / "tiger" / "last.pt")
    b = trainer.load_checkpoint(tmp_path / "single" / "last.pt")
    assert len(a["rng"]) == WORLD and len(b["rng"]) == 1                # every rank's RNG state is kept
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, atol=2e-6, rtol=1e-5)


def _cli_worker(rank, rendezvous, argv, codes):
    """train.main under a 2-process group, as torchrun would start it."""
    import os
    import train
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        with open(f"{codes}{rank}", "w") as f:
            f.write(str(train.main(argv)))
    finally:
        torch.distributed.destroy_process_group()


def test_train_cli_on_a_fresh_folder_under_two_ranks(tmp_path):
    """Rank 0 alone writes run.json; every rank still records the run's key digest in its checkpoints."""
    import amazon_fixture as fx
    ds = fx.write_lcrec(tmp_path / "Fix")
    argv = ["--stage", "unisrec", "--dataset", str(ds), "--encoder", "none", "--max-epochs", "2", "--batch-size",
            "4", "--data-dir", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"), "--device", "cpu"]
    mp.spawn(_cli_worker, args=(str(tmp_path / "rdv"), argv, str(tmp_path / "code")), nprocs=WORLD, join=True)
    assert [(tmp_path / f"code{r}").read_text() for r in range(WORLD)] == ["0", "0"]
    run = next((tmp_path / "runs" / "Fix").glob("unisrec-id-*"))
    key = json.loads((run / "run.json").read_text())["key"]
    assert trainer.load_checkpoint(run / "best.pt")["meta"]["run_key"] == trainer.digest(key)
    assert json.loads((run / "results.json").read_text())["steps"] == 2 * 3      # 12 prefixes / batch 4
