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

EncodeRec has no UniSRec pre-training stage: the model is trained from scratch on the target domain
with the item text embeddings frozen (a buffer, never a parameter); nothing inside the transformer is
frozen (UniSRec's `fix_enc` applies only to a loaded pre-trained encoder).

Histories (one convention, documented once): (B, L) int64 catalog rows, any negative value = padding,
either alignment. Internally each row is packed LEFT-aligned (RecBole's layout: column 0 = the oldest
item of the window, position id 0) and keeps its most recent `max_seq_len` items. The mask is causal,
so padding after the last real item never changes a score; every query also sees itself, so a fully
padded row gives a finite representation. The final layer runs only at the last real position, the
one row the model reads.

    model = UniSRec(UniSRecConfig(), item_emb)              # item_emb (I, d_plm) float32 numpy
    loss = model.loss(hist, target)                         # hist (B, L) int64, target (B,)
    scores = score(model, hist)                             # (B, I) for full-ranking evaluation
    sasrec = SASRecID(n_items)                              # the no-text baseline (mode 'id')

Imports: the standard library, torch, numpy and tqdm only (the caller brings data and metrics).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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

        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v),
                                           attn_mask=attention_mask(valid, qpos),
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
                raise ValueError("item_emb must be a 2-D (n_items, d_plm) array, "
                                 f"got shape {tuple(table.shape)}")
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
            # row 0 = padding, item i -> row i + 1
            self.item_id_emb = nn.Embedding(cfg.n_items + 1, D, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, D)
        self.ln = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
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
        start = (n - M).clamp(min=0)                                       # (B,) first item in the window
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
            return self.item_id_emb(items + 1)                             # (B, W) -> (B, W, D), pad -> 0
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

    def compile_core(self, **kwargs) -> UniSRec:
        """torch.compile the data-independent parts (transformer, MoE adaptor) with dynamic shapes;
        input packing stays eager. State-dict keys do not change."""
        if getattr(self, "_compiled", False):
            return self
        self._compiled = True
        kwargs.setdefault("dynamic", True)
        self._transform = torch.compile(self._transform, **kwargs)
        if hasattr(self, "adaptor"):
            self.adaptor.forward = torch.compile(self.adaptor.forward, **kwargs)
        return self

    def hidden_states(self, hist) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-layer states at every (left-packed) position (B, W, D) and the lengths (B,)."""
        items, valid, lengths = self.prepare(hist)
        return self._run(items, valid, lengths, all_positions=True), lengths

    def encode(self, hist) -> torch.Tensor:
        """Sequence representation = final state at the last real position: (B, L) -> (B, D)."""
        return self._run(*self.prepare(hist), all_positions=False)

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
