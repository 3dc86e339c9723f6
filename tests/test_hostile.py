"""Hostile input: every kind of file the project reads, malformed or planted; every flag at its edges;
a full disk; two writers. Each must end in ONE line on stderr naming the file or flag, exit code 2 (or a
DataError / WeightsError from the library), never a traceback, never a silently wrong result, and no file
may run code when read.

The cases are built here, on the fixture catalog; none needs the real MiniLM weights."""
import ast
import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import amazon_fixture as fx
import encoderec as er
import prepare_data as pd
import eval as ev
import report as rp
import train
import trainer
from conftest import ROOT
from data import DataError, load_dataset, weights_folder
from test_encoderec import make_tiny

TOP_LEVEL = sorted(ROOT.glob("*.py"))


def _common(tmp_path):
    return ["--data-dir", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"), "--device", "cpu"]


def _refused(main, argv, capsys, *needles):
    """main(argv) exits 2 (argparse's own errors: SystemExit 2) with one line on stderr that holds every
    needle."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    out = capsys.readouterr().err.strip()
    err = out.splitlines()[-1]                             # progress lines may precede it
    assert err.startswith("error: ") and out.count("error:") == 1 and "Traceback" not in out, out
    for n in needles:
        assert n in err, (n, err)
    return err


# ------------------------------------------------------------------------------------------ pickle
class Payload:
    """Unpickling it would create the file `marker`."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_no_loader_in_the_project_can_unpickle():
    """Every torch.load passes weights_only=True and every np.load allow_pickle=False."""
    calls = 0
    for path in TOP_LEVEL:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "load" and getattr(node.func.value, "id", "") in ("torch", "np"):
                kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                want = ("weights_only", True) if node.func.value.id == "torch" else ("allow_pickle", False)
                assert kw.get(want[0]) is want[1], f"{path.name}:{node.lineno} {node.func.value.id}.load"
                calls += 1
            assert not (isinstance(node, ast.Name) and node.id == "pickle"), f"{path.name}:{node.lineno}"
    assert calls >= 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished runs on the fixture catalog: SASRec-ID, RQ-VAE IDs and TIGER on random embeddings."""
    tmp = tmp_path_factory.mktemp("runs")
    ds = fx.write_lcrec(tmp / "Fix")
    emb = tmp / "emb.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32))
    common = _common(tmp)
    argv = {"unisrec": ["--stage", "unisrec", "--dataset", str(ds), "--encoder", "none", "--max-epochs", "1",
                        *common],
            "tiger": ["--stage", "tiger", "--dataset", str(ds), "--emb", str(emb), "--rqvae-epochs", "2",
                      "--max-steps", "2", "--eval-every", "1", "--warmup-steps", "1", *common]}
    assert train.main(argv["unisrec"]) == 0 and train.main(argv["tiger"]) == 0
    folder = tmp / "runs" / "Fix"
    return {"tmp": tmp, "ds": ds, "emb": emb, "common": common, "argv": argv,
            "unisrec": next(folder.glob("unisrec-id-*")),
            "ids": next(folder.glob("ids-rqvae-emb-emb-*")), "tiger": next(folder.glob("tiger-rqvae-*"))}


def _copy_run(run: Path, dest: Path) -> Path:
    import shutil
    shutil.copytree(run, dest)
    return dest


def _planted(kind, path, tmp):
    """A bad checkpoint of `kind` at `path`; for 'pickle', the marker its payload would create."""
    marker = tmp / f"PWNED-{kind}"
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[:len(good) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle":
        torch.save({"model": {}, "meta": Payload(marker)}, path)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "other-model":
        torch.save({"model": {"w": torch.zeros(3)}, "meta": {}}, path)
    elif kind == "not-a-dict":
        torch.save([1, 2, 3], path)
    return marker


BAD_CHECKPOINTS = ["truncated", "random", "empty", "pickle", "plain-pickle", "other-model", "not-a-dict"]


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
@pytest.mark.parametrize("model", ["unisrec", "tiger"])
def test_bad_best_checkpoint_in_eval(runs, tmp_path, capsys, model, kind):
    run = _copy_run(runs[model], tmp_path / runs[model].name)
    marker = _planted(kind, run / "best.pt", tmp_path)
    _refused(ev.main, ["--task", model, "--dataset", str(runs["ds"]), "--run", str(run), *runs["common"]],
             capsys, "best.pt")
    assert not marker.exists()


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
@pytest.mark.parametrize("model", ["unisrec", "tiger"])
def test_bad_last_checkpoint_on_resume(runs, tmp_path, capsys, model, kind):
    run = _copy_run(runs[model], tmp_path / runs[model].name)
    (run / "results.json").unlink()                                      # unfinished: --resume reads last.pt
    marker = _planted(kind, run / "last.pt", tmp_path)
    assert json.loads((run / "run.json").read_text())["argv"] == runs["argv"][model]   # the command, recorded
    err = _refused(train.main, [*runs["argv"][model], "--out", str(run), "--resume"], capsys, "last.pt")
    assert "--resume starts this run over" in err or kind in ("other-model", "not-a-dict")
    assert not marker.exists()


@pytest.mark.parametrize("stage", ["encoder", "rqvae"])
def test_encoder_and_rqvae_checkpoints_refuse_a_payload(runs, tmp_path, capsys, stage):
    """The other two kinds of last.pt: the encoder's (a tiny BERT here) and the RQ-VAE's."""
    common = _common(tmp_path)
    if stage == "encoder":
        argv = ["--stage", "encoder", "--backbone", str(make_tiny(tmp_path / "tiny")), "--dataset",
                str(runs["ds"]), "--epochs", "1", "--batch-size", "4", "--max-length", "32", *common]
    else:
        argv = ["--stage", "rqvae", "--dataset", str(runs["ds"]), "--emb", str(runs["emb"]), "--rqvae-epochs",
                "1", *common]
    assert train.main(argv) == 0
    run = next((tmp_path / "runs" / "Fix").glob(f"{'encoder' if stage == 'encoder' else 'ids'}-*"))
    (run / "results.json").unlink()
    marker = _planted("pickle", run / "last.pt", tmp_path)
    _refused(train.main, [*argv, "--resume"], capsys, f"{run / 'last.pt'} is not a readable checkpoint")
    assert not marker.exists()


# ------------------------------------------------------------------------------------- provenance
def test_eval_on_other_data_names_both_sides(runs, tmp_path, capsys):
    other = fx.write_lcrec(tmp_path / "Fix")
    inter = json.loads((other / "Fix.inter.json").read_text())
    inter[next(iter(inter))] = list(reversed(inter[next(iter(inter))]))      # same size, other sequences
    (other / "Fix.inter.json").write_text(json.dumps(inter))
    err = _refused(ev.main, ["--task", "unisrec", "--dataset", str(other), "--run", str(runs["unisrec"]),
                             "--data-dir", str(tmp_path / "c"), "--device", "cpu"], capsys, "trained on", "6 items")
    assert err.count("fingerprint") == 2


def test_resume_on_other_data_is_refused(runs, tmp_path, capsys):
    run = _copy_run(runs["unisrec"], tmp_path / "u")
    (run / "results.json").unlink()
    big = tmp_path / "Big"
    from test_faults import synthetic_lcrec
    synthetic_lcrec(big / "Fix")
    argv = ["--stage", "unisrec", "--dataset", str(big / "Fix"), "--encoder", "none", "--max-epochs", "1",
            "--out", str(run), "--resume", *_common(tmp_path)]
    _refused(train.main, argv, capsys, str(run), "other inputs")


def test_unisrec_eval_rechecks_its_embeddings(runs, tmp_path, capsys):
    ds, common = runs["ds"], runs["common"]
    emb = tmp_path / "e.npy"
    np.save(emb, np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32))
    assert train.main(["--stage", "unisrec", "--dataset", str(ds), "--emb", str(emb), "--max-epochs", "1",
                       "--data-dir", str(tmp_path / "c"), "--runs", str(tmp_path / "r"), "--device", "cpu"]) == 0
    run = next((tmp_path / "r" / "Fix").glob("unisrec-inductive-emb-e-*"))
    capsys.readouterr()
    argv = ["--task", "unisrec", "--dataset", str(ds), "--run", str(run), *common]
    np.save(emb, np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32))
    _refused(ev.main, argv, capsys, "e.npy", "changed")
    emb.unlink()
    _refused(ev.main, argv, capsys, "e.npy", "gone")


def test_best_checkpoint_of_another_run_or_with_nan_weights(runs, tmp_path, capsys):
    ds, common = runs["ds"], runs["common"]
    assert train.main(["--stage", "unisrec", "--dataset", str(ds), "--encoder", "none", "--max-epochs", "1",
                       "--max-history", "7", "--data-dir", str(tmp_path / "c"), "--runs", str(tmp_path / "r"),
                       "--device", "cpu"]) == 0
    other = next((tmp_path / "r" / "Fix").glob("unisrec-id-*"))
    run = _copy_run(runs["unisrec"], tmp_path / runs["unisrec"].name)
    (run / "best.pt").write_bytes((other / "best.pt").read_bytes())          # same model kind, other run
    argv = ["--task", "unisrec", "--dataset", str(ds), "--run", str(run), *common]
    _refused(ev.main, argv, capsys, "best.pt belongs to another run folder")
    ck = torch.load(runs["unisrec"] / "best.pt", weights_only=True)
    ck["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                   for k, v in ck["model"].items()}
    torch.save(ck, run / "best.pt")
    _refused(ev.main, argv, capsys, "best.pt: weight", "NaN")


def test_last_resort_is_one_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ENCODEREC_DEBUG", raising=False)
    monkeypatch.setattr(ev, "evaluate_unisrec", lambda *a, **k: {}["boom"])
    argv = ["--task", "unisrec", "--dataset", str(runs["ds"]), "--run", str(runs["unisrec"]), *runs["common"]]
    assert ev.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unexpected KeyError") and "ENCODEREC_DEBUG=1" in err[-1]
    monkeypatch.setenv("ENCODEREC_DEBUG", "1")
    with pytest.raises(KeyError):
        ev.main(argv)


# ------------------------------------------------------------------------------------ LC-Rec files
def _lcrec(tmp_path, inter=None, items=None, raw_inter=None, raw_items=None):
    folder = fx.write_lcrec(tmp_path / "Fix")
    if inter is not None or raw_inter is not None:
        (folder / "Fix.inter.json").write_text(raw_inter if raw_inter is not None else json.dumps(inter))
    if items is not None or raw_items is not None:
        (folder / "Fix.item.json").write_text(raw_items if raw_items is not None else json.dumps(items))
    return folder


BAD_SEQUENCES = [5.5, True, "3", None, -1, 6, 2 ** 70, [1], {"i": 1}]


@pytest.mark.parametrize("value", BAD_SEQUENCES, ids=repr)
def test_sequence_values_are_never_coerced(tmp_path, value):
    folder = _lcrec(tmp_path, inter={"0": [0, 1, value], "1": [2, 3, 4]})
    with pytest.raises(DataError, match=r"Fix\.inter\.json: user 0, position 2: .* is not an item index"):
        load_dataset(str(folder), tmp_path / "cache")


@pytest.mark.parametrize("raw, pattern", [
    ('{"0": [0, 1, NaN]}', "NaN is not a JSON number"),
    ('{"0": [0, 1, Infinity]}', "Infinity is not a JSON number"),
    ('{"0": [0, 1], "0": [2, 3]}', "key '0' appears twice"),
    ('{"0": [0, 1], "01": [2, 3]}', "user key '01' is not an index"),
    ('{" 1": [0, 1]}', "user key ' 1' is not an index"),
    ('{"1_0": [0, 1]}', "user key '1_0' is not an index"),
    ('{"0": "0123"}', r'user 0: "0123" is not a non-empty list'),
    ('{"0": []}', r"user 0: \[\] is not a non-empty list"),
    ('{}', "no interactions"),
    ('[[0, 1]]', "must each hold one JSON object"),
    ('{"0": [0, 1', "malformed JSON"),
    ('', "malformed JSON"),
])
def test_malformed_inter_file(tmp_path, raw, pattern):
    folder = _lcrec(tmp_path, raw_inter=raw)
    with pytest.raises(DataError, match=pattern):
        load_dataset(str(folder), tmp_path / "cache")


def _times(**edits):
    """fx's 6 users x 5 timestamps, with edits: user -> a replacement list."""
    times = {str(u): [10, 20, 30, 40, 50] for u in range(6)}
    times.update(edits)
    return times


@pytest.mark.parametrize("raw, pattern", [
    (json.dumps({"0": [1, 2, 3, 4, 5]}), r"Fix\.time\.json: user\(s\) 1, 2, 3, 4, 5 are not in both it and "
                                         r"Fix\.inter"),
    (json.dumps(_times(**{"6": [1]})), r"user\(s\) 6 are not in both"),
    (json.dumps(_times(**{"0": [1, 2, 3, 4]})), r"user 0: \[1, 2, 3, 4\] is not a list of 5 timestamps"),
    (json.dumps(_times(**{"1": "12345"})), r"user 1: \"12345\" is not a list of 5 timestamps"),
    (json.dumps(_times(**{"0": [1, 2, 5.5, 6, 7]})), "user 0, position 2: 5.5 is not an integer timestamp"),
    (json.dumps(_times(**{"0": [1, 2, True, 6, 7]})), "position 2: true is not an integer timestamp"),
    (json.dumps(_times(**{"0": [1, 2, "3", 6, 7]})), 'position 2: "3" is not an integer timestamp'),
    (json.dumps(_times(**{"0": [1, 2, 2 ** 70, 6, 7]})), "position 2: 1180591620717411303424 is not"),
    (json.dumps(_times(**{"2": [1, 2, 1, 6, 7]})), "user 2, position 2: 1 is not an integer timestamp at or "
                                                   "after"),
    (json.dumps(_times(**{"01": [1, 2, 3, 4, 5]})), "user key '01' is not an index"),
    ('[[1, 2, 3, 4, 5]]', "Fix.time.json must hold one JSON object"),
    ('{"0": [1, NaN]}', "NaN is not a JSON number"),
    ('{"0": [1, 2', r"Fix\.time\.json:1: malformed JSON"),
])
def test_malformed_time_file(tmp_path, raw, pattern):
    folder = _lcrec(tmp_path)
    (folder / "Fix.time.json").write_text(raw)
    with pytest.raises(DataError, match=pattern):
        load_dataset(str(folder), tmp_path / "cache")


def test_a_time_file_selects_the_time_split_and_is_fingerprinted(tmp_path):
    folder = _lcrec(tmp_path)
    plain = load_dataset(str(folder), tmp_path / "cache")
    (folder / "Fix.time.json").write_text(json.dumps(_times(**{"3": [-5, 0, 0, 2 ** 62, 2 ** 63 - 1]})))
    timed = load_dataset(str(folder), tmp_path / "cache")
    assert (plain.protocol, timed.protocol) == ("loo", "time") and plain.seq_times is None
    assert timed.fingerprint != plain.fingerprint
    assert timed.seq_times[15:20].tolist() == [-5, 0, 0, 2 ** 62, 2 ** 63 - 1]
    (folder / "Fix.time.json").unlink()
    (folder / "Fix.time.json").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="is not a regular file"):
        load_dataset(str(folder), tmp_path / "cache")


@pytest.mark.parametrize("items, pattern", [
    ({"00": {"title": "a"}}, "item key '00' is not an index"),
    ({"0": {"title": "a"}, "2": {"title": "b"}}, "without gaps"),
    ({}, "without gaps"),
    ({str(i): {"title": 5} for i in range(6)}, "item 0: field 'title' is 5"),
    ({str(i): {"title": True} for i in range(6)}, "item 0: field 'title' is true"),
    ({str(i): {"title": {"x": 1}} for i in range(6)}, "field 'title' is"),
    ({str(i): {"categories": 3} for i in range(6)}, "field 'categories' is 3"),
    ({str(i): {"features": [[["a"]]]} for i in range(6)}, "field 'features' is"),   # one level nests
    ({str(i): "title" for i in range(6)}, "item 0 is not a JSON object"),
])
def test_malformed_item_file(tmp_path, items, pattern):
    folder = _lcrec(tmp_path, items=items)
    with pytest.raises(DataError, match=pattern):
        load_dataset(str(folder), tmp_path / "cache")


def test_not_utf8_and_two_pairs_and_a_file(tmp_path):
    folder = _lcrec(tmp_path)
    (folder / "Fix.item.json").write_bytes(b'{"0": {"title": "\xff"}}')
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(str(folder), tmp_path / "cache")
    folder = fx.write_lcrec(tmp_path / "Two")
    for suffix in ("inter", "item"):
        (folder / f"Other.{suffix}.json").write_text((folder / f"Fix.{suffix}.json").read_text())
    with pytest.raises(DataError, match="holds 2 LC-Rec pairs"):
        load_dataset(str(folder), tmp_path / "cache")
    with pytest.raises(DataError, match="is a file"):
        load_dataset(str(folder / "Fix.inter.json"), tmp_path / "cache")


def test_random_json_in_sequences_never_loads_wrong(tmp_path):
    """A seeded fuzz: any JSON value in a sequence either loads as exactly that int or is refused."""
    rng = np.random.default_rng(0)
    pool = [0, 5, 6, -1, 1.0, 2.5, True, False, None, "1", "", [], {}, 10 ** 20, -0.0, 1e300]
    for trial in range(40):
        value = pool[rng.integers(len(pool))]
        folder = _lcrec(tmp_path / str(trial), inter={"0": [1, 2, value], "1": [3, 4, 5]})
        try:
            ds = load_dataset(str(folder), tmp_path / "cache", use_cache=False)
        except DataError:
            assert not (type(value) is int and 0 <= value < 6)
            continue
        assert type(value) is int and ds.sequence(0).tolist() == [1, 2, value]


# ----------------------------------------------------------------------------------- raw Amazon files
@pytest.mark.parametrize("edit, pattern", [
    (lambda r: r.update(unixReviewTime=10.5), "an integer unixReviewTime"),
    (lambda r: r.update(unixReviewTime=True), "an integer unixReviewTime"),
    (lambda r: r.update(reviewerID=["u4"]), "string reviewerID"),
    (lambda r: r.update(asin=7), "string reviewerID and asin"),
    (lambda r: r.pop("asin"), "record lacks asin"),
])
def test_raw_reviews_are_never_coerced(tmp_path, edit, pattern):
    import gzip
    folder = fx.write_2018(tmp_path / "r18")
    path = next(folder.glob("*_5.json.gz"))
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    first = json.loads(lines[0])
    edit(first)
    path.write_bytes(gzip.compress(("\n".join([json.dumps(first), *lines[1:]]) + "\n").encode()))
    with pytest.raises(DataError, match=r":1: .*" + pattern):
        pd.prepare(str(folder), tmp_path / "cache")


def test_truncated_gzip(tmp_path):
    folder = fx.write_2018(tmp_path / "r18")
    path = next(folder.glob("*_5.json.gz"))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        pd.prepare(str(folder), tmp_path / "cache")
    assert not (tmp_path / "cache" / "r18").exists()  # nothing half-prepared


# -------------------------------------------------------------------------------- the processed cache
@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "inconsistent", "directory"])
def test_a_damaged_cache_is_rebuilt(tmp_path, capsys, damage):
    folder = fx.write_lcrec(tmp_path / "Fix")
    good = load_dataset(str(folder), tmp_path / "cache")
    cache = next((tmp_path / "cache" / "processed").glob("Fix-*.npz"))
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:200])
    elif damage == "random":
        cache.write_bytes(np.random.default_rng(0).bytes(1000))
    elif damage == "empty":
        cache.write_bytes(b"")
    elif damage == "inconsistent":
        with np.load(cache) as z:
            arrays = dict(z)
        arrays["seq_items"] = arrays["seq_items"] + 100
        with open(cache, "wb") as f:
            np.savez(f, **arrays)
    else:
        cache.unlink()
        cache.mkdir()
    again = load_dataset(str(folder), tmp_path / "cache")
    assert again.seq_items.tolist() == good.seq_items.tolist() and again.items == good.items
    if damage != "directory":
        assert "rebuilding" in capsys.readouterr().err
        assert load_dataset(str(folder), tmp_path / "cache").seq_items.tolist() == good.seq_items.tolist()


# ------------------------------------------------------------------- encoder config / tokenizer / weights
@pytest.fixture
def tiny(tmp_path):
    return make_tiny(tmp_path / "tiny")


@pytest.mark.parametrize("edit, pattern", [
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
    ({"num_attention_heads": 5}, "not divisible by num_attention_heads=5"),
    ({"num_hidden_layers": -1}, "num_hidden_layers=-1 must be a positive integer"),
    ({"hidden_size": "32"}, "hidden_size='32' must be a positive integer"),
    ({"model_type": "t5"}, "model_type='t5' is not supported"),
])
def test_bad_config(tiny, edit, pattern):
    cfg = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(er.WeightsError, match=pattern):
        er.load_encoder(tiny)


@pytest.mark.parametrize("what", ["int8", "nan", "config-not-json", "tokenizer", "max_length", "sbert",
                                  "pooling", "vocab"])
def test_bad_weights_and_tokenizer(tiny, what):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tiny / "model.safetensors"))
    k = "embeddings.word_embeddings.weight"
    if what in ("int8", "nan"):
        sd[k] = sd[k].to(torch.int8) if what == "int8" else torch.full_like(sd[k], float("nan"))
        save_file(sd, str(tiny / "model.safetensors"))
        pattern = f"tensor {k} is {'torch.int8' if what == 'int8' else 'not finite'}"
    elif what == "config-not-json":
        (tiny / "config.json").write_text("{'hidden_size': 32")
        pattern = "config.json: not valid JSON"
    elif what == "tokenizer":
        (tiny / "tokenizer.json").write_text('{"model": 1')
        pattern = "tokenizer.json: unreadable"
    elif what == "sbert":
        (tiny / "sentence_bert_config.json").write_text('{"max_seq_length": -5}')
        pattern = "max_seq_length=-5 is not a positive integer"
    elif what == "pooling":
        (tiny / "1_Pooling").mkdir()
        (tiny / "1_Pooling" / "config.json").write_text("[1, 2]")
        pattern = "holds list, not an object"
    elif what == "vocab":
        cfg = json.loads((tiny / "config.json").read_text())
        (tiny / "config.json").write_text(json.dumps({**cfg, "vocab_size": 6}))
        sd["embeddings.word_embeddings.weight"] = sd["embeddings.word_embeddings.weight"][:6]
        save_file(sd, str(tiny / "model.safetensors"))
        pattern = "tokenizer.json has token id .*, the model 6 embeddings"
    else:
        with pytest.raises(ValueError, match="max_length=65: this model reads 1 to 64 tokens"):
            er.load_encoder(tiny, max_length=65)
        return
    with pytest.raises(er.WeightsError, match=pattern):
        er.load_encoder(tiny)


# --------------------------------------------------------------------------------- .npy embeddings
def _npy(path, array=None, raw=None):
    if raw is not None:
        path.write_bytes(raw)
    else:
        with open(path, "wb") as f:
            np.save(f, array, allow_pickle=True)
    return path


BAD_EMBEDDINGS = {
    "int": np.zeros((6, 8), np.int64), "bool": np.ones((6, 8), bool), "complex": np.ones((6, 8), np.complex64),
    "object": np.array([[object()] * 8] * 6, dtype=object), "1-D": np.ones(6, np.float32),
    "3-D": np.ones((6, 2, 4), np.float32), "rows": np.ones((5, 8), np.float32),
    "nan": np.full((6, 8), np.nan, np.float32), "inf": np.full((6, 8), np.inf, np.float32),
    "zeros": np.zeros((6, 8), np.float32), "semantic-ids": np.arange(24).reshape(6, 4),
    "empty": np.zeros((6, 0), np.float32),
}


@pytest.mark.parametrize("kind", [*BAD_EMBEDDINGS, "text", "truncated"])
def test_bad_embedding_files(tmp_path, capsys, kind):
    folder = fx.write_lcrec(tmp_path / "Fix")
    path = tmp_path / "bad.npy"
    if kind == "text":
        _npy(path, raw=b"not a numpy file")
    elif kind == "truncated":
        _npy(path, np.ones((6, 8), np.float32))
        path.write_bytes(path.read_bytes()[:100])
    else:
        _npy(path, BAD_EMBEDDINGS[kind])
    _refused(train.main, ["--stage", "rqvae", "--dataset", str(folder), "--emb", str(path), *_common(tmp_path)],
             capsys, str(path))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("results.json"))


# ------------------------------------------------------------------------------- semantic-ID files
@pytest.mark.parametrize("edit", ["negative", "beyond-vocab", "width", "float", "duplicate", "vocab", "results"])
def test_bad_semantic_ids(runs, tmp_path, capsys, edit):
    run = _copy_run(runs["ids"], tmp_path / runs["ids"].name)
    ids = np.load(run / "semantic_ids.npy")
    res = json.loads((run / "results.json").read_text())
    if edit == "negative":
        ids[0, 0] = -1
    elif edit == "beyond-vocab":
        ids[0, 1] = 256
    elif edit == "width":
        ids = ids[:, :3]
    elif edit == "float":
        ids = ids.astype(np.float32)
    elif edit == "duplicate":
        ids[1] = ids[0]
    elif edit == "vocab":
        res["vocab_sizes"] = [256, 256]
    if edit == "results":
        (run / "results.json").write_text('{"task": "rqvae", "vocab_sizes": [256,')
    else:
        (run / "results.json").write_text(json.dumps(res))
    np.save(run / "semantic_ids.npy", ids)
    with pytest.raises(DataError, match="is not the file this project wrote"):   # the manifest refuses it
        ev.read_semantic_ids(run / "semantic_ids.npy", 6)
    (run / "sha256.json").unlink()                                      # then the content checks do
    with pytest.raises(DataError, match=str(run)):
        ev.read_semantic_ids(run / "semantic_ids.npy", 6)


# ------------------------------------------------------------------------ results / run / history JSON
@pytest.mark.parametrize("content", ['{"task": "unisrec", "test": {"recall@10": 0.5', '[1, 2]', '{"task": NaN}',
                                     '{"task": "unisrec", "task": "tiger"}'])
def test_bad_results_json(runs, tmp_path, capsys, content):
    run = _copy_run(runs["unisrec"], tmp_path / "runs" / "Fix" / runs["unisrec"].name)
    (run / "results.json").write_text(content)
    _refused(ev.main, ["--task", "unisrec", "--dataset", str(runs["ds"]), "--run", str(run), *runs["common"]],
             capsys, "results.json")
    assert rp.main(["--dataset", "Fix", "--runs", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "report skips" in err and str(run) in err


def test_report_marks_what_it_skips(tmp_path, capsys):
    run = tmp_path / "runs" / "Fix" / "unisrec-x"
    run.mkdir(parents=True)
    trainer.write_json(run / "results.json", {"task": "unisrec", "encoder": "none", "steps": 3,
                                              "test": {"recall@10": float("nan"), "ndcg@10": True}})
    assert "NaN" not in (run / "results.json").read_text()                   # valid JSON: null
    assert rp.main(["--dataset", "Fix", "--runs", str(tmp_path / "runs")]) == 0
    assert "no unisrec metrics" in capsys.readouterr().err
    _refused(rp.main, ["--dataset", "/abs/nowhere", "--runs", str(tmp_path / "runs")], capsys,
             "no run folders for /abs/nowhere", "Fix")


def test_unreadable_run_json_is_not_overwritten(runs, tmp_path, capsys):
    run = _copy_run(runs["unisrec"], tmp_path / "u")
    (run / "run.json").write_text("{")
    argv = ["--stage", "unisrec", "--dataset", str(runs["ds"]), "--encoder", "none", "--max-epochs", "1",
            "--out", str(run), *_common(tmp_path)]
    _refused(train.main, argv, capsys, "run.json is unreadable", f"delete {run} to start over")
    assert (run / "run.json").read_text() == "{"


# ------------------------------------------------------------------------------------------- flags
def _ds(tmp_path):
    return str(fx.write_lcrec(tmp_path / "Fix"))


TRAIN_FLAGS = [  # (extra argv after --stage, the flag the error must name)
    (["encoder", "--batch-size", "1"], "--batch-size 1"),
    (["encoder", "--batch-size", "-3"], "--batch-size: must be > 0"),
    (["encoder", "--batch-size", "0"], "--batch-size: must be > 0"),
    (["encoder", "--max-length", "0"], "--max-length: must be > 0"),
    (["encoder", "--max-length", "-5"], "--max-length: must be > 0"),
    (["encoder", "--chunk-size", "-2"], "--chunk-size: must be > 0"),
    (["encoder", "--epochs", "0"], "--epochs: must be > 0"),
    (["encoder", "--lr", "nan"], "--lr: must be > 0"),
    (["encoder", "--lr", "0"], "--lr: must be > 0"),
    (["encoder", "--lr", "inf"], "--lr: must be > 0"),
    (["encoder", "--temperature", "0"], "--temperature: must be >= 0.001"),
    (["encoder", "--holdout", "1"], "--holdout: must be >= 0 and < 1"),
    (["encoder", "--holdout", "nan"], "--holdout: must be >= 0 and < 1"),
    (["encoder", "--holdout", "-0.1"], "--holdout: must be >= 0 and < 1"),
    (["encoder", "--max-minutes", "-1"], "--max-minutes: must be > 0"),
    (["encoder", "--seed", "-1"], "--seed: must be >= 0"),
    (["encoder", "--no-eval"], "unrecognized arguments: --no-eval"),
    (["encoder", "--beam", "5"], "--beam does not apply to --stage encoder"),
    (["encoder", "--emb", "x.npy"], "--emb does not apply to --stage encoder"),
    (["embed", "--epochs", "2"], "--epochs does not apply to --stage embed"),
    (["embed", "--encoder", "none"], "--encoder none (SASRec on item IDs) is for --stage unisrec"),
    (["rqvae", "--encoder", "none"], "--encoder none"),
    (["rqvae", "--tokenizer", "rkmeans", "--rqvae-epochs", "3"], "--rqvae-epochs is an RQ-VAE option"),
    (["rqvae", "--tokenizer", "rkmeans", "--no-dead-code-restart"], "--no-dead-code-restart is an RQ-VAE"),
    (["rqvae", "--rqvae-epochs", "-1"], "--rqvae-epochs: must be >= 0"),
    (["rqvae", "--lr", "0.1"], "--lr does not apply to --stage rqvae"),
    (["unisrec", "--encoder", "none", "--emb", "x.npy"], "--emb does not apply to --encoder none"),
    (["unisrec", "--encoder", "none", "--mode", "transductive"], "--mode does not apply to --encoder none"),
    (["unisrec", "--emb", "x.npy", "--encoder", "other"], "--emb replaces the encoder's embeddings: drop --encoder"),
    (["unisrec", "--emb", "x.npy", "--fields", "title"], "drop --fields"),
    (["unisrec", "--max-epochs", "0"], "--max-epochs: must be > 0"),
    (["unisrec", "--patience", "0"], "--patience: must be > 0"),
    (["unisrec", "--max-history", "0"], "--max-history: must be > 0"),
    (["unisrec", "--beam", "3"], "--beam does not apply to --stage unisrec"),
    (["tiger", "--beam", "0"], "--beam: must be > 0"),
    (["tiger", "--eval-every", "0"], "--eval-every: must be > 0"),
    (["tiger", "--warmup-steps", "0"], "--warmup-steps: must be > 0"),
    (["tiger", "--tiger-history", "3"], "unrecognized arguments: --tiger-history"),
    (["tiger", "--group-by-length", "-1"], "--group-by-length: must be >= 0"),
    (["tiger", "--mode", "transductive"], "--mode does not apply to --stage tiger"),
    (["all"], "argument --stage: invalid choice: 'all'"),
    (["retrieval", "--emb", "x.npy"], "--emb does not apply to --stage retrieval"),
    (["ease", "--amp", "bf16"], "--amp does not apply to --stage ease"),
    (["embed", "--seed", "3"], "--seed does not apply to --stage embed"),
    (["rqvae", "--tokenizer", "pq", "--no-standardize"], "--no-standardize is for semantic IDs"),
    (["unisrec", "--device", "cuda"], "--device cuda: this machine has"),
    (["unisrec", "--device", "cuda:7"], "--device cuda:7"),
    (["unisrec", "--device", "gpu"], "--device gpu is not a device"),
    (["unisrec", "--device", "meta"], "only cpu and cuda"),
    (["unisrec", "--amp", "fp16"], "argument --amp: invalid choice: 'fp16'"),
    (["embed", "--weights", "/no/such/dir"], "unrecognized arguments: --weights"),
]


@pytest.mark.parametrize("argv, needle", TRAIN_FLAGS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_train_flags(tmp_path, capsys, argv, needle):
    if torch.cuda.is_available() and "cuda" in " ".join(argv):
        pytest.skip("this machine has a GPU")
    common = [a for a in _common(tmp_path) if a != "cpu" and a != "--device"] if "--device" in argv \
        else _common(tmp_path)
    _refused(train.main, ["--stage", argv[0], "--dataset", _ds(tmp_path), *argv[1:], *common], capsys, needle)
    assert not (tmp_path / "runs").exists()                 # refused before anything was written


EVAL_FLAGS = [
    (["retrieval", "--batch-size", "-1"], "--batch-size: must be > 0"),
    (["retrieval", "--max-length", "0"], "--max-length: must be > 0"),
    (["retrieval", "--holdout", "2"], "--holdout: must be >= 0 and < 1"),
    (["retrieval", "--beam", "3"], "--beam does not apply to --task retrieval"),
    (["unisrec", "--beam", "3"], "--beam does not apply to --task unisrec"),
    (["tiger", "--beam", "0"], "--beam: must be > 0"),
    (["tiger", "--tokenizer", "rkmeans"], "unrecognized arguments: --tokenizer rkmeans"),
    (["unisrec", "--holdout", "0.5"], "--holdout does not apply"),
    (["unisrec", "--device", "gpu"], "--device gpu is not a device"),
    (["unisrec", "--device", "mps"], "only cpu and cuda"),
]


@pytest.mark.parametrize("argv, needle", EVAL_FLAGS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_eval_flags(tmp_path, capsys, argv, needle):
    _refused(ev.main, ["--task", argv[0], "--dataset", _ds(tmp_path), *argv[1:]], capsys, needle)


@pytest.mark.parametrize("argv, needle", [(["--run", "x"], "unrecognized arguments: --run x"),
                                          (["--csv"], "argument --csv: expected one argument")])
def test_report_flags(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:                    # argparse exits 2 itself: one line
        rp.main(["--dataset", "Fix", "--runs", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err


@pytest.mark.parametrize("argv, needle", [(["--kcore", "0"], "--kcore: must be > 0"),
                                          (["--dataset", "/no/such"], "does not exist")])
def test_data_cli(tmp_path, capsys, argv, needle):
    base = ["--dataset", _ds(tmp_path), "--data-dir", str(tmp_path / "c")]
    _refused(pd.main, [*base, *argv], capsys, needle)


@pytest.mark.parametrize("argv, needle", [(["--lr", "0.1"], "--lr is set by the pipeline"),
                                          (["--amp", "fp16"], "argument --amp: invalid choice"),
                                          (["--no-such-flag"], "unrecognized arguments: --no-such-flag")])
def test_pipeline_flags(tmp_path, capsys, argv, needle):
    import pipeline
    _refused(pipeline.main, ["--dataset", _ds(tmp_path), *argv, *_common(tmp_path)], capsys, needle)
    assert not (tmp_path / "runs").exists()


def test_out_and_runs_that_are_files(tmp_path, capsys):
    ds, f = _ds(tmp_path), tmp_path / "file"
    f.write_text("x")
    base = ["--stage", "unisrec", "--dataset", ds, "--encoder", "none", "--max-epochs", "1", "--device", "cpu",
            "--data-dir", str(tmp_path / "c")]
    _refused(train.main, [*base, "--out", str(f)], capsys, "is a file, not a run folder")
    _refused(train.main, [*base, "--runs", str(f)], capsys, str(f))
    _refused(train.main, [*base, "--runs", str(tmp_path / "r"), "--dataset", str(f)], capsys, "is a file")


def test_no_validation_cases(tmp_path, capsys):
    folder = _lcrec(tmp_path, inter={"0": [0, 1], "1": [2, 3], "2": [4, 5]})
    _refused(train.main, ["--stage", "unisrec", "--dataset", str(folder), "--encoder", "none",
                          *_common(tmp_path)], capsys, "0 validation and 3 test cases")


# --------------------------------------------------------------------------------- writers and locks
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_last_one(tmp_path, capsys, monkeypatch, code):
    run, real, kept = tmp_path / "u", Path.write_bytes, []

    def fail(self, data):  # the second last.pt fails
        if self.name.startswith(".last.pt.") and (run / "last.pt").is_file():
            kept.append((run / "last.pt").read_bytes())
            raise OSError(code, os.strerror(code))
        return real(self, data)
    monkeypatch.setattr(Path, "write_bytes", fail)
    argv = ["--stage", "unisrec", "--dataset", _ds(tmp_path), "--encoder", "none", "--max-epochs", "2",
            "--out", str(run), *_common(tmp_path)]
    _refused(train.main, argv, capsys, f"{run / 'last.pt'}: {os.strerror(code)}", "--resume continues")
    assert kept and (run / "last.pt").read_bytes() == kept[0] and not list(run.glob(".last.pt*"))
    assert not (run / "results.json").exists()


def test_torch_save_on_a_full_disk_is_an_oserror(tmp_path, monkeypatch):
    """torch's own file writer raises an opaque RuntimeError; save_torch writes through Python."""
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*x\.pt'"):
        trainer.save_torch(tmp_path / "x.pt", {"w": torch.zeros(3)})


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import trainer
from pathlib import Path
trainer.lock_folder(Path(sys.argv[2]))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_with_the_owner(tmp_path, capsys):
    ds, out = _ds(tmp_path), tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ROOT), str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["--stage", "unisrec", "--dataset", ds, "--encoder", "none", "--max-epochs", "1", "--out", str(out),
                *_common(tmp_path)]
        _refused(train.main, argv, capsys, f"{out} is being written by pid {holder.pid}")
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train.main(argv) == 0                               # the lock dies with its owner


def test_nan_stop_says_whether_a_checkpoint_exists(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = trainer.TrainConfig(batch_size=2, max_epochs=2, metric=None)
    with pytest.raises(FloatingPointError, match="no checkpoint was written yet"):
        trainer.fit(model, lambda idx: torch.tensor(float("nan"), requires_grad=True), 4, opt, tmp_path, cfg)
    calls = iter(range(100))

    def loss(idx):  # finite for the first epoch, then NaN
        return model(torch.ones(1, 2)).sum() * (1 if next(calls) < 2 else float("nan"))
    with pytest.raises(FloatingPointError, match=r"last\.pt holds the state of step 2"):
        trainer.fit(model, loss, 4, opt, tmp_path / "b", cfg)


# ------------------------------------------------------------------- found by a second hostile pass
def test_a_planted_lock_symlink_is_refused(tmp_path, capsys):
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("precious")
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    argv = ["--stage", "unisrec", "--dataset", _ds(tmp_path), "--encoder", "none", "--out", str(out),
            *_common(tmp_path)]
    _refused(train.main, argv, capsys, ".lock is not a plain file")
    assert victim.read_text() == "precious"


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(train.STAGES, "unisrec", interrupted)
    assert train.main(["--stage", "unisrec", "--dataset", _ds(tmp_path), *_common(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().startswith("error: interrupted; --resume continues from the last")


@pytest.mark.parametrize("argv, needle", [
    (["unisrec", "--encoder", "none", "--max-history", "99999999999"], "--max-history 99999999999 is more than"),
    (["tiger", "--beam", "100000"], "--beam 100000 is more than Fix's 6 items"),
    (["tiger", "--max-history", "500"], "--max-history 500 is more than Fix's longest sequence"),
    (["unisrec", "--seed", str(2 ** 40)], "--seed: must be >= 0 and <= 4294967295"),
    (["encoder", "--lr", "2"], "--lr: must be > 0 and <= 1"),
    (["encoder", "--temperature", "1e-30"], "--temperature: must be >= 0.001"),
    (["encoder", "--max-length", "100000"], "--max-length 100000: minilm reads at most 512 tokens"),
    (["encoder", "--holdout", "0.99"], "after --holdout 0.99 keeps"),
    (["unisrec", "--batch-size", "1e3"], "argument --batch-size: expected an integer, got '1e3'"),
    (["unisrec", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["unisrec", "--bat", "3"], "unrecognized arguments: --bat"),
])
def test_more_flags(tmp_path, capsys, argv, needle):
    if "--max-length" in argv:
        try:
            weights_folder("minilm")
        except DataError as e:
            pytest.skip(f"real MiniLM weights unavailable: {e}")
    _refused(train.main, ["--stage", argv[0], "--dataset", _ds(tmp_path), *argv[1:], *_common(tmp_path)],
             capsys, needle)
    assert not any((tmp_path / "runs").rglob("run.json"))


def test_world_size_without_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    _refused(train.main, ["--stage", "unisrec", "--dataset", _ds(tmp_path), "--encoder", "none",
                          *_common(tmp_path)], capsys, "WORLD_SIZE=abc", "torchrun")


@pytest.mark.parametrize("edit", ["history", "step", "rng", "best", "int-weights"])
def test_tampered_checkpoint_internals_on_resume(runs, tmp_path, capsys, edit):
    run = _copy_run(runs["unisrec"], tmp_path / runs["unisrec"].name)
    (run / "results.json").unlink()
    ck = torch.load(run / "last.pt", weights_only=True)
    if edit == "history":
        ck["state"]["history"] = "x"
    elif edit == "step":
        ck["state"]["step"] = -4
    elif edit == "rng":
        ck["rng"] = []
    elif edit == "best":
        ck["state"]["best"] = float("nan")
    else:
        k = next(k for k, v in ck["model"].items() if v.is_floating_point())
        ck["model"][k] = ck["model"][k].long()
    torch.save(ck, run / "last.pt")
    _refused(train.main, [*runs["argv"]["unisrec"], "--out", str(run), "--resume"], capsys, "last.pt")


def test_tampered_semantic_ids_in_a_tiger_checkpoint(runs, tmp_path, capsys):
    run = _copy_run(runs["tiger"], tmp_path / runs["tiger"].name)
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["meta"]["semantic_ids"] = [[1, 2, 3, 4]]
    torch.save(ck, run / "best.pt")
    _refused(ev.main, ["--task", "tiger", "--dataset", str(runs["ds"]), "--run", str(run), *runs["common"]],
             capsys, "best.pt: meta.semantic_ids is unusable")


def test_a_finished_folder_with_bad_results_is_not_up_to_date(runs, tmp_path, capsys):
    tmp = tmp_path / "t"
    import shutil
    shutil.copytree(runs["tmp"], tmp)
    run = next((tmp / "runs" / "Fix").glob("unisrec-id-*"))
    (run / "results.json").write_text("[]")
    argv = [a.replace(str(runs["tmp"]), str(tmp)) for a in runs["argv"]["unisrec"]]
    _refused(train.main, argv, capsys, "results.json is not the file this project wrote")
    (run / "sha256.json").unlink()                                      # a folder from before manifests
    _refused(train.main, argv, capsys, "results.json holds list")


def test_report_csv_never_overwrites_other_files(runs, tmp_path, capsys):
    victim = tmp_path / "x.csv"
    victim.write_text("precious,data\n")
    for path in (victim, runs["ds"] / "Fix.inter.json"):
        _refused(rp.main, ["--dataset", "Fix", "--runs", str(runs["tmp"] / "runs"), "--csv",
                           str(path)], capsys, f"{path}: not a .csv, or a file other than a report")
    assert victim.read_text() == "precious,data\n"
    for folder in (runs["ds"], runs["unisrec"]):                        # a new file, but in a data or run folder
        _refused(rp.main, ["--dataset", "Fix", "--runs", str(runs["tmp"] / "runs"), "--csv",
                           str(folder / "r.csv")], capsys, "outside run and dataset folders")
        assert not (folder / "r.csv").exists()


def test_a_name_that_is_also_a_folder_here(tmp_path, capsys, monkeypatch):
    fx.write_lcrec(tmp_path / "beauty")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="both a registered name and a folder here"):
        pd.prepare("beauty", tmp_path / "cache")
    fx.write_lcrec(tmp_path / "cache" / "Beauty")                  # and a prepared one under --data-dir
    with pytest.raises(DataError, match="both a folder here and the prepared"):
        load_dataset("beauty", tmp_path / "cache")


def test_an_edit_that_keeps_size_and_mtime_is_seen(tmp_path):
    folder = fx.write_lcrec(tmp_path / "Fix")
    inter = folder / "Fix.inter.json"
    first = load_dataset(str(folder), tmp_path / "cache")
    st = inter.stat()
    text = inter.read_text()
    swapped = text.replace("[0,", "[9,", 1).replace("[1,", "[0,", 1).replace("[9,", "[1,", 1)
    assert swapped != text and len(swapped) == len(text)
    inter.write_text(swapped)
    os.utime(inter, ns=(st.st_atime_ns, st.st_mtime_ns))              # as cp -p / touch -r would
    again = load_dataset(str(folder), tmp_path / "cache")
    assert again.fingerprint != first.fingerprint and again.seq_items.tolist() != first.seq_items.tolist()


def test_lone_surrogates_and_devices(tmp_path):
    folder = _lcrec(tmp_path, raw_items=json.dumps({str(i): {"title": "a\ud800"} for i in range(6)}))
    with pytest.raises(DataError, match="item 0: field 'title'.*valid Unicode"):
        load_dataset(str(folder), tmp_path / "cache")
    folder = fx.write_lcrec(tmp_path / "Dev")
    (folder / "Fix.inter.json").unlink()
    (folder / "Fix.inter.json").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="is not a regular file"):
        load_dataset(str(folder), tmp_path / "cache")


def test_no_training_examples_and_a_failed_start_does_not_block(tmp_path, capsys):
    folder = _lcrec(tmp_path, inter={"0": [0, 1, 2], "1": [2, 3, 4]})     # 3 items each: no training prefix
    _refused(train.main, ["--stage", "unisrec", "--dataset", str(folder), "--encoder", "none",
                          *_common(tmp_path)], capsys, "0 training examples")
    out = tmp_path / "out"                                  # a stage that failed after making its folder
    good = _ds(tmp_path / "g")
    argv = ["--stage", "unisrec", "--dataset", good, "--encoder", "none", "--max-epochs", "1", "--out", str(out),
            *_common(tmp_path)]
    assert train.main(argv) == 0
    for f in out.iterdir():
        if f.name != "run.json":
            f.unlink() if f.is_file() else None
    assert train.main(argv) == 0                            # run.json alone: nothing to resume, no --resume


def test_report_warns_when_a_folder_mixes_data_versions(runs, tmp_path, capsys):
    import shutil
    shutil.copytree(runs["tmp"] / "runs", tmp_path / "runs")
    run = next((tmp_path / "runs" / "Fix").glob("unisrec-id-*"))
    info = json.loads((run / "run.json").read_text())
    info["key"]["data"] = "0123456789abcdef"
    (run / "run.json").write_text(json.dumps(info))
    (run / "sha256.json").unlink()                              # else the edited run.json is refused
    assert rp.main(["--dataset", "Fix", "--runs", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "the Fix tables mix runs on 2 versions of its data" in err and f"0123456789abcdef: {run}" in err


def test_report_skips_a_run_of_another_dataset_naming_it(runs, tmp_path, capsys):
    import shutil
    shutil.copytree(runs["tmp"] / "runs" / "Fix", tmp_path / "runs" / "Other")     # B's runs under runs/A/
    assert rp.main(["--dataset", "Other", "--runs", str(tmp_path / "runs")]) == 0
    cap = capsys.readouterr()
    assert "report skips" in cap.err and "a run of dataset 'Fix', not Other" in cap.err
    assert str(tmp_path / "runs" / "Other" / "unisrec-id-") in cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["cells"] == 0


# ------------------------------------------------------------------- found by a third hostile pass
def test_run_json_that_is_a_device_or_a_pipe(runs, tmp_path, capsys):
    import shutil
    shutil.copytree(runs["tmp"] / "runs", tmp_path / "runs")
    run = next((tmp_path / "runs" / "Fix").glob("unisrec-id-*"))
    (run / "run.json").unlink()
    os.mkfifo(run / "run.json")                                 # reading it would block forever
    _refused(ev.main, ["--task", "unisrec", "--dataset", str(runs["ds"]), "--run", str(run), *runs["common"]],
             capsys, "run.json is not a regular file")


@pytest.mark.parametrize("env, needle", [({"WORLD_SIZE": "2", "RANK": "5"}, "below WORLD_SIZE"),
                                         ({"WORLD_SIZE": "2", "RANK": "-1"}, "whole numbers")])
def test_rank_variables_are_checked(tmp_path, capsys, monkeypatch, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _refused(train.main, ["--stage", "unisrec", "--dataset", _ds(tmp_path), "--encoder", "none",
                          *_common(tmp_path)], capsys, needle, "torchrun")


def test_sigterm_is_one_line_and_resumable(tmp_path):
    from test_faults import ENV, synthetic_lcrec
    ds = synthetic_lcrec(tmp_path / "Syn")
    base = [sys.executable, str(ROOT / "train.py"), "--stage", "unisrec", "--dataset", str(ds), "--encoder",
            "none", "--max-epochs", "400", "--batch-size", "8"]
    proc = subprocess.Popen([*base, *_common(tmp_path)], env=ENV, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "Syn"
    for _ in range(600):                                       # until the first epoch's checkpoint
        if list(run_dir.glob("*/last.pt")):
            break
        import time
        time.sleep(0.1)
    proc.terminate()
    err = proc.communicate(timeout=60)[1].strip().splitlines()
    assert proc.returncode == 130 and err[-1].startswith("error: interrupted; --resume continues"), err[-3:]
    assert "Traceback" not in "\n".join(err)
    again = subprocess.run([*base, "--max-minutes", "0.01", "--resume", *_common(tmp_path)], env=ENV,
                           capture_output=True, text=True)
    assert again.returncode == 0 and "resumed from" in again.stdout + again.stderr


def test_warmup_beyond_the_run(tmp_path, capsys):
    _refused(train.main, ["--stage", "tiger", "--dataset", _ds(tmp_path), "--warmup-steps", "100",
                          "--max-steps", "2", *_common(tmp_path)], capsys, "--warmup-steps 100 > --max-steps 2")


# ------------------------------------------------------------- outputs are recorded and verified (sha256.json)
def _edit_number(path: Path):
    """results.json with one metric changed and still valid: what a hand edit looks like."""
    res = json.loads(path.read_text())
    res["test"]["ndcg@10"] = 0.99
    path.write_text(json.dumps(res))


def test_every_reader_refuses_an_edited_output(runs, tmp_path, capsys):
    run = _copy_run(runs["unisrec"], tmp_path / "runs" / "Fix" / runs["unisrec"].name)
    assert "results.json" in json.loads((run / "sha256.json").read_text())
    _edit_number(run / "results.json")
    argv = [*runs["argv"]["unisrec"][:-6], "--out", str(run), *_common(tmp_path)]
    _refused(train.main, argv, capsys, f"{run / 'results.json'} is not the file this project wrote")
    _refused(ev.main, ["--task", "unisrec", "--dataset", str(runs["ds"]), "--run", str(run), *runs["common"]],
             capsys, "results.json is not the file this project wrote", "edited or damaged")
    assert rp.main(["--dataset", "Fix", "--runs", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "report skips" in err and "0.99" not in capsys.readouterr().out


def test_zeroed_ranks_never_reach_the_significance_test(runs, tmp_path, capsys):
    for name in ("unisrec", "tiger"):
        _copy_run(runs[name], tmp_path / "runs" / "Fix" / runs[name].name)
    ranks = tmp_path / "runs" / "Fix" / runs["tiger"].name / "test_ranks.npy"
    np.save(ranks, np.zeros_like(np.load(ranks)))
    assert rp.main(["--dataset", "Fix", "--runs", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert f"report skips {ranks.parent}" in err and f"{ranks} is not the file this project wrote" in err


def test_edited_semantic_ids_are_refused_by_tiger(runs, tmp_path, capsys):
    import shutil
    tmp = tmp_path / "t"
    shutil.copytree(runs["tmp"], tmp, ignore=shutil.ignore_patterns("tiger-*"))
    ids = next((tmp / "runs" / "Fix").glob("ids-*")) / "semantic_ids.npy"
    codes = np.load(ids)
    np.save(ids, codes[[1, 0, *range(2, len(codes))]])                  # still valid IDs, other items
    argv = [a.replace(str(runs["tmp"]), str(tmp)) for a in runs["argv"]["tiger"]]
    _refused(train.main, argv, capsys, f"{ids} is not the file this project wrote")


def test_a_consistently_edited_cache_is_rebuilt(tmp_path, capsys):
    folder, cache_dir = _ds(tmp_path), tmp_path / "c"
    ds = load_dataset(folder, cache_dir)
    cache = next((cache_dir / "processed").glob("*.npz"))
    z = dict(np.load(cache))
    z["seq_items"] = z["seq_items"][::-1].copy()                        # valid arrays, other histories
    with open(cache, "wb") as f:
        np.savez(f, **z)
    again = load_dataset(folder, cache_dir)
    assert "rebuilding it" in capsys.readouterr().err
    assert (again.seq_items == ds.seq_items).all()


# ------------------------------------------------------------------------------ output flags never destroy
def test_ranks_never_overwrites_what_it_did_not_write(runs, tmp_path, capsys):
    run = _copy_run(runs["unisrec"], tmp_path / runs["unisrec"].name)
    base = ["--task", "unisrec", "--dataset", str(runs["ds"]), "--run", str(run), *runs["common"]]
    inter = Path(runs["ds"]) / "Fix.inter.json"
    stranger = tmp_path / "mine.npy"
    np.save(stranger, np.arange(3))
    before = {p: p.read_bytes() for p in (inter, run / "best.pt", stranger)}
    for target, needle in [(inter, "outside run and dataset folders"), (run / "best.pt", "outside run"),
                           (run / "x.npy", "outside run"), (stranger, "is not a file this flag wrote"),
                           (tmp_path / "r.txt", "give a .npy")]:
        _refused(ev.main, [*base, "--ranks", str(target)], capsys, needle)
    assert all(p.read_bytes() == b for p, b in before.items())
    out = tmp_path / "out" / "ranks.npy"
    for _ in range(2):                                                   # its own file: replaced
        assert ev.main([*base, "--ranks", str(out)]) == 0
    assert np.load(out).shape == (len(load_dataset(str(runs["ds"]), tmp_path / "c2").splits.test),)


# --------------------------------------------------------------------- degenerate training is refused
def _encoder_argv(tmp_path, folder):
    return ["--stage", "encoder", "--backbone", str(make_tiny(tmp_path / "tiny")), "--dataset", str(folder),
            "--epochs", "1", "--batch-size", "4", "--max-length", "16", *_common(tmp_path)]


@pytest.mark.parametrize("title, side", [("Same thing", "title"), ("\u200b \u200b", "title"),
                                         (None, "document")])
def test_training_that_cannot_learn_is_refused(tmp_path, capsys, title, side):
    folder = Path(_ds(tmp_path))
    items = json.loads((folder / "Fix.item.json").read_text())
    for it in items.values():
        it["title"] = title or it["title"]
        it["description"] = "one description" if side == "document" else it["description"]
        it["description"] = it["description"] or "some text"
        it["brand"] = it["categories"] = "" if side == "document" else it["brand"]
    (folder / "Fix.item.json").write_text(json.dumps(items))
    _refused(train.main, _encoder_argv(tmp_path, folder), capsys, f"every training {side} is the same text")
    assert not list((tmp_path / "runs").rglob("model.safetensors"))


def test_corpus_too_small_names_corpus(tmp_path, capsys):
    _refused(train.main, [*_encoder_argv(tmp_path, _ds(tmp_path)), "--corpus", "1e-300"], capsys,
             "--corpus 1e-300 keeps 0 of the")


def test_a_zero_first_loss_stops_before_any_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="loss exactly 0 at the first step"):
        trainer.fit(model, lambda idx: model(torch.zeros(len(idx), 2)).sum() * 0, 8,
                    torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run",
                    trainer.TrainConfig(batch_size=4, max_epochs=1, metric=None))
    assert not (tmp_path / "run" / "last.pt").exists()


# ------------------------------------------------------------------------------ errors name the thing
def test_a_config_too_large_for_memory_names_the_config(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 2 ** 31}))
    with pytest.raises(er.WeightsError, match="does not match .*config.json"):
        er.load_encoder(tiny)


def test_a_tokenizer_id_beyond_the_vocabulary(tiny):
    tok = json.loads((tiny / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz"] = 10 ** 6
    (tiny / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(er.WeightsError, match="tokenizer.json has token id 1000000"):
        er.load_encoder(tiny)


def _ease(tmp_path, **kw):
    """`python train.py --stage ease` on the fixture, its stdout wherever kw says."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "ease", "--dataset", _ds(tmp_path),
           *_common(tmp_path)]
    return subprocess.run(cmd, stderr=subprocess.PIPE, text=True, cwd=tmp_path, **kw)


def test_a_closed_stdout_ends_quietly_and_a_full_one_is_named(tmp_path):
    r, w = os.pipe()
    os.close(r)                                                          # the reader left: `| head -1`
    done = _ease(tmp_path, stdout=w)
    os.close(w)
    assert done.returncode == 141 and "error" not in done.stderr and "Traceback" not in done.stderr
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            done = _ease(tmp_path, stdout=full)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: stdout: ")
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def test_a_symlink_loop_as_out(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    _refused(train.main, ["--stage", "ease", "--dataset", _ds(tmp_path), "--out", str(loop),
                          *_common(tmp_path)], capsys, "a dangling or looping link, not a run folder")


def test_pipeline_fits_a_backbone_with_few_positions(tmp_path):
    import pipeline
    tiny = make_tiny(tmp_path / "tiny")
    cfg = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    cmds = pipeline.commands("paper", str(tiny), load_dataset(_ds(tmp_path), tmp_path / "c"), None)
    lengths = {c[c.index("--max-length") + 1] for c in cmds if "--max-length" in c}
    assert lengths == {"64"}


# ------------------------------------------------------------------------- resume from what is there
@pytest.mark.parametrize("best_is_last", [True, False])
def test_a_damaged_best_checkpoint_with_a_good_last_one_resumes(runs, tmp_path, capsys, best_is_last):
    """last.pt holding the best step rebuilds best.pt; otherwise the best weights are lost, and the run
    goes on (a later evaluation writes best.pt) or, when training was over, says what to delete."""
    u = tmp_path / "u"
    argv = [*runs["argv"]["unisrec"][:-6], "--out", str(u), *_common(tmp_path)]
    argv[argv.index("--max-epochs") + 1] = "2"
    assert train.main(argv) == 0
    (u / "results.json").unlink()
    ck = torch.load(u / "last.pt", weights_only=True)
    ck["state"]["best_step"] = ck["state"]["step"] - (0 if best_is_last else 1)
    torch.save(ck, u / "last.pt")
    _planted("truncated", u / "best.pt", tmp_path)
    capsys.readouterr()
    if best_is_last:
        assert train.main([*argv, "--resume"]) == 0
        assert trainer.load_checkpoint(u / "best.pt")["step"] == ck["state"]["step"]
    else:
        _refused(train.main, [*argv, "--resume"], capsys, f"{u / 'best.pt'} is not a readable checkpoint",
                 f"delete {u}")
