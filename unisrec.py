"""UniSRec and SASRec: the first downstream test of EncodeRec (arXiv 2601.10837, Sec. 4, Table 2).

EncodeRec swaps the frozen item text embeddings inside UniSRec (Hou et al., "Towards Universal
Sequence Representation Learning for Recommender Systems", KDD 2022; official code
RUCAIBox/UniSRec on RecBole). This file re-implements, with the definitions of that code:

* Parametric whitening (UniSRec Sec. 2.2.1, Eq. 1): PW(x) = W (dropout(x) - b).
* The MoE adaptor (Sec. 2.2.2, Eq. 2-3): 8 PW experts d_plm -> 300, a softmax gate over x W_gate
  with Gaussian gate noise (std softplus(x W_noise) + 1e-2) in training only; W_gate and W_noise
  start at zero, so the gates start uniform (1/8 each).
* The SASRec encoder (Kang & McAuley 2018, RecBole's TransformerEncoder): learned position
  embeddings, post-LayerNorm blocks, GELU, causal + padding attention mask. The hidden state at the
  last real position is the sequence representation.
* Scoring and loss (UniSRec Sec. 2.3, Eq. 4 and the fine-tuning stage): cosine(sequence,
  adaptor(item text)) / tau with tau = 0.07, cross-entropy over ALL items.
* Modes: 'inductive' (text only; EncodeRec's setting and the default), 'transductive' (the adapted
  text embedding plus a learnable item-ID embedding, UniSRec's transductive fine-tuning), and
  'id' (classic SASRec: item-ID embeddings only, dot-product scores, full cross-entropy) = the
  no-text baseline.

EncodeRec has no UniSRec pre-training stage: the model is trained from scratch on the target
domain with the item text embeddings frozen (a buffer, never a parameter), so nothing is frozen
inside the transformer (UniSRec's `fix_enc` only applies when a pre-trained encoder is loaded).

Layout of histories (one convention, documented once)
-----------------------------------------------------
Inputs are (B, L) int64 item indices = 0-based catalog rows, any negative value = padding (data.py
pads with -1). Either alignment is accepted: `Dataset.histories(..., align='right')` (the default,
most recent item in the last column) and align='left' give identical results. Internally every
row is packed LEFT-aligned, RecBole's layout: column 0 = the oldest item of the window (position
id 0), the last real item in column len-1, padding after it. Histories longer than
`max_seq_len` keep their most recent `max_seq_len` items. Because the mask is causal, the padding
columns after the last real item can never influence it, so the amount of padding (L) does not
change any score; each batch is trimmed to its longest real history. Every query attends at
least to itself (a padding query also to the real items before it), so a fully padded row yields
a finite (if uninformative) representation, never NaN. Two exact savings follow from this layout: the final transformer layer is evaluated only at
the last real position (the only row the model reads), and each row runs at the smallest
power-of-two width >= its length (`model.length_buckets`, on by default; Amazon histories
average ~8 of 50 slots, so ~4x fewer tokens). Neither changes a score or a gradient beyond float
rounding; only which dropout masks are drawn differs.

    model = UniSRec(UniSRecConfig(), item_emb)              # item_emb (I, d_plm) float32 numpy
    loss = model.loss(hist, target)                         # hist (B, L) int64, target (B,)
    scores = score(model, hist)                             # (B, I) for full-ranking evaluation
    summary = fit(model, train_hist, train_target, eval_fn, "runs/x", TrainConfig())

Imports: the standard library, torch, numpy and tqdm only (the caller brings data and metrics).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

MODES = ("inductive", "transductive", "id")
CHECKPOINT_FORMAT = "encoderec-unisrec/1"


# ----------------------------------------------------------------------------- configs
@dataclass
class UniSRecConfig:
    """Model settings. Defaults = UniSRec's released props (RUCAIBox/UniSRec props/UniSRec.yaml,
    finetune.yaml, RecBole SASRec) unless noted."""
    mode: str = "inductive"        # EncodeRec's setting: text only ('transductive' | 'id' also)
    n_items: int | None = None     # catalog size; inferred from the item-embedding table
    plm_size: int | None = None    # text embedding width; inferred (MiniLM: 384; UniSRec's BERT: 768)
    hidden_size: int = 300         # UniSRec: hidden_size 300 (= adaptor output, adaptor_layers [d, 300])
    n_layers: int = 2              # UniSRec: n_layers 2
    n_heads: int = 2               # UniSRec: n_heads 2
    inner_size: int = 256          # UniSRec: inner_size 256 (feed-forward)
    hidden_dropout: float = 0.5    # UniSRec: hidden_dropout_prob 0.5
    attn_dropout: float = 0.5      # UniSRec: attn_dropout_prob 0.5
    layer_norm_eps: float = 1e-12  # RecBole SASRec: layer_norm_eps 1e-12
    initializer_range: float = 0.02  # RecBole SASRec: N(0, 0.02) for Linear / Embedding weights
    max_seq_len: int = 50          # UniSRec: MAX_ITEM_LIST_LENGTH 50
    n_exps: int = 8                # UniSRec: n_exps 8
    adaptor_dropout: float = 0.2   # UniSRec: adaptor_dropout_prob 0.2
    temperature: float = 0.07      # UniSRec: temperature 0.07 (cosine / tau)
    gate_noise: bool = True        # UniSRec MoEAdaptorLayer(noise=True): noisy gating in training
    noise_eps: float = 1e-2        # UniSRec: noise_epsilon 1e-2

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"UniSRecConfig.mode={self.mode!r}: choose from {', '.join(MODES)}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        for name in ("hidden_size", "n_layers", "n_heads", "inner_size", "max_seq_len", "n_exps"):
            if getattr(self, name) < 1:
                raise ValueError(f"UniSRecConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """Training loop settings. Defaults = UniSRec's fine-tuning props (RecBole trainer) unless noted."""
    lr: float = 1e-3               # UniSRec finetune: learning_rate 0.001, Adam, no weight decay
    batch_size: int = 2048         # UniSRec finetune: train_batch_size 2048
    max_epochs: int | None = None  # None = until early stopping (UniSRec: epochs 300 as a cap)
    max_minutes: float | None = None  # stop after the first epoch that ends past this wall time (this call)
    patience: int = 10             # stop after 10 epochs without a better valid NDCG@10 (RecBole's
                                   # stopping_step 10 stops one epoch later, after the 11th)
    metric: str = "ndcg@10"        # UniSRec: valid_metric NDCG@10 (evaluated every epoch)
    amp: str = "off"               # "off" | "bf16" | "fp16" (autocast; fp16 needs CUDA, uses a GradScaler)
    compile: bool = False          # torch.compile the transformer and adaptor (UniSRec.compile_core)
    seed: int = 0                  # dropout / gate noise RNG and the per-epoch shuffles


# ----------------------------------------------------------------------------- adaptor
class PWLayer(nn.Module):
    """Parametric whitening PW(x) = W (dropout(x) - b) (UniSRec Eq. 1): b starts at 0, W ~ N(0, 0.02)."""

    def __init__(self, d_in: int, d_out: int, dropout: float, init_std: float = 0.02):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(d_in))
        self.lin = nn.Linear(d_in, d_out, bias=False)
        nn.init.normal_(self.lin.weight, 0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.dropout(x) - self.bias)


class MoEAdaptor(nn.Module):
    """Mixture of PW experts with a (noisy) softmax gate (UniSRec Eq. 2-3)."""

    def __init__(self, d_in: int, d_out: int, n_exps: int = 8, dropout: float = 0.2, noise: bool = True,
                 noise_eps: float = 1e-2, init_std: float = 0.02):
        super().__init__()
        self.experts = nn.ModuleList(PWLayer(d_in, d_out, dropout, init_std) for _ in range(n_exps))
        self.w_gate = nn.Parameter(torch.zeros(d_in, n_exps))   # zero: the gates start uniform
        self.w_noise = nn.Parameter(torch.zeros(d_in, n_exps))  # zero: noise std starts softplus(0)+eps
        self.noise, self.noise_eps = noise, noise_eps

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., E) softmax gate weights; Gaussian noise on the logits in training."""
        logits = x @ self.w_gate
        if self.training and self.noise:
            std = F.softplus(x @ self.w_noise) + self.noise_eps
            logits = logits + torch.randn_like(logits) * std
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(x)                                              # (N, E)
        out = g[..., :1] * self.experts[0](x)                          # (N, 1) * (N, D) -> (N, D)
        for e in range(1, len(self.experts)):
            out = out + g[..., e:e + 1] * self.experts[e](x)
        return out


# ----------------------------------------------------------------------------- transformer
def attention_mask(valid: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = may attend) for queries at positions qpos (B, Tq) over W keys.

    Key k is visible to the query at q when k <= q (causal) and k is a real item; a query also
    always sees itself, so a padding query (or a fully padded row) never has an empty softmax.
    valid (B, W) bool -> (B, 1, Tq, W)."""
    kpos = torch.arange(valid.shape[1], device=valid.device)          # (W,)
    q = qpos.unsqueeze(-1)                                            # (B, Tq, 1)
    allowed = (kpos <= q) & (valid.unsqueeze(1) | (kpos == q))         # (B, Tq, W)
    return allowed.unsqueeze(1)                                        # (B, Tq, W) -> (B, 1, Tq, W)


class Block(nn.Module):
    """One post-LayerNorm transformer layer (RecBole TransformerLayer): multi-head self-attention
    -> dropout -> LN(x + .), then Linear -> GELU -> Linear -> dropout -> LN(x + .)."""

    def __init__(self, cfg: UniSRecConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads, self.attn_p = cfg.n_heads, cfg.attn_dropout
        self.qkv = nn.Linear(D, 3 * D)   # query, key, value projections (RecBole: three Linears)
        self.proj = nn.Linear(D, D)
        self.drop1 = nn.Dropout(cfg.hidden_dropout)
        self.ln1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.ff1 = nn.Linear(D, cfg.inner_size)
        self.ff2 = nn.Linear(cfg.inner_size, D)
        self.drop2 = nn.Dropout(cfg.hidden_dropout)
        self.ln2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, W, D), valid (B, W). With `last` (B,), only the query row at that position is
        computed (keys/values still cover every position): returns (B, 1, D), else (B, W, D)."""
        B, W, D = x.shape
        H = self.n_heads
        kv = F.linear(x, self.qkv.weight[D:], self.qkv.bias[D:])      # (B, W, 2D)
        k, v = kv.split(D, dim=-1)
        if last is None:
            qpos = torch.arange(W, device=x.device).expand(B, W)       # (B, W)
        else:
            qpos = last.unsqueeze(1)                                   # (B,) -> (B, 1)
            x = x.gather(1, qpos.unsqueeze(-1).expand(B, 1, D))        # (B, W, D) -> (B, 1, D)
        q = F.linear(x, self.qkv.weight[:D], self.qkv.bias[:D])       # (B, Tq, D)

        def heads(t):
            return t.reshape(B, -1, H, D // H).transpose(1, 2)         # (B, T, D) -> (B, H, T, D/H)

        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attention_mask(valid, qpos),
                                           dropout_p=self.attn_p if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, -1, D)                        # (B, H, Tq, D/H) -> (B, Tq, D)
        x = self.ln1(x + self.drop1(self.proj(a)))
        return self.ln2(x + self.drop2(self.ff2(F.gelu(self.ff1(x)))))


# ----------------------------------------------------------------------------- the model
def _table_fingerprint(table: torch.Tensor) -> str:
    return hashlib.sha1(table.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class UniSRec(nn.Module):
    """UniSRec (modes 'inductive', 'transductive') or SASRec with item IDs (mode 'id').

    item_emb: (I, d_plm) float32 frozen item text embeddings (row i = catalog item i); required
    for the text modes, ignored for 'id' (which needs cfg.n_items instead)."""

    def __init__(self, cfg: UniSRecConfig | None = None, item_emb=None):
        super().__init__()
        cfg = replace(cfg or UniSRecConfig())
        cfg.validate()
        text = cfg.mode != "id"
        if text:
            if item_emb is None:
                raise ValueError(f"mode {cfg.mode!r} needs the item-embedding table (I, d_plm); "
                                 "pass item_emb (e.g. np.load('item_emb.npy')) or use mode 'id'.")
            table = torch.as_tensor(np.asarray(item_emb, dtype=np.float32))
            if table.dim() != 2 or table.shape[0] < 1 or table.shape[1] < 1:
                raise ValueError(f"item_emb must be a 2-D (n_items, d_plm) array, got shape {tuple(table.shape)}")
            if not torch.isfinite(table).all():
                raise ValueError("item_emb contains NaN or inf values; re-run the embedding stage.")
            for name, got in (("n_items", table.shape[0]), ("plm_size", table.shape[1])):
                want = getattr(cfg, name)
                if want is not None and want != got:
                    what = "rows" if name == "n_items" else "columns"
                    raise ValueError(f"item_emb has {got} {what} but UniSRecConfig.{name}={want}: the table "
                                     f"must hold one row per catalog item of the dataset (row i = item i).")
            cfg = replace(cfg, n_items=table.shape[0], plm_size=table.shape[1])
            self.register_buffer("plm_emb", table.clone(), persistent=False)  # frozen, not a parameter
        elif cfg.n_items is None or cfg.n_items < 1:
            raise ValueError("mode 'id' needs UniSRecConfig.n_items (the catalog size).")
        self.cfg = cfg
        D = cfg.hidden_size
        if text:
            self.adaptor = MoEAdaptor(cfg.plm_size, D, cfg.n_exps, cfg.adaptor_dropout, cfg.gate_noise,
                                      cfg.noise_eps, cfg.initializer_range)
        if cfg.mode in ("transductive", "id"):
            self.item_id_emb = nn.Embedding(cfg.n_items + 1, D, padding_idx=0)  # row 0 = padding, item i -> i+1
        self.pos_emb = nn.Embedding(cfg.max_seq_len, D)
        self.ln = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.length_buckets = True  # compute only: run each row at a power-of-two width >= its length
        self._init_weights()

    def _init_weights(self):
        """RecBole SASRec init: Linear/Embedding weights N(0, 0.02), biases 0, LayerNorm (1, 0);
        PW experts keep their own N(0, 0.02) with b = 0, the gates stay zero, the padding row is 0."""
        std = self.cfg.initializer_range
        for name, m in self.named_modules():
            if name.startswith("adaptor"):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if hasattr(self, "item_id_emb"):
            with torch.no_grad():
                self.item_id_emb.weight[0].zero_()

    @property
    def device(self) -> torch.device:
        return self.pos_emb.weight.device

    @property
    def table_fingerprint(self) -> str | None:
        return _table_fingerprint(self.plm_emb) if self.cfg.mode != "id" else None

    # -- inputs
    def prepare(self, hist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Any-aligned (B, L) history with negative padding -> left-packed (B, W) items (-1 = pad),
        valid mask (B, W) and lengths (B,), W = min(longest real history, max_seq_len) (>= 1)."""
        h = torch.as_tensor(hist, device=self.device)
        if h.dim() != 2:
            raise ValueError(f"histories must be (B, L) item indices, got shape {tuple(h.shape)}")
        if h.dtype.is_floating_point or h.dtype == torch.bool:
            raise ValueError(f"histories must be integer item indices, got {h.dtype}")
        h = h.long()
        B, L = h.shape
        if h.numel() and int(h.max()) >= self.cfg.n_items:
            raise ValueError(f"history holds item index {int(h.max())} but the model has {self.cfg.n_items} "
                             "items (0-based rows); was the embedding table built for another dataset?")
        valid = h >= 0                                                     # (B, L)
        n = valid.sum(dim=1)                                               # (B,)
        M = self.cfg.max_seq_len
        W = max(1, min(int(n.max()) if B and L else 1, M))
        if L == 0:
            h, valid, L = h.new_full((B, 1), -1), valid.new_zeros((B, 1)), 1
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # real items first, order kept
        packed = h.gather(1, order)                                        # (B, L), left-packed
        start = (n - M).clamp(min=0)                                       # (B,) drop items older than the window
        cols = (start.unsqueeze(1) + torch.arange(W, device=h.device)).clamp(max=L - 1)  # (B, W)
        lengths = n.clamp(max=M)                                           # (B,)
        mask = torch.arange(W, device=h.device) < lengths.unsqueeze(1)     # (B, W)
        items = torch.where(mask, packed.gather(1, cols), -1)              # (B, W)
        return items, mask, lengths

    def embed_items(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Item part of the input: adaptor(text) (+ ID embedding) or the ID embedding.
        items (B, W), -1 = pad -> (B, W, D); padding positions get 0 (they are never attended)."""
        B, W = items.shape
        D = self.cfg.hidden_size
        if self.cfg.mode == "id":
            return self.item_id_emb(items + 1)                             # (B, W) -> (B, W, D), pad -> row 0 = 0
        x = self.adaptor(self.plm_emb[items[valid]])                       # (n_real, d_plm) -> (n_real, D)
        out = x.new_zeros(B, W, D).masked_scatter(valid.unsqueeze(-1), x)  # (n_real, D) -> (B, W, D)
        if self.cfg.mode == "transductive":
            out = out + self.item_id_emb(items + 1)
        return out

    def item_table(self) -> torch.Tensor:
        """Representations of every catalog item used for scoring: (I, D)."""
        if self.cfg.mode == "id":
            return self.item_id_emb.weight[1:]                             # (I+1, D) -> (I, D), drop padding
        t = self.adaptor(self.plm_emb)                                     # (I, d_plm) -> (I, D)
        if self.cfg.mode == "transductive":
            t = t + self.item_id_emb.weight[1:]
        return t

    # -- the encoder
    def _run(self, items: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor, all_positions: bool):
        """Embedding -> LN -> dropout -> transformer on left-packed (B, W) items."""
        W = items.shape[1]
        x = self.embed_items(items, valid) + self.pos_emb.weight[:W]      # (B, W, D) + (W, D)
        last = (lengths - 1).clamp(min=0)                                  # (B,) column of the last real item
        return self._transform(x, valid, None if all_positions else last)

    def _transform(self, x: torch.Tensor, valid: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
        """LN -> dropout -> blocks; the final block only at `last` when given. Shape-static, so
        this (and the adaptor) is what compile_core() hands to torch.compile."""
        x = self.drop(self.ln(x))
        for i, blk in enumerate(self.blocks):
            x = blk(x, valid, last if i == len(self.blocks) - 1 else None)
        return x if last is None else x.squeeze(1)                         # (B, W, D) | (B, 1, D) -> (B, D)

    def compile_core(self, **kwargs) -> "UniSRec":
        """torch.compile the data-independent parts (transformer, MoE adaptor) with dynamic shapes;
        input packing and length bucketing stay eager. State-dict keys do not change."""
        if getattr(self, "_compiled", False):
            return self
        self._compiled = True
        kwargs.setdefault("dynamic", True)
        self._transform = torch.compile(self._transform, **kwargs)
        if hasattr(self, "adaptor"):
            self.adaptor.forward = torch.compile(self.adaptor.forward, **kwargs)
        return self

    def _encode(self, hist, all_positions: bool):
        items, valid, lengths = self.prepare(hist)
        if all_positions:
            return self._run(items, valid, lengths, True), lengths         # (B, W, D), (B,)
        W = items.shape[1]
        if not self.length_buckets or W <= 8:
            return self._run(items, valid, lengths, False)                 # (B, D)
        # Rows only depend on their first `length` columns (left-packed, causal), so each row is run
        # at the smallest power-of-two width >= its length: ~4x fewer tokens on Amazon data.
        width = (2 ** torch.ceil(torch.log2(lengths.clamp(min=1).double()))).long().clamp(max=W)  # (B,)
        order, outs = [], []
        for w in torch.unique(width).tolist():
            rows = (width == w).nonzero().squeeze(1)                       # (b,)
            order.append(rows)
            outs.append(self._run(items[rows, :w], valid[rows, :w], lengths[rows], False))  # (b, D)
        order = torch.cat(order)                                           # (B,) row of each output
        return torch.cat(outs)[torch.argsort(order)]                       # (B, D) back in input order

    def hidden_states(self, hist) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-layer states at every (left-packed) position (B, W, D) and the lengths (B,)."""
        return self._encode(hist, all_positions=True)

    def encode(self, hist) -> torch.Tensor:
        """Sequence representation = final state at the last real position: (B, L) -> (B, D)."""
        return self._encode(hist, all_positions=False)

    def logits(self, seq: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, D) x (I, D) -> (B, I) float32: cosine / tau (text modes) or dot product ('id').
        Computed in float32 also under autocast: at 1 / tau = 14.3, bf16 rounding of the cosines
        moves logits by up to ~0.08 across the whole catalog."""
        with torch.autocast(seq.device.type, enabled=False):
            seq, table = seq.float(), table.float()
            if self.cfg.mode == "id":
                return seq @ table.T
            return F.normalize(seq, dim=-1) @ F.normalize(table, dim=-1).T / self.cfg.temperature

    def forward(self, hist) -> torch.Tensor:
        """Scores over all items (B, I)."""
        return self.logits(self.encode(hist), self.item_table())

    def loss(self, hist, target) -> torch.Tensor:
        """Cross-entropy of the next item over the full catalog (UniSRec / RecBole 'CE' loss)."""
        target = torch.as_tensor(target, device=self.device).long()
        return F.cross_entropy(self(hist), target)


def SASRecID(n_items: int, cfg: UniSRecConfig | None = None) -> UniSRec:
    """Classic SASRec on item IDs (the no-text baseline): the same encoder, mode 'id'."""
    return UniSRec(replace(cfg or UniSRecConfig(), mode="id", n_items=n_items, plm_size=None))


# ----------------------------------------------------------------------------- scoring
def score(model: UniSRec, hist, items: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (B, I) float32 on the model's device for histories (B, L), in inference mode.
    `items` = a precomputed model.item_table() (see score_fn) saves recomputing it per chunk."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            table = model.item_table() if items is None else items
            return model.logits(model.encode(hist), table)
    finally:
        model.train(was)


def score_fn(model: UniSRec, histories: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:
    """A `score_fn(indices) -> (len(indices), I)` over rows of `histories` (C, L) for chunked
    full-ranking evaluation (eval.full_ranking_ranks); the item table is computed once."""
    was = model.training
    model.eval()
    with torch.inference_mode():
        table = model.item_table()
    model.train(was)
    return lambda idx: score(model, histories[idx], table)


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


def _state_dict(model: UniSRec) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_dict(model: UniSRec, **extra) -> dict:
    return {"format": CHECKPOINT_FORMAT, "model_config": asdict(model.cfg), "model": _state_dict(model),
            "item_emb_sha1": model.table_fingerprint, **extra}


def _saved_at(path: Path, key: str):
    """The `key` ('epoch') recorded in a checkpoint file, or None when there is none."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get(key)
    except (OSError, RuntimeError, EOFError):
        return None


def save_checkpoint(model: UniSRec, path, meta: dict | None = None, **extra) -> None:
    """Atomically write the weights + resolved config (+ meta: git commit, data fingerprint, ...).
    The item-embedding table is not stored (only its SHA-1); pass it again to load_checkpoint."""
    _atomic_save(checkpoint_dict(model, meta=_plain(meta or {}), **extra), Path(path))


def load_checkpoint(path, item_emb=None, device="cpu", check_table: bool = True) -> UniSRec:
    """Rebuild the model from a best.pt / last.pt / save_checkpoint file. Text modes need the same
    item-embedding table (I, d_plm) it was trained with; a different table is an error unless
    check_table=False."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a UniSRec checkpoint (format {ck.get('format') if isinstance(ck, dict) else '?'})")
    cfg = UniSRecConfig(**ck["model_config"])
    if cfg.mode == "id":
        model = UniSRec(cfg)
    else:
        if item_emb is None:
            raise ValueError(f"{path} is a {cfg.mode} UniSRec: pass the item-embedding table it was trained "
                             f"with ({cfg.n_items} x {cfg.plm_size}, e.g. item_emb.npy).")
        model = UniSRec(cfg, item_emb)
        if check_table and ck.get("item_emb_sha1") and model.table_fingerprint != ck["item_emb_sha1"]:
            raise ValueError(f"the item-embedding table differs from the one {path} was trained with "
                             "(SHA-1 mismatch); pass the right item_emb.npy or check_table=False.")
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------- training
def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(device: torch.device, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_train_arrays(model: UniSRec, hist, target) -> tuple[np.ndarray, np.ndarray]:
    hist, target = np.asarray(hist), np.asarray(target)
    if hist.ndim != 2 or target.ndim != 1 or len(hist) != len(target):
        raise ValueError(f"train_hist must be (N, L) and train_target (N,); got {hist.shape} and {target.shape}")
    if len(target) == 0:
        raise ValueError("no training examples (train_target is empty)")
    if not (np.issubdtype(hist.dtype, np.integer) and np.issubdtype(target.dtype, np.integer)):
        raise ValueError(f"train_hist / train_target must be integer item indices, got {hist.dtype} / {target.dtype}")
    I = model.cfg.n_items
    if target.min() < 0 or target.max() >= I:
        raise ValueError(f"train_target holds items outside [0, {I}): min {target.min()}, max {target.max()}")
    if hist.size and hist.max() >= I:
        raise ValueError(f"train_hist holds item {hist.max()} but the model has {I} items")
    return hist.astype(np.int64, copy=False), target.astype(np.int64, copy=False)


def fit(model: UniSRec, train_hist, train_target, eval_fn: Callable[[UniSRec], dict], out_dir,
        cfg: TrainConfig | None = None, resume: bool = False, meta: dict | None = None) -> dict:
    """Train with Adam on full-softmax cross-entropy, validating every epoch (UniSRec fine-tuning).

    train_hist (N, L) int64 (negative = padding, either alignment) and train_target (N,) int64 are
    every training prefix -> its next item. eval_fn(model) -> dict with at least cfg.metric
    ("ndcg@10", on the validation cases); it is called with the model in eval mode. Writes to
    out_dir: best.pt (best validation metric so far), last.pt (everything needed to resume:
    model, optimizer, scaler, epoch, RNG, best-so-far, bad-epoch count, history, configs, meta)
    and history.json, all atomically. Stops after cfg.patience epochs without a strictly better
    validation metric, or after cfg.max_epochs, or after the first epoch that ends past
    cfg.max_minutes of wall time in this call (summary["time_capped"]). resume=True continues from
    last.pt (same result as an uninterrupted run on CPU for a seed; max_epochs and max_minutes may
    change). At the end the best weights
    are loaded back into the model. Returns {best_epoch, epochs_run, best_valid, stopped_early,
    wall_time_s (summed over resumed runs), max_epochs}."""
    cfg = cfg or TrainConfig()
    if cfg.amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"TrainConfig.amp={cfg.amp!r}: use 'off', 'bf16' or 'fp16'.")
    dev = model.device
    if cfg.amp == "fp16" and dev.type != "cuda":
        raise ValueError("TrainConfig.amp='fp16' needs a CUDA device; use 'bf16' or 'off' on CPU.")
    if cfg.batch_size < 1 or cfg.patience < 1 or (cfg.max_epochs is not None and cfg.max_epochs < 0):
        raise ValueError(f"bad TrainConfig: batch_size {cfg.batch_size}, patience {cfg.patience}, "
                         f"max_epochs {cfg.max_epochs}")
    hist_np, target_np = _check_train_arrays(model, train_hist, train_target)
    H = torch.as_tensor(hist_np, device=dev)                               # (N, L)
    T = torch.as_tensor(target_np, device=dev)                             # (N,)
    N, bs = len(T), cfg.batch_size
    n_batches = math.ceil(N / bs)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, hist_path = out / "last.pt", out / "best.pt", out / "history.json"
    st = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "best_valid": None, "bad": 0, "history": [],
          "stopped": False, "wall": 0.0}
    if resume and last_path.is_file():
        ck = torch.load(last_path, map_location="cpu", weights_only=True)
        if ck.get("model_config") != asdict(model.cfg):
            raise ValueError(f"{last_path} holds a model with another UniSRecConfig ({ck.get('model_config')}); "
                             "resume with the same model settings or use a fresh output folder.")
        old = ck["train_config"]
        free = ("max_epochs", "max_minutes", "compile")
        diff = {k: (old.get(k), v) for k, v in asdict(cfg).items() if k not in free and old.get(k) != v}
        if diff:
            raise ValueError(f"{last_path} was written with another TrainConfig "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); resume with the "
                             "same settings (only max_epochs, max_minutes and compile may change) or use a fresh "
                             "folder.")
        if model.cfg.mode != "id" and ck.get("item_emb_sha1") != model.table_fingerprint:
            raise ValueError(f"{last_path} was trained with another item-embedding table (SHA-1 mismatch).")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        _set_rng_state(dev, ck["rng"])
        st = ck["state"]
        print(f"resumed from {last_path} after epoch {st['epoch']} (best {cfg.metric} {st['best']:.4f} "
              f"at epoch {st['best_epoch']}, {st['bad']} epochs without improvement)")
        if st["best_epoch"] == st["epoch"] and _saved_at(best_path, "epoch") != st["epoch"]:
            # killed between last.pt and best.pt: the weights just loaded ARE the best epoch's
            save_checkpoint(model, best_path, meta=meta, epoch=st["epoch"], valid=st["best_valid"],
                            train_config=asdict(cfg))
    else:
        if resume:
            print(f"no {last_path} to resume from: starting fresh")
        torch.manual_seed(cfg.seed)
    if cfg.compile:
        model.compile_core()
    t_start = time.perf_counter()
    wall0 = st["wall"]
    capped = False

    while not st["stopped"] and (cfg.max_epochs is None or st["epoch"] < cfg.max_epochs):
        epoch = st["epoch"] + 1
        model.train()
        t0 = time.perf_counter()
        perm = torch.as_tensor(np.random.default_rng([cfg.seed, epoch]).permutation(N), device=dev)  # (N,)
        total = torch.zeros((), device=dev)
        cap = cfg.max_epochs if cfg.max_epochs is not None else "?"
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cap}", unit="step", leave=False)
        for b in bar:
            idx = perm[b * bs:(b + 1) * bs]                                # (b,)
            with autocast():
                loss = model.loss(H[idx], T[idx])
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total += loss.detach().float() * len(idx)
            if b % 10 == 0 or b == n_batches - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        train_loss = float(total) / N
        if not math.isfinite(train_loss):  # stop before anything of this epoch is written
            raise FloatingPointError(
                f"training loss became {train_loss} in epoch {epoch}; stopped. {last_path} still holds "
                f"epoch {st['epoch']} (the last good one): lower the learning rate or use --amp off, "
                "then --resume.")
        train_s = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            res = dict(eval_fn(model) or {})
        if cfg.metric not in res:
            raise ValueError(f"eval_fn returned {sorted(res)} without {cfg.metric!r}, the early-stopping metric")
        value = float(res[cfg.metric])
        improved = not math.isnan(value) and value > st["best"]
        rec = {"epoch": epoch, "loss": train_loss, "valid": _plain(res), "train_s": round(train_s, 3),
               "epoch_s": round(time.perf_counter() - t0, 3), "improved": improved}
        st["history"].append(rec)
        if improved:
            st.update(best=value, best_epoch=epoch, best_valid=_plain(res), bad=0)
        else:
            st["bad"] += 1
        st["epoch"] = epoch
        st["stopped"] = st["bad"] >= cfg.patience
        st["wall"] = wall0 + time.perf_counter() - t_start
        metrics = " ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, (int, float)))
        print(f"epoch {epoch} | loss {train_loss:.4f} | valid {metrics} | {rec['epoch_s']:.1f}s"
              + (" | best" if improved else f" | {st['bad']}/{cfg.patience} without improvement"), flush=True)
        ck = checkpoint_dict(model, optimizer=opt.state_dict(), scaler=scaler.state_dict() if scaler else None,
                             rng=_rng_state(dev), state=st, train_config=asdict(cfg), meta=_plain(meta or {}))
        _atomic_save(ck, last_path)  # first last.pt, then best.pt: a kill between them is repaired on resume
        if improved:
            save_checkpoint(model, best_path, meta=meta, epoch=epoch, valid=_plain(res), train_config=asdict(cfg))
        _atomic_write_text(hist_path, json.dumps(st["history"], indent=2))
        more = not st["stopped"] and (cfg.max_epochs is None or epoch < cfg.max_epochs)
        if more and cfg.max_minutes is not None and time.perf_counter() - t_start >= 60 * cfg.max_minutes:
            print(f"time cap: stopping after epoch {epoch} ({cfg.max_minutes:g} min in this call; --resume continues)")
            capped = True
            break

    if st["stopped"]:
        print(f"early stop: no better valid {cfg.metric} for {cfg.patience} epochs "
              f"(best {st['best']:.4f} at epoch {st['best_epoch']})")
    if best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
    model.eval()
    return {"best_epoch": st["best_epoch"], "epochs_run": st["epoch"], "best_valid": st["best_valid"],
            "stopped_early": st["stopped"], "wall_time_s": round(wall0 + time.perf_counter() - t_start, 3),
            "max_epochs": cfg.max_epochs, "max_minutes": cfg.max_minutes, "time_capped": capped}
