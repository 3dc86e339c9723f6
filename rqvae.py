"""Semantic IDs for TIGER: an RQ-VAE, a residual k-means baseline, the dedup code, collision audits.

EncodeRec (arXiv 2601.10837, Sec. 4, Table 3) feeds its frozen item embeddings to TIGER (Rajput et al.,
NeurIPS 2023), whose items are named by semantic IDs. This file re-implements TIGER Sec. 3.1 and Sec. 4
"RQ-VAE implementation details": an MLP encoder d -> 512 -> 256 -> 128 -> 32 and its mirror, 3 residual
levels of 256 codes (c_l = argmin_k ||r_l - e_{l,k}||, r_{l+1} = r_l - e_{l,c_l}), a straight-through
decoder input, loss = reconstruction + sum_l (||sg(r_l) - e_l||^2 + beta ||r_l - sg(e_l)||^2) with the
chosen codes detached inside the residual chain (RQ-VAE, Lee et al., CVPR 2022, Eq. 6), codebooks
initialised by k-means on the first batch, and a 4th code = the item's rank among the items sharing its
first three codes (TIGER Sec. 3.1), so every ID names one item.

Two decisions of ours, both against codebook collapse:
* Loss scales: every term is a mean over elements (summing one and averaging another tilts the balance
  by d / 32), and the inputs are standardised per dimension (`standardize`; `decode` returns the original
  units): the coordinates of unit-norm text embeddings are tiny, so without it the reconstruction loss is
  tiny too and the encoder shrinks the latents until the quantisation terms vanish.
* Dead-code restart (`dead_code_restart`): the k-means init fits the untrained encoder's latents, which
  training then stretches, stranding inner codes; after each epoch every code no item chose is moved to
  a random residual of the epoch's last batch. TIGER trains 20k epochs instead; set it False for that.

Residual k-means (`residual_kmeans`) is the same quantiser without a network, the simple baseline.
Collision rate = 1 - unique 3-code prefixes / items. Training runs through trainer.fit
(train.train_rqvae: the loss is `model(x).loss`; after each epoch, `restart_dead_codes`).

    model = RQVAE(RQVAEConfig(input_dim=d)); model.set_standardization(emb)   # emb (N, d) float32 numpy
    codes3 = tokenize(model, emb)                                # (N, 3) int64, after training
    codes3 = residual_kmeans(emb, levels=3, k=256, seed=0)      # the baseline, (N, 3) int64
    ids, vocab_sizes = semantic_ids(codes3)                      # (N, 4) int64, 4 ints
    collision_stats(codes3), embedding_stats(emb)                # audits (JSON-ready)

Imports: the standard library, numpy, torch and tqdm only. CPU runs are deterministic for a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

# ----------------------------------------------------------------------------- config
@dataclass
class RQVAEConfig:
    """RQ-VAE settings. Defaults = TIGER Sec. 4 "RQ-VAE implementation details" unless noted."""
    input_dim: int | None = None              # d; inferred (MiniLM: 384; TIGER's Sentence-T5: 768)
    hidden_dims: tuple[int, ...] = (512, 256, 128)  # TIGER: intermediate layers 512, 256, 128, ReLU
    latent_dim: int = 32                      # TIGER: latent (and code) dimension 32
    levels: int = 3                           # TIGER: 3 levels of residual quantisation
    codebook_size: int = 256                  # TIGER: 256 codes per level
    beta: float = 0.25                        # TIGER: beta = 0.25 (commitment weight)
    standardize: bool = True                  # ours: per-dim z-scoring of the inputs (module docstring)
    kmeans_init: bool = True                  # TIGER: k-means init of each codebook on the first batch
    kmeans_iters: int = 50                    # ours: Lloyd iterations of that init (fewer on convergence)
    dead_code_restart: bool = True            # ours (TIGER: none, 20k epochs instead): codes unused in an
                                              # epoch -> random residuals of its last batch (docstring)
    lr: float = 1e-3                          # LC-Rec's RQ-VAE: AdamW 1e-3 (TIGER: Adagrad 0.4)
    weight_decay: float = 1e-4                # ours (LC-Rec: 1e-4); never applied to the codebooks
    batch_size: int = 1024                    # TIGER: batch size 1024
    epochs: int = 150                         # ours, a CPU budget: ~2k steps on 12k items (TIGER: 20k)

    def __post_init__(self):
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)  # JSON round trips give lists

    def validate(self) -> None:
        if self.input_dim is None or self.input_dim < 1:
            raise ValueError(f"RQVAEConfig.input_dim must be a positive int, got {self.input_dim}")
        for name in ("latent_dim", "levels", "codebook_size", "batch_size", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"RQVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0 or any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"RQVAEConfig: epochs {self.epochs} / hidden_dims {self.hidden_dims} invalid")


# ----------------------------------------------------------------------------- k-means
def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid and the squared distance to it. x (N, D), c (K, D) -> (N,), (N,)."""
    idx = torch.empty(len(x), dtype=torch.long, device=x.device)
    d2 = torch.empty(len(x), dtype=x.dtype, device=x.device)
    cc = (c * c).sum(1)                                                  # (K,)
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk]
        dist = (xs * xs).sum(1, keepdim=True) - 2 * xs @ c.T + cc        # (n, K)
        d, i = dist.min(dim=1)
        idx[s:s + chunk], d2[s:s + chunk] = i, d.clamp_min(0)
    return idx, d2


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), deterministic for a seed
    on CPU. x (N, D) -> (centroids (k, D), assign (N,)).

    A cluster that empties is re-seeded to the point farthest from its centroid (distinct points for
    several empty clusters), so every returned centroid owns >= 1 point whenever there are >= k
    distinct points (with fewer, some centroids must repeat and own nothing). With N <= k each point
    is its own centroid and the spare centroids repeat random points."""
    x = x.detach().float()
    n = len(x)
    if n == 0 or k < 1:
        raise ValueError(f"kmeans needs points and k >= 1, got {n} points, k={k}")
    g = torch.Generator().manual_seed(int(seed))
    if n <= k:
        extra = torch.randint(n, (k - n,), generator=g).to(x.device)
        return torch.cat([x, x[extra]]), torch.arange(n, device=x.device)
    first = int(torch.randint(n, (1,), generator=g))
    c = x.new_empty(k, x.shape[1])
    c[0] = x[first]
    d2 = ((x - c[0]) ** 2).sum(1)                                         # (N,) distance to nearest chosen
    for j in range(1, k):
        p = d2.double().cpu()
        pick = int(torch.multinomial(p / p.sum(), 1, generator=g)) if p.sum() > 0 \
            else int(torch.randint(n, (1,), generator=g))
        c[j] = x[pick]
        d2 = torch.minimum(d2, ((x - c[j]) ** 2).sum(1))
    assign = None
    for _ in range(iters):
        new, d2 = _nearest(x, c)
        counts = torch.bincount(new, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):                                                    # re-seed to far points
            far = torch.argsort(d2, descending=True, stable=True)[:len(empty)]
            c[empty] = x[far]
            new, d2 = _nearest(x, c)
            counts = torch.bincount(new, minlength=k)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)              # (k, D)
        keep = counts > 0
        c[keep] = sums[keep] / counts[keep, None].to(x.dtype)
    assign, _ = _nearest(x, c)
    return c, assign


def _standardization(emb: np.ndarray, on: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (std floored at 1e-6, so constant dims stay finite); (0, 1) when off."""
    d = emb.shape[1]
    if not on:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    e = emb.astype(np.float64)
    return e.mean(0).astype(np.float32), np.maximum(e.std(0), 1e-6).astype(np.float32)


def check_embeddings(emb) -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
        raise ValueError(f"item embeddings must be a non-empty (N, d) matrix, got shape {emb.shape}")
    emb = emb.astype(np.float32, copy=False)
    if not np.isfinite(emb).all():
        raise ValueError("item embeddings contain NaN or inf values; re-create them (train.py --stage embed)")
    return emb


def residual_kmeans(emb, levels: int = 3, k: int = 256, iters: int = 50, seed: int = 0,
                    standardize: bool = True, return_codebooks: bool = False, progress: bool = False):
    """Residual k-means tokenizer (no network): k-means on the (standardised) embeddings, then on
    the residuals, level by level. emb (N, d) -> codes (N, levels) int64, and with
    `return_codebooks` also the centroids (levels, k, d) float32 in the standardised space.
    Level l uses the seed `seed + l`; deterministic for a seed on CPU."""
    emb = check_embeddings(emb)
    mean, std = _standardization(emb, standardize)
    r = torch.from_numpy((emb - mean) / std)                              # (N, d)
    codes, books = [], []
    for level in tqdm(range(levels), desc="residual k-means", unit="level", disable=not progress):
        c, a = kmeans(r, k, iters=iters, seed=seed + level)
        codes.append(a)
        books.append(c)
        r = r - c[a]
    out = torch.stack(codes, 1).long().numpy()                            # levels x (N,) -> (N, levels)
    if return_codebooks:
        return out, torch.stack(books).numpy()                            # (levels, k, d)
    return out


# ----------------------------------------------------------------------------- semantic IDs
def _check_codes(codes3) -> np.ndarray:
    c = np.asarray(codes3)
    if c.ndim != 2 or c.shape[0] < 1 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"codes must be a non-empty (N, levels) integer matrix, got {c.dtype} {c.shape}")
    if c.min() < 0:
        raise ValueError("codes must be >= 0")
    return c.astype(np.int64, copy=False)


def semantic_ids(codes3, codebook_size: int = 256) -> tuple[np.ndarray, tuple[int, ...]]:
    """Append TIGER's dedup code: (N, 3) -> ids (N, 4) int64 and the vocabulary of each position.

    The 4th code is the item's rank (by item index) among the items with the same 3-code prefix:
    0 for the first (or only) one. Every item gets all 4 codes, so all 4-code IDs are distinct.
    Vocabularies: codebook_size per level, and max(largest group, codebook_size) for the 4th."""
    c = _check_codes(codes3)
    if c.max() >= codebook_size:
        raise ValueError(f"code {int(c.max())} is outside a codebook of size {codebook_size}")
    n = len(c)
    _, inv, counts = np.unique(c, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)                                                 # numpy 2 may keep a trailing dim
    order = np.argsort(inv, kind="stable")                                # grouped, item order inside a group
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])                # (G,) first slot of each group
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[inv[order]]
    ids = np.concatenate([c, rank[:, None]], axis=1)                      # (N, L) + (N, 1) -> (N, L + 1)
    vocab = tuple([int(codebook_size)] * c.shape[1] + [max(int(counts.max()), int(codebook_size))])
    return ids, vocab


def collision_stats(codes3, codebook_size: int = 256) -> dict:
    """Audit of a 3-code tokenisation (JSON-ready).

    collision_rate = 1 - unique prefixes / items (0 = every item has its own prefix);
    items_in_collisions = items whose prefix is shared with at least one other item;
    usage[l] = share of the codebook_size codes used at level l;
    perplexity[l] = exp(entropy of the level-l code histogram), at most codebook_size."""
    c = _check_codes(codes3)
    n, levels = c.shape
    _, counts = np.unique(c, axis=0, return_counts=True)
    usage, ppl = [], []
    for lv in range(levels):
        h = np.bincount(c[:, lv], minlength=codebook_size).astype(np.float64)
        p = h[h > 0] / n
        usage.append(round(float((h > 0).sum() / codebook_size), 4))
        ppl.append(round(float(math.exp(-(p * np.log(p)).sum())), 2))
    return {"items": int(n), "unique_prefixes": len(counts),
            "collision_rate": round(1.0 - len(counts) / n, 6),
            "items_in_collisions": int(counts[counts > 1].sum()),
            "largest_group": int(counts.max()), "codebook_size": int(codebook_size),
            "usage": usage, "perplexity": ppl}


def embedding_stats(emb) -> dict:
    """What the embeddings themselves allow a tokenizer (JSON-ready).

    repeated_embeddings = items minus distinct embedding rows (bit-identical rows, e.g. identical
    texts, count once); collision_floor = repeated_embeddings / items: a deterministic tokenizer gives
    identical rows one prefix, so no tokenizer's collision rate (1 - prefixes / items) can be lower;
    mean_cosine = mean cosine similarity over all pairs of distinct items (exact, from the
    norm of the sum of the unit rows); effective_rank = exp(entropy of the normalised squared
    singular values of the centred matrix), high when the variance is spread over many directions."""
    e = check_embeddings(emb).astype(np.float64)
    n = len(e)
    repeated = n - len(np.unique(check_embeddings(emb), axis=0))
    u = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    mean_cos = (np.square(u.sum(0)).sum() - n) / max(n * (n - 1), 1)       # sum over i != j of u_i . u_j
    sv2 = np.square(np.linalg.svd(e - e.mean(0), compute_uv=False))
    p = sv2[sv2 > 0] / sv2.sum() if sv2.sum() > 0 else np.ones(1)
    return {"items": int(n), "dim": int(e.shape[1]), "repeated_embeddings": int(repeated),
            "collision_floor": round(repeated / n, 6), "mean_cosine": round(float(mean_cos), 4),
            "effective_rank": round(float(np.exp(-(p * np.log(p)).sum())), 1)}


# ----------------------------------------------------------------------------- model
def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers dims[0] -> ... -> dims[-1], ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAEOutput(NamedTuple):
    x_hat: torch.Tensor        # (B, d) reconstruction in the input's units
    codes: torch.Tensor        # (B, levels) int64
    loss: torch.Tensor         # scalar: recon + quant.sum()
    recon: torch.Tensor        # scalar: mean squared error in the standardised space
    quant: torch.Tensor        # (levels,) codebook + beta * commitment, per level


class RQVAE(nn.Module):
    """TIGER's RQ-VAE. Input (B, d) float -> latent (B, latent_dim) -> codes (B, levels)."""

    def __init__(self, cfg: RQVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dims = [cfg.input_dim, *cfg.hidden_dims, cfg.latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, cfg.codebook_size, cfg.latent_dim))  # (L, K, D)
        self.register_buffer("mean", torch.zeros(cfg.input_dim))
        self.register_buffer("std", torch.ones(cfg.input_dim))
        self.register_buffer("initialized", torch.tensor(False))      # codebooks k-means-initialised

    def set_standardization(self, emb: np.ndarray) -> None:
        """Store the per-dimension mean/std of the training embeddings ((0, 1) with standardize off)."""
        mean, std = _standardization(check_embeddings(emb), self.cfg.standardize)
        self.mean.copy_(torch.from_numpy(mean))
        self.std.copy_(torch.from_numpy(std))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) embeddings -> (B, latent_dim) latents."""
        return self.encoder((x - self.mean) / self.std)

    def quantize(self, z: torch.Tensor, return_residuals: bool = False):
        """Residual quantisation of z (B, D) -> (codes (B, L) int64, z_q (B, D), losses (L,)).

        z_q carries the straight-through gradient (value = sum of the chosen codes, gradient = the
        identity to z). losses[l] = ||sg(r_l) - e_l||^2 + beta ||r_l - sg(e_l)||^2, means over
        the batch and the D dims. With `return_residuals`, also the residuals (L, B, D) detached."""
        r = z
        z_q = torch.zeros_like(z)
        codes, losses, residuals = [], [], []
        for level in range(self.cfg.levels):
            book = self.codebooks[level]                                   # (K, D)
            idx, _ = _nearest(r.detach(), book.detach())
            # (B, D) chosen codes as one-hot @ codebook: the same values as book[idx], but its
            # gradient to the codebook is a matmul, not an index_put accumulate, whose summation order
            # varies between runs on a multi-threaded CPU (the codes then drifted run to run)
            e = F.one_hot(idx, book.shape[0]).to(book.dtype) @ book
            losses.append(F.mse_loss(e, r.detach()) + self.cfg.beta * F.mse_loss(r, e.detach()))
            codes.append(idx)
            residuals.append(r.detach())
            z_q = z_q + e.detach()
            r = r - e.detach()
        z_q = z + (z_q - z).detach()                                       # straight-through estimator
        out = (torch.stack(codes, 1), z_q, torch.stack(losses))            # L x (B,) -> (B, L)
        return (*out, torch.stack(residuals)) if return_residuals else out

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 codes -> (B, D) quantised latent = sum over levels of the chosen codes."""
        codes = torch.as_tensor(codes, device=self.codebooks.device).long()
        levels = torch.arange(codes.shape[1], device=codes.device)
        return self.codebooks[levels, codes].sum(1)                        # (B, L, D) -> (B, D)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, D) quantised latent -> (B, d) reconstruction in the input's (un-standardised) units."""
        return self.decoder(z_q) * self.std + self.mean

    def forward(self, x: torch.Tensor, return_residuals: bool = False):
        xs = (x - self.mean) / self.std                                    # (B, d) standardised
        z = self.encoder(xs)
        q = self.quantize(z, return_residuals=return_residuals)
        codes, z_q, quant = q[:3]
        xs_hat = self.decoder(z_q)
        recon = F.mse_loss(xs_hat, xs)                                     # mean over B and d (docstring)
        out = RQVAEOutput(xs_hat * self.std + self.mean, codes, recon + quant.sum(), recon, quant)
        return (out, q[3]) if return_residuals else out

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int = 0) -> None:
        """k-means on the latents of a batch, then on its residuals, level by level (TIGER)."""
        r = self.encode(x)
        for level in range(self.cfg.levels):
            c, a = kmeans(r, self.cfg.codebook_size, iters=self.cfg.kmeans_iters, seed=seed + level)
            self.codebooks[level] = c
            r = r - c[a]
        self.initialized.fill_(True)


@torch.no_grad()
def tokenize(model: RQVAE, emb, batch_size: int = 4096) -> np.ndarray:
    """Codes of every row of emb (N, d) -> (N, levels) int64, in eval mode."""
    was = model.training
    model.eval()
    x = torch.as_tensor(check_embeddings(emb))
    dev = model.codebooks.device
    out = [model.quantize(model.encode(x[s:s + batch_size].to(dev)))[0].cpu()
           for s in range(0, len(x), batch_size)]
    model.train(was)
    return torch.cat(out).numpy().astype(np.int64)


# ----------------------------------------------------------------------------- dead codes
@torch.no_grad()
def restart_dead_codes(model: RQVAE, counts: torch.Tensor, residuals: torch.Tensor) -> list[int]:
    """Move every code no item chose during an epoch (counts (L, K) == 0) onto a random residual (L, B, D)
    of that epoch's last batch, at its level (drawn from torch's global RNG). Returns the count per level."""
    restarted = []
    for level in range(model.cfg.levels):
        dead = (counts[level] == 0).nonzero().flatten()
        if len(dead):
            pick = torch.randint(residuals.shape[1], (len(dead),)).to(residuals.device)
            model.codebooks[level, dead] = residuals[level, pick]
        restarted.append(len(dead))
    return restarted
