"""EncodeRec's text encoder (arXiv 2601.10837, Sec. 3): a BERT or MPNet sentence encoder and its InfoNCE loss.

EncodeRec fine-tunes all-MiniLM-L6-v2 (Sec. 4: batch 512) so an item's title (the query) lands next to its
document (description + features + attributes): mean pooling, L2 norm, in-batch InfoNCE; frozen, it
embeds the catalog for the recommenders. Reading order: BERT modules and MPNet's changes to them (Hugging
Face names, so `model.safetensors` loads strictly), `TextEncoder`, the loss, loading a folder, saving.

    enc = load_encoder(folder)               # any BERT/MPNet sentence-transformers folder, a fine-tuned run
    emb = enc.encode(texts)                  # float32 (N, d), unit rows, input order
    loss = cached_info_nce(enc, titles, documents, chunk_size=64)  # then loss.backward()
    save_pretrained(enc, "runs/my-encoder")  # SentenceTransformer(folder) loads it too

Imports torch, numpy, tqdm, tokenizers, safetensors (no transformers) and no project file: copyable alone.
A backbone name (minilm, mpnet) -> its folder is data.weights_folder; scripts/fetch_weights.py fetches it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# ---- errors
class WeightsError(ValueError):
    """An unloadable weights folder (missing, corrupt, mismatched tensors)."""


# ---- config
@dataclass
class BertConfig:
    """Shape of a BERT or MPNet encoder, from a Hugging Face `config.json`; defaults = all-MiniLM-L6-v2's."""
    vocab_size: int = 30522  # WordPiece vocabulary (bert-base-uncased's)
    hidden_size: int = 384  # d, the embedding size
    num_hidden_layers: int = 6
    num_attention_heads: int = 12  # head dim = 384 / 12 = 32
    intermediate_size: int = 1536  # feed-forward width = 4 d
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"  # erf GELU
    pad_token_id: int = 0
    model_type: str = "bert"  # or "mpnet": no token types, positions after the pad id, a relative bias
    relative_attention_num_buckets: int = 32  # MPNet's

    def __post_init__(self):
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size",
                  "relative_attention_num_buckets"):
            if type(v := getattr(self, k)) is not int or v < 1:
                raise WeightsError(f"{k}={v!r} must be a positive integer; fix config.json.")
        if type(self.layer_norm_eps) is not float or not 0 < self.layer_norm_eps < 1:
            raise WeightsError(f"layer_norm_eps={self.layer_norm_eps!r} must be a small positive float; fix "
                               "config.json.")
        if type(self.pad_token_id) is not int or not 0 <= self.pad_token_id < self.vocab_size:
            raise WeightsError(f"pad_token_id={self.pad_token_id!r} is not a token id; fix config.json.")
        if self.model_type not in ("bert", "mpnet"):
            raise WeightsError(f"model_type={self.model_type!r} is not supported; use a 'bert' or 'mpnet' "
                               "model.")
        if self.hidden_act != "gelu":
            raise WeightsError(f"hidden_act={self.hidden_act!r} is not supported; use a 'gelu' (erf) model.")
        if self.hidden_size % self.num_attention_heads:
            raise WeightsError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                               f"{self.num_attention_heads}; fix config.json.")

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        if (raw := _read_json(Path(path))) is None:
            raise WeightsError(f"{path}: config.json not found; the weights folder needs one.")
        if (pos := raw.get("position_embedding_type", "absolute")) != "absolute":
            raise WeightsError(f"{path}: position_embedding_type={pos!r} is not supported (only 'absolute').")
        known = {f.name for f in fields(cls)}  # a null pad_token_id (some configs) keeps the default
        kw = {k: v for k, v in raw.items() if k in known and not (k == "pad_token_id" and v is None)}
        try:  # model_type never defaults: the file must say
            return cls(**{**kw, "model_type": raw.get("model_type")})
        except WeightsError as e:  # __post_init__'s checks, named by the file
            raise WeightsError(f"{path}: {e}") from None

    @property
    def max_tokens(self) -> int:
        """The longest input: MPNet's positions start at 2 (MPNET_PAD + 1, RoBERTa's convention)."""
        return self.max_position_embeddings - (MPNET_PAD + 1 if self.model_type == "mpnet" else 0)

    def to_hf_dict(self) -> dict:
        """The config.json that transformers' BertModel or MPNetModel reads."""
        d = asdict(self)
        if self.model_type == "mpnet":
            d.pop("type_vocab_size")
            return {"architectures": ["MPNetModel"], **d, "initializer_range": 0.02}
        d.pop("relative_attention_num_buckets")
        return {"architectures": ["BertModel"], **d, "position_embedding_type": "absolute",
                "initializer_range": 0.02}


# ---- model (Hugging Face's BertModel parameter names)
MPNET_PAD = 1  # transformers' MPNetEmbeddings fixes its padding index at 1, whatever config.json says
# transformers' MPNet position bias uses these, whatever config.json says
MPNET_BUCKETS, MPNET_MAX_DISTANCE = 32, 128

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
        H, self.n_head = cfg.hidden_size, cfg.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(H, H) for _ in range(3))
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, attn_mask):
        return _attend(x, (self.query, self.key, self.value), self.n_head, attn_mask,
                       self.dropout_p if self.training else 0.0)


def _attend(x, projections, n_head: int, attn_mask, dropout_p: float):
    """Multi-head attention of x (B, L, H) through its (query, key, value) Linears; attn_mask: bool keys to
    attend or an additive float bias, broadcast to (B, nh, L, L)."""
    B, L, H = x.shape
    # three projections, not one fused (B, L, 3H): a long CPU batch's 3H buffer would exceed glibc's
    # mmap threshold (page faults each call)
    q, k, v = (f(x).view(B, L, n_head, H // n_head).transpose(1, 2)  # (B, L, H) -> (B, nh, L, hd)
               for f in projections)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in the query's (autocast) dtype
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, nh, L, hd)
    return y.transpose(1, 2).reshape(B, L, H)  # (B, nh, L, hd) -> (B, L, H)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig, d_in: int | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in or cfg.hidden_size, cfg.hidden_size)
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


class BertOutput(BertSelfOutput):  # the same post-LN residual, from the feed-forward width
    def __init__(self, cfg: BertConfig):
        super().__init__(cfg, cfg.intermediate_size)


# ---- MPNet (Song et al., 2020; all-mpnet-base-v2): BERT's post-LN layers with three changes, in HF's names:
# no token types and positions counted from MPNET_PAD + 1 (MPNetEmbeddings); the attention's output
# projection inside the attention (attn.q/k/v/o); a learned bias per (relative-position bucket, head),
# shared by every layer and added to the attention scores (BertEncoder.position_bias).
class MPNetEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=MPNET_PAD)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                                padding_idx=MPNET_PAD)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        real = input_ids.ne(MPNET_PAD)  # as HF: real tokens numbered from MPNET_PAD + 1, padding MPNET_PAD
        x = self.word_embeddings(input_ids) + self.position_embeddings(real.cumsum(1) * real + MPNET_PAD)
        return self.dropout(self.LayerNorm(x))


class MPNetSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        H, self.n_head = cfg.hidden_size, cfg.num_attention_heads
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, attn_mask):
        return self.o(_attend(x, (self.q, self.k, self.v), self.n_head, attn_mask,
                              self.dropout_p if self.training else 0.0))


class MPNetAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = MPNetSelfAttention(cfg)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, attn_mask):
        return self.LayerNorm(self.dropout(self.attn(x, attn_mask)) + x)  # post-LN residual


# Copied from tiger.relative_position_bucket
def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's buckets of relative positions (key - query): exact below num_buckets/2 (per direction
    when bidirectional), log-spaced up to max_distance, one bucket beyond."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -rel.clamp(max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


# CPU inference (bench/encode.py): the feed-forward runs over token tiles of FFN_TILE_ELEMS floats (24 MB),
# under glibc's mmap threshold, so its memory is reused, not page-faulted afresh each call
FFN_TILE_ELEMS = 6 << 20


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = (MPNetAttention if cfg.model_type == "mpnet" else BertAttention)(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, attn_mask):
        x = self.attention(x, attn_mask)
        if self.training or torch.is_grad_enabled():
            return self.output(self.intermediate(x), x)
        return self._ffn_inference(x)

    def _ffn_inference(self, x):
        """output(intermediate(x), x) without dropout, over token tiles (see FFN_TILE_ELEMS)."""
        B, L, H = x.shape
        flat = x.reshape(B * L, H)  # (B, L, H) -> (T, H)
        out = torch.empty_like(flat)
        (W1, b1), (W2, b2) = ((m.dense.weight, m.dense.bias) for m in (self.intermediate, self.output))
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
        if cfg.model_type == "mpnet":
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets,
                                                        cfg.num_attention_heads)

    def position_bias(self, L: int) -> torch.Tensor:
        """MPNet's additive attention bias (1, nh, L, L) of each key's position relative to the query's."""
        w = self.relative_attention_bias.weight
        pos = torch.arange(L, device=w.device)
        rel = pos[None, :] - pos[:, None]
        buckets = relative_position_bucket(rel, True, MPNET_BUCKETS, MPNET_MAX_DISTANCE)  # (L, L)
        return F.embedding(buckets, w).permute(2, 0, 1)[None]  # (L, L, nh) -> (1, nh, L, L)


class BertPooler(nn.Module):
    """tanh(W h_CLS), the next-sentence head's input: kept for checkpoint round-trips only."""
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class BertModel(nn.Module):
    """Post-LN BERT (or MPNet, cfg.model_type) encoder: input ids -> the last hidden states (B, L, H)."""
    def __init__(self, cfg: BertConfig, add_pooler: bool = False):
        super().__init__()
        self.config = cfg
        self.embeddings = (MPNetEmbeddings if cfg.model_type == "mpnet" else BertEmbeddings)(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooler else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # BERT's init (initializer_range 0.02), for random/tiny models
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
        # no mask when nothing is padded (fast SDPA kernels); always one under torch.compile (no
        # graph break on the data-dependent check)
        if attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all())):
            attn_mask = attention_mask.bool()[:, None, None, :]  # (B, L) -> (B, 1, 1, L) keys to attend
        if self.config.model_type == "mpnet":  # the bias, with padded keys at -inf: (B|1, nh, L, L)
            bias = self.encoder.position_bias(input_ids.shape[1])
            attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
        for layer in self.encoder.layer:
            x = layer(x, attn_mask)
        return x


# ---- encoder = tokenizer + BERT + pooling + L2 norm
class TextEncoder(nn.Module):
    """Text -> unit-norm embedding (mean or CLS pooling of the last hidden states)."""
    def __init__(self, bert: BertModel, tokenizer, pooling: str = "mean", max_length: int | None = None,
                 source_dir=None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r}: use 'mean' or 'cls'.")
        self.bert, self.pooling = bert, pooling
        max_length = max_length or min(256, bert.config.max_tokens)  # None: MiniLM card's 256
        if not 1 <= max_length <= bert.config.max_tokens:
            raise ValueError(f"max_length={max_length}: this model reads 1 to {bert.config.max_tokens} "
                             "tokens")
        self.max_length = int(max_length)
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.tokenizer = tokenizer
        tokenizer.no_padding()  # we pad per batch ourselves
        tokenizer.enable_truncation(self.max_length)
        self.pad_id = bert.config.pad_token_id

    @property
    def dim(self) -> int:
        return self.bert.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    def compile_bert(self, **kwargs):
        """torch.compile the BertModel, kept in __dict__ (not a submodule: state_dict names stay)."""
        self.__dict__["_compiled_bert"] = torch.compile(self.bert, **kwargs)
        return self

    @staticmethod
    def _check_texts(texts) -> list[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str; clean missing fields first.")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: the tokenizer cannot read it
                raise ValueError(f"texts[{i}] is not valid Unicode: {t[:60]!r}") from None
        return texts

    def _collate(self, encodings, device=None) -> dict[str, torch.Tensor]:
        L = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), L), self.pad_id, dtype=np.int64)  # (B, L)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        ids, mask = (torch.from_numpy(a).to(device or self.device) for a in (ids, mask))
        return {"input_ids": ids, "attention_mask": mask}

    def tokenize(self, texts, device=None) -> dict[str, torch.Tensor]:
        """Truncated, padded to the longest text: input_ids, attention_mask (B, L)."""
        return self._collate(self.tokenizer.encode_batch(self._check_texts(texts)), device)

    def _pool(self, h, mask, normalize: bool = True):
        if self.pooling == "cls":
            e = h[:, 0]  # (B, L, H) -> (B, H)
        else:
            m = mask.unsqueeze(-1).to(h.dtype)  # (B, L) -> (B, L, 1)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, H)
        return F.normalize(e, p=2, dim=-1) if normalize else e

    def forward(self, batch, normalize: bool = True) -> torch.Tensor:
        """Differentiable embeddings (B, d) of texts or a `tokenize` batch: unit-norm, or the raw pooled
        vectors (normalize=False: what UniSRec's preprocessing feeds it)."""
        if not isinstance(batch, dict):
            batch = self.tokenize(batch)
        bert = self.__dict__.get("_compiled_bert", self.bert)
        h = bert(batch["input_ids"], batch["attention_mask"])  # (B, L, H)
        return self._pool(h.float(), batch["attention_mask"], normalize)

    def encode(self, texts, batch_size: int = 64, show_progress: bool = True, device=None,
               normalize: bool = True) -> np.ndarray:
        """float32 (N, d), rows in input order; batched by length (less padding)."""
        texts = self._check_texts(texts)
        if device is not None:
            self.to(device)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(texts)
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")  # longest first
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for s in tqdm(range(0, len(texts), batch_size), desc="encode", unit="batch",
                              disable=not show_progress):
                    idx = order[s : s + batch_size]
                    batch = self._collate([encodings[i] for i in idx])
                    out[idx] = self.forward(batch, normalize).cpu().numpy()
        finally:
            self.train(was_training)
        return out


# ---- InfoNCE (in-batch negatives, false negatives masked), GradCache
def info_nce_loss(q, d, temperature: float = 0.05, symmetric: bool = False, q_ids=None, d_ids=None):
    """In-batch InfoNCE: logits = q @ d.T / tau (unit rows), target = diagonal. q_ids / d_ids (B,) text
    ids: an off-diagonal pair with the same query or document is a false negative, masked (-inf).
    symmetric=True averages the q->d and d->q losses."""
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


# Copied from trainer._rng_state
def _rng_state(dev: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


# Copied from trainer._set_rng_state
def _set_rng_state(dev: torch.device, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dev)


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows x (n_r, ...; n_r may differ) in rank order and this rank's offset (values only)."""
    dist, n = torch.distributed, torch.tensor([x.shape[0]], device=x.device)
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
    """`info_nce_loss` of (query, document) texts with GradCache (Gao et al., 2021): `.backward()` gives
    the exact full-batch gradient in one chunk's memory. (a) Embed chunks without a graph, keeping RNG
    states; (b) cache the loss's gradient w.r.t. the embeddings; (c) the returned leaf's backward hook
    re-embeds each chunk with a graph (same RNG state, autocast) and back-propagates the cached gradient
    times the incoming one. One process, chunk_size None or >= B: plain autograd. Under torchrun (b) uses
    all-gathered embeddings; each rank back-propagates its rows and returns the global loss times its
    share of rows (trainer.fit sums over ranks)."""
    B = len(queries)
    if len(documents) != B:
        raise ValueError(f"{B} queries but {len(documents)} documents; pairs must align.")
    distributed = _world() > 1
    if not distributed and (not chunk_size or chunk_size >= B):
        return info_nce_loss(encoder(queries), encoder(documents), temperature, symmetric, q_ids, d_ids)
    chunk_size = chunk_size or max(B, 1)
    dev = encoder.device
    amp = torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type)
    chunks, orders = [], []
    for texts in (queries, documents):  # chunks of similar length pad little; rows are put back after (a)
        enc = encoder.tokenizer.encode_batch(encoder._check_texts(texts))
        orders.append(order := np.argsort([len(e.ids) for e in enc], kind="stable"))
        chunks += [encoder._collate([enc[i] for i in order[s: s + chunk_size]])
                   for s in range(0, B, chunk_size)]
    states, embs = [], []
    with torch.no_grad():  # (a)
        for batch in tqdm(chunks, desc="embed chunks", unit="chunk", leave=False, disable=not progress):
            states.append(_rng_state(dev))
            embs.append(encoder(batch).float())
    after = _rng_state(dev)
    half = len(chunks) // 2
    empty = torch.zeros(0, encoder.dim, device=dev)  # a rank may hold no pair
    q, d = (torch.cat(e)[np.argsort(o)] if half else empty  # (B, d) each, in batch order
            for e, o in ((embs[:half], orders[0]), (embs[half:], orders[1])))
    off, n_all = 0, B
    if distributed:  # (B, d) -> (B_global, d); ids too, so false negatives span ranks
        (q, off), (d, _) = _gather_rows(q), _gather_rows(d)
        q_ids, d_ids = (None if i is None else _gather_rows(torch.as_tensor(i, device=dev))[0]
                        for i in (q_ids, d_ids))
        n_all = len(q)
    q, d = q.requires_grad_(), d.requires_grad_()
    with torch.enable_grad():  # (b)
        full = info_nce_loss(q, d, temperature, symmetric, q_ids, d_ids)
        gq, gd = torch.autograd.grad(full, [q, d])
    grads = [*gq[off: off + B][orders[0]].split(chunk_size), *gd[off: off + B][orders[1]].split(chunk_size)]

    def replay(grad_out):  # (c)
        with torch.enable_grad(), torch.autocast(dev.type, dtype=amp[1], enabled=amp[0]):
            bar = tqdm(chunks, desc="re-embed chunks", unit="chunk", leave=False, disable=not progress)
            for batch, state, g in zip(bar, states, grads):
                _set_rng_state(dev, state)
                encoder(batch).float().backward(g * grad_out)
        _set_rng_state(dev, after)

    loss = (full.detach() * (B / max(n_all, 1))).requires_grad_()
    loss.register_hook(replay)
    return loss


# ---- strict safetensors loading
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"{path}: model.safetensors not found; the weights folder needs one.")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: truncated, wrong format
        raise WeightsError(f"{path}: unreadable ({type(e).__name__}: {e}); truncated or corrupt: "
                           "download/copy it again.") from None


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> BertModel's: strip 'bert.' / 'mpnet.' (BertFor* / MPNetFor* checkpoints; heads
    dropped), rename old LayerNorm gamma/beta, drop older checkpoints' `embeddings.position_ids`."""
    for prefix in ("bert.", "mpnet."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    old = {"gamma": "weight", "beta": "bias"}
    return {re.sub(r"LayerNorm\.(gamma|beta)$", lambda m: "LayerNorm." + old[m[1]], k): v
            for k, v in sd.items() if k != "embeddings.position_ids"}


def load_bert(folder: str | Path) -> BertModel:
    """A BertModel of `folder/config.json`, `folder/model.safetensors` loaded strictly."""
    folder = Path(folder)
    cfg_path, st_path = folder / "config.json", folder / "model.safetensors"
    cfg = BertConfig.from_json(cfg_path)
    sd = _normalise_keys(_read_safetensors(st_path))
    n_file = len({int(m[1]) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if n_file != cfg.num_hidden_layers:
        raise WeightsError(f"{cfg_path} says num_hidden_layers={cfg.num_hidden_layers} but {st_path} holds "
                           f"{n_file} layers: different models; use a matching pair.")
    for k, v in sd.items():  # never cast quantised weights or carry NaN into every embedding
        if not v.is_floating_point() or not torch.isfinite(v).all():
            what = "not finite" if v.is_floating_point() else v.dtype
            raise WeightsError(f"{st_path}: tensor {k} is {what}; "
                               "expected finite float weights: re-download the model (not a quantised copy).")
    with torch.device("meta"):  # shapes only: a config too large for memory allocates nothing
        model = BertModel(cfg, add_pooler=any(k.startswith("pooler.") for k in sd))
    expected = model.state_dict()
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    parts = [f"{what}: {sep.join(keys)}" for what, sep, keys in [
        ("missing tensors", ", ", sorted(set(expected) - set(sd))),
        ("unexpected tensors", ", ", sorted(set(sd) - set(expected))), ("wrong shapes", "; ", wrong)] if keys]
    if parts:
        raise WeightsError(f"{st_path} does not match {cfg_path}: {' | '.join(parts)}. "
                           "Use the weights' own config.json.")
    model.to_empty(device="cpu").load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


# ---- loading a folder
REQUIRED_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


def _not_a_number(token):
    raise ValueError(f"{token} is not a JSON number")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(), parse_constant=_not_a_number)
        if not isinstance(raw, dict):
            raise ValueError(f"holds {type(raw).__name__}, not an object")
        return raw
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e}); re-download or fix the file.") from None


def _pooling_from_folder(folder: Path) -> str:
    cfg = _read_json(path := folder / "1_Pooling" / "config.json") or {}
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens", True):
        return "mean"
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    raise WeightsError(f"{path}: pooling {modes} is not supported; pass pooling='mean' or 'cls'.")


def default_max_length(folder: Path) -> int:
    """A model folder's token limit: its sentence_bert_config.json's, else 256 (MiniLM's card), at most its
    position count."""
    n = BertConfig.from_json(Path(folder) / "config.json").max_tokens
    value = (_read_json(sb := Path(folder) / "sentence_bert_config.json") or {}).get("max_seq_length")
    if value is not None and (type(value) is not int or value < 1):
        raise WeightsError(f"{sb}: max_seq_length={value!r} is not a positive integer; fix it.")
    return value or min(256, n)


def load_encoder(folder, device="cpu", max_length=None, pooling=None) -> TextEncoder:
    """A folder's encoder (a backbone's sentence-transformers folder, a fine-tuned run): BERT, tokenizer,
    pooling; max_length: sentence_bert_config.json's, else 256 (all-MiniLM-L6-v2's card)."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    if miss := [f for f in REQUIRED_FILES if not (folder / f).is_file()]:
        what = f"missing {', '.join(miss)}" if folder.is_dir() else "not a folder"
        raise WeightsError(f"{folder}: {what}; a weights folder holds {', '.join(REQUIRED_FILES)} (a Hugging "
                           "Face BERT or MPNet, a fine-tuned run).")
    bert = load_bert(folder)
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:
        raise WeightsError(f"{folder / 'tokenizer.json'}: unreadable ({e}); re-download or fix it.") from None
    if (top := max(tok.get_vocab().values(), default=0)) >= bert.config.vocab_size:
        raise WeightsError(f"{folder / 'tokenizer.json'} has token id {top}, the model "
                           f"{bert.config.vocab_size} embeddings: they do not belong together.")
    max_length = max_length or default_max_length(folder)
    pooling = pooling or _pooling_from_folder(folder)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TextEncoder(bert, tok, pooling=pooling, max_length=max_length, source_dir=folder).to(device)


# ---- saving in the sentence-transformers layout
def save_pretrained(encoder: TextEncoder, out_dir):
    """A folder that `load_encoder` and `SentenceTransformer` both load (HF tensor names)."""
    from safetensors.torch import save

    out = Path(out_dir)
    (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
    src, tok, cfg = encoder.source_dir, encoder.tokenizer, encoder.bert.config
    js = lambda obj: json.dumps(obj, indent=2)  # noqa: E731

    def write(name, text):
        (out / name).write_text(text)

    def copy_or(name, make):  # src's file, else make() unless out has one
        if src is not None and (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)
        elif not (out / name).is_file():
            write(name, make())

    write("config.json", js(cfg.to_hf_dict()))
    copy_or("tokenizer.json", tok.to_str)
    specials = {f"{k}_token": f"[{k.upper()}]" for k in ("unk", "sep", "pad", "cls", "mask")}
    specials = {k: t for k, t in specials.items() if tok.token_to_id(t) is not None}
    copy_or("tokenizer_config.json", lambda: js({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_tokens,
        **specials}))
    copy_or("special_tokens_map.json", lambda: js(specials))
    vocab = tok.get_vocab()
    copy_or("vocab.txt", lambda: "".join(t + "\n" for t in sorted(vocab, key=vocab.get)))
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]  # (path, type)
    write("modules.json", js([dict(idx=i, name=str(i), path=p, type="sentence_transformers.models." + t)
                              for i, (p, t) in enumerate(modules)]))
    write("1_Pooling/config.json", js({
        "word_embedding_dimension": encoder.dim, "pooling_mode_cls_token": encoder.pooling == "cls",
        "pooling_mode_mean_tokens": encoder.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    write("sentence_bert_config.json", js({"max_seq_length": encoder.max_length, "do_lower_case": False}))
    write("config_sentence_transformers.json", js({
        "__version__": {"pytorch": torch.__version__}, "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"}))
    # the weights last, whole or not at all (renamed into place): a folder holding them is complete
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in encoder.bert.state_dict().items()}
    (tmp := out / ".model.safetensors.part").write_bytes(save(tensors, metadata={"format": "pt"}))
    os.replace(tmp, out / "model.safetensors")
    return out
