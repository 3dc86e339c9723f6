"""Faults (issue 6): SIGKILL a real training process (UniSRec, encoder, TIGER) and resume it; NaN
losses; unwritable output.

A killed run resumed with --resume must end with exactly the metrics of an uninterrupted run
(CPU, same seed): checkpoints are written atomically, so a kill mid-write leaves the previous
checkpoint intact (plus a stray temp file that resuming ignores)."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import amazon_fixture as fx
import tiger as tg
import train
import unisrec as us
from conftest import ROOT
from data import ITEM_TEXT_FIELDS, load_dataset
from test_encoderec import make_tiny

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ENCODEREC_OFFLINE": "1"}


def synthetic_lcrec(folder, users=60, items=30, seed=0):
    """A random LC-Rec folder big enough that an epoch takes a visible moment."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {str(i): {"asin": f"A{i:04d}", "title": f"item {i}", "categories": "a,b"} for i in range(items)}
    inter = {str(u): rng.choice(items, size=int(rng.integers(5, 12)), replace=False).tolist()
             for u in range(users)}
    (folder / "Syn.item.json").write_text(json.dumps(meta))
    (folder / "Syn.inter.json").write_text(json.dumps(inter))
    return folder


def _train(argv, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _kill_after(proc, history, epochs, timeout=240):
    """SIGKILL proc as soon as `history` (a JSON list) records `epochs` epochs."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if len(json.loads(history.read_text())) >= epochs:
                break
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{proc.stdout.read()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _junk_temp_file(folder, name):
    """What a kill in the middle of an atomic write leaves behind: a half-written temp file."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    os.write(fd, b"PK\x03\x04 half a checkpoint")
    os.close(fd)


def test_unisrec_killed_mid_run_resumes_to_the_same_metrics(tmp_path):
    ds = synthetic_lcrec(tmp_path / "Syn")
    common = ["--stage", "unisrec", "--dataset", str(ds), "--encoder", "none", "--max-epochs", "6",
              "--patience", "100", "--batch-size", "64", "--data-dir", str(tmp_path / "cache"),
              "--device", "cpu"]
    _finish(_train([*common, "--out", str(tmp_path / "whole")]))
    cut = tmp_path / "cut"
    _kill_after(_train([*common, "--out", str(cut)]), cut / "history.json", 2)
    assert not (cut / "results.json").exists()
    _junk_temp_file(cut, "last.pt")
    out = _finish(_train([*common, "--out", str(cut), "--resume"]))
    assert "resumed from" in out
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    again = json.loads((cut / "results.json").read_text())
    assert again["test"] == whole["test"] and again["valid"] == whole["valid"]
    assert again["best_epoch"] == whole["best_epoch"] and again["epochs_run"] == 6


def test_encoder_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    tiny = make_tiny(tmp_path / "tiny", dropout=0.1)        # dropout on: the RNG state must resume too
    ds = fx.write_lcrec(tmp_path / "Fix")
    common = ["--stage", "encoder", "--backbone", str(tiny), "--dataset", str(ds), "--epochs", "8",
              "--batch-size", "3", "--no-eval", "--chunk-size", "2", "--lr", "1e-3", "--max-length", "32",
              "--doc-fields", "description,brand", "--data-dir", str(tmp_path / "cache"), "--device", "cpu"]
    _finish(_train([*common, "--out", str(tmp_path / "whole")]))
    cut = tmp_path / "cut"
    _kill_after(_train([*common, "--out", str(cut)]), cut / "history.json", 3)
    assert not (cut / "model.safetensors").exists()
    _junk_temp_file(cut, "checkpoint.pt")
    _finish(_train([*common, "--out", str(cut), "--resume"]))
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "whole" / "history.json").read_text())
    hb = json.loads((cut / "history.json").read_text())
    assert [h.get("loss") for h in ha] == [h.get("loss") for h in hb] and len(ha) == 8  # --no-eval: no epoch 0


def test_tiger_killed_mid_run_resumes_to_the_same_metrics(tmp_path):
    """Semantic IDs without the network or MiniLM: random item embeddings written where
    train.embedding_path puts the default encoder's, so ensure_semantic_ids finds them and only runs
    residual k-means (once: the later runs find the IDs up to date)."""
    ds = synthetic_lcrec(tmp_path / "Syn")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    data = load_dataset(str(ds), str(cache))
    emb = train.embedding_path(runs, data.name, "minilm", train.parse_fields(None, ITEM_TEXT_FIELDS))
    emb.parent.mkdir(parents=True)
    np.save(emb, np.random.default_rng(0).standard_normal((data.n_items, 16)).astype(np.float32))
    common = ["--stage", "tiger", "--dataset", str(ds), "--tokenizer", "rkmeans", "--max-steps", "24",
              "--eval-every", "6", "--batch-size", "8", "--warmup-steps", "6", "--lr", "3e-3",
              "--data-dir", str(cache), "--runs", str(runs), "--device", "cpu"]
    out = _finish(_train([*common, "--out", str(tmp_path / "whole")]))
    assert "embedding the items first" not in out
    cut = tmp_path / "cut"
    _kill_after(_train([*common, "--out", str(cut)]), cut / "history.json", 2)
    assert not (cut / "results.json").exists()
    _junk_temp_file(cut, "last.pt")
    out = _finish(_train([*common, "--out", str(cut), "--resume"]))
    assert "resumed from" in out and "up to date" in out
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    again = json.loads((cut / "results.json").read_text())
    assert again["test"] == whole["test"] and again["best_valid"] == whole["best_valid"]
    assert again["best_step"] == whole["best_step"] and again["steps_run"] == 24
    ha = json.loads((tmp_path / "whole" / "history.json").read_text())
    hb = json.loads((cut / "history.json").read_text())
    assert [(h["loss"], h["valid"]) for h in ha] == [(h["loss"], h["valid"]) for h in hb] and len(ha) == 4


def test_nan_loss_stops_tiger_before_the_update(tmp_path, one_thread):
    codes, vocab = tg.random_semantic_ids(20, (3, 3, 3), seed=0)
    ids = tg.SemanticIDs(codes, vocab)
    rng = np.random.default_rng(0)
    hist, target = rng.integers(-1, 20, (64, 5)), rng.integers(0, 20, 64)
    torch.manual_seed(0)
    model = tg.Tiger(tg.TigerConfig(vocab_sizes=ids.vocab_sizes, d_model=16, d_kv=8, n_heads=2, d_ff=32,
                                    n_encoder_layers=1, n_decoder_layers=1))
    real_loss, calls = model.loss, {"n": 0}

    def loss(src, tgt):  # steps 1-5 are fine, then the loss blows up
        calls["n"] += 1
        out = real_loss(src, tgt)
        if calls["n"] <= 5:
            return out
        calls["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        return out * math.nan

    model.loss = loss
    cfg = tg.TrainConfig(batch_size=16, max_steps=20, eval_every=4)
    with pytest.raises(FloatingPointError, match="at step 6; stopped before the update.*last validated"):
        tg.fit(model, ids, hist, target, lambda m: {"ndcg@10": 0.1}, tmp_path, cfg)
    for k, v in model.state_dict().items():  # the NaN step changed nothing
        assert torch.equal(v, calls["weights"][k]), k
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["state"]["step"] == 4 and len(json.loads((tmp_path / "history.json").read_text())) == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_nan_loss_stops_unisrec_and_keeps_the_last_good_checkpoint(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    hist, target = rng.integers(-1, 20, (64, 6)), rng.integers(0, 20, 64)
    model = us.SASRecID(20, us.UniSRecConfig(hidden_size=8, inner_size=16, n_heads=2, n_layers=1))
    real_loss, calls = model.loss, {"n": 0}

    def loss(h, t):  # epoch 1 is fine, then the loss blows up
        calls["n"] += 1
        out = real_loss(h, t)
        return out if calls["n"] <= 2 else out * math.nan

    model.loss = loss
    cfg = us.TrainConfig(batch_size=32, max_epochs=5)
    with pytest.raises(FloatingPointError, match="epoch 2.*last good"):
        us.fit(model, hist, target, lambda m: {"ndcg@10": 0.1}, tmp_path, cfg)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_nan_loss_stops_the_encoder_before_the_update(tmp_path, monkeypatch, one_thread):
    import encoderec as er
    enc = er.load_encoder(make_tiny(tmp_path / "tiny"))
    real, calls = er.contrastive_step, {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        return real(*a, **k) if calls["n"] <= 2 else math.inf

    monkeypatch.setattr(er, "contrastive_step", step)
    pairs = [("red relay kit", "a relay"), ("steel staples", "heavy duty"), ("hard start", "capacitor"),
             ("blue kit", "kit for the relay")]
    cfg = er.FinetuneConfig(batch_size=2, chunk_size=2, epochs=3, max_length=16)
    with pytest.raises(FloatingPointError, match="epoch 2, step 1"):
        er.finetune(enc, pairs, tmp_path / "run", cfg)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 1


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch, capsys):
    ds = fx.write_lcrec(tmp_path / "Fix")

    def full(*a, dir=None, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    code = train.main(["--stage", "unisrec", "--dataset", str(ds), "--encoder", "none", "--max-epochs", "1",
                       "--data-dir", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "writable --runs" in err


_WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import encoderec, tiger, train, unisrec
from pathlib import Path
which, path = sys.argv[2], Path(sys.argv[3])
save = {"tiger": tiger._atomic_save, "unisrec": unisrec._atomic_save,
        "encoderec": lambda obj, p: encoderec._atomic_write_bytes(p, lambda tmp: torch.save(obj, tmp)),
        "train": lambda obj, p: train.atomic_write(p, lambda tmp: torch.save(obj, tmp))}[which]
i = 0
while True:  # complete checkpoints of 16 MB, each filled with its own number
    save({"i": i, "x": torch.full((4_000_000,), float(i))}, path)
    i += 1
"""


@pytest.mark.parametrize("which", ["tiger", "unisrec", "encoderec", "train"])
def test_sigkill_in_the_middle_of_a_checkpoint_write_leaves_the_last_complete_one(tmp_path, which):
    """A real kill while the writer is inside a write: the checkpoint is the previous complete one."""
    target = tmp_path / "last.pt"
    for attempt in range(5):  # the kill must land while a temp file exists; retry if a write ended first
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(ROOT), which, str(target)], env=ENV)
        t0 = time.time()
        while not (target.exists() and list(tmp_path.glob(".last.pt.*"))):
            assert proc.poll() is None and time.time() - t0 < 120, "the writer never got going"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        leftovers = list(tmp_path.glob(".last.pt.*"))
        ck = torch.load(target, weights_only=True)
        assert torch.equal(ck["x"], torch.full((4_000_000,), float(ck["i"])))  # complete, not mixed
        if leftovers:
            break
        target.unlink()
    assert leftovers, "no kill landed mid-write in 5 attempts"


def test_kill_between_last_and_best_checkpoint_is_repaired_on_resume(tmp_path, one_thread):
    """last.pt is written before best.pt; a kill in between leaves best.pt one improvement behind.
    On resume the loaded weights are the best ones, so best.pt is rewritten from them."""
    rng = np.random.default_rng(0)
    hist, target = rng.integers(-1, 20, (64, 6)), rng.integers(0, 20, 64)
    # UniSRec: epoch 1 always improves (from -inf); drop its best.pt as the kill would
    torch.manual_seed(0)
    model = us.SASRecID(20, us.UniSRecConfig(hidden_size=8, inner_size=16, n_heads=2, n_layers=1))
    us.fit(model, hist, target, lambda m: {"ndcg@10": 0.1}, tmp_path / "u", us.TrainConfig(batch_size=32, max_epochs=1))
    (tmp_path / "u" / "best.pt").unlink()
    us.fit(model, hist, target, lambda m: {"ndcg@10": 0.1}, tmp_path / "u", us.TrainConfig(batch_size=32, max_epochs=1),
           resume=True)
    best, last = (torch.load(tmp_path / "u" / f, weights_only=True) for f in ("best.pt", "last.pt"))
    assert best["epoch"] == 1 and all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    # TIGER: the first validation always improves
    codes, vocab = tg.random_semantic_ids(20, (3, 3, 3), seed=0)
    ids = tg.SemanticIDs(codes, vocab)
    tmodel = tg.Tiger(tg.TigerConfig(vocab_sizes=ids.vocab_sizes, d_model=16, d_kv=8, n_heads=2, d_ff=32,
                                     n_encoder_layers=1, n_decoder_layers=1))
    cfg = tg.TrainConfig(batch_size=16, max_steps=4, eval_every=4, warmup_steps=2)
    tg.fit(tmodel, ids, hist, target, lambda m: {"ndcg@10": 0.1}, tmp_path / "t", cfg)
    (tmp_path / "t" / "best.pt").unlink()
    tg.fit(tmodel, ids, hist, target, lambda m: {"ndcg@10": 0.1}, tmp_path / "t", cfg, resume=True)
    best, last = (torch.load(tmp_path / "t" / f, weights_only=True) for f in ("best.pt", "last.pt"))
    assert best["step"] == 4 and all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
