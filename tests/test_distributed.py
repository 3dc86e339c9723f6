"""Two CPU processes with gloo = one process on the same global batch (issue 6: past one machine).

The distributed InfoNCE all-gathers the embeddings, so each query is scored against the whole
global batch, and sums the parameter gradients over ranks: loss and gradients must equal the
single-process computation, and a short fine-tuning run must end with the same weights."""
import json

import pytest
import torch
import torch.multiprocessing as mp

import encoderec as er
from test_encoderec import TEXTS, make_tiny

WORLD = 2
QS, DS = TEXTS[:7], TEXTS[5:12]
Q_IDS, D_IDS = list(range(7)), [0, 1, 2, 3, 4, 5, 0]   # the last document repeats the first


def _grads(enc):
    return {k: p.grad.clone() for k, p in enc.bert.named_parameters() if p.grad is not None}


def _worker(rank, folder, rendezvous, out):
    """One rank: a single contrastive step, then a short fine-tuning run (one spawn: start-up is
    the slow part of this test)."""
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
