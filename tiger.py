"""TIGER: generative retrieval over semantic IDs, the second downstream test of EncodeRec
(arXiv 2601.10837, Sec. 4, Table 3).

TIGER (Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023, Sec. 3.2 and
4) represents every catalog item by a tuple of codes (its semantic ID: 3 RQ-VAE levels of 256
codes + a 4th code that separates items sharing the first three, made by rqvae.py) and trains a
T5-style encoder-decoder to generate the next item's ID from the IDs of the user's history.
EncodeRec changes only the item embeddings the RQ-VAE quantises; this file is the recommender.

Token layout (one convention, documented once)
----------------------------------------------
* PAD = 0, EOS = 1. Code c of level l is token 2 + sum(vocab_sizes[:l]) + c, so every level has
  its own token range and vocab_size = 2 + sum(vocab_sizes) (TIGER: 2 + 3*256 + V4).
* Encoder input: the 4 tokens of each history item, oldest first, at most the last `max_items`
  = 20 items (TIGER caps histories at 20), then EOS, then PAD up to the batch width:
  (B, 4 * L' + 1) with L' = the longest (capped) history in the batch. Padding is masked out of
  every attention; with relative positions the amount of padding never changes an output.
* Decoder: start token PAD (the T5 convention), input [PAD, t0, t1, t2], target [t0, t1, t2, t3];
  IDs have a fixed length, so no EOS is generated.

Model: T5 v1.0 as TIGER configures it (Sec. 4.1: 4 encoder + 4 decoder layers, d_model 128,
6 heads of 64, feed-forward 1024, ReLU, dropout 0.1), written here: RMSNorm pre-norm, no biases,
unscaled dot-product attention (T5 folds 1/sqrt(d) into the init), T5 relative position bias
(32 log-spaced buckets up to distance 128; bidirectional in the encoder, causal in the decoder;
computed once per stack and shared by its layers; none in cross-attention; no learned absolute
positions), and one token embedding shared by the encoder input, the decoder input and the
output head: TIED, with the decoder output rescaled by d_model^-0.5 before the head (T5 v1.0, and
what Hugging Face transformers >= 5 always builds for T5). Weights map 1:1 onto Hugging Face
`T5ForConditionalGeneration` (`t5_state_dict`, `t5_config_kwargs`); the tests check parity.

Training (TIGER Sec. 4.1): every prefix of a training sequence -> the next item's 4 tokens,
teacher forcing, cross-entropy over the full vocabulary at the 4 target positions, batch 256.
TIGER used Adafactor, lr 0.01, inverse-square-root decay after 10k warm-up steps, 200k steps;
we use AdamW (lr 1e-3, weight decay 0.01 on matrices) with linear warm-up over 1,000 steps then
inverse-square-root decay lr * sqrt(warmup / step), gradients clipped at norm 1 (TrainConfig).
The schedule depends only on the step, so --resume may raise max_steps. Under torchrun, fit trains
with DistributedDataParallel on shares of the same global batch (exactly its loss and gradients) and
rank 0 alone validates and writes checkpoints.

Decoding: beam search batched over users and beams (a loop over the 4 levels only), width 10,
with a KV cache; cross-attention K/V of the encoder output are computed once per layer and
shared by all beams of a user. A beam's score is the sum of its tokens' log-probabilities under
the full-vocabulary softmax (the Hugging Face `generate` convention: constraints mask, they do not
renormalise). Constrained decoding (the default) allows at each level only the codes that extend
a prefix of some catalog item (per-level sorted prefix keys + searchsorted + a dense
(n_prefixes, codes) mask; memory ~ n_items * codes bytes); with beam >= number of items it equals
exhaustive scoring. Free decoding (constrain=False) draws each level's code from that level's
token range only and maps IDs absent from the catalog to item -1.

    ids = SemanticIDs(codes, vocab_sizes)                  # codes (N, 4) int, row i = catalog item i
    model = Tiger(TigerConfig(vocab_sizes=list(vocab_sizes)))
    src = tokenize_histories(hist, ids)                    # hist (B, L) item indices, -1 = padding
    loss = model.loss(src, target_tokens(target, ids))
    items, scores = recommend(model, hist, ids, beam=10)   # (B, 10) catalog indices, -1 = invalid
    summary = fit(model, ids, train_hist, train_target, eval_fn, "runs/x", TrainConfig())

Imports: the standard library, numpy, torch and tqdm only.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
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


@dataclass
class TrainConfig:
    """Training loop settings. TIGER (Sec. 4.1) trained 200k steps at batch 256 with Adafactor,
    lr 0.01 and inverse-sqrt decay after 10k warm-up steps; AdamW needs a smaller lr (below)."""
    lr: float = 1e-3                # AdamW peak lr (ours; TIGER's 0.01 was with Adafactor)
    warmup_steps: int = 1000        # linear warm-up, then lr * sqrt(warmup / step) (TIGER: 10k of 200k)
    weight_decay: float = 0.01      # AdamW, on Linear weights only (ours)
    grad_clip: float = 1.0          # max global gradient norm (ours; 0 = off)
    batch_size: int = 256           # TIGER: batch size 256
    max_steps: int = 200_000        # TIGER: 200k training steps
    max_epochs: int | None = None   # optional cap on passes over the training prefixes
    max_minutes: float | None = None  # stop at the first validation after this much wall time (this call)
    eval_every: int = 1000          # steps between validation runs (ours)
    patience: int = 10              # validations without a better valid NDCG@10 before stopping (ours)
    metric: str = "ndcg@10"         # early-stopping metric on the validation cases
    beam: int = 10                  # validation beam width (TIGER: beam 10 for Recall/NDCG@10)
    amp: str = "off"                # "off" | "bf16" | "fp16" (autocast; fp16 needs CUDA, uses a GradScaler)
    compile: bool = False           # torch.compile the encoder and decoder stacks
    seed: int = 0                   # dropout RNG and the per-epoch shuffles
    group_by_length: int = 50       # batches per length-sorted span (ours; see epoch_order); 0 = plain shuffle


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
        return self if torch.device(device) == self.device else SemanticIDs(self.codes_np, self.vocab_sizes, device)

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


def random_semantic_ids(n_items: int, vocab_sizes=(256, 256, 256), seed: int = 0) -> tuple[np.ndarray, list]:
    """Random unique semantic IDs for tests and benchmarks: uniform codes per level plus a last
    dedup level numbering the items that share a prefix (0, 1, ...), as rqvae.py's 4th code.
    Returns codes (n_items, len(vocab_sizes) + 1) int64 and the vocab sizes (dedup level =
    largest collision count, at least 1)."""
    rng = np.random.default_rng(seed)
    head = np.stack([rng.integers(0, v, n_items) for v in vocab_sizes], axis=1)   # (N, L)
    _, inv = np.unique(head, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    first = np.searchsorted(inv[order], inv[order])                    # first sorted row of each group
    dedup = np.empty(n_items, dtype=np.int64)
    dedup[order] = np.arange(n_items) - first                          # rank within its group
    return np.concatenate([head, dedup[:, None]], axis=1), [int(v) for v in vocab_sizes] + [int(dedup.max()) + 1]


def load_semantic_ids(path, device="cpu") -> SemanticIDs:
    """semantic_ids-*.npy (N, n_levels) + its .json sidecar with "vocab_sizes" (made by rqvae.py)."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"semantic-ID file {path} not found; run `python train.py --stage rqvae` first")
    if not side.is_file():
        raise FileNotFoundError(f"{side} (the sidecar with 'vocab_sizes') is missing; rebuild {path} "
                                "with `python train.py --stage rqvae`")
    info = json.loads(side.read_text())
    if "vocab_sizes" not in info:
        raise ValueError(f"{side} has no 'vocab_sizes' field; rebuild it with `python train.py --stage rqvae`")
    return SemanticIDs(np.load(path), info["vocab_sizes"], device)


# ----------------------------------------------------------------------------- tokenisation
def tokenize_histories(hist, ids: SemanticIDs, max_items: int = 20) -> torch.Tensor:
    """Encoder input tokens of histories.

    hist (B, L) item indices, any negative value = padding, either alignment (data.py's
    Dataset.histories is right-aligned, -1 padding). Keeps each row's last `max_items` real items
    in order, then EOS, then PAD: (B, 4 * L' + 1) int64 on ids.device, L' = longest kept history."""
    h = torch.as_tensor(hist, device=ids.device)
    if h.dim() != 2 or h.dtype.is_floating_point or h.dtype == torch.bool:
        raise ValueError(f"histories must be a (B, L) integer array of item indices, got {tuple(h.shape)} {h.dtype}")
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
        self.bidirectional, self.buckets, self.max_distance = bidirectional, cfg.rel_buckets, cfg.rel_max_distance

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(Tq,), (Tk,) positions -> (1, H, Tq, Tk)."""
        b = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional, self.buckets,
                                     self.max_distance)                # (Tq, Tk)
        return self.emb(b).permute(2, 0, 1).unsqueeze(0)                # (Tq, Tk, H) -> (1, H, Tq, Tk)


def dropout_keep_mask(shape, p: float, device) -> torch.Tensor:
    """Bernoulli keep-mask (True = keep) for dropout rate p. On CPU the mask comes from 16-bit
    uniform integers (four per 64-bit draw; the actual rate is round(p * 65536) / 65536, 0.100006
    for 0.1), ~2x cheaper than torch's per-element Bernoulli, which otherwise costs as much as the
    model's matmuls; on CUDA from torch.rand."""
    if torch.device(device).type != "cpu":
        return torch.rand(shape, device=device) >= p
    n = math.prod(shape)
    r = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)  # 4 x 16 random bits each
    return r.view(torch.int16)[:n].view(shape) >= -32768 + round(p * 65536)


class Dropout(nn.Module):
    """Inverted dropout with `dropout_keep_mask` (same semantics as nn.Dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.keep = 1.0 - round(p * 65536) / 65536

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * dropout_keep_mask(x.shape, self.p, x.device) * (1.0 / self.keep)


def attend(q, k, v, mask, drop: Dropout) -> torch.Tensor:
    """softmax(q k^T + mask) v per head, unscaled (T5): (B, H, Tq, dk) x (B, H, Tk, dk) -> (B, H, Tq, dk).
    Inference uses F.scaled_dot_product_attention; training spells it out so the attention
    dropout can use the fast mask (the same computation as SDPA's math path on CPU)."""
    mask = mask.to(q.dtype)
    if drop.training and drop.p > 0:
        w = torch.softmax((q @ k.transpose(-1, -2) + mask).float(), dim=-1).to(q.dtype)  # (B, H, Tq, Tk)
        return drop(w) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


class FeedForward(nn.Module):
    """T5 DenseReluDense: wo(dropout(relu(wi(x))))."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = Dropout(cfg.dropout)

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
        self.attn_drop = Dropout(cfg.dropout)
        self.qkv = nn.Linear(cfg.d_model, 3 * self.inner, bias=False)
        self.o = nn.Linear(self.inner, cfg.d_model, bias=False)

    def forward(self, x, mask, cache=None):
        q, k, v = self.qkv(x).split(self.inner, dim=-1)                 # 3 x (B, T, inner)
        q, k, v = _heads(q, self.H), _heads(k, self.H), _heads(v, self.H)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, H, t+T, dk)
        return self.o(_merge(attend(q, k, v, mask, self.attn_drop))), (k, v)


class CrossAttention(nn.Module):
    """Decoder -> encoder attention. K/V of the memory are computed once (`kv`) and shared by
    `G` decoder sequences per memory row (beams, candidate items): queries (B*G, S, D) attend as
    (B, H, G*S, dk), exact because cross-attention queries never interact."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.H, self.inner = cfg.n_heads, cfg.n_heads * cfg.d_kv
        self.attn_drop = Dropout(cfg.dropout)
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
        q = _heads(self.q(x).reshape(B, (BG // B) * S, self.inner), self.H)  # (B*G, S, inner) -> (B, H, G*S, dk)
        a = attend(q, k, v, mem_mask, self.attn_drop)                   # (B, H, G*S, dk)
        return self.o(_merge(a).reshape(BG, S, self.inner))             # (B, G*S, inner) -> (B*G, S, D)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.ff = FeedForward(cfg)
        self.drop = Dropout(cfg.dropout)

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
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, self_mask, kv, mem_mask, cache=None):
        a, new_cache = self.attn(self.norm1(x), self_mask, cache)
        x = x + self.drop(a)
        x = x + self.drop(self.cross(self.norm2(x), kv, mem_mask))
        return x + self.drop(self.ff(self.norm3(x))), new_cache


class Encoder(nn.Module):
    def __init__(self, cfg: TigerConfig, embed: nn.Embedding):
        super().__init__()
        self.embed = embed
        self.bias = RelativeBias(cfg, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.drop = Dropout(cfg.dropout)

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


class Decoder(nn.Module):
    def __init__(self, cfg: TigerConfig, embed: nn.Embedding):
        super().__init__()
        self.embed = embed
        self.bias = RelativeBias(cfg, bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.eps)
        self.drop = Dropout(cfg.dropout)
        self.scale = cfg.d_model ** -0.5

    def forward(self, tgt_in, kvs, mem_mask, start: int = 0, caches=None):
        """tgt_in (B*G, S) tokens at positions start..start+S-1; kvs = per-layer memory K/V of B
        rows; caches = per-layer (k, v) of positions < start (or None). Returns logits
        (B*G, S, V) float32-or-autocast and the updated caches."""
        S = tgt_in.shape[1]
        dev = tgt_in.device
        q_pos = torch.arange(start, start + S, device=dev)
        k_pos = torch.arange(start + S, device=dev)
        causal = torch.zeros(S, start + S, device=dev).masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
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
        self.encoder = Encoder(cfg, self.shared)
        self.decoder = Decoder(cfg, self.shared)
        self._init_weights()
        # compute only: run groups of rows at their own encoder width. "auto": training buckets on CPU
        # only (on a GPU the extra small launches cost more than the padding: 0.16x measured on an
        # H200 by bench/tiger.py), decoding buckets everywhere; True / False force both
        self.length_buckets: bool | str = "auto"

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

    def encode(self, src) -> tuple[list, torch.Tensor]:
        """Encoder input (B, T) -> per-decoder-layer memory K/V [(k, v) (B, H, T, dk)] and the
        additive memory mask (B, 1, 1, T) float (0 = real token, -inf = PAD)."""
        src = self._check(src, "encoder input")
        memory = self.encoder(src)                                      # (B, T, D)
        kvs = [layer.cross.memory_kv(memory) for layer in self.decoder.layers]
        mem_mask = torch.zeros(src.shape, device=src.device).masked_fill(src == PAD, float("-inf"))
        return kvs, mem_mask[:, None, None, :]                         # (B, T) -> (B, 1, 1, T)

    def _forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        kvs, mem_mask = self.encode(src)
        return self.decoder(tgt_in, kvs, mem_mask)[0]

    def row_widths(self, src: torch.Tensor) -> torch.Tensor | None:
        """Encoder width each row of a left-aligned batch (B, T) runs at with length buckets: the
        smallest ladder width >= its real length, the ladder being 1 + n_levels * c tokens for
        c = 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... items (<= 1.5x padding). None when the rows are not
        left-aligned (a PAD before a real token), which then run unbucketed."""
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

    def forward(self, src, tgt_in) -> torch.Tensor:
        """Teacher-forced logits (B, S, V) for encoder input (B, T) and decoder input (B, S).

        With `length_buckets` (True, or "auto" on a CPU tensor) rows are grouped by `row_widths` and
        each group runs the whole model at its own width: exact (padding never changes an output,
        relative positions do not depend on it), ~2.5x fewer encoder tokens on Amazon histories of
        <= 20 items, where a batch of 256 almost always holds one full-length history
        (tokenize_histories already cuts a batch to its longest row; fit's length-grouped batches
        do the rest on a GPU)."""
        src, tgt_in = self._check(src, "encoder input"), self._check(tgt_in, "decoder input")
        use = self.length_buckets is True or (self.length_buckets == "auto" and src.device.type == "cpu")
        width = self.row_widths(src) if use and len(src) > 1 else None
        if width is None:
            return self._forward(src, tgt_in)
        groups = torch.unique(width).tolist()
        if len(groups) == 1:
            return self._forward(src[:, :groups[0]], tgt_in)
        order, outs = [], []
        for w in groups:
            rows = (width == w).nonzero().squeeze(1)                    # (b,)
            order.append(rows)
            outs.append(self._forward(src[rows, :w], tgt_in[rows]))     # (b, S, V)
        return torch.cat(outs)[torch.argsort(torch.cat(order))]         # (B, S, V) back in input order

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
    With model.length_buckets, users are grouped by Tiger.row_widths and each group is decoded at
    its own encoder width (exact; the encoder dominates decoding cost)."""
    k = beam if k is None else k
    if not 1 <= k <= beam:
        raise ValueError(f"need 1 <= k <= beam, got k={k}, beam={beam}")
    if ids.vocab_sizes != model.cfg.vocab_sizes:
        raise ValueError(f"semantic IDs have vocab sizes {ids.vocab_sizes} but the model {model.cfg.vocab_sizes}")
    ids = ids.to(model.device)
    src = model._check(src, "encoder input")
    width = model.row_widths(src) if model.length_buckets in (True, "auto") and len(src) > 1 else None
    if width is None:
        return _beam_search(model, src, ids, beam, k, constrain)
    groups = torch.unique(width).tolist()
    if len(groups) == 1:
        return _beam_search(model, src[:, :groups[0]], ids, beam, k, constrain)
    order, outs = [], []
    for w in groups:
        rows = (width == w).nonzero().squeeze(1)                       # (b,)
        order.append(rows)
        outs.append(_beam_search(model, src[rows, :w], ids, beam, k, constrain))
    inv = torch.argsort(torch.cat(order))                              # (B,) back to input order
    return tuple(torch.cat(parts)[inv] for parts in zip(*outs, strict=True))


def _beam_search(model: Tiger, src, ids: SemanticIDs, beam: int, k: int,
                 constrain: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_grad_eval(model):
        kvs, mem_mask = model.encode(src)
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
        kvs, mem_mask = model.encode(src)
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


# ----------------------------------------------------------------------------- Hugging Face interop
def t5_config_kwargs(cfg: TigerConfig) -> dict:
    """Keyword arguments of transformers.T5Config for the same architecture (no transformers import)."""
    return {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
            "num_layers": cfg.n_encoder_layers, "num_decoder_layers": cfg.n_decoder_layers,
            "num_heads": cfg.n_heads, "relative_attention_num_buckets": cfg.rel_buckets,
            "relative_attention_max_distance": cfg.rel_max_distance, "dropout_rate": cfg.dropout,
            "layer_norm_epsilon": cfg.eps, "feed_forward_proj": "relu", "tie_word_embeddings": True,
            "pad_token_id": PAD, "eos_token_id": EOS, "decoder_start_token_id": PAD}


def t5_state_dict(model: Tiger) -> dict:
    """Our weights under Hugging Face T5ForConditionalGeneration's parameter names."""
    inner = model.cfg.n_heads * model.cfg.d_kv
    sd = {"shared.weight": model.shared.weight, "encoder.embed_tokens.weight": model.shared.weight,
          "decoder.embed_tokens.weight": model.shared.weight, "lm_head.weight": model.shared.weight,
          "encoder.final_layer_norm.weight": model.encoder.norm.weight,
          "decoder.final_layer_norm.weight": model.decoder.norm.weight,
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": model.encoder.bias.emb.weight,
          "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": model.decoder.bias.emb.weight}
    for side, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i, layer in enumerate(stack.layers):
            p = f"{side}.block.{i}.layer"
            q, k, v = layer.attn.qkv.weight.split(inner)
            sd.update({f"{p}.0.SelfAttention.q.weight": q, f"{p}.0.SelfAttention.k.weight": k,
                       f"{p}.0.SelfAttention.v.weight": v, f"{p}.0.SelfAttention.o.weight": layer.attn.o.weight,
                       f"{p}.0.layer_norm.weight": layer.norm1.weight})
            f = 1
            if side == "decoder":
                ck, cv = layer.cross.kv.weight.split(inner)
                sd.update({f"{p}.1.EncDecAttention.q.weight": layer.cross.q.weight,
                           f"{p}.1.EncDecAttention.k.weight": ck, f"{p}.1.EncDecAttention.v.weight": cv,
                           f"{p}.1.EncDecAttention.o.weight": layer.cross.o.weight,
                           f"{p}.1.layer_norm.weight": layer.norm2.weight})
                f = 2
            norm_ff = layer.norm2 if side == "encoder" else layer.norm3
            sd.update({f"{p}.{f}.DenseReluDense.wi.weight": layer.ff.wi.weight,
                       f"{p}.{f}.DenseReluDense.wo.weight": layer.ff.wo.weight,
                       f"{p}.{f}.layer_norm.weight": norm_ff.weight})
    return {k: v.detach().clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------- checkpoints
def _atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same folder, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plain(obj):
    """JSON-able copy (numpy scalars, paths -> str) so checkpoints load with weights_only=True."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def checkpoint_dict(model: Tiger, ids: SemanticIDs, **extra) -> dict:
    """Weights + resolved config + the semantic IDs themselves (small: N x 4 int64), so a checkpoint
    decodes on its own."""
    return {"format": CHECKPOINT_FORMAT, "model_config": asdict(model.cfg),
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "sem_ids": torch.as_tensor(ids.codes_np), "vocab_sizes": list(ids.vocab_sizes),
            "sem_ids_sha1": ids.fingerprint, **extra}


def _saved_at(path: Path, key: str):
    """The `key` ('step') recorded in a checkpoint file, or None when there is none."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get(key)
    except (OSError, RuntimeError, EOFError):
        return None


def save_checkpoint(model: Tiger, ids: SemanticIDs, path, meta: dict | None = None, **extra) -> None:
    """Atomically write weights, config, semantic IDs and meta (git commit, data fingerprint, ...)."""
    _atomic_save(checkpoint_dict(model, ids, meta=_plain(meta or {}), **extra), Path(path))


def load_checkpoint(path, device="cpu") -> tuple[Tiger, SemanticIDs]:
    """Rebuild (model in eval mode, its semantic IDs) from a best.pt / last.pt / save_checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a TIGER checkpoint (format {ck.get('format') if isinstance(ck, dict) else '?'})")
    model = Tiger(TigerConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    ids = SemanticIDs(ck["sem_ids"].numpy(), ck["vocab_sizes"], device)
    return model.to(device).eval(), ids


# ----------------------------------------------------------------------------- training
def lr_factor(step: int, warmup: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up to 1 over
    `warmup` steps, then inverse-square-root decay sqrt(warmup / (step + 1)). The decay is scaled
    by the warm-up, so warmup must be >= 1 (0 would mean a zero learning rate)."""
    if warmup < 1:
        raise ValueError(f"warmup_steps must be >= 1 (the decay is sqrt(warmup / step)), got {warmup}")
    s = step + 1
    return s / warmup if s < warmup else math.sqrt(warmup / s)


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(device: torch.device, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _optimizer(model: Tiger, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on Linear weights only (not embeddings, norms, position biases)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _check_train_arrays(ids: SemanticIDs, hist, target) -> tuple[np.ndarray, np.ndarray]:
    hist, target = np.asarray(hist), np.asarray(target)
    if hist.ndim != 2 or target.ndim != 1 or len(hist) != len(target):
        raise ValueError(f"train_hist must be (N, L) and train_target (N,); got {hist.shape} and {target.shape}")
    if len(target) == 0:
        raise ValueError("no training examples (train_target is empty)")
    if not (np.issubdtype(hist.dtype, np.integer) and np.issubdtype(target.dtype, np.integer)):
        raise ValueError(f"train_hist / train_target must be integer item indices, got {hist.dtype} / {target.dtype}")
    if target.min() < 0 or target.max() >= ids.n_items or (hist.size and hist.max() >= ids.n_items):
        raise ValueError(f"training items must be in [0, {ids.n_items}) (the semantic IDs' catalog)")
    return hist.astype(np.int64, copy=False), target.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- torchrun (DDP)
def _rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group with > 1 process, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        return d.get_rank(), d.get_world_size()
    return 0, 1


class TrainLoss(nn.Module):
    """`model.loss(src, tgt)` as a forward, so DistributedDataParallel can wrap it (DDP arms its
    gradient hooks in forward). Its state_dict keys carry a "model." prefix: checkpoints save the
    Tiger itself, never this wrapper."""

    def __init__(self, model: Tiger):
        super().__init__()
        self.model = model

    def forward(self, src, tgt):
        return self.model.loss(src, tgt)


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, buckets: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the N training examples: consecutive runs of
    `batch_size` are the batches (the last one may be short). A seeded shuffle; with buckets > 1,
    each run of `buckets` batches of the shuffle is sorted by history length (`lengths` (N,), items
    kept) before it is cut into batches, and the full batches are then put in a random order.
    Histories of one batch then have similar lengths. Tiger.forward already runs every batch in
    groups of rows of similar width; grouping the batches themselves makes those groups few and
    large (on Scientific, CPU, 1 thread: ~1.3-1.7x training examples/s over a plain shuffle), while
    every batch still draws its users from the whole shuffle and the batch order stays random.
    The same (seed, epoch) always gives the same order (exact resume)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    if buckets <= 1:
        return perm
    span = batch_size * buckets
    order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                            for c in np.array_split(perm, range(span, len(perm), span))]) if len(perm) else perm
    n_full = len(order) // batch_size * batch_size
    batches = order[:n_full].reshape(-1, batch_size)                       # (n_full / bs, bs)
    return np.concatenate([batches[rng.permutation(len(batches))].ravel(), order[n_full:]])


def global_batch_loss(model: Tiger, ids: SemanticIDs, hist: torch.Tensor, target: torch.Tensor,
                      ddp: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one GLOBAL training batch: hist (B, L) item indices, target (B,) items.
    Returns (the loss to backward, the global mean loss: detached, identical on every rank).

    One process (ddp None): model.loss on the whole batch. Under torchrun, ddp =
    DistributedDataParallel(TrainLoss(model)) and this rank takes its share
    hist.tensor_split(world)[rank] (shares differ by at most one row). DDP averages the gradients
    over the ranks, so the rank's mean loss is weighted by n_rank * world / B before backward: the
    average is then exactly the gradient of the mean loss over the B global rows. A rank whose share
    is empty (B < world) runs row 0 at weight 0, since DDP needs every rank in every backward."""
    if ddp is None:
        loss = model.loss(tokenize_histories(hist, ids, model.cfg.max_items), ids.tokens[target])
        return loss, loss.detach()
    rank, world = _rank_world()
    B = len(target)
    share = torch.arange(B, device=target.device).tensor_split(world)[rank]   # (n,) this rank's rows
    n = len(share)
    rows = share if n else share.new_zeros(1)                                  # (max(n, 1),)
    local = ddp(tokenize_histories(hist[rows], ids, model.cfg.max_items), ids.tokens[target[rows]])
    glob = local.detach().float() * (n / B)                                    # this rank's part of the mean
    torch.distributed.all_reduce(glob)
    return local * (n * world / B), glob


def _gather_rng(dev: torch.device) -> list:
    """Every rank's RNG state (dropout draws differ per rank), in rank order; a collective."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, _rng_state(dev))
    return out


def fit(model: Tiger, ids: SemanticIDs, train_hist, train_target, eval_fn: Callable[[Tiger], dict], out_dir,
        cfg: TrainConfig | None = None, resume: bool = False, meta: dict | None = None) -> dict:
    """Train with AdamW on teacher-forced cross-entropy, validating every cfg.eval_every steps.

    train_hist (N, L) int64 item indices (-1 = padding, either alignment) and train_target (N,)
    are every training prefix -> its next item; each step tokenises a batch of them on the
    device. Epoch e visits the examples in epoch_order(.., seed, e, cfg.group_by_length): a seeded
    shuffle, batched by similar history length unless group_by_length is 0. eval_fn(model)
    -> dict with at least cfg.metric (called in eval mode; e.g. beam search on the validation
    cases). Validation runs every eval_every steps and once more at the last step when training
    ends at max_steps / max_epochs. Writes to out_dir, atomically: best.pt (best validation so far),
    last.pt (at every validation: model, optimizer, scaler, RNG, step, position in the epoch order,
    best-so-far, patience count, history, configs, meta) and history.json. Stops after cfg.patience
    validations without a strictly better metric, or at the first validation after cfg.max_minutes
    of wall time in this call (summary["time_capped"]). resume=True continues from last.pt exactly
    (CPU, same seed; max_steps / max_epochs may be raised, max_minutes may change). The best weights are
    loaded back at the end. Returns {best_step, best_epoch, steps_run, epochs_run, best_valid,
    stopped_early, wall_time_s (summed over resumed runs), examples_per_s}. A non-finite training
    loss raises FloatingPointError before that step's update (with fp16 the GradScaler skips such
    steps itself; a non-finite segment still raises at the next validation), so last.pt keeps
    the last validated, good, state.

    Under torchrun (torch.distributed initialised, world > 1) the model trains wrapped in
    DistributedDataParallel; cfg.batch_size stays the GLOBAL batch: every rank draws the same epoch
    order and takes its share of each global batch (see global_batch_loss: the loss and gradients
    are those of the global batch). Rank 0 alone validates, prints and writes best.pt / last.pt /
    history.json, then broadcasts the training state (best, patience count, stop decision,
    history), so all ranks stop together and return the same summary; the others wait for it.
    Rank r seeds its dropout with cfg.seed + r; last.pt keeps every rank's RNG state, and every
    rank loads last.pt on resume."""
    cfg = cfg or TrainConfig()
    if cfg.amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"TrainConfig.amp={cfg.amp!r}: use 'off', 'bf16' or 'fp16'.")
    dev = model.device
    if cfg.amp == "fp16" and dev.type != "cuda":
        raise ValueError("TrainConfig.amp='fp16' needs a CUDA device; use 'bf16' or 'off' on CPU.")
    if (cfg.batch_size < 1 or cfg.patience < 1 or cfg.eval_every < 1 or cfg.max_steps < 0
            or (cfg.max_epochs is not None and cfg.max_epochs < 0)):
        raise ValueError(f"bad TrainConfig: batch_size {cfg.batch_size}, patience {cfg.patience}, eval_every "
                         f"{cfg.eval_every}, max_steps {cfg.max_steps}, max_epochs {cfg.max_epochs}")
    if ids.vocab_sizes != model.cfg.vocab_sizes:
        raise ValueError(f"semantic IDs have vocab sizes {ids.vocab_sizes} but the model {model.cfg.vocab_sizes}")
    ids = ids.to(dev)
    hist_np, target_np = _check_train_arrays(ids, train_hist, train_target)
    lengths = np.minimum((hist_np >= 0).sum(1), model.cfg.max_items)      # (N,) history items kept
    H = torch.as_tensor(hist_np, device=dev)                               # (N, L)
    Tg = torch.as_tensor(target_np, device=dev)                            # (N,)
    N, bs = len(Tg), cfg.batch_size
    n_batches = math.ceil(N / bs)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    opt = _optimizer(model, cfg)
    rank, world = _rank_world()                                            # (0, 1) without torchrun
    main = rank == 0

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, hist_path = out / "last.pt", out / "best.pt", out / "history.json"
    st = {"step": 0, "epochs_done": 0, "batch": 0, "best": -math.inf, "best_step": 0, "best_valid": None,
          "bad": 0, "history": [], "stopped": False, "wall": 0.0, "train_s": 0.0, "examples": 0}
    if resume and last_path.is_file():
        ck = torch.load(last_path, map_location="cpu", weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("model_config") != asdict(model.cfg):
            raise ValueError(f"{last_path} holds a model with another TigerConfig ({ck.get('model_config')}); "
                             "resume with the same model settings or use a fresh output folder.")
        old = ck["train_config"]
        free = ("max_steps", "max_epochs", "max_minutes", "compile")
        diff = {k: (old.get(k), v) for k, v in asdict(cfg).items() if k not in free and old.get(k) != v}
        if diff:
            raise ValueError(f"{last_path} was written with another TrainConfig "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); resume with the "
                             "same settings (only max_steps, max_epochs, max_minutes and compile may change) or use "
                             "a fresh folder.")
        if ck.get("sem_ids_sha1") != ids.fingerprint:
            raise ValueError(f"{last_path} was trained on other semantic IDs (SHA-1 mismatch); use a fresh folder.")
        if ck["state"].get("n_examples") not in (None, N):
            raise ValueError(f"{last_path} was trained on {ck['state']['n_examples']} examples, now {N}: "
                             "the data changed; use a fresh folder.")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        st = ck["state"]
        rngs = ck.get("rng_ranks")
        if rngs and len(rngs) == world:
            _set_rng_state(dev, rngs[rank])
        elif rank == 0:
            _set_rng_state(dev, ck["rng"])
        else:  # another world size than the run that wrote last.pt: fresh dropout draws for this rank
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank, st["step"]]).generate_state(1)[0]))
        if main:
            print(f"resumed from {last_path} at step {st['step']} (best {cfg.metric} {st['best']:.4f} at step "
                  f"{st['best_step']}, {st['bad']} validations without improvement)")
            if st["best_step"] == st["step"] and _saved_at(best_path, "step") != st["step"]:
                # killed between last.pt and best.pt: the weights just loaded ARE the best step's
                save_checkpoint(model, ids, best_path, meta=meta, step=st["step"], valid=st["best_valid"],
                                train_config=asdict(cfg))
    else:
        if resume and main:
            print(f"no {last_path} to resume from: starting fresh")
        torch.manual_seed(cfg.seed + rank)                                 # rank r: its own dropout draws
    st["n_examples"] = N
    if cfg.compile:
        model.compile_core()
    ddp = None
    if world > 1:  # DDP broadcasts rank 0's weights once here, then averages gradients in backward
        ddp = torch.nn.parallel.DistributedDataParallel(
            TrainLoss(model), device_ids=[dev.index if dev.index is not None else torch.cuda.current_device()]
            if dev.type == "cuda" else None)

    def cap_steps() -> int:
        cap = cfg.max_steps
        if cfg.max_epochs is not None:
            cap = min(cap, cfg.max_epochs * n_batches)
        return cap

    t_start = time.perf_counter()
    wall0 = st["wall"]
    perm, perm_epoch, time_up, capped = None, None, False, False
    loss_sum, loss_n, ex_seen, t_seg = torch.zeros((), device=dev), 0, 0, time.perf_counter()
    bar = tqdm(total=cap_steps(), initial=min(st["step"], cap_steps()), desc="tiger", unit="step", leave=False,
               disable=not main)
    while not st["stopped"] and st["step"] < cap_steps():
        model.train()
        epoch = st["epochs_done"] + 1
        if perm_epoch != epoch:
            perm = torch.as_tensor(epoch_order(lengths, bs, cfg.seed, epoch, cfg.group_by_length), device=dev)  # (N,)
            perm_epoch = epoch
        b = st["batch"]
        idx = perm[b * bs:(b + 1) * bs]                                    # (b,) the global batch
        lr = cfg.lr * lr_factor(st["step"], cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast():  # tokenises (b, L) -> (b, 4L'+1) and (b,) -> (b, 4), or this rank's share
            loss, step_loss = global_batch_loss(model, ids, H[idx], Tg[idx], ddp)
        if scaler is None and not bool(torch.isfinite(step_loss)):  # the same verdict on every rank
            raise FloatingPointError(
                f"training loss became {float(step_loss)} at step {st['step'] + 1}; stopped before the update. "
                f"{last_path} still holds the last validated step (a good one): lower the learning rate or "
                "use --amp off, then --resume.")
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        loss_sum += step_loss.float() * len(idx)
        loss_n += len(idx)
        ex_seen += len(idx)
        st["examples"] += len(idx)
        st["step"] += 1
        st["batch"] += 1
        if st["batch"] == n_batches:
            st["batch"], st["epochs_done"] = 0, st["epochs_done"] + 1
        bar.update(1)
        if st["step"] % 10 == 0:
            bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{lr:.1e}")
        if st["step"] % cfg.eval_every and st["step"] < cap_steps():
            continue
        # ---- validation
        train_loss = float(loss_sum) / max(loss_n, 1)
        if not math.isfinite(train_loss):  # stop before anything of this segment is written
            raise FloatingPointError(
                f"training loss became {train_loss} before step {st['step']}; stopped. {last_path} still holds "
                f"the last validated step (a good one): lower the learning rate or use --amp off, then --resume.")
        train_s = time.perf_counter() - t_seg
        st["train_s"] += train_s
        rngs = _gather_rng(dev) if world > 1 else None                     # collective, before rank 0 writes
        if main:  # validate, count patience, write best.pt / last.pt / history.json
            t0 = time.perf_counter()
            model.eval()
            with torch.no_grad():
                res = dict(eval_fn(model) or {})
            if cfg.metric not in res:
                raise ValueError(f"eval_fn returned {sorted(res)} without {cfg.metric!r}, the early-stopping metric")
            value = float(res[cfg.metric])
            improved = not math.isnan(value) and value > st["best"]
            rec = {"step": st["step"], "epoch": round(st["step"] / n_batches, 3), "loss": train_loss,
                   "lr": lr, "valid": _plain(res), "train_s": round(train_s, 3),
                   "eval_s": round(time.perf_counter() - t0, 3), "examples_per_s": round(ex_seen / max(train_s, 1e-9), 1),
                   "improved": improved}
            st["history"].append(rec)
            if improved:
                st.update(best=value, best_step=st["step"], best_valid=_plain(res), bad=0)
            else:
                st["bad"] += 1
            st["stopped"] = st["bad"] >= cfg.patience
            st["wall"] = wall0 + time.perf_counter() - t_start
            metrics = " ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, (int, float)) and k != "n")
            tqdm.write(f"step {st['step']} (epoch {rec['epoch']:.2f}) | loss {rec['loss']:.4f} | lr {lr:.2e} | "
                       f"valid {metrics} | {rec['examples_per_s']:.0f} ex/s, eval {rec['eval_s']:.1f}s"
                       + (" | best" if improved else f" | {st['bad']}/{cfg.patience} without improvement"))
            ck = checkpoint_dict(model, ids, optimizer=opt.state_dict(), scaler=scaler.state_dict() if scaler else None,
                                 rng=_rng_state(dev), state=st, train_config=asdict(cfg), meta=_plain(meta or {}),
                                 **({"rng_ranks": rngs} if rngs else {}))
            _atomic_save(ck, last_path)  # first last.pt, then best.pt: a kill between them is repaired on resume
            if improved:
                save_checkpoint(model, ids, best_path, meta=meta, step=st["step"], valid=_plain(res),
                                train_config=asdict(cfg))
            _atomic_write_text(hist_path, json.dumps(st["history"], indent=2))
            time_up = cfg.max_minutes is not None and time.perf_counter() - t_start >= 60 * cfg.max_minutes
        if world > 1:  # rank 0's verdict (best, patience, stop, time) for all; the others wait here for it
            box = [st, time_up]
            torch.distributed.broadcast_object_list(box, src=0)
            st, time_up = box
        if time_up and not st["stopped"] and st["step"] < cap_steps():
            if main:
                print(f"time cap: stopping after the validation at step {st['step']} "
                      f"({cfg.max_minutes:g} min in this call; --resume continues)")
            capped = True
            break
        loss_sum, loss_n, ex_seen, t_seg = torch.zeros((), device=dev), 0, 0, time.perf_counter()
    bar.close()

    if st["stopped"] and main:
        print(f"early stop: no better valid {cfg.metric} for {cfg.patience} validations "
              f"(best {st['best']:.4f} at step {st['best_step']})")
    if best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    model.eval()
    return {"best_step": st["best_step"], "best_epoch": round(st["best_step"] / n_batches, 3),
            "steps_run": st["step"], "epochs_run": round(st["step"] / n_batches, 3), "best_valid": st["best_valid"],
            "stopped_early": st["stopped"], "wall_time_s": round(wall0 + time.perf_counter() - t_start, 3),
            "examples_per_s": round(st["examples"] / max(st["train_s"], 1e-9), 1), "max_steps": cfg.max_steps,
            "max_epochs": cfg.max_epochs, "max_minutes": cfg.max_minutes, "time_capped": capped}

