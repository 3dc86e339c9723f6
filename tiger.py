"""TIGER: generative retrieval over semantic IDs, EncodeRec's second downstream test (arXiv 2601.10837,
Sec. 4, Table 3).

TIGER (Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023, Sec. 3.2 and 4)
names every catalog item by a semantic ID (3 RQ-VAE codes + a 4th code that separates items sharing the
first three, made by rqvae.py) and trains a T5 encoder-decoder to generate the next item's ID from the
IDs of the user's history. EncodeRec changes only the item embeddings the RQ-VAE quantises.

Token layout (one convention, documented once)
----------------------------------------------
* PAD = 0, EOS = 1. Code c of level l is token 2 + sum(vocab_sizes[:l]) + c, so every level has its own
  token range and vocab_size = 2 + sum(vocab_sizes).
* Encoder input: the tokens of the last `max_items` (TIGER: 20) history items, oldest first, then EOS,
  then PAD up to the batch width: (B, n_levels * L' + 1), L' = the longest kept history of the batch.
  Padding is masked out of every attention and positions are relative, so it never changes an output.
* Decoder: start token PAD (T5), input [PAD, t0, t1, t2], target [t0, t1, t2, t3]; IDs have a fixed
  length, so no EOS is generated.

Model: T5 v1.0 as TIGER configures it (Sec. 4.1, see TigerConfig): RMSNorm pre-norm, no biases,
unscaled attention (T5 folds 1/sqrt(d) into the init), a relative position bias computed once per
stack (bidirectional in the encoder, causal in the decoder, none in cross-attention), and one token
embedding shared by both inputs and the output head, the decoder output scaled by d_model^-0.5 before
the head. The weights map 1:1 onto Hugging Face T5ForConditionalGeneration (tests/t5_helpers.py; a test
checks parity). Loss: cross-entropy over the full vocabulary at the target tokens, teacher forcing.

Decoding: beam search batched over users and beams (a loop over the levels only) with a KV cache; the
cross-attention K/V of a user's encoder output are computed once and shared by its beams. A beam's
score is the sum of its tokens' full-vocabulary log-probabilities (constraints mask, they do not
renormalise: Hugging Face `generate`'s convention). Constrained decoding (the default) allows at each
level only the codes that extend a catalog prefix; free decoding maps IDs no item has to item -1.

    ids = SemanticIDs(codes, vocab_sizes)                  # codes (N, 4) int, row i = catalog item i
    model = Tiger(TigerConfig(vocab_sizes=list(vocab_sizes)))
    src = tokenize_histories(hist, ids)                    # hist (B, L) item indices, -1 = padding
    loss = model.loss(src, target_tokens(target, ids))
    items, scores = recommend(model, hist, ids, beam=10)   # (B, 10) catalog indices, -1 = invalid

Training (trainer.fit through train.py) and checkpoints live outside this file. Imports: the standard
library, numpy, torch and tqdm only.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

PAD, EOS = 0, 1          # special tokens; level codes start at token 2
N_SPECIAL = 2
CHECKPOINT_FORMAT = "encoderec-tiger/1"


# ----------------------------------------------------------------------------- configs
@dataclass
class TigerConfig:
    """Model settings. Defaults = TIGER (Rajput et al. 2023, Sec. 4.1) unless noted."""
    vocab_sizes: list | None = None  # codes per ID level (TIGER: 256, 256, 256 + the dedup level);
                                     # inferred from the semantic IDs
    d_model: int = 128              # TIGER: input dimension 128
    d_kv: int = 64                  # TIGER: 6 heads of dimension 64 (inner dim 384)
    n_heads: int = 6                # TIGER: 6 self-attention heads
    d_ff: int = 1024                # TIGER: MLP dimension 1024
    n_encoder_layers: int = 4       # TIGER: 4 encoder layers
    n_decoder_layers: int = 4       # TIGER: 4 decoder layers
    dropout: float = 0.1            # TIGER: dropout 0.1
    rel_buckets: int = 32           # T5: relative_attention_num_buckets 32
    rel_max_distance: int = 128     # T5: relative_attention_max_distance 128
    eps: float = 1e-6               # T5: layer_norm_epsilon 1e-6 (RMSNorm)
    max_items: int = 20             # TIGER: history capped at the last 20 items

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
class SemanticIDs:
    """The catalog's semantic IDs: codes (N, n_levels) (row i = catalog item i, codes[i, l] in
    [0, vocab_sizes[l])), their tokens, and the prefix tables of constrained decoding.

    Prefix keys are mixed-radix integers: key(c_0..c_{l-1}) = (..(c_0 * V_1 + c_1) * V_2 ..) + c_{l-1}.
    For each level l, `prefix_keys[l]` holds the sorted distinct keys of the catalog's length-l
    prefixes and `allowed_codes[l]` (n_prefixes_l, V_l) bool which codes may follow each."""

    def __init__(self, codes, vocab_sizes, device="cpu"):
        codes = np.asarray(codes)
        vocab = [int(v) for v in vocab_sizes]
        if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] != len(vocab):
            raise ValueError(f"semantic IDs must be an (n_items, {len(vocab)}) array (one row per catalog "
                             f"item, one column per level of vocab_sizes {vocab}), got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"semantic IDs must be integer codes, got dtype {codes.dtype}")
        codes = codes.astype(np.int64)
        for lvl, v in enumerate(vocab):
            lo, hi = int(codes[:, lvl].min()), int(codes[:, lvl].max())
            if lo < 0 or hi >= v:
                raise ValueError(f"semantic-ID level {lvl} holds codes {lo}..{hi} outside [0, {v}); "
                                 "the vocab sizes do not match the codes (check the .json sidecar)")
        if math.prod(vocab) >= 2 ** 62:
            raise ValueError(f"vocab sizes {vocab} are too large for 64-bit prefix keys")
        keys = np.zeros(len(codes), dtype=np.int64)                   # (N,) key of the empty prefix
        prefix_keys, allowed = [], []
        for lvl, v in enumerate(vocab):
            uniq, row = np.unique(keys, return_inverse=True)          # (P,), (N,) prefix row of each item
            mask = np.zeros((len(uniq), v), dtype=bool)               # (P, V_l)
            mask[row.reshape(-1), codes[:, lvl]] = True
            prefix_keys.append(uniq)
            allowed.append(mask)
            keys = keys * v + codes[:, lvl]
        order = np.argsort(keys, kind="stable")
        if len(np.unique(keys)) != len(keys):
            dup = keys[order][np.flatnonzero(np.diff(keys[order]) == 0)[0]]
            items = np.flatnonzero(keys == dup)[:5].tolist()
            raise ValueError(f"semantic IDs are not unique (items {items} share one ID); a generated ID "
                             "must name one item: rebuild them with the dedup level (rqvae.py)")
        self.vocab_sizes = vocab
        self.codes_np = codes
        self.device = torch.device(device)
        off = np.concatenate([[0], np.cumsum(vocab)[:-1]]) + N_SPECIAL
        self.offsets = [int(o) for o in off]                            # first token of each level
        t = lambda a: torch.as_tensor(a, device=self.device)
        self.codes = t(codes)                                           # (N, n_levels)
        self.tokens = t(codes + off[None, :])                           # (N, n_levels) item -> tokens
        self.prefix_keys = [t(k) for k in prefix_keys]
        self.allowed_codes = [t(m) for m in allowed]
        self.item_keys = t(keys[order])                                 # (N,) sorted full keys
        self.key_items = t(order.astype(np.int64))                      # (N,) item of each sorted key

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

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1(json.dumps(self.vocab_sizes).encode())
        h.update(np.ascontiguousarray(self.codes_np).tobytes())
        return h.hexdigest()

    def allowed(self, level: int, keys: torch.Tensor) -> torch.Tensor:
        """Codes of `level` that extend each prefix key (...,) into a catalog ID: (..., V_level) bool.
        A key that is no catalog prefix allows nothing."""
        table = self.prefix_keys[level]                                 # (P,)
        row = torch.searchsorted(table, keys).clamp(max=len(table) - 1)  # (...,)
        found = table[row] == keys                                      # (...,)
        return self.allowed_codes[level][row] & found.unsqueeze(-1)     # (..., V_level)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Catalog item of each full-ID key (...,), -1 where no item has that ID."""
        row = torch.searchsorted(self.item_keys, keys).clamp(max=self.n_items - 1)
        return torch.where(self.item_keys[row] == keys, self.key_items[row], -1)

    def key_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Mixed-radix key of full codes (..., n_levels) -> (...,)."""
        key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for lvl, v in enumerate(self.vocab_sizes):
            key = key * v + codes[..., lvl]
        return key


def load_semantic_ids(path, device="cpu") -> SemanticIDs:
    """semantic_ids-*.npy (N, n_levels) + its .json sidecar with "vocab_sizes" (made by rqvae.py)."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"semantic-ID file {path} not found; "
                                "run `python train.py --stage rqvae` first")
    if not side.is_file():
        raise FileNotFoundError(f"{side} (the sidecar with 'vocab_sizes') is missing; rebuild {path} "
                                "with `python train.py --stage rqvae`")
    info = json.loads(side.read_text())
    if "vocab_sizes" not in info:
        raise ValueError(f"{side} has no 'vocab_sizes' field; "
                         "rebuild it with `python train.py --stage rqvae`")
    return SemanticIDs(np.load(path), info["vocab_sizes"], device)


# ----------------------------------------------------------------------------- tokenisation
def tokenize_histories(hist, ids: SemanticIDs, max_items: int = 20) -> torch.Tensor:
    """Encoder input tokens of histories.

    hist (B, L) item indices, any negative value = padding, either alignment (data.py's
    Dataset.histories is right-aligned, -1 padding). Keeps each row's last `max_items` real items
    in order, then EOS, then PAD: (B, 4 * L' + 1) int64 on ids.device, L' = longest kept history."""
    h = torch.as_tensor(hist, device=ids.device)
    if h.dim() != 2 or h.dtype.is_floating_point or h.dtype == torch.bool:
        raise ValueError("histories must be a (B, L) integer array of item indices, "
                         f"got {tuple(h.shape)} {h.dtype}")
    h = h.long()
    B, L = h.shape
    if h.numel() and int(h.max()) >= ids.n_items:
        raise ValueError(f"history holds item {int(h.max())} but the semantic IDs cover {ids.n_items} items; "
                         "were they built for another dataset?")
    valid = h >= 0                                                      # (B, L)
    n = valid.sum(dim=1)                                                # (B,) real items
    kept = n.clamp(max=max_items)                                       # (B,)
    W = int(kept.max()) if B else 0
    n_lv = ids.n_levels
    out = torch.zeros(B, n_lv * W + 1, dtype=torch.long, device=h.device)
    if W:
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # real items first, order kept
        packed = h.gather(1, order)                                     # (B, L) left-packed
        cols = (n - kept).unsqueeze(1) + torch.arange(W, device=h.device)  # (B, W) last `kept` items
        items = packed.gather(1, cols.clamp(max=L - 1))                 # (B, W)
        real = torch.arange(W, device=h.device) < kept.unsqueeze(1)     # (B, W)
        tok = ids.tokens[items.clamp(min=0)] * real.unsqueeze(-1)       # (B, W, n_lv), pad -> 0
        out[:, :n_lv * W] = tok.reshape(B, n_lv * W)                    # (B, W, n_lv) -> (B, n_lv*W)
    out.scatter_(1, (n_lv * kept).unsqueeze(1), EOS)                    # EOS right after the last item
    return out


def target_tokens(target, ids: SemanticIDs) -> torch.Tensor:
    """Decoder targets: the tokens of each target item's ID, (B,) -> (B, n_levels)."""
    t = torch.as_tensor(target, device=ids.device).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= ids.n_items):
        raise ValueError(f"target items must be in [0, {ids.n_items}), got {int(t.min())}..{int(t.max())}")
    return ids.tokens[t]


def decoder_inputs(tgt: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: targets shifted right behind the start token PAD, (B, S) -> (B, S)."""
    return F.pad(tgt[:, :-1], (1, 0), value=PAD)


# ----------------------------------------------------------------------------- the model
def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of relative positions (key - query): exact below num_buckets/2 (per
    direction when bidirectional), log-spaced up to max_distance, one bucket beyond."""
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
    """Learned per-head scalar bias per relative-position bucket (T5)."""

    def __init__(self, cfg: TigerConfig, bidirectional: bool):
        super().__init__()
        self.emb = nn.Embedding(cfg.rel_buckets, cfg.n_heads)
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(Tq,), (Tk,) positions -> (1, H, Tq, Tk)."""
        b = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional, self.buckets,
                                     self.max_distance)                # (Tq, Tk)
        return self.emb(b).permute(2, 0, 1).unsqueeze(0)                # (Tq, Tk, H) -> (1, H, Tq, Tk)


def attend(q, k, v, mask, dropout: float) -> torch.Tensor:
    """softmax(q k^T + mask) v per head, unscaled (T5), with dropout on the attention weights:
    (B, H, Tq, dk) x (B, H, Tk, dk) -> (B, H, Tq, dk)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout, scale=1.0)


class FeedForward(nn.Module):
    """T5 DenseReluDense: wo(dropout(relu(wi(x))))."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.wo(self.drop(F.relu(self.wi(x))))


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    B, T, _ = t.shape
    return t.view(B, T, H, -1).transpose(1, 2)                          # (B, T, H*dk) -> (B, H, T, dk)


def _merge(t: torch.Tensor) -> torch.Tensor:
    B, H, T, dk = t.shape
    return t.transpose(1, 2).reshape(B, T, H * dk)                      # (B, H, T, dk) -> (B, T, H*dk)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection, unscaled scores (T5) and an additive
    bias/mask; `cache` (k, v) (B, H, t, dk) holds earlier decoder positions."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.H, self.inner = cfg.n_heads, cfg.n_heads * cfg.d_kv
        self.p = cfg.dropout                                            # on the attention weights
        self.qkv = nn.Linear(cfg.d_model, 3 * self.inner, bias=False)
        self.o = nn.Linear(self.inner, cfg.d_model, bias=False)

    def forward(self, x, mask, cache=None):
        q, k, v = self.qkv(x).split(self.inner, dim=-1)                 # 3 x (B, T, inner)
        q, k, v = _heads(q, self.H), _heads(k, self.H), _heads(v, self.H)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, H, t+T, dk)
        a = attend(q, k, v, mask, self.p if self.training else 0.0)    # (B, H, T, dk)
        return self.o(_merge(a)), (k, v)


class CrossAttention(nn.Module):
    """Decoder -> encoder attention. K/V of the memory are computed once (`kv`) and shared by
    `G` decoder sequences per memory row (beams, candidate items): queries (B*G, S, D) attend as
    (B, H, G*S, dk), exact because cross-attention queries never interact."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.H, self.inner = cfg.n_heads, cfg.n_heads * cfg.d_kv
        self.p = cfg.dropout
        self.q = nn.Linear(cfg.d_model, self.inner, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * self.inner, bias=False)
        self.o = nn.Linear(self.inner, cfg.d_model, bias=False)

    def memory_kv(self, memory):
        k, v = self.kv(memory).split(self.inner, dim=-1)                # 2 x (B, T, inner)
        return _heads(k, self.H), _heads(v, self.H)                     # 2 x (B, H, T, dk)

    def forward(self, x, kv, mem_mask):
        k, v = kv
        B = k.shape[0]
        BG, S, _ = x.shape
        q = self.q(x).reshape(B, (BG // B) * S, self.inner)             # (B*G, S, inner) -> (B, G*S, inner)
        q = _heads(q, self.H)                                           # -> (B, H, G*S, dk)
        a = attend(q, k, v, mem_mask, self.p if self.training else 0.0)  # (B, H, G*S, dk)
        return self.o(_merge(a).reshape(BG, S, self.inner))             # (B, G*S, inner) -> (B*G, S, D)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        x = x + self.drop(self.attn(self.norm1(x), mask)[0])
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.cross = CrossAttention(cfg)
        self.norm3 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, self_mask, kv, mem_mask, cache=None):
        a, new_cache = self.attn(self.norm1(x), self_mask, cache)
        x = x + self.drop(a)
        x = x + self.drop(self.cross(self.norm2(x), kv, mem_mask))
        return x + self.drop(self.ff(self.norm3(x))), new_cache


class EncoderStack(nn.Module):
    """Token embedding -> encoder layers -> RMSNorm (T5Stack without a decoder)."""

    def __init__(self, cfg: TigerConfig, embed: nn.Embedding):
        super().__init__()
        self.embed = embed
        self.bias = RelativeBias(cfg, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        """src (B, T) tokens -> (B, T, D); PAD keys are masked (padding queries give unused rows)."""
        T = src.shape[1]
        pos = torch.arange(T, device=src.device)
        pad = torch.zeros(src.shape, device=src.device).masked_fill(src == PAD, float("-inf"))  # (B, T)
        mask = self.bias(pos, pos) + pad[:, None, None, :]              # (1, H, T, T) + (B, 1, 1, T)
        x = self.drop(self.embed(src))
        for layer in self.layers:
            x = layer(x, mask)
        return self.drop(self.norm(x))


class DecoderStack(nn.Module):
    """Token embedding -> causal decoder layers with cross-attention -> RMSNorm -> tied head."""

    def __init__(self, cfg: TigerConfig, embed: nn.Embedding):
        super().__init__()
        self.embed = embed
        self.bias = RelativeBias(cfg, bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.scale = cfg.d_model ** -0.5

    def forward(self, tgt_in, kvs, mem_mask, start: int = 0, caches=None):
        """tgt_in (B*G, S) tokens at positions start..start+S-1; kvs = per-layer memory K/V of B
        rows; caches = per-layer (k, v) of positions < start (or None). Returns logits
        (B*G, S, V) float32-or-autocast and the updated caches."""
        S = tgt_in.shape[1]
        dev = tgt_in.device
        q_pos = torch.arange(start, start + S, device=dev)
        k_pos = torch.arange(start + S, device=dev)
        future = k_pos[None, :] > q_pos[:, None]                        # (S, start+S)
        causal = torch.zeros(S, start + S, device=dev).masked_fill(future, float("-inf"))
        mask = self.bias(q_pos, k_pos) + causal                        # (1, H, S, start+S)
        x = self.drop(self.embed(tgt_in))
        new = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, mask, kvs[i], mem_mask, None if caches is None else caches[i])
            new.append(c)
        h = self.drop(self.norm(x)) * self.scale                        # T5 v1.0: d^-1/2 before the tied head
        return F.linear(h, self.embed.weight), new                      # (B*G, S, D) -> (B*G, S, V)


class Tiger(nn.Module):
    """T5-style encoder-decoder over semantic-ID tokens (TIGER)."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        cfg = replace(cfg, vocab_sizes=[int(v) for v in (cfg.vocab_sizes or [])])
        cfg.validate()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)         # encoder/decoder inputs + output head
        self.encoder = EncoderStack(cfg, self.shared)
        self.decoder = DecoderStack(cfg, self.shared)
        self._init_weights()
        # Compute only (exact either way): run groups of rows at their own encoder width instead of
        # the batch's (see by_width). It saves work on CPU; on a GPU the extra small launches can
        # cost more than the padding they save, so a GPU training loop may turn it off.
        self.length_buckets = True

    def _init_weights(self):
        """T5's init (HF T5PreTrainedModel._init_weights, factor 1): embeddings N(0, 1); q N(0,
        (d*dk)^-1/2); k, v, wi N(0, d^-1/2); o N(0, (H*dk)^-1/2); wo N(0, d_ff^-1/2); relative
        biases N(0, d^-1/2); RMSNorm 1. The head is the shared embedding (tied)."""
        c = self.cfg
        d, inner = c.d_model, c.n_heads * c.d_kv
        nn.init.normal_(self.shared.weight, 0.0, 1.0)
        for m in self.modules():
            if isinstance(m, SelfAttention):
                nn.init.normal_(m.qkv.weight[:inner], 0.0, (d * c.d_kv) ** -0.5)
                nn.init.normal_(m.qkv.weight[inner:], 0.0, d ** -0.5)
                nn.init.normal_(m.o.weight, 0.0, inner ** -0.5)
            elif isinstance(m, CrossAttention):
                nn.init.normal_(m.q.weight, 0.0, (d * c.d_kv) ** -0.5)
                nn.init.normal_(m.kv.weight, 0.0, d ** -0.5)
                nn.init.normal_(m.o.weight, 0.0, inner ** -0.5)
            elif isinstance(m, FeedForward):
                nn.init.normal_(m.wi.weight, 0.0, d ** -0.5)
                nn.init.normal_(m.wo.weight, 0.0, c.d_ff ** -0.5)
            elif isinstance(m, RelativeBias):
                nn.init.normal_(m.emb.weight, 0.0, d ** -0.5)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def _check(self, tokens: torch.Tensor, what: str) -> torch.Tensor:
        t = torch.as_tensor(tokens, device=self.device)
        if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{what} must be (B, T) integer tokens, got shape {tuple(t.shape)} {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{what} holds token {int(t.max())} outside the vocabulary of "
                             f"{self.cfg.vocab_size}; were the semantic IDs built with other vocab sizes?")
        return t.long()

    def encode_memory(self, src) -> tuple[list, torch.Tensor]:
        """Run the encoder and project its output once for every decoder layer's cross-attention:
        encoder input (B, T) -> memory K/V per decoder layer [(k, v) (B, H, T, dk)] and the
        additive memory mask (B, 1, 1, T) float (0 = real token, -inf = PAD)."""
        src = self._check(src, "encoder input")
        memory = self.encoder(src)                                      # (B, T, D)
        kvs = [layer.cross.memory_kv(memory) for layer in self.decoder.layers]
        mem_mask = torch.zeros(src.shape, device=src.device).masked_fill(src == PAD, float("-inf"))
        return kvs, mem_mask[:, None, None, :]                         # (B, T) -> (B, 1, 1, T)

    def _forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        kvs, mem_mask = self.encode_memory(src)
        return self.decoder(tgt_in, kvs, mem_mask)[0]

    def row_widths(self, src: torch.Tensor) -> torch.Tensor | None:
        """Encoder width each row of a left-aligned batch (B, T) runs at with length buckets: the
        smallest ladder width >= its real length, the ladder being 1 + n_levels * c tokens for
        c = 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... items (so a row carries at most 1.5x its length,
        in few distinct widths). None when the rows are not left-aligned (a PAD before a real
        token): those run at the batch width."""
        T = src.shape[1]
        real = src != PAD                                               # (B, T)
        lengths = real.sum(1)                                           # (B,)
        if not bool((real == (torch.arange(T, device=src.device) < lengths[:, None])).all()):
            return None
        items, c = [0, 1, 2, 3], 4
        while self.cfg.n_levels * items[-1] + 1 < T:
            items += [c, c * 3 // 2]
            c *= 2
        ladder = torch.tensor([self.cfg.n_levels * i + 1 for i in items], device=src.device)
        ladder = torch.cat([ladder[ladder < T], ladder.new_tensor([T])])   # (n_widths,) ending at T
        return ladder[torch.searchsorted(ladder, lengths)]              # (B,) first width >= length

    def by_width(self, fn: Callable, src: torch.Tensor, *rest: torch.Tensor):
        """fn(src, *rest) for a batch of encoder inputs src (B, T) and row-aligned tensors `rest`.

        With `length_buckets` the rows are grouped by `row_widths`, fn runs once per group on the
        group's rows cut to its width, and the outputs (a tensor or a tuple of tensors, batch
        first) come back in input order. Exact, as padding never changes an output and positions
        are relative (in training only which dropout masks are drawn differs). Without it, or for
        rows that are not left-aligned, this is the plain fn(src, *rest)."""
        width = self.row_widths(src) if self.length_buckets and len(src) > 1 else None
        if width is None:
            return fn(src, *rest)                                       # plain path: the batch width
        groups = torch.unique(width).tolist()
        if len(groups) == 1:
            return fn(src[:, :groups[0]], *rest)
        order, outs = [], []
        for w in groups:
            rows = (width == w).nonzero().squeeze(1)                    # (b,) rows of this width
            order.append(rows)
            outs.append(fn(src[rows, :w], *(t[rows] for t in rest)))
        inv = torch.argsort(torch.cat(order))                           # (B,) back to input order
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)[inv]
        return tuple(torch.cat(parts)[inv] for parts in zip(*outs, strict=True))

    def forward(self, src, tgt_in) -> torch.Tensor:
        """Teacher-forced logits (B, S, V) for encoder input (B, T) and decoder input (B, S)."""
        src, tgt_in = self._check(src, "encoder input"), self._check(tgt_in, "decoder input")
        return self.by_width(self._forward, src, tgt_in)

    def loss(self, src, tgt) -> torch.Tensor:
        """Mean cross-entropy over the target tokens (B, S) (full vocabulary, teacher forcing)."""
        tgt = self._check(tgt, "target tokens")
        logits = self(src, decoder_inputs(tgt))                         # (B, S, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))

    def compile_core(self, **kwargs) -> Tiger:
        """torch.compile the encoder and decoder stacks (dynamic shapes); state-dict keys unchanged."""
        if not getattr(self, "_compiled", False):
            self._compiled = True
            kwargs.setdefault("dynamic", True)
            self.encoder.compile(**kwargs)
            self.decoder.compile(**kwargs)
        return self


# ----------------------------------------------------------------------------- decoding
@contextmanager
def _no_grad_eval(model: Tiger):
    """Eval mode + inference mode for the block; the model's mode is restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was)


def beam_search(model: Tiger, src, ids: SemanticIDs, beam: int = 10, k: int | None = None,
                constrain: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k item IDs for encoder inputs src (B, T), beams batched over users on the device.

    Returns items (B, k) catalog indices (-1 = an ID no item has, or an empty beam), scores (B, k)
    float32 sums of log-probs (-inf for empty beams), best first, and codes (B, k, n_levels).
    With model.length_buckets, users run in groups of similar history length (Tiger.by_width)."""
    k = beam if k is None else k
    if not 1 <= k <= beam:
        raise ValueError(f"need 1 <= k <= beam, got k={k}, beam={beam}")
    if ids.vocab_sizes != model.cfg.vocab_sizes:
        raise ValueError(f"semantic IDs have vocab sizes {ids.vocab_sizes} "
                         f"but the model {model.cfg.vocab_sizes}")
    ids = ids.to(model.device)
    src = model._check(src, "encoder input")
    return model.by_width(lambda rows: _beam_search(model, rows, ids, beam, k, constrain), src)


def _beam_search(model: Tiger, src, ids: SemanticIDs, beam: int, k: int,
                 constrain: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_grad_eval(model):
        kvs, mem_mask = model.encode_memory(src)
        B, dev = mem_mask.shape[0], mem_mask.device
        W = 1                                                          # one beam (the start token) at step 0
        scores = torch.zeros(B, 1, device=dev)                         # (B, W)
        keys = torch.zeros(B, 1, dtype=torch.long, device=dev)         # (B, W) prefix keys
        codes = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)     # (B, W, l)
        tok = torch.full((B, 1), PAD, dtype=torch.long, device=dev)    # (B*W, 1)
        caches = None
        rows = torch.arange(B, device=dev)[:, None]                    # (B, 1)
        for lvl, V in enumerate(ids.vocab_sizes):
            logits, caches = model.decoder(tok, kvs, mem_mask, start=lvl, caches=caches)  # (B*W, 1, V_all)
            logp = torch.log_softmax(logits[:, 0].float(), dim=-1)     # full-vocabulary log-probs
            off = ids.offsets[lvl]
            logp = logp[:, off:off + V].view(B, W, V)                  # (B*W, V_all) -> (B, W, V)
            if constrain:
                logp = logp.masked_fill(~ids.allowed(lvl, keys), float("-inf"))
            cand = (scores.unsqueeze(-1) + logp).view(B, W * V)       # (B, W, V) -> (B, W*V)
            Wn = min(beam, W * V)
            scores, pick = cand.topk(Wn, dim=1)                        # (B, Wn), sorted
            parent, code = pick // V, pick % V
            keys = keys.gather(1, parent) * V + code
            codes = torch.cat([codes.gather(1, parent.unsqueeze(-1).expand(-1, -1, lvl)),
                               code.unsqueeze(-1)], dim=-1)            # (B, Wn, l+1)
            if lvl + 1 < ids.n_levels:
                flat = (rows * W + parent).reshape(-1)                 # (B*Wn,) parent beam of each new beam
                caches = [(ck[flat], cv[flat]) for ck, cv in caches]
                tok = (code + off).reshape(B * Wn, 1)
            W = Wn
        items = torch.where(torch.isfinite(scores), ids.lookup(keys), -1)
        return items[:, :k], scores[:, :k], codes[:, :k]


def exhaustive_scores(model: Tiger, src, ids: SemanticIDs, chunk: int = 4096) -> torch.Tensor:
    """Log-probability of every catalog item's ID for each encoder input: (B, T) -> (B, N) float32,
    teacher-forced (the reference that constrained beam search must reproduce)."""
    with _no_grad_eval(model):
        kvs, mem_mask = model.encode_memory(src)
        B = mem_mask.shape[0]
        out = []
        for s in range(0, ids.n_items, chunk):
            tgt = ids.tokens[s:s + chunk]                              # (n, S)
            n, S = tgt.shape
            tin = decoder_inputs(tgt).repeat(B, 1)                     # (B*n, S), n candidates per user
            logits = model.decoder(tin, kvs, mem_mask)[0].float()      # (B*n, S, V)
            lp = torch.log_softmax(logits, -1).gather(-1, tgt.repeat(B, 1).unsqueeze(-1))  # (B*n, S, 1)
            out.append(lp.view(B, n, S).sum(-1))                       # (B*n, S, 1) -> (B, n)
        return torch.cat(out, dim=1)


def recommend(model: Tiger, hist, ids: SemanticIDs, beam: int = 10, k: int | None = None,
              constrain: bool = True, batch_size: int = 256, max_items: int | None = None,
              progress: bool = False, amp: str = "off") -> tuple[np.ndarray, np.ndarray]:
    """Top-k items (C, k) int64 (-1 = invalid ID) and scores (C, k) for histories (C, L) (item
    indices, -1 = padding), `batch_size` users at a time. Users are sorted by history length so a
    batch carries little padding (exact: padding never changes an output); results come back in
    input order."""
    hist = np.asarray(hist)
    ids = ids.to(model.device)
    max_items = model.cfg.max_items if max_items is None else max_items
    k = beam if k is None else k
    C = len(hist)
    lengths = np.minimum((hist >= 0).sum(1), max_items) if C else np.zeros(0, int)
    order = np.argsort(lengths, kind="stable")
    items = np.full((C, k), -1, dtype=np.int64)
    scores = np.full((C, k), -np.inf, dtype=np.float32)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    starts = range(0, C, batch_size)
    if progress:
        starts = tqdm(starts, desc=f"beam search ({'constrained' if constrain else 'free'})", unit="batch",
                      leave=False)
    for s in starts:
        rows = order[s:s + batch_size]
        src = tokenize_histories(hist[rows], ids, max_items)
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            it, sc, _ = beam_search(model, src, ids, beam, k, constrain)
        items[rows], scores[rows] = it.cpu().numpy(), sc.float().cpu().numpy()
    return items, scores
