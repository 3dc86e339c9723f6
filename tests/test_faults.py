"""Faults: SIGKILL a real training process (UniSRec, encoder, TIGER) and resume it; a kill in the middle
of a write; unwritable output. (The loop's own faults, NaN and the last/best repair: test_trainer.py.)

A killed run resumed with --resume must end with exactly the metrics of an uninterrupted run
(CPU, same seed): checkpoints are written atomically, so a kill mid-write leaves the previous
checkpoint intact (plus a stray temp file that resuming ignores)."""
import errno
import json
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
import train
from conftest import ROOT
from data import load_dataset
from test_encoderec import make_tiny

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ENCODEREC_OFFLINE": "1"}


def synthetic_lcrec(folder, users=60, items=30, seed=0):
    """A random LC-Rec folder big enough that an epoch takes a visible moment."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {str(i): {"asin": f"A{i:04d}", "title": f"item {i}", "categories": f"a,b{i % 7}"} for i in range(items)}
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
    assert again["best_epoch"] == whole["best_epoch"] and again["epochs"] == 6


def test_encoder_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    tiny = make_tiny(tmp_path / "tiny", dropout=0.1)        # dropout on: the RNG state must resume too
    ds = fx.write_lcrec(tmp_path / "Fix")
    common = ["--stage", "encoder", "--backbone", str(tiny), "--dataset", str(ds), "--epochs", "8",
              "--batch-size", "3", "--chunk-size", "2", "--lr", "1e-3", "--max-length", "32",
              "--doc-fields", "description,brand", "--data-dir", str(tmp_path / "cache"), "--device", "cpu"]
    _finish(_train([*common, "--out", str(tmp_path / "whole")]))
    cut = tmp_path / "cut"
    _kill_after(_train([*common, "--out", str(cut)]), cut / "history.json", 3)
    assert not (cut / "model.safetensors").exists()
    _junk_temp_file(cut, "last.pt")
    _finish(_train([*common, "--out", str(cut), "--resume"]))
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "whole" / "history.json").read_text())
    hb = json.loads((cut / "history.json").read_text())
    assert [h.get("loss") for h in ha] == [h.get("loss") for h in hb] and len(ha) == 8


def test_tiger_killed_mid_run_resumes_to_the_same_metrics(tmp_path):
    """Semantic IDs without the network or MiniLM: random item embeddings given with --emb, tokenised by
    residual k-means once (the later runs find the IDs finished)."""
    ds = synthetic_lcrec(tmp_path / "Syn")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((load_dataset(str(ds), str(cache)).n_items, 16))
            .astype(np.float32))
    common = ["--stage", "tiger", "--dataset", str(ds), "--tokenizer", "rkmeans", "--max-steps", "24",
              "--eval-every", "6", "--batch-size", "8", "--warmup-steps", "6", "--lr", "3e-3", "--emb", str(emb),
              "--data-dir", str(cache), "--runs", str(runs), "--device", "cpu"]
    out = _finish(_train([*common, "--out", str(tmp_path / "whole")]))
    cut = tmp_path / "cut"
    _kill_after(_train([*common, "--out", str(cut)]), cut / "history.json", 2)
    assert not (cut / "results.json").exists()
    _junk_temp_file(cut, "last.pt")
    out = _finish(_train([*common, "--out", str(cut), "--resume"]))
    assert "resumed from" in out and "up to date" in out
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    again = json.loads((cut / "results.json").read_text())
    assert again["test"] == whole["test"] and again["best_valid"] == whole["best_valid"]
    assert again["best_step"] == whole["best_step"] and again["steps"] == 24
    ha = json.loads((tmp_path / "whole" / "history.json").read_text())
    hb = json.loads((cut / "history.json").read_text())
    assert [(h["loss"], h["valid"]) for h in ha] == [(h["loss"], h["valid"]) for h in hb] and len(ha) == 4
    # eval.py rebuilds the model and its semantic IDs from best.pt alone and finds the same test metrics
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--task", "tiger", "--dataset", str(ds), "--run",
                          str(cut), "--data-dir", str(cache), "--device", "cpu"], env=ENV, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1])["test"] == json.loads(json.dumps(again["test"]))


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch, capsys):
    ds = fx.write_lcrec(tmp_path / "Fix")

    def full(*a, dir=None, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    code = train.main(["--stage", "unisrec", "--dataset", str(ds), "--encoder", "none", "--max-epochs", "1",
                       "--data-dir", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Free some space" in err


_WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from pathlib import Path
which, path = sys.argv[2], Path(sys.argv[3])
write = __import__(which).atomic_write
i = 0
while True:  # complete checkpoints of 16 MB, each filled with its own number
    obj = {"i": i, "x": torch.full((4_000_000,), float(i))}
    write(path, lambda tmp: torch.save(obj, tmp))
    i += 1
"""


@pytest.mark.parametrize("which", ["trainer", "data"])
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
