"""trainer.fit, the one training loop, on a toy regression with dropout (nothing here is a recommender):
early stopping, exact resume, the time cap, the NaN stop, the last/best repair, refusing foreign or
corrupt checkpoints."""
import json
import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

import trainer
from trainer import CheckpointError, TrainConfig

X = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1


def toy(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))


def run(out, cfg, model=None, resume=False, values=None, loss_hook=None, **kw):
    """Train the toy model; evaluate() returns the scripted `values` in turn (else minus the MSE)."""
    model = model or toy()
    opt = torch.optim.AdamW(model.parameters())
    it = iter(values) if values else None

    def loss_fn(idx):
        loss = ((model(X[idx]).squeeze(-1) - Y[idx]) ** 2).mean()
        return loss_hook(loss) if loss_hook else loss

    def evaluate(m):
        return {"ndcg@10": next(it) if it else -float(((m(X).squeeze(-1) - Y) ** 2).mean())}
    summary = trainer.fit(model, loss_fn, len(X), opt, out, cfg, evaluate=evaluate, resume=resume,
                          schedule=lambda s: min(1.0, (s + 1) / 3), **kw)
    return model, summary


CFG = TrainConfig(lr=1e-2, batch_size=8, max_steps=30, eval_every=5, patience=3, seed=1)


def test_early_stopping_keeps_the_best_and_stops_after_patience(tmp_path):
    values = [0.1, 0.3, 0.2, 0.3, 0.25, 0.9]   # best at the 2nd evaluation, then 3 without gain: stop
    model, s = run(tmp_path, CFG, values=values)
    assert (s["best_step"], s["steps"], s["stopped_early"]) == (10, 25, True) and s["epochs"] == 5.0
    best = trainer.load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 10 and all(torch.equal(model.state_dict()[k], v) for k, v in best["model"].items())
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in hist] == [5, 10, 15, 20, 25] and [h["improved"] for h in hist][:2] == [True, True]


def test_resume_is_exact(tmp_path):
    """Stopped after 2 of 6 epochs (dropout on), then resumed: the weights and history of one whole run."""
    cfg = replace(CFG, max_steps=None, max_epochs=6, eval_every=None, patience=None)
    whole, sw = run(tmp_path / "a", cfg)
    cut, _ = run(tmp_path / "b", replace(cfg, max_epochs=2))
    again, sb = run(tmp_path / "b", cfg, model=toy(seed=7), resume=True)    # other init: last.pt wins
    for k, v in whole.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text()) for d in "ab")
    assert [(h["loss"], h["valid"]) for h in ha] == [(h["loss"], h["valid"]) for h in hb] and len(ha) == 6
    assert (sb["best_step"], sb["steps"]) == (sw["best_step"], sw["steps"])


def test_time_cap_stops_at_an_evaluation_and_resume_continues(tmp_path):
    _, s = run(tmp_path, replace(CFG, max_minutes=0))
    assert s["time_capped"] and s["steps"] == 5
    _, s = run(tmp_path, CFG, resume=True)
    assert not s["time_capped"] and s["steps"] > 5


def test_nan_loss_stops_before_the_update_and_last_pt_keeps_the_good_state(tmp_path):
    calls = {"n": 0}

    def blow_up(loss):  # steps 1-7 fine, then NaN
        calls["n"] += 1
        if calls["n"] == 8:
            calls["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        return loss if calls["n"] < 8 else loss * math.nan
    model = toy()
    with pytest.raises(FloatingPointError, match="at step 8; stopped before the update"):
        run(tmp_path, CFG, model=model, loss_hook=blow_up)
    assert all(torch.equal(v, calls["weights"][k]) for k, v in model.state_dict().items())
    ck = trainer.load_checkpoint(tmp_path / "last.pt")
    assert ck["state"]["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_kill_between_last_and_best_is_repaired_on_resume(tmp_path):
    """last.pt is written before best.pt; a kill in between leaves best.pt one improvement behind. On
    resume the loaded weights are the best ones, so best.pt is rewritten from them."""
    run(tmp_path, replace(CFG, max_steps=5), values=[0.5])
    (tmp_path / "best.pt").unlink()
    run(tmp_path, replace(CFG, max_steps=5), resume=True)
    best, last = (trainer.load_checkpoint(tmp_path / f) for f in ("best.pt", "last.pt"))
    assert best["step"] == 5 and all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


def test_resume_refuses_other_settings_or_data(tmp_path):
    run(tmp_path, replace(CFG, max_steps=5), meta={"data_fingerprint": "a", "git_commit": "x"})
    with pytest.raises(CheckpointError, match=r"lr: 0.01 -> 0.5"):
        run(tmp_path, replace(CFG, lr=0.5), resume=True, meta={"data_fingerprint": "a"})
    with pytest.raises(CheckpointError, match=r"meta.data_fingerprint: a -> b"):
        run(tmp_path, CFG, resume=True, meta={"data_fingerprint": "b"})
    run(tmp_path, replace(CFG, max_steps=10), resume=True, meta={"data_fingerprint": "a", "git_commit": "y"})


class Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", bytes(range(256)) * 8, "pickle"])
def test_corrupt_or_pickled_checkpoints_are_refused(tmp_path, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "last.pt"
    if content == "pickle":
        torch.save({"model": Payload()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        trainer.load_checkpoint(path)
    with pytest.raises(CheckpointError):
        run(tmp_path, CFG, resume=True)
    assert not (tmp_path / "PWNED").exists()
    assert pickle.dumps(1)  # (pickle itself is fine; loading one from a checkpoint is not)


def test_a_run_needs_something_that_ends_it(tmp_path):
    with pytest.raises(ValueError, match="nothing would end"):
        run(tmp_path, replace(CFG, max_steps=None, patience=None))
    with pytest.raises(ValueError, match="batch_size"):
        run(tmp_path, replace(CFG, batch_size=0))


def test_json_safe_has_no_nan_tokens():
    assert json.dumps(trainer.json_safe({"a": np.float32(1.5), "b": [math.nan, math.inf], 3: (1, 2)})) == \
        '{"a": 1.5, "b": [null, null], "3": [1, 2]}'
