"""UniSRec and SASRec: the first downstream test of EncodeRec (arXiv 2601.10837, Sec. 4, Table 2).

EncodeRec swaps the frozen item text embeddings inside UniSRec (Hou et al., KDD 2022), re-implemented
after its official code (RUCAIBox/UniSRec on RecBole):

* MoE adaptor (Sec. 2.2, Eq. 1-3): 8 parametric-whitening experts W (dropout(x) - b), d_plm -> 300,
  under a softmax gate x W_gate with Gaussian noise (std softplus(x W_noise) + 1e-2) in training only.
* SASRec encoder (Kang & McAuley 2018; RecBole's TransformerEncoder): learned positions, post-LN, GELU,
  causal + padding mask; the state at the last real position represents the sequence.
* Scores (Sec. 2.3, Eq. 4): cosine(sequence, adaptor(text)) / 0.07; cross-entropy over ALL items.
* Modes: 'inductive' (text only, EncodeRec's setting), 'transductive' (+ a learnable ID embedding),
  'id' (classic SASRec on IDs, dot-product scores) = the no-text baseline, and 'vqrec': VQ-Rec (Hou et
  al., WWW 2023; RUCAIBox/VQ-Rec), the text embedding's product code (n_sub codes of `code_cap`, made by
  rqvae.product_codes) -> the mean of one learned embedding per code, cosine / 0.07 as above.
No pre-training: trained on the target domain, the text embeddings frozen (a buffer).

Histories: (B, L) int64 catalog rows, negative = padding, either alignment; packed LEFT-aligned (as
RecBole), keeping the last `max_seq_len` items. The mask is causal, so trailing padding never changes a
score; each query sees itself, so an empty row stays finite.

    model = UniSRec(UniSRecConfig(), item_emb)  # item_emb (I, d_plm) float32 numpy
    loss = model.loss(hist, target)             # hist (B, L) int64, target (B,)
    scores = score(model, hist)                 # (B, I) for full-ranking evaluation
    sasrec = SASRecID(n_items)                  # mode 'id'
    vqrec = UniSRec(UniSRecConfig(mode="vqrec"), codes=codes)  # codes (I, n_sub) int, each < code_cap

Imports: stdlib, torch, numpy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("inductive", "transductive", "id", "vqrec")
LENGTH_GROUP = 128  # rows per padded group in encode (fewer: less padding, smaller and slower matmuls)


# ----------------------------------------------------------------------------- configs
@dataclass
class UniSRecConfig:
    """Defaults = UniSRec's props (RUCAIBox/UniSRec UniSRec.yaml, finetune.yaml; RecBole SASRec)."""
    mode: str = "inductive"          # one of MODES; EncodeRec: 'inductive'
    n_items: int | None = None       # catalog size; inferred from the item-embedding table
    plm_size: int | None = None      # text embedding width; inferred (MiniLM: 384; UniSRec's BERT: 768)
    hidden_size: int = 300           # UniSRec: hidden_size 300 (= the adaptor's output)
    n_layers: int = 2                # UniSRec: n_layers 2
    n_heads: int = 2                 # UniSRec: n_heads 2
    inner_size: int = 256            # UniSRec: inner_size 256 (feed-forward)
    hidden_dropout: float = 0.5      # UniSRec: hidden_dropout_prob 0.5
    attn_dropout: float = 0.5        # UniSRec: attn_dropout_prob 0.5
    layer_norm_eps: float = 1e-12    # RecBole SASRec: layer_norm_eps 1e-12
    initializer_range: float = 0.02  # RecBole SASRec: initializer_range 0.02
    max_seq_len: int = 50            # UniSRec: MAX_ITEM_LIST_LENGTH 50
    n_exps: int = 8                  # UniSRec: n_exps 8
    adaptor_dropout: float = 0.2     # UniSRec: adaptor_dropout_prob 0.2
    temperature: float = 0.07        # UniSRec: temperature 0.07 (cosine / tau)
    gate_noise: bool = True          # UniSRec: MoEAdaptorLayer noise=True
    noise_eps: float = 1e-2          # UniSRec: noise_epsilon 1e-2
    code_cap: int = 256              # VQ-Rec: code_cap 256 codes per sub-vector (OPQ32,IVF1,PQ32x8)
    n_sub: int | None = None         # VQ-Rec: code_dim 32 sub-vectors; inferred from the codes

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"UniSRecConfig.mode={self.mode!r}: choose from {', '.join(MODES)}")
        for name in ("hidden_size", "n_layers", "n_heads", "inner_size", "max_seq_len", "n_exps"):
            if getattr(self, name) < 1:
                raise ValueError(f"UniSRecConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")


# ----------------------------------------------------------------------------- adaptor
class Dropout(nn.Dropout):
    """nn.Dropout whose keep mask on CPU comes from torch.rand: Bernoulli(1 - p) as nn.Dropout's, for about
    half the cost of the CPU bernoulli_ behind it (bench/order.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0 < self.p < 1 and x.is_cpu):
            return super().forward(x)
        keep = torch.rand(x.shape) >= self.p  # drawn in float32, whatever x's dtype
        return x * (keep.to(x.dtype) / (1 - self.p))


class PWLayer(nn.Module):
    """Parametric whitening (UniSRec Eq. 1)."""

    def __init__(self, d_in: int, d_out: int, dropout: float, init_std: float = 0.02):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(d_in))
        self.lin = nn.Linear(d_in, d_out, bias=False)
        nn.init.normal_(self.lin.weight, 0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.dropout(x) - self.bias)


class MoEAdaptor(nn.Module):
    """Mixture of PW experts with a (noisy) softmax gate (UniSRec Eq. 2-3)."""

    def __init__(self, d_in: int, d_out: int, n_exps: int, dropout: float, noise: bool, noise_eps: float,
                 init_std: float):
        super().__init__()
        self.experts = nn.ModuleList(PWLayer(d_in, d_out, dropout, init_std) for _ in range(n_exps))
        self.w_gate = nn.Parameter(torch.zeros(d_in, n_exps))   # zero: the gates start uniform
        self.w_noise = nn.Parameter(torch.zeros(d_in, n_exps))  # zero: noise std starts softplus(0)+eps
        self.noise, self.noise_eps = noise, noise_eps

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., E) softmax gates."""
        logits = x @ self.w_gate
        if self.training and self.noise:
            std = F.softplus(x @ self.w_noise) + self.noise_eps
            logits = logits + torch.randn_like(logits) * std
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(x)                      # (N, E)
        out = g[..., :1] * self.experts[0](x)  # (N, 1) * (N, D) -> (N, D)
        for e in range(1, len(self.experts)):
            out = out + g[..., e:e + 1] * self.experts[e](x)
        return out


# ----------------------------------------------------------------------------- transformer
def attention_mask(valid: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """May-attend mask (module docstring) of queries at qpos (B, Tq) over keys valid (B, W)
    -> (B, 1, Tq, W) bool."""
    kpos = torch.arange(valid.shape[1], device=valid.device)    # (W,)
    q = qpos.unsqueeze(-1)                                      # (B, Tq, 1)
    allowed = (kpos <= q) & (valid.unsqueeze(1) | (kpos == q))  # (B, Tq, W)
    return allowed.unsqueeze(1)                                 # (B, Tq, W) -> (B, 1, Tq, W)


class Block(nn.Module):
    """Post-LN transformer layer (RecBole TransformerLayer)."""

    def __init__(self, cfg: UniSRecConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads, self.attn_p = cfg.n_heads, cfg.attn_dropout
        self.qkv = nn.Linear(D, 3 * D)  # q, k, v (RecBole: three Linears)
        self.proj = nn.Linear(D, D)
        self.drop1 = Dropout(cfg.hidden_dropout)
        self.ln1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.ff1 = nn.Linear(D, cfg.inner_size)
        self.ff2 = nn.Linear(cfg.inner_size, D)
        self.drop2 = Dropout(cfg.hidden_dropout)
        self.ln2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, W, D), valid (B, W) -> (B, W, D), or with `last` (B,) only the query at that position
        (keys/values cover every position) -> (B, 1, D)."""
        B, W, D = x.shape
        H = self.n_heads
        k, v = F.linear(x, self.qkv.weight[D:], self.qkv.bias[D:]).split(D, dim=-1)  # 2 x (B, W, D)
        if last is None:
            qpos = torch.arange(W, device=x.device).expand(B, W)  # (B, W)
        else:
            qpos = last.unsqueeze(1)                             # (B,) -> (B, 1)
            x = x.gather(1, qpos.unsqueeze(-1).expand(B, 1, D))  # (B, W, D) -> (B, 1, D)
        q = F.linear(x, self.qkv.weight[:D], self.qkv.bias[:D])  # (B, Tq, D)

        def heads(t):
            return t.reshape(B, -1, H, D // H).transpose(1, 2)  # (B, T, D) -> (B, H, T, D/H)

        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v),
                                           attn_mask=attention_mask(valid, qpos),
                                           dropout_p=self.attn_p if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, -1, D)  # (B, H, Tq, D/H) -> (B, Tq, D)
        x = self.ln1(x + self.drop1(self.proj(a)))
        return self.ln2(x + self.drop2(self.ff2(F.gelu(self.ff1(x)))))


# ----------------------------------------------------------------------------- the model
class UniSRec(nn.Module):
    """UniSRec on item_emb (I, d_plm) (modes 'inductive', 'transductive') or SASRec on IDs ('id')."""

    def __init__(self, cfg: UniSRecConfig | None = None, item_emb=None, codes=None):
        super().__init__()
        cfg = replace(cfg or UniSRecConfig())
        cfg.validate()
        text = cfg.mode in ("inductive", "transductive")
        if cfg.mode == "vqrec":
            c = torch.as_tensor(np.asarray(codes if codes is not None else np.empty((0, 0)))).long()
            if c.dim() != 2 or not c.numel() or int(c.min()) < 0 or int(c.max()) >= cfg.code_cap:
                raise ValueError(f"mode 'vqrec' needs codes (n_items, n_sub) in [0, {cfg.code_cap}), got "
                                 f"{tuple(c.shape)}")
            cfg = replace(cfg, n_items=c.shape[0], n_sub=c.shape[1], plm_size=None)
            rows = c + torch.arange(c.shape[1]) * cfg.code_cap  # (I, M): sub-vector m's codes own rows m*K..
            self.register_buffer("code_rows", rows, persistent=False)
        if text:
            if item_emb is None:
                raise ValueError(f"mode {cfg.mode!r} needs the item-embedding table (I, d_plm): pass "
                                 "item_emb or use mode 'id'")
            table = torch.as_tensor(np.asarray(item_emb, dtype=np.float32))
            if table.dim() != 2 or not table.numel():
                raise ValueError(f"item_emb must be a 2-D (n_items, d_plm) array, got {tuple(table.shape)}")
            if not torch.isfinite(table).all():
                raise ValueError("item_emb contains NaN or inf values; re-run the embedding stage")
            for name, got, what in zip(("n_items", "plm_size"), table.shape, ("rows", "columns")):
                if (want := getattr(cfg, name)) not in (None, got):
                    raise ValueError(f"item_emb has {got} {what} but UniSRecConfig.{name}={want}; it needs "
                                     "one row per catalog item (row i = item i)")
            cfg = replace(cfg, n_items=table.shape[0], plm_size=table.shape[1])
            self.register_buffer("plm_emb", table.clone(), persistent=False)  # frozen
        elif cfg.n_items is None or cfg.n_items < 1:
            raise ValueError("mode 'id' needs UniSRecConfig.n_items (the catalog size)")
        self.cfg = cfg
        D = cfg.hidden_size
        if text:
            self.adaptor = MoEAdaptor(cfg.plm_size, D, cfg.n_exps, cfg.adaptor_dropout, cfg.gate_noise,
                                      cfg.noise_eps, cfg.initializer_range)
        if cfg.mode == "vqrec":
            self.code_emb = nn.Embedding(cfg.n_sub * cfg.code_cap, D)
        if cfg.mode in ("transductive", "id"):  # row 0 = padding, item i -> row i + 1
            self.item_id_emb = nn.Embedding(cfg.n_items + 1, D, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, D)
        self.ln = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self._init_weights()

    def _init_weights(self):
        """RecBole SASRec's init; the adaptor keeps its own."""
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

    def prepare(self, hist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Histories (module docstring) -> left-packed items (B, W) (-1 = pad), valid mask (B, W),
        lengths (B,); W = min(longest history, max_seq_len), at least 1."""
        h = torch.as_tensor(hist, device=self.device)
        if h.dim() != 2 or h.dtype.is_floating_point or h.dtype == torch.bool:
            raise ValueError(f"histories must be (B, L) integer item indices, got {tuple(h.shape)} {h.dtype}")
        h = h.long()
        B, L = h.shape
        if h.numel() and int(h.max()) >= self.cfg.n_items:
            raise ValueError(f"history holds item index {int(h.max())} but the model has {self.cfg.n_items} "
                             "items; was the embedding table built for another dataset?")
        valid = h >= 0        # (B, L)
        n = valid.sum(dim=1)  # (B,)
        M = self.cfg.max_seq_len
        W = max(1, min(int(n.max()) if B and L else 1, M))
        if L == 0:
            h, valid, L = h.new_full((B, 1), -1), valid.new_zeros((B, 1)), 1
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # real items first, order kept
        packed = h.gather(1, order)                                     # (B, L), left-packed
        start = (n - M).clamp(min=0)                                    # (B,) first item in the window
        cols = (start.unsqueeze(1) + torch.arange(W, device=h.device)).clamp(max=L - 1)  # (B, W)
        lengths = n.clamp(max=M)                                        # (B,)
        mask = torch.arange(W, device=h.device) < lengths.unsqueeze(1)  # (B, W)
        items = torch.where(mask, packed.gather(1, cols), -1)           # (B, W)
        return items, mask, lengths

    def embed_items(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """item_table's rows for items (B, W) -> (B, W, D), pad (-1) -> 0."""
        if self.cfg.mode == "id":
            return self.item_id_emb(items + 1)
        B, W = items.shape
        x = self._codes_mean(items[valid]) if self.cfg.mode == "vqrec" else \
            self.adaptor(self.plm_emb[items[valid]])  # (n_real, d_plm) -> (n_real, D)
        out = x.new_zeros(B, W, x.shape[1]).masked_scatter(valid.unsqueeze(-1), x)  # (n_real, D) -> (B, W, D)
        if self.cfg.mode == "transductive":
            out = out + self.item_id_emb(items + 1)
        return out

    def item_table(self) -> torch.Tensor:
        """Every catalog item's representation (I, D)."""
        if self.cfg.mode == "id":
            return self.item_id_emb.weight[1:]  # (I+1, D) -> (I, D), drop padding
        if self.cfg.mode == "vqrec":
            return self._codes_mean(torch.arange(self.cfg.n_items, device=self.device))
        t = self.adaptor(self.plm_emb)          # (I, d_plm) -> (I, D)
        if self.cfg.mode == "transductive":
            t = t + self.item_id_emb.weight[1:]
        return t

    def _codes_mean(self, items: torch.Tensor) -> torch.Tensor:
        """VQ-Rec's item representation: the mean of its codes' embeddings, (n,) -> (n, D)."""
        return F.embedding_bag(self.code_rows[items], self.code_emb.weight, mode="mean")

    def _transform(self, x: torch.Tensor, valid: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """LN -> dropout -> blocks, the last only at `last` (B,): (B, W, D) -> (B, D); for compile_core."""
        x = self.drop(self.ln(x))
        for i, blk in enumerate(self.blocks):
            x = blk(x, valid, last if i == len(self.blocks) - 1 else None)
        return x.squeeze(1)  # (B, 1, D) -> (B, D)

    def compile_core(self, **kwargs) -> UniSRec:
        """torch.compile the transformer and the adaptor (dynamic shapes); state-dict keys unchanged."""
        if not getattr(self, "_compiled", False):
            self._compiled = True
            kwargs.setdefault("dynamic", True)
            self._transform = torch.compile(self._transform, **kwargs)
            if hasattr(self, "adaptor"):
                self.adaptor.forward = torch.compile(self.adaptor.forward, **kwargs)
        return self

    def encode(self, hist) -> torch.Tensor:
        """Final state at the last real position: (B, L) -> (B, D). On CPU, rows sorted by length run in
        groups, each padded to its own longest history (a GPU keeps one pass: launches cost more there)."""
        items, valid, lengths = self.prepare(hist)  # (B, W) each, (B,)
        order, out = lengths.argsort(), []
        for rows in order.split(LENGTH_GROUP if items.is_cpu else max(1, len(order))):
            W = max(1, int(lengths[rows].max()))
            x = self.embed_items(items[rows, :W], valid[rows, :W]) + self.pos_emb.weight[:W]  # (b, W, D)
            out.append(self._transform(x, valid[rows, :W], (lengths[rows] - 1).clamp(min=0)))
        return torch.cat(out)[order.argsort()]  # (B, D), rows back in batch order

    def logits(self, seq: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, D) x (I, D) -> (B, I): cosine / tau (text modes) or dot product ('id'); float32
        under autocast, as 1 / tau = 14.3 magnifies bf16 cosine errors."""
        with torch.autocast(seq.device.type, enabled=False):
            seq, table = seq.float(), table.float()
            if self.cfg.mode == "id":
                return seq @ table.T
            return F.normalize(seq, dim=-1) @ F.normalize(table, dim=-1).T / self.cfg.temperature

    def forward(self, hist) -> torch.Tensor:
        """Scores over all items: (B, L) -> (B, I)."""
        return self.logits(self.encode(hist), self.item_table())

    def loss(self, hist, target) -> torch.Tensor:
        """Cross-entropy of the next item over the full catalog (RecBole 'CE')."""
        return F.cross_entropy(self(hist), torch.as_tensor(target, device=self.device).long())


def SASRecID(n_items: int, cfg: UniSRecConfig | None = None) -> UniSRec:
    """Classic SASRec on item IDs (mode 'id')."""
    return UniSRec(replace(cfg or UniSRecConfig(), mode="id", n_items=n_items, plm_size=None))


# ----------------------------------------------------------------------------- scoring
def score(model: UniSRec, hist, items: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (B, I) float32 of histories (B, L) in eval mode; `items` = a precomputed item_table()."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            table = model.item_table() if items is None else items
            return model.logits(model.encode(hist), table)
    finally:
        model.train(was)


def score_fn(model: UniSRec, histories: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:
    """`score_fn(indices) -> (len(indices), I)` over rows of `histories` (C, L) for chunked ranking
    (eval.full_ranking_ranks); the item table is computed once."""
    was = model.training
    model.eval()
    with torch.inference_mode():
        table = model.item_table()
    model.train(was)
    return lambda idx: score(model, histories[idx], table)
