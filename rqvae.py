"""Item codes for TIGER (an RQ-VAE and its training recipe, a residual k-means baseline, collision audits)
and VQ-Rec's product codes (PQ / OPQ, `product_codes`).

EncodeRec (arXiv 2601.10837, Sec. 4, Table 3) feeds its item embeddings to TIGER (Rajput et al., NeurIPS
2023, Sec. 3.1, 4), whose items are named by semantic IDs: an MLP encoder and its mirror (sizes:
RQVAEConfig), residual levels of codes (c_l = argmin_k ||r_l - e_{l,k}||, r_{l+1} = r_l - e_{l,c_l}),
a straight-through decoder input, loss = reconstruction + sum_l (||sg(r_l) - e_l||^2 + beta ||r_l -
sg(e_l)||^2) (RQ-VAE, Lee et al., CVPR 2022, Eq. 6; codes detached in the residual chain). TIGER appends
a 4th code so that every ID names one item (tiger.semantic_ids).

Ours, against codebook collapse: (1) every loss term is a mean over elements and the inputs are
standardised per dimension, else the tiny coordinates of unit-norm text embeddings make the
reconstruction loss tiny and the encoder shrinks the latents until quantisation stops mattering;
(2) dead-code restart: training stretches the latents the k-means init fitted, stranding codes, so
after each epoch unused codes move to random residuals of the epoch's last batch (TIGER trains 20k
epochs instead). `Recipe` holds the training recipe for any loop (train.py runs it in trainer.fit):

    model = RQVAE(cfg := RQVAEConfig(input_dim=d))
    recipe = Recipe(model, emb)              # emb (N, d) float32: standardisation; k-means init on batch 1
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)  # train.py: cfg.weight_decay, none on codebooks
    for epoch in range(cfg.epochs):
        for idx in torch.randperm(len(emb)).split(cfg.batch_size):
            opt.zero_grad(); recipe.loss(idx).backward(); opt.step()
        recipe.end_of_epoch()                # code usage; dead codes restarted
    codes3 = tokenize(model, emb)            # (N, 3) int64
    codes3 = residual_kmeans(emb)            # the baseline, (N, 3) int64
    pq = product_codes(emb)                  # VQ-Rec's OPQ codes: pq["codes"] (N, 32) int64
    collision_stats(codes3), embedding_stats(emb)  # audits (JSON)

Imports: stdlib, numpy, torch, tqdm. CPU runs are deterministic for a seed.
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
    input_dim: int | None = None    # d; inferred (MiniLM: 384; TIGER's Sentence-T5: 768)
    hidden_dims: tuple[int, ...] = (512, 256, 128)  # TIGER: intermediate layers 512, 256, 128, ReLU
    latent_dim: int = 32            # TIGER: latent (and code) dimension 32
    levels: int = 3                 # TIGER: 3 levels of residual quantisation
    codebook_size: int = 256        # TIGER: 256 codes per level
    beta: float = 0.25              # TIGER: beta = 0.25 (commitment weight)
    standardize: bool = True        # ours: per-dim z-scored inputs (module docstring)
    kmeans_init: bool = True        # TIGER: k-means init of each codebook on the first batch
    kmeans_iters: int = 50          # ours: Lloyd iterations of that init (fewer on convergence)
    dead_code_restart: bool = True  # ours (TIGER: none; module docstring)
    lr: float = 1e-3                # LC-Rec's RQ-VAE: AdamW 1e-3 (TIGER: Adagrad 0.4)
    weight_decay: float = 1e-4      # ours (LC-Rec: 1e-4); never applied to the codebooks
    batch_size: int = 1024          # TIGER: batch size 1024
    epochs: int = 150               # ours, a CPU budget: ~2k steps on 12k items (TIGER: 20k)

    def __post_init__(self):
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)  # JSON round trips give lists

    def validate(self) -> None:
        for name in ("input_dim", "latent_dim", "levels", "codebook_size", "batch_size", "kmeans_iters"):
            if (getattr(self, name) or 0) < 1:  # input_dim: None until inferred
                raise ValueError(f"RQVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0 or any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"RQVAEConfig: epochs {self.epochs} / hidden_dims {self.hidden_dims} invalid")


# ----------------------------------------------------------------------------- k-means
def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance to it: x (N, D), c (K, D) -> (N,), (N,)."""
    idx = torch.empty(len(x), dtype=torch.long, device=x.device)
    d2 = torch.empty(len(x), dtype=x.dtype, device=x.device)
    cc = (c * c).sum(1)  # (K,)
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk]
        dist = (xs * xs).sum(1, keepdim=True) - 2 * xs @ c.T + cc  # (n, K)
        d, i = dist.min(dim=1)
        idx[s:s + chunk], d2[s:s + chunk] = i, d.clamp_min(0)
    return idx, d2


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0,
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means, k-means++ seeding (Arthur & Vassilvitskii 2007) unless `init` (k, D) centroids are
    given: x (N, D) -> centroids (k, D), assign (N,); empty clusters re-seed at the farthest points;
    N <= k: the points are the centroids."""
    x = x.detach().float()
    n = len(x)
    if n == 0 or k < 1:
        raise ValueError(f"kmeans needs points and k >= 1, got {n} points, k={k}")
    g = torch.Generator().manual_seed(int(seed))
    if n <= k:
        extra = torch.randint(n, (k - n,), generator=g).to(x.device)
        return torch.cat([x, x[extra]]), torch.arange(n, device=x.device)
    if init is not None:
        c = init.detach().float().clone()
    else:
        first = int(torch.randint(n, (1,), generator=g))
        c = x.new_empty(k, x.shape[1])
        c[0] = x[first]
        d2 = ((x - c[0]) ** 2).sum(1)  # (N,) distance to nearest chosen
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
        if len(empty):
            far = torch.argsort(d2, descending=True, stable=True)[:len(empty)]
            c[empty] = x[far]
            new, d2 = _nearest(x, c)
            counts = torch.bincount(new, minlength=k)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # (k, D)
        keep = counts > 0
        c[keep] = sums[keep] / counts[keep, None].to(x.dtype)
    assign, _ = _nearest(x, c)
    return c, assign


def _standardization(emb: np.ndarray, on: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-dim mean and std (>= 1e-6); (0, 1) when off."""
    d = emb.shape[1]
    if not on:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    e = emb.astype(np.float64)
    return e.mean(0).astype(np.float32), np.maximum(e.std(0), 1e-6).astype(np.float32)


def check_embeddings(emb) -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim != 2 or not emb.size:
        raise ValueError(f"item embeddings must be a non-empty (N, d) matrix, got shape {emb.shape}")
    emb = emb.astype(np.float32, copy=False)
    if not np.isfinite(emb).all():
        raise ValueError("item embeddings contain NaN or inf values; re-create them (train.py --stage embed)")
    return emb


def _residual(r: torch.Tensor, levels: int, k: int, iters: int, seed: int, progress: bool = False):
    """k-means on r (N, D), then its residuals: codes (N, L), centroids (L, k, D)."""
    codes, books = [], []
    for level in tqdm(range(levels), desc="residual k-means", unit="level", disable=not progress):
        c, a = kmeans(r, k, iters=iters, seed=seed + level)
        codes.append(a)
        books.append(c)
        r = r - c[a]
    return torch.stack(codes, 1), torch.stack(books)  # levels x (N,) -> (N, levels)


def residual_kmeans(emb, levels: int = 3, k: int = 256, iters: int = 50, seed: int = 0,
                    standardize: bool = True, return_codebooks: bool = False, progress: bool = False):
    """The baseline tokenizer: emb (N, d) -> codes (N, levels) int64 (+ standardised centroids if asked)."""
    emb = check_embeddings(emb)
    mean, std = _standardization(emb, standardize)
    codes, books = _residual(torch.from_numpy((emb - mean) / std), levels, k, iters, seed, progress)
    out = codes.long().numpy()  # (N, levels)
    return (out, books.numpy()) if return_codebooks else out


# ----------------------------------------------------------------------------- product codes (VQ-Rec)
def product_codes(emb, n_sub: int = 32, k: int = 256, rotate: bool = True, opq_iters: int = 50,
                  iters: int = 4, first_iters: int = 40, seed: int = 0, fit_rows=None) -> dict:
    """(Optimised) product quantisation: emb (N, d), centred on the fitting rows' mean (faiss's IVF1), is
    rotated by an orthogonal R (d, d) and cut into n_sub sub-vectors of d / n_sub dims, each coded by one
    of k centroids (PQ: Jegou et al., TPAMI 2011). OPQ (Ge et al., CVPR 2013, non-parametric) alternates
    `iters` warm-started Lloyd steps per sub-space with the orthogonal Procrustes rotation R = U V^T,
    U S V^T = svd(X^T Y), Y the reconstruction; neither step can raise the distortion. Iteration counts =
    faiss's OPQMatrix (niter 50, niter_pq 4, niter_pq_0 40). fit_rows: the rows fitted (VQ-Rec: the
    training items, "strict"); every row is coded. -> {"codes": (N, n_sub) int64, "rotation": R,
    "centroids": (n_sub, k, d / n_sub), "mean": (d,), "distortion": per iteration, on the fitted rows}."""
    x = torch.from_numpy(check_embeddings(emb))
    d = x.shape[1]
    if n_sub < 1 or d % n_sub:
        raise ValueError(f"{d}-d embeddings do not split into {n_sub} equal sub-vectors")
    fit = x if fit_rows is None else x[torch.as_tensor(np.asarray(fit_rows))]
    mean = fit.mean(0)
    fit, rot, books, history = fit - mean, torch.eye(d), [None] * n_sub, []
    for it in range(opq_iters if rotate else 1):
        y = (fit @ rot).reshape(len(fit), n_sub, d // n_sub)  # (n, d) -> (n, M, d / M)
        recon = torch.empty_like(y)
        for m in range(n_sub):
            books[m], a = kmeans(y[:, m], k, first_iters if it == 0 else iters, seed + m, init=books[m])
            recon[:, m] = books[m][a]
        recon = recon.reshape(len(fit), d)  # (n, M, d / M) -> (n, d)
        history.append(float(((fit @ rot - recon) ** 2).sum(1).mean()))
        if rotate:
            u, _, vh = torch.linalg.svd(fit.T.double() @ recon.double())  # (d, d)
            rot = (u @ vh).float()
    y = ((x - mean) @ rot).reshape(len(x), n_sub, d // n_sub)
    codes = torch.stack([_nearest(y[:, m], books[m])[0] for m in range(n_sub)], 1)  # (N, M)
    return {"codes": codes.numpy(), "rotation": rot.numpy(), "centroids": torch.stack(books).numpy(),
            "mean": mean.numpy(), "distortion": history}


# ----------------------------------------------------------------------------- audits
def _check_codes(codes3) -> np.ndarray:
    c = np.asarray(codes3)
    if c.ndim != 2 or c.shape[0] < 1 or not np.issubdtype(c.dtype, np.integer) or c.min() < 0:
        raise ValueError(f"codes must be a non-empty (N, levels) int matrix >= 0, got {c.dtype} {c.shape}")
    return c.astype(np.int64, copy=False)


def collision_stats(codes3, codebook_size: int = 256) -> dict:
    """Audit of 3-code prefixes (JSON): collision_rate = 1 - unique prefixes / items; usage[l] = share of
    level l's codes used; perplexity[l] = exp(entropy of its code histogram)."""
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
    """What the embeddings allow (JSON): collision_floor = repeated rows / items, the lowest collision rate
    of a deterministic tokenizer; mean_cosine over distinct pairs (exact); effective_rank = exp(entropy
    of the normalised squared singular values of the centred matrix)."""
    e32 = check_embeddings(emb)
    e, n = e32.astype(np.float64), len(e32)
    repeated = n - len(np.unique(e32, axis=0))
    u = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    mean_cos = (np.square(u.sum(0)).sum() - n) / max(n * (n - 1), 1)  # sum over i != j of u_i . u_j
    sv2 = np.square(np.linalg.svd(e - e.mean(0), compute_uv=False))
    p = sv2[sv2 > 0] / sv2.sum() if sv2.sum() > 0 else np.ones(1)
    return {"items": int(n), "dim": int(e.shape[1]), "repeated_embeddings": int(repeated),
            "collision_floor": round(repeated / n, 6), "mean_cosine": round(float(mean_cos), 4),
            "effective_rank": round(float(np.exp(-(p * np.log(p)).sum())), 1)}


# ----------------------------------------------------------------------------- model
def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims, dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class RQVAEOutput(NamedTuple):
    x_hat: torch.Tensor  # (B, d) reconstruction in the input's units
    codes: torch.Tensor  # (B, levels) int64
    loss: torch.Tensor   # scalar: recon + quant.sum()
    recon: torch.Tensor  # scalar: MSE in the standardised space
    quant: torch.Tensor  # (levels,) codebook + beta * commitment, per level


class RQVAE(nn.Module):
    """TIGER's RQ-VAE: (B, d) -> latent (B, latent_dim) -> codes (B, levels)."""

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
        self.register_buffer("initialized", torch.tensor(False))  # codebooks k-means-initialised

    def set_standardization(self, emb: np.ndarray) -> None:
        """Store emb's per-dim mean/std (_standardization)."""
        mean, std = _standardization(check_embeddings(emb), self.cfg.standardize)
        self.mean.copy_(torch.from_numpy(mean))
        self.std.copy_(torch.from_numpy(std))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) -> latents (B, latent_dim)."""
        return self.encoder((x - self.mean) / self.std)

    def quantize(self, z: torch.Tensor, return_residuals: bool = False):
        """z (B, D) -> codes (B, L) int64, z_q (B, D) (the codes' sum, straight-through), losses (L,)
        [, residuals (L, B, D) detached]."""
        r = z
        z_q = torch.zeros_like(z)
        codes, losses, residuals = [], [], []
        for level in range(self.cfg.levels):
            book = self.codebooks[level]  # (K, D)
            idx, _ = _nearest(r.detach(), book.detach())
            # = book[idx] (B, D), but a matmul's gradient; index_put's accumulate varies on CPU threads
            e = F.one_hot(idx, book.shape[0]).to(book.dtype) @ book
            losses.append(F.mse_loss(e, r.detach()) + self.cfg.beta * F.mse_loss(r, e.detach()))
            codes.append(idx)
            residuals.append(r.detach())
            z_q = z_q + e.detach()
            r = r - e.detach()
        z_q = z + (z_q - z).detach()                             # straight-through estimator
        out = (torch.stack(codes, 1), z_q, torch.stack(losses))  # L x (B,) -> (B, L)
        return (*out, torch.stack(residuals)) if return_residuals else out

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latent (B, D) -> reconstruction (B, d) in the input's units."""
        return self.decoder(z_q) * self.std + self.mean

    def forward(self, x: torch.Tensor, return_residuals: bool = False):
        xs = (x - self.mean) / self.std  # (B, d) standardised
        z = self.encoder(xs)
        q = self.quantize(z, return_residuals=return_residuals)
        codes, z_q, quant = q[:3]
        xs_hat = self.decoder(z_q)
        recon = F.mse_loss(xs_hat, xs)  # mean over B and d
        out = RQVAEOutput(xs_hat * self.std + self.mean, codes, recon + quant.sum(), recon, quant)
        return (out, q[3]) if return_residuals else out

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int = 0) -> None:
        """Residual k-means of a batch's latents (TIGER)."""
        c = self.cfg
        self.codebooks.copy_(_residual(self.encode(x), c.levels, c.codebook_size, c.kmeans_iters, seed)[1])
        self.initialized.fill_(True)


@torch.no_grad()
def tokenize(model: RQVAE, emb, batch_size: int = 4096) -> np.ndarray:
    """Codes (N, levels) int64 of emb (N, d), in eval mode."""
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
    """Move codes unused in an epoch (counts (L, K) == 0) to random residuals (L, B, D) of its last batch
    (torch's global RNG); returns the count per level."""
    restarted = []
    for level in range(model.cfg.levels):
        dead = (counts[level] == 0).nonzero().flatten()
        if len(dead):
            pick = torch.randint(residuals.shape[1], (len(dead),)).to(residuals.device)
            model.codebooks[level, dead] = residuals[level, pick]
        restarted.append(len(dead))
    return restarted


class Recipe:
    """The RQ-VAE's training recipe for any loop: `loss(idx)` k-means-initialises the codebooks on the first
    batch (cfg.kmeans_init, TIGER) and keeps each item's codes; `end_of_epoch()` reports the epoch's code
    usage and (cfg.dead_code_restart) moves its unused codes onto residuals of its last batch."""

    def __init__(self, model: RQVAE, emb, seed: int = 0):
        self.model, self.seed, cfg = model, seed, model.cfg
        model.set_standardization(emb)
        self.x = torch.from_numpy(check_embeddings(emb)).to(model.codebooks.device)       # (N, d)
        self.codes = torch.zeros(len(self.x), cfg.levels, dtype=torch.long, device=self.x.device)
        self.residuals = None                                  # (L, B, D) of the last batch

    def init_codebooks(self, idx: torch.Tensor) -> None:
        """TIGER's k-means init on the items `idx` (cfg.kmeans_init), once."""
        if self.model.cfg.kmeans_init and not bool(self.model.initialized):
            self.model.init_codebooks(self.x[idx], seed=self.seed)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self.x.device)
        self.init_codebooks(idx)
        out, self.residuals = self.model(self.x[idx], return_residuals=True)
        self.codes[idx] = out.codes
        return out.loss

    def end_of_epoch(self, model: RQVAE | None = None) -> dict:
        """The epoch's code audit (JSON); `model` is unused (the signature of trainer.fit's evaluate)."""
        cfg = self.model.cfg
        stats = collision_stats(self.codes.cpu().numpy(), cfg.codebook_size)
        rec = {k: stats[k] for k in ("usage", "perplexity", "collision_rate", "largest_group")}
        if cfg.dead_code_restart:
            counts = torch.stack([torch.bincount(c, minlength=cfg.codebook_size)
                                  for c in self.codes.T])  # (L, K)
            rec["restarted"] = restart_dead_codes(self.model, counts, self.residuals)
        return rec
