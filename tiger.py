"""TIGER: generative retrieval over semantic IDs (Rajput et al., NeurIPS 2023, Sec. 3.2, 4), EncodeRec's
second downstream test (arXiv 2601.10837, Sec. 4, Table 3): a T5 encoder-decoder generates the next
item's semantic ID (3 RQ-VAE codes, rqvae.py, + a dedup code, `semantic_ids`) from the history's IDs.
EncodeRec changes only the item embeddings behind the IDs.

Tokens: PAD = 0, EOS = 1; code c of level l is token 2 + sum(vocab_sizes[:l]) + c. Encoder input: the
tokens of the last `max_items` (TIGER: 20) items, oldest first, then EOS, then PAD (masked; positions
are relative, so it never changes an output). Decoder: input [PAD, t0, t1, t2] (PAD = T5's start
token), target [t0, t1, t2, t3] (no EOS).

Model: T5 v1.0 as TIGER sets it (Sec. 4.1): RMSNorm pre-norm, no biases, unscaled attention (T5 folds
1/sqrt(d) into the init), relative position biases, one embedding tied to the inputs and the head
(decoder output scaled by d_model^-0.5); weights map 1:1 onto HF T5ForConditionalGeneration
(tests/t5_helpers.py). Decoding: beam search with a KV cache; score = sum of full-vocabulary log-probs
(constraints mask, never renormalise, as HF `generate`); constrained decoding (the default) allows only
catalog prefixes, free decoding maps unknown IDs to -1.

    codes, vocab_sizes = semantic_ids(codes3)  # codes3 (N, 3) int, row i = catalog item i -> (N, 4)
    ids = SemanticIDs(codes, vocab_sizes)
    model = Tiger(TigerConfig(vocab_sizes=list(vocab_sizes)))
    src = tokenize_histories(hist, ids)    # hist (B, L) item indices, -1 = padding
    loss = model.loss(src, target_tokens(target, ids))
    items, scores = recommend(model, hist, ids, beam=10)  # (B, 10) catalog indices, -1 = invalid

Trained by trainer.fit (train.py). Imports: stdlib, numpy, torch, tqdm.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

PAD, EOS = 0, 1
N_SPECIAL = 2


# ----------------------------------------------------------------------------- configs
@dataclass
class TigerConfig:
    """Defaults = TIGER (Rajput et al. 2023, Sec. 4.1) unless noted."""
    vocab_sizes: list | None = None  # codes per level (TIGER: 256 x 3 + dedup); from the semantic IDs
    d_model: int = 128           # TIGER: input dimension 128
    d_kv: int = 64               # TIGER: 6 heads of dimension 64 (inner dim 384)
    n_heads: int = 6             # TIGER: 6 self-attention heads
    d_ff: int = 1024             # TIGER: MLP dimension 1024
    n_encoder_layers: int = 4    # TIGER: 4 encoder layers
    n_decoder_layers: int = 4    # TIGER: 4 decoder layers
    dropout: float = 0.1         # TIGER: dropout 0.1
    rel_buckets: int = 32        # T5: relative_attention_num_buckets 32
    rel_max_distance: int = 128  # T5: relative_attention_max_distance 128
    eps: float = 1e-6            # T5: layer_norm_epsilon 1e-6 (RMSNorm)
    max_items: int = 20          # TIGER: history capped at the last 20 items

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + sum(self.vocab_sizes)

    @property
    def n_levels(self) -> int:
        return len(self.vocab_sizes)

    def validate(self) -> None:
        if not self.vocab_sizes or any(int(v) < 1 for v in self.vocab_sizes):
            raise ValueError(f"TigerConfig.vocab_sizes must list >= 1 code per level, got {self.vocab_sizes}")
        for name in ("d_model", "d_kv", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers",
                     "rel_buckets", "rel_max_distance", "max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"TigerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TigerConfig.dropout must be in [0, 1), got {self.dropout}")


# ----------------------------------------------------------------------------- semantic IDs
def semantic_ids(codes3, codebook_size: int = 256) -> tuple[np.ndarray, tuple[int, ...]]:
    """TIGER's IDs from codes (N, levels) (rqvae.py's): + a dedup code, the item's rank among the items
    that share its codes, so that every ID names one item: distinct ids (N, levels + 1) int64 and vocab
    sizes (codebook_size per level, max(largest group, codebook_size))."""
    c = np.asarray(codes3)
    if c.ndim != 2 or not len(c) or not np.issubdtype(c.dtype, np.integer) or c.min() < 0:
        raise ValueError(f"codes must be a non-empty (N, levels) int matrix >= 0, got {c.dtype} {c.shape}")
    if c.max() >= codebook_size:
        raise ValueError(f"code {int(c.max())} is outside a codebook of size {codebook_size}")
    c = c.astype(np.int64, copy=False)
    n = len(c)
    _, inv, counts = np.unique(c, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)                                   # numpy 2 may keep a trailing dim
    order = np.argsort(inv, kind="stable")                  # grouped, item order inside a group
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (G,) first slot of each group
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[inv[order]]
    ids = np.concatenate([c, rank[:, None]], axis=1)  # (N, L) + (N, 1) -> (N, L + 1)
    vocab = tuple([int(codebook_size)] * c.shape[1] + [max(int(counts.max()), int(codebook_size))])
    return ids, vocab


class SemanticIDs:
    """The catalog's semantic IDs (N, n_levels) (row i = item i), their tokens, and the prefix tables of
    constrained decoding: prefix keys are mixed-radix, key(c_0..c_l) = key(c_0..c_{l-1}) * V_l + c_l;
    `prefix_keys[l]` sorted length-l keys, `allowed_codes[l]` (n_prefixes, V_l) bool codes that follow."""

    def __init__(self, codes, vocab_sizes, device="cpu"):
        codes = np.asarray(codes)
        vocab = [int(v) for v in vocab_sizes]
        if codes.ndim != 2 or not len(codes) or codes.shape[1] != len(vocab) \
                or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"semantic IDs must be an integer (n_items, {len(vocab)}) array for vocab "
                             f"sizes {vocab}, got {codes.dtype} {codes.shape}")
        codes = codes.astype(np.int64)
        for lvl, v in enumerate(vocab):
            lo, hi = int(codes[:, lvl].min()), int(codes[:, lvl].max())
            if lo < 0 or hi >= v:
                raise ValueError(f"semantic-ID level {lvl} holds codes {lo}..{hi} outside [0, {v}): "
                                 "vocab sizes and codes disagree (check vocab_sizes)")
        if math.prod(vocab) >= 2 ** 62:
            raise ValueError(f"vocab sizes {vocab} are too large for 64-bit prefix keys")
        keys = np.zeros(len(codes), dtype=np.int64)  # (N,) key of the empty prefix
        prefix_keys, allowed = [], []
        for lvl, v in enumerate(vocab):
            uniq, row = np.unique(keys, return_inverse=True)  # (P,), (N,) prefix row of each item
            mask = np.zeros((len(uniq), v), dtype=bool)       # (P, V_l)
            mask[row.reshape(-1), codes[:, lvl]] = True
            prefix_keys.append(uniq)
            allowed.append(mask)
            keys = keys * v + codes[:, lvl]
        uniq, counts = np.unique(keys, return_counts=True)
        if (counts > 1).any():
            items = np.flatnonzero(keys == uniq[counts > 1][0])[:5].tolist()
            raise ValueError(f"semantic IDs are not unique (items {items} share one); rebuild them with "
                             "the dedup level (semantic_ids)")
        order = np.argsort(keys, kind="stable")
        self.vocab_sizes = vocab
        self.codes_np = codes
        self.device = torch.device(device)
        off = np.concatenate([[0], np.cumsum(vocab)[:-1]]) + N_SPECIAL
        self.offsets = [int(o) for o in off]  # first token of each level
        t = lambda a: torch.as_tensor(a, device=self.device)
        self.codes = t(codes)                  # (N, n_levels)
        self.tokens = t(codes + off[None, :])  # (N, n_levels) item -> tokens
        self.prefix_keys = [t(k) for k in prefix_keys]
        self.allowed_codes = [t(m) for m in allowed]
        self.item_keys = t(keys[order])             # (N,) sorted full keys
        self.key_items = t(order.astype(np.int64))  # (N,) item of each sorted key

    def to(self, device) -> SemanticIDs:
        if torch.device(device) == self.device:
            return self
        return SemanticIDs(self.codes_np, self.vocab_sizes, device)

    @property
    def n_items(self) -> int:
        return len(self.codes_np)

    @property
    def n_levels(self) -> int:
        return len(self.vocab_sizes)

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + sum(self.vocab_sizes)

    def allowed(self, level: int, keys: torch.Tensor) -> torch.Tensor:
        """Codes of `level` extending each prefix key (...,) in the catalog: (..., V_level) bool."""
        table = self.prefix_keys[level]  # (P,)
        row = torch.searchsorted(table, keys).clamp(max=len(table) - 1)  # (...,)
        found = table[row] == keys                                   # (...,)
        return self.allowed_codes[level][row] & found.unsqueeze(-1)  # (..., V_level)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Catalog item of each full-ID key (...,), else -1."""
        row = torch.searchsorted(self.item_keys, keys).clamp(max=self.n_items - 1)
        return torch.where(self.item_keys[row] == keys, self.key_items[row], -1)


# ----------------------------------------------------------------------------- tokenisation
def _int_2d(x, device, what: str) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{what} must be a 2-D integer array, got {tuple(t.shape)} {t.dtype}")
    return t.long()


def tokenize_histories(hist, ids: SemanticIDs, max_items: int = 20, fixed: bool = False) -> torch.Tensor:
    """Encoder input (module docstring) of histories (B, L) (item indices, negative = padding, either
    alignment): (B, n_levels * L' + 1) int64, L' = the longest kept history, or max_items if `fixed` (one
    shape for every batch: the GPU path; trailing PAD changes no result)."""
    h = _int_2d(hist, ids.device, "histories (B, L) of item indices")
    B, L = h.shape
    if h.numel() and int(h.max()) >= ids.n_items:
        raise ValueError(f"history holds item {int(h.max())} but the semantic IDs cover {ids.n_items} "
                         "items; were they built for another dataset?")
    valid = h >= 0                 # (B, L)
    n = valid.sum(dim=1)           # (B,) real items
    kept = n.clamp(max=max_items)  # (B,)
    W = max_items if fixed else int(kept.max()) if B else 0
    n_lv = ids.n_levels
    out = torch.zeros(B, n_lv * W + 1, dtype=torch.long, device=h.device)
    if W and L:
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # real items first, order kept
        packed = h.gather(1, order)  # (B, L) left-packed
        cols = (n - kept).unsqueeze(1) + torch.arange(W, device=h.device)  # (B, W) last `kept` items
        items = packed.gather(1, cols.clamp(max=L - 1))              # (B, W)
        real = torch.arange(W, device=h.device) < kept.unsqueeze(1)  # (B, W)
        tok = ids.tokens[items.clamp(min=0)] * real.unsqueeze(-1)    # (B, W, n_lv), pad -> 0
        out[:, :n_lv * W] = tok.reshape(B, n_lv * W)                 # (B, W, n_lv) -> (B, n_lv*W)
    out.scatter_(1, (n_lv * kept).unsqueeze(1), EOS)                 # EOS right after the last item
    return out


def target_tokens(target, ids: SemanticIDs) -> torch.Tensor:
    """Decoder targets: items (B,) -> their IDs' tokens (B, n_levels)."""
    t = torch.as_tensor(target, device=ids.device).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= ids.n_items):
        raise ValueError(f"target items must be in [0, {ids.n_items}), got {int(t.min())}..{int(t.max())}")
    return ids.tokens[t]


def decoder_inputs(tgt: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: targets (B, S) shifted right behind PAD."""
    return F.pad(tgt[:, :-1], (1, 0), value=PAD)


def _pad_mask(src: torch.Tensor) -> torch.Tensor:
    """Additive key mask, 0 = real, -inf = PAD: tokens (B, T) -> (B, 1, 1, T)."""
    return torch.zeros(src.shape, device=src.device).masked_fill(src == PAD, float("-inf"))[:, None, None]


# ----------------------------------------------------------------------------- the model
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


class RelativeBias(nn.Module):
    """T5's per-head bias per relative-position bucket."""

    def __init__(self, cfg: TigerConfig, bidirectional: bool):
        super().__init__()
        self.emb = nn.Embedding(cfg.rel_buckets, cfg.n_heads)
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(Tq,), (Tk,) positions -> (1, H, Tq, Tk)."""
        b = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional, self.buckets,
                                     self.max_distance)  # (Tq, Tk)
        return self.emb(b).permute(2, 0, 1).unsqueeze(0)  # (Tq, Tk, H) -> (1, H, Tq, Tk)


def attend(q, k, v, mask, dropout: float) -> torch.Tensor:
    """softmax(q k^T + mask) v, unscaled (T5): (B, H, Tq, dk) -> (B, H, Tq, dk)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout, scale=1.0)


class FeedForward(nn.Module):
    """T5 DenseReluDense."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.wo(self.drop(F.relu(self.wi(x))))


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    B, T, _ = t.shape
    return t.view(B, T, H, -1).transpose(1, 2)  # (B, T, H*dk) -> (B, H, T, dk)


def _merge(t: torch.Tensor) -> torch.Tensor:
    B, H, T, dk = t.shape
    return t.transpose(1, 2).reshape(B, T, H * dk)  # (B, H, T, dk) -> (B, T, H*dk)


class SelfAttention(nn.Module):
    """Self-attention, additive bias/mask; `cache` (k, v) (B, H, t, dk): earlier decoder positions."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.H, self.inner = cfg.n_heads, cfg.n_heads * cfg.d_kv
        self.p = cfg.dropout  # on the attention weights
        self.qkv = nn.Linear(cfg.d_model, 3 * self.inner, bias=False)
        self.o = nn.Linear(self.inner, cfg.d_model, bias=False)

    def forward(self, x, mask, cache=None):
        q, k, v = self.qkv(x).split(self.inner, dim=-1)  # 3 x (B, T, inner)
        q, k, v = _heads(q, self.H), _heads(k, self.H), _heads(v, self.H)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, H, t+T, dk)
        a = attend(q, k, v, mask, self.p if self.training else 0.0)  # (B, H, T, dk)
        return self.o(_merge(a)), (k, v)


class CrossAttention(nn.Module):
    """Decoder -> encoder attention; G decoder rows (beams) share a memory row's K/V (`memory_kv`):
    queries (B*G, S, D) attend as (B, H, G*S, dk), exact as queries never interact."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.H, self.inner = cfg.n_heads, cfg.n_heads * cfg.d_kv
        self.p = cfg.dropout
        self.q = nn.Linear(cfg.d_model, self.inner, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * self.inner, bias=False)
        self.o = nn.Linear(self.inner, cfg.d_model, bias=False)

    def memory_kv(self, memory):
        k, v = self.kv(memory).split(self.inner, dim=-1)  # 2 x (B, T, inner)
        return _heads(k, self.H), _heads(v, self.H)       # 2 x (B, H, T, dk)

    def forward(self, x, kv, mem_mask):
        k, v = kv
        B = k.shape[0]
        BG, S, _ = x.shape
        q = self.q(x).reshape(B, (BG // B) * S, self.inner)  # (B*G, S, inner) -> (B, G*S, inner)
        q = _heads(q, self.H)                                # -> (B, H, G*S, dk)
        a = attend(q, k, v, mem_mask, self.p if self.training else 0.0)  # (B, H, G*S, dk)
        return self.o(_merge(a).reshape(BG, S, self.inner))  # (B, G*S, inner) -> (B*G, S, D)


class Layer(nn.Module):
    """T5 block: pre-norm self-attention, cross-attention (decoder only), feed-forward."""

    def __init__(self, cfg: TigerConfig, decoder: bool):
        super().__init__()
        norm = lambda: nn.RMSNorm(cfg.d_model, eps=cfg.eps)  # noqa: E731
        self.norm1, self.attn, self.norm2 = norm(), SelfAttention(cfg), norm()
        if decoder:
            self.cross, self.norm3 = CrossAttention(cfg), norm()
        self.ff, self.drop = FeedForward(cfg), nn.Dropout(cfg.dropout)

    def forward(self, x, mask, kv=None, mem_mask=None, cache=None):
        a, cache = self.attn(self.norm1(x), mask, cache)
        x, norm = x + self.drop(a), self.norm2
        if kv is not None:
            x, norm = x + self.drop(self.cross(self.norm2(x), kv, mem_mask)), self.norm3
        return x + self.drop(self.ff(norm(x))), cache


class EncoderStack(nn.Module):
    decoder = False

    def __init__(self, cfg: TigerConfig, embed: nn.Embedding):
        super().__init__()
        self.embed = embed
        self.bias = RelativeBias(cfg, bidirectional=not self.decoder)
        n = cfg.n_decoder_layers if self.decoder else cfg.n_encoder_layers
        self.layers = nn.ModuleList(Layer(cfg, self.decoder) for _ in range(n))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        """src (B, T) tokens -> (B, T, D); PAD keys are masked (PAD queries give unused rows)."""
        pos = torch.arange(src.shape[1], device=src.device)
        mask = self.bias(pos, pos) + _pad_mask(src)  # (1, H, T, T) + (B, 1, 1, T)
        x = self.drop(self.embed(src))
        for layer in self.layers:
            x = layer(x, mask)[0]
        return self.drop(self.norm(x))


class DecoderStack(EncoderStack):
    """Causal decoder layers with cross-attention, then the tied head."""
    decoder = True

    def forward(self, tgt_in, kvs, mem_mask, start: int = 0, caches=None):
        """tgt_in (B*G, S) tokens at positions start.., kvs: per-layer memory K/V of B rows, caches:
        per-layer (k, v) of positions < start or None -> logits (B*G, S, V), new caches."""
        S, dev = tgt_in.shape[1], tgt_in.device
        q_pos = torch.arange(start, start + S, device=dev)
        k_pos = torch.arange(start + S, device=dev)
        future = k_pos[None, :] > q_pos[:, None]  # (S, start+S)
        causal = torch.zeros(S, start + S, device=dev).masked_fill(future, float("-inf"))
        mask = self.bias(q_pos, k_pos) + causal  # (1, H, S, start+S)
        x = self.drop(self.embed(tgt_in))
        new = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, mask, kvs[i], mem_mask, None if caches is None else caches[i])
            new.append(c)
        h = self.drop(self.norm(x)) * self.embed.embedding_dim ** -0.5  # T5 v1.0: before the tied head
        return F.linear(h, self.embed.weight), new  # (B*G, S, D) -> (B*G, S, V)


class Tiger(nn.Module):
    """T5-style encoder-decoder over semantic-ID tokens (TIGER)."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        cfg = replace(cfg, vocab_sizes=[int(v) for v in (cfg.vocab_sizes or [])])
        cfg.validate()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)  # both inputs + the output head
        self.encoder = EncoderStack(cfg, self.shared)
        self.decoder = DecoderStack(cfg, self.shared)
        self._init_weights()
        # exact either way (by_width); saves CPU work, but extra GPU launches can cost more
        self.length_buckets = True

    def _init_weights(self):
        """T5's init (HF T5PreTrainedModel._init_weights, factor 1)."""
        c, normal = self.cfg, nn.init.normal_
        d, inner = c.d_model, c.n_heads * c.d_kv
        normal(self.shared.weight, 0.0, 1.0)
        for m in self.modules():
            if isinstance(m, SelfAttention):
                normal(m.qkv.weight[:inner], 0.0, (d * c.d_kv) ** -0.5)
                normal(m.qkv.weight[inner:], 0.0, d ** -0.5)
                normal(m.o.weight, 0.0, inner ** -0.5)
            elif isinstance(m, CrossAttention):
                normal(m.q.weight, 0.0, (d * c.d_kv) ** -0.5)
                normal(m.kv.weight, 0.0, d ** -0.5)
                normal(m.o.weight, 0.0, inner ** -0.5)
            elif isinstance(m, FeedForward):
                normal(m.wi.weight, 0.0, d ** -0.5)
                normal(m.wo.weight, 0.0, c.d_ff ** -0.5)
            elif isinstance(m, RelativeBias):
                normal(m.emb.weight, 0.0, d ** -0.5)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def _check(self, tokens: torch.Tensor, what: str) -> torch.Tensor:
        t = _int_2d(tokens, self.device, what + " (B, T)")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{what} holds token {int(t.max())} outside the vocabulary of "
                             f"{self.cfg.vocab_size}; were the semantic IDs built with other vocab sizes?")
        return t

    def encode_memory(self, src) -> tuple[list, torch.Tensor]:
        """Encoder input (B, T) -> each decoder layer's memory K/V [(k, v) (B, H, T, dk)], projected once,
        and the memory mask (B, 1, 1, T)."""
        src = self._check(src, "encoder input")
        memory = self.encoder(src)  # (B, T, D)
        return [layer.cross.memory_kv(memory) for layer in self.decoder.layers], _pad_mask(src)

    def _forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decoder(tgt_in, *self.encode_memory(src))[0]

    def row_widths(self, src: torch.Tensor) -> torch.Tensor | None:
        """Bucketed width (B,) of each row of a left-aligned batch (B, T): the first 1 + n_levels * c >= its
        length, c = 0, 1, 2, 3, 4, 6, 8, 12, ... items (<= 1.5x the length). None if not left-aligned."""
        T = src.shape[1]
        real = src != PAD      # (B, T)
        lengths = real.sum(1)  # (B,)
        if not bool((real == (torch.arange(T, device=src.device) < lengths[:, None])).all()):
            return None
        items, c = [0, 1, 2, 3], 4
        while self.cfg.n_levels * items[-1] + 1 < T:
            items += [c, c * 3 // 2]
            c *= 2
        ladder = torch.tensor([self.cfg.n_levels * i + 1 for i in items], device=src.device)
        ladder = torch.cat([ladder[ladder < T], ladder.new_tensor([T])])  # (n_widths,) ending at T
        return ladder[torch.searchsorted(ladder, lengths)]  # (B,) first width >= length

    def by_width(self, fn: Callable, src: torch.Tensor, *rest: torch.Tensor):
        """fn(src (B, T), *rest (B, ...)); with `length_buckets`, once per `row_widths` group at its
        width, outputs (batch first) back in input order. Exact (in training only dropout masks differ)."""
        width = self.row_widths(src) if self.length_buckets and len(src) > 1 else None
        if width is None:
            return fn(src, *rest)
        groups = torch.unique(width).tolist()
        if len(groups) == 1:
            return fn(src[:, :groups[0]], *rest)
        order, outs = [], []
        for w in groups:
            rows = (width == w).nonzero().squeeze(1)  # (b,) rows of this width
            order.append(rows)
            outs.append(fn(src[rows, :w], *(t[rows] for t in rest)))
        inv = torch.argsort(torch.cat(order))  # (B,) back to input order
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)[inv]
        return tuple(torch.cat(parts)[inv] for parts in zip(*outs, strict=True))

    def forward(self, src, tgt_in) -> torch.Tensor:
        """Teacher-forced logits (B, S, V) of encoder (B, T) and decoder (B, S) inputs."""
        src, tgt_in = self._check(src, "encoder input"), self._check(tgt_in, "decoder input")
        return self.by_width(self._forward, src, tgt_in)

    def loss(self, src, tgt, checked: bool = True) -> torch.Tensor:
        """Mean cross-entropy of the target tokens (B, S), teacher-forced. checked=False skips the range
        checks (each a host-device sync) for tensors already checked, e.g. a device-resident epoch."""
        if checked:
            src, tgt = self._check(src, "encoder input"), self._check(tgt, "target tokens")
        logits = self.by_width(self._forward, src, decoder_inputs(tgt))  # (B, S, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))

    def compile_core(self, fixed: bool = False, **kwargs) -> Tiger:
        """torch.compile both stacks (dynamic shapes); fixed=True (one batch shape, the GPU path): only the
        teacher-forced step, as CUDA graphs ("reduce-overhead"), beam search eager. State-dict keys kept."""
        if not getattr(self, "_compiled", False):
            self._compiled = True
            if fixed:
                self._forward = torch.compile(self._forward, mode="reduce-overhead", dynamic=False, **kwargs)
                return self
            kwargs.setdefault("dynamic", True)
            self.encoder.compile(**kwargs)
            self.decoder.compile(**kwargs)
        return self


# ----------------------------------------------------------------------------- decoding
def beam_search(model: Tiger, src, ids: SemanticIDs, beam: int = 10, k: int | None = None,
                constrain: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k item IDs for encoder inputs src (B, T), best first: items (B, k) catalog indices (-1 = an
    unknown ID or empty beam), scores (B, k) float32 sums of log-probs (-inf: empty beam) and
    codes (B, k, n_levels)."""
    k = beam if k is None else k
    if not 1 <= k <= beam:
        raise ValueError(f"need 1 <= k <= beam, got k={k}, beam={beam}")
    if ids.vocab_sizes != model.cfg.vocab_sizes:
        raise ValueError(f"semantic-ID vocab sizes {ids.vocab_sizes} != the model's {model.cfg.vocab_sizes}")
    ids = ids.to(model.device)
    src, was = model._check(src, "encoder input"), model.training
    model.eval()
    try:
        return model.by_width(lambda rows: _beam_search(model, rows, ids, beam, k, constrain), src)
    finally:
        model.train(was)


@torch.inference_mode()
def _beam_search(model: Tiger, src, ids: SemanticIDs, beam: int, k: int,
                 constrain: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kvs, mem_mask = model.encode_memory(src)
    B, dev = mem_mask.shape[0], mem_mask.device
    W = 1  # one beam (the start token) at step 0
    scores = torch.zeros(B, 1, device=dev)                       # (B, W)
    keys = torch.zeros(B, 1, dtype=torch.long, device=dev)       # (B, W) prefix keys
    codes = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)   # (B, W, l)
    tok = torch.full((B, 1), PAD, dtype=torch.long, device=dev)  # (B*W, 1)
    caches = None
    rows = torch.arange(B, device=dev)[:, None]  # (B, 1)
    for lvl, V in enumerate(ids.vocab_sizes):
        logits, caches = model.decoder(tok, kvs, mem_mask, start=lvl, caches=caches)  # (B*W, 1, V_all)
        logp = torch.log_softmax(logits[:, 0].float(), dim=-1)  # full-vocabulary log-probs
        off = ids.offsets[lvl]
        logp = logp[:, off:off + V].view(B, W, V)  # (B*W, V_all) -> (B, W, V)
        if constrain:
            logp = logp.masked_fill(~ids.allowed(lvl, keys), float("-inf"))
        cand = (scores.unsqueeze(-1) + logp).view(B, W * V)  # (B, W, V) -> (B, W*V)
        Wn = min(beam, W * V)
        scores, pick = cand.topk(Wn, dim=1)  # (B, Wn), sorted
        parent, code = pick // V, pick % V
        keys = keys.gather(1, parent) * V + code
        codes = torch.cat([codes.gather(1, parent.unsqueeze(-1).expand(-1, -1, lvl)),
                           code.unsqueeze(-1)], dim=-1)  # (B, Wn, l+1)
        if lvl + 1 < ids.n_levels:
            flat = (rows * W + parent).reshape(-1)  # (B*Wn,) parent beam of each new beam
            caches = [(ck[flat], cv[flat]) for ck, cv in caches]
            tok = (code + off).reshape(B * Wn, 1)
        W = Wn
    items = torch.where(torch.isfinite(scores), ids.lookup(keys), -1)
    return items[:, :k], scores[:, :k], codes[:, :k]


def recommend(model: Tiger, hist, ids: SemanticIDs, beam: int = 10, k: int | None = None,
              constrain: bool = True, batch_size: int = 256,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items (C, k) int64 (-1 = invalid ID) and scores (C, k) of histories (C, L), `batch_size`
    users at a time, sorted by history length so a batch carries little padding; in input order."""
    hist = np.asarray(hist)
    ids = ids.to(model.device)
    max_items = model.cfg.max_items
    k = beam if k is None else k
    C = len(hist)
    lengths = np.minimum((hist >= 0).sum(1), max_items) if C else np.zeros(0, int)
    order = np.argsort(lengths, kind="stable")
    items = np.full((C, k), -1, dtype=np.int64)
    scores = np.full((C, k), -np.inf, dtype=np.float32)
    for s in tqdm(range(0, C, batch_size), desc=f"beam search ({'constrained' if constrain else 'free'})",
                  unit="batch", leave=False, disable=not progress):
        rows = order[s:s + batch_size]
        src = tokenize_histories(hist[rows], ids, max_items)
        it, sc, _ = beam_search(model, src, ids, beam, k, constrain)
        items[rows], scores[rows] = it.cpu().numpy(), sc.float().cpu().numpy()
    return items, scores
