"""The one training loop of the project: the EncodeRec encoder, UniSRec, TIGER and the RQ-VAE all train here.

Nothing in this file knows about recommenders (minGPT's trainer.py is the model). A model trains by handing
`fit` a loss over a batch of example indices, its optimizer and, optionally, an evaluation:

    cfg = TrainConfig(batch_size=256, max_epochs=10, metric="ndcg@10", patience=10)
    summary = fit(model, lambda idx: model.loss(x[idx], y[idx]), len(y), optimizer, "runs/x", cfg,
                  evaluate=lambda m: {"ndcg@10": ...})

The loop owns, once: autocast (bf16, or fp16 with a GradScaler), gradient clipping, the learning rate as
a function of the step, evaluation every N steps or at each epoch end with early stopping on one metric,
atomic `last.pt` / `best.pt` checkpoints (last first, so a kill between the two is repaired on resume),
exact resume with the RNG states, a wall-time cap, the stop on a non-finite loss, and data parallelism
under torchrun. Checkpoints hold tensors and plain Python values only and are read with
`weights_only=True`: no pickle is ever loaded.

Conventions
* Epoch e (1-based) visits `order(e)` (default: a permutation seeded by (cfg.seed, e)) in consecutive
  batches of cfg.batch_size. The same seed gives the same batches, so a resumed run continues exactly
  (CPU, same seed: the same weights as an uninterrupted run).
* Under torchrun (`init_distributed`), every rank draws the same global batch; `loss_fn` takes its rows
  with `rank_share(idx)` and returns this rank's part of the global batch loss: values and gradients
  summed over the ranks are those of the global batch. The loop sums the gradients (an all-reduce per
  parameter, instead of DistributedDataParallel's buckets: simpler, and the encoder's GradCache step
  needs it). Rank r draws its dropout from seed + r. Rank 0 alone evaluates and writes files.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm


@dataclass
class TrainConfig:
    lr: float = 1e-3                  # peak learning rate; schedule(step) multiplies it
    batch_size: int = 256             # the GLOBAL batch (all ranks together)
    max_epochs: int | None = None     # None: no cap on epochs
    max_steps: int | None = None      # None: no cap on optimizer steps
    eval_every: int | None = None     # steps between evaluations; None: at the end of every epoch
    metric: str | None = "ndcg@10"    # evaluate()'s key for best.pt and early stopping; None: best = last
    patience: int | None = None       # evaluations without a better metric before stopping; None: never
    grad_clip: float = 0.0            # max gradient norm; 0: no clipping
    amp: str = "off"                  # off | bf16 | fp16 (fp16 needs CUDA and uses a GradScaler)
    max_minutes: float | None = None  # stop at the first evaluation past this much time in this call
    checkpoint_minutes: float | None = 5.0  # also write last.pt this often between evaluations
    seed: int = 0

    # settings that may change when a run is resumed (they change when or how long, not what, it learns)
    RESUMABLE = ("max_epochs", "max_steps", "max_minutes", "checkpoint_minutes")


@dataclass
class TrainState:
    """Where a run is; saved in last.pt and restored on resume."""
    step: int = 0                     # optimizer steps done
    epoch: int = 0                    # epochs completed
    batch: int = 0                    # batches done in the current epoch
    best: float = -math.inf           # best value of cfg.metric so far
    best_step: int = 0
    best_valid: dict | None = None
    evals_without_improvement: int = 0
    stopped: bool = False             # early stopping fired
    wall_s: float = 0.0               # summed over resumed calls
    train_s: float = 0.0              # time in training steps (not evaluation)
    examples: int = 0
    history: list = field(default_factory=list)


# ----------------------------------------------------------------------------- files
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


def write_json(path, obj) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(json_safe(obj), indent=2)))


def json_safe(obj):
    """A copy with JSON types only (numpy scalars -> numbers, paths -> str, NaN/inf -> None)."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return clean(json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o))))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, or not written by this loop."""


def load_checkpoint(path) -> dict:
    """A last.pt / best.pt of `fit`, read without pickle (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle payload: all refused the same way
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it and "
                              f"train again") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{path} was not written by trainer.fit; delete it and train again")
    return ck


# ----------------------------------------------------------------------------- torchrun
def init_distributed(device: str = "auto") -> tuple[str, int, int]:
    """Under torchrun (WORLD_SIZE > 1) join the process group (NCCL on GPU, gloo on CPU) and return
    (this rank's device, rank, world); otherwise (device, 0, 1). 'auto' = cuda when available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if world <= 1:
        return ("cuda" if cuda else "cpu") if device == "auto" else device, 0, 1
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return device, torch.distributed.get_rank(), world


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group of more than one process, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        return d.get_rank(), d.get_world_size()
    return 0, 1


def rank_share(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's rows of a global batch `idx` (B,) and the weight n_rank / B of a mean loss over them,
    so that the weighted losses sum over the ranks to the global mean. A rank with no row (B < world)
    gets row 0 at weight 0. One process: (idx, 1.0)."""
    rank, world = rank_world()
    if world == 1:
        return idx, 1.0
    share = idx.tensor_split(world)[rank]
    return (share, len(share) / len(idx)) if len(share) else (idx[:1], 0.0)


def _rng_state(dev: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}


def _set_rng_state(dev: torch.device, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dev)


# ----------------------------------------------------------------------------- the loop
def fit(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], n_examples: int,
        optimizer: torch.optim.Optimizer, out_dir, cfg: TrainConfig, *,
        schedule: Callable[[int], float] | None = None, evaluate: Callable[[torch.nn.Module], dict] | None = None,
        order: Callable[[int], np.ndarray] | None = None, resume: bool = False, meta: dict | None = None,
        desc: str = "train") -> dict:
    """Train `model` and return a summary (JSON-ready).

    loss_fn(idx) -> scalar loss of the batch of example indices idx (B,) (a CPU int64 tensor), this
    rank's part under torchrun (see the module docstring). schedule(step) -> multiplier of cfg.lr at
    optimizer step `step` (0-based; default constant 1). evaluate(model) -> dict of metrics, called in eval
    mode without gradients at every evaluation point (every cfg.eval_every steps, or each epoch end, and at
    the last step); it may be None (then those points only checkpoint). order(epoch) -> the example indices
    epoch `epoch` visits (default: a seeded permutation of n_examples).

    Writes to out_dir: last.pt (model, optimizer, scaler, TrainState, RNG states, config, meta) at every
    evaluation point and every cfg.checkpoint_minutes; best.pt (model + meta) when cfg.metric improves;
    history.json (one record per evaluation). resume=True continues from last.pt; `meta` (JSON values and
    tensors, e.g. the model config and the data fingerprint) must then equal the saved one, except its
    'git_commit'. At the end the best weights (cfg.metric set) are loaded back into the model."""
    dev = next(model.parameters()).device
    _check_config(cfg, dev)
    out, meta, rank = Path(out_dir), meta or {}, rank_world()[0]
    order = order or (lambda e: np.random.default_rng([cfg.seed, e]).permutation(n_examples))
    n_batches = math.ceil(len(order(1)) / cfg.batch_size)
    cap = _step_cap(cfg, n_batches)
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    st = TrainState()
    if resume and (out / "last.pt").is_file():
        st = _resume(model, optimizer, scaler, out, cfg, meta, dev)
    else:
        if resume and rank == 0:
            print(f"no {out / 'last.pt'} to resume from: starting fresh")
        torch.manual_seed(cfg.seed + rank)
    run = _Run(model, optimizer, scaler, out, cfg, meta, st)
    t_call, wall0, capped, perm_epoch = time.perf_counter(), st.wall_s, False, None
    bar = tqdm(total=cap, initial=min(st.step, cap or st.step), desc=desc, unit="step", disable=rank > 0,
               dynamic_ncols=True)
    while not st.stopped and (cap is None or st.step < cap):
        model.train()
        if perm_epoch != st.epoch + 1:
            perm_epoch = st.epoch + 1
            perm = torch.as_tensor(order(perm_epoch), dtype=torch.int64)
            bar.set_description(f"{desc} epoch {perm_epoch}")
        idx = perm[st.batch * cfg.batch_size:(st.batch + 1) * cfg.batch_size]     # (B,) the global batch
        lr = cfg.lr * (schedule(st.step) if schedule else 1.0)
        with autocast():
            loss = loss_fn(idx)
        value = run.step(loss, lr)
        run.seg_loss, run.seg_n = run.seg_loss + value * len(idx), run.seg_n + len(idx)
        st.step, st.batch, st.examples = st.step + 1, st.batch + 1, st.examples + len(idx)
        end_of_epoch = st.batch == n_batches
        if end_of_epoch:
            st.epoch, st.batch = st.epoch + 1, 0
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}", refresh=False)
        done = cap is not None and st.step >= cap
        st.wall_s = wall0 + time.perf_counter() - t_call
        if not (done or (st.step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch)):
            run.maybe_save_between()
            continue
        time_up = run.evaluation_point(evaluate, lr, n_batches, cfg.max_minutes is not None
                                       and time.perf_counter() - t_call >= 60 * cfg.max_minutes)
        st = run.st
        if time_up and not st.stopped and not done:
            if rank == 0:
                print(f"time cap: stopping after step {st.step} ({cfg.max_minutes:g} min in this call; "
                      f"--resume continues)")
            capped = True
            break
    bar.close()
    if st.stopped and rank == 0:
        print(f"early stop: no better {cfg.metric} for {cfg.patience} evaluations "
              f"(best {st.best:.4f} at step {st.best_step})")
    if cfg.metric and (out / "best.pt").is_file():
        model.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    model.eval()
    return {"steps": st.step, "epochs": round(st.step / n_batches, 3), "best_step": st.best_step,
            "best_epoch": round(st.best_step / n_batches, 3), "best_valid": st.best_valid,
            "stopped_early": st.stopped, "time_capped": capped, "wall_time_s": round(st.wall_s, 3),
            "examples_per_s": round(st.examples / max(st.train_s, 1e-9), 1)}


class _Run:
    """What fit does at each step and at each evaluation point, around one TrainState."""

    def __init__(self, model, optimizer, scaler, out: Path, cfg: TrainConfig, meta: dict, st: TrainState):
        self.model, self.optimizer, self.scaler, self.out, self.cfg, self.meta, self.st = \
            model, optimizer, scaler, out, cfg, meta, st
        self.rank, self.world = rank_world()
        self.dev = next(model.parameters()).device
        self.t_saved = self.t_seg = time.perf_counter()
        self.seg_loss, self.seg_n = 0.0, 0

    def step(self, loss: torch.Tensor, lr: float) -> float:
        """Backward, gradient sum over ranks, clipping, the update; the global batch loss (checked finite)."""
        value = loss.detach().float().reshape(1)
        if self.world > 1:
            torch.distributed.all_reduce(value)                # the global batch loss, the same on every rank
        value = float(value)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss became {value} at step {self.st.step + 1}; stopped before the update. "
                f"{self.out / 'last.pt'} holds the last good state: lower the learning rate or use --amp off, "
                f"then --resume.")
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.world > 1:
            _all_reduce_grads(self.model)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return value

    def save_last(self) -> None:
        rngs = _gather(_rng_state(self.dev), self.world)       # a collective: every rank calls it
        if self.rank == 0:
            ck = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                  "scaler": self.scaler.state_dict() if self.scaler else None, "state": asdict(self.st),
                  "rng": rngs, "train_config": _plain_config(self.cfg), "meta": self.meta}
            atomic_write(self.out / "last.pt", lambda tmp: torch.save(ck, tmp))

    def save_best(self) -> None:
        st = self.st
        atomic_write(self.out / "best.pt", lambda tmp: torch.save(
            {"model": self.model.state_dict(), "step": st.step, "valid": st.best_valid, "meta": self.meta}, tmp))

    def maybe_save_between(self) -> None:
        """last.pt every cfg.checkpoint_minutes between evaluations (one process: no collective then)."""
        every = self.cfg.checkpoint_minutes
        if self.world == 1 and every is not None and time.perf_counter() - self.t_saved > 60 * every:
            self.save_last()
            self.t_saved = time.perf_counter()

    def evaluation_point(self, evaluate, lr: float, n_batches: int, time_up: bool) -> bool:
        """Evaluate (rank 0), count patience, write last.pt, then best.pt, then history.json; rank 0's
        verdict goes to every rank. Returns whether the time is up."""
        st = self.st
        st.train_s += time.perf_counter() - self.t_seg
        rec = {"step": st.step, "epoch": round(st.step / n_batches, 3), "loss": self.seg_loss / max(self.seg_n, 1),
               "lr": lr, "examples_per_s": round(self.seg_n / max(time.perf_counter() - self.t_seg, 1e-9), 1)}
        improved = self.rank == 0 and _evaluate(self.model, evaluate, self.cfg, st, rec)
        if self.world > 1:
            box = [asdict(st), time_up, improved]
            torch.distributed.broadcast_object_list(box, src=0)
            self.st, time_up, improved = TrainState(**box[0]), box[1], box[2]
        self.save_last()                                       # last.pt first, then best.pt (see _resume)
        if self.rank == 0:
            if improved:
                self.save_best()
            write_json(self.out / "history.json", self.st.history)
            tqdm.write(_summary_line(rec, self.st, self.cfg, improved))
        self.t_saved = self.t_seg = time.perf_counter()
        self.seg_loss, self.seg_n = 0.0, 0
        return time_up


def _check_config(cfg: TrainConfig, dev: torch.device) -> None:
    if cfg.amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"amp={cfg.amp!r}: use off, bf16 or fp16")
    if cfg.amp == "fp16" and dev.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use bf16 or off on the CPU")
    for name in ("batch_size", "max_epochs", "max_steps", "eval_every", "patience"):
        v = getattr(cfg, name)
        if v is not None and v < (0 if name in ("max_epochs", "max_steps") else 1):
            raise ValueError(f"{name} must be >= {0 if name.startswith('max') else 1}, got {v}")
    if cfg.max_epochs is None and cfg.max_steps is None and cfg.patience is None:
        raise ValueError("set max_epochs, max_steps or patience: nothing would end the training")


def _step_cap(cfg: TrainConfig, n_batches: int) -> int | None:
    caps = [c for c in (cfg.max_steps, None if cfg.max_epochs is None else cfg.max_epochs * n_batches)
            if c is not None]
    return min(caps) if caps else None


def _plain_config(cfg: TrainConfig) -> dict:
    return json_safe(asdict(cfg))


def _evaluate(model, evaluate, cfg: TrainConfig, st: TrainState, rec: dict) -> bool:
    """Run evaluate (if any) into rec, update best / patience in st; True when cfg.metric improved."""
    t0 = time.perf_counter()
    res = {}
    if evaluate is not None:
        model.eval()
        with torch.no_grad():
            res = dict(evaluate(model) or {})
    rec.update(valid=json_safe(res), eval_s=round(time.perf_counter() - t0, 3))
    improved = False
    if cfg.metric is not None and evaluate is not None:
        if cfg.metric not in res:
            raise ValueError(f"evaluate returned {sorted(res)} without {cfg.metric!r}, the early-stopping metric")
        value = float(res[cfg.metric])
        improved = not math.isnan(value) and value > st.best
        if improved:
            st.best, st.best_step, st.best_valid, st.evals_without_improvement = value, st.step, rec["valid"], 0
        else:
            st.evals_without_improvement += 1
        st.stopped = cfg.patience is not None and st.evals_without_improvement >= cfg.patience
    rec["improved"] = improved
    st.history.append(rec)
    return improved


def _summary_line(rec: dict, st: TrainState, cfg: TrainConfig, improved: bool) -> str:
    metrics = " ".join(f"{k} {v:.4f}" for k, v in rec["valid"].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n")
    line = (f"step {st.step} (epoch {rec['epoch']:g}) | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"{rec['examples_per_s']:.0f} ex/s")
    if metrics:
        line += f" | valid {metrics} ({rec['eval_s']:.1f}s)"
    if cfg.metric and rec["valid"]:
        line += " | best" if improved else f" | {st.evals_without_improvement}/{cfg.patience or '-'} without gain"
    return line


def _resume(model, optimizer, scaler, out: Path, cfg: TrainConfig, meta: dict, dev) -> TrainState:
    """Load last.pt into model / optimizer / scaler / RNG after checking that it is the same run."""
    path = out / "last.pt"
    ck = load_checkpoint(path)
    old = {k: v for k, v in ck.get("train_config", {}).items() if k not in TrainConfig.RESUMABLE}
    new = {k: v for k, v in _plain_config(cfg).items() if k not in TrainConfig.RESUMABLE}
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    diff.update({f"meta.{k}": (ck.get("meta", {}).get(k), v) for k, v in meta.items()
                 if k != "git_commit" and not _equal(ck.get("meta", {}).get(k), v)})
    if diff:
        raise CheckpointError(f"{path} belongs to another run ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())})"
                              f"; resume with the same data and settings (only {', '.join(TrainConfig.RESUMABLE)} "
                              f"may change) or use a fresh folder")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    st = TrainState(**ck["state"])
    rank, world = rank_world()
    rngs = ck["rng"]
    if len(rngs) == world:
        _set_rng_state(dev, rngs[rank])
    else:  # another world size than the run that wrote last.pt: fresh, distinct dropout streams
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank, st.step]).generate_state(1)[0]))
    if rank == 0:
        print(f"resumed from {path} at step {st.step} (epoch {st.epoch}, best {cfg.metric} {st.best:.4f} "
              f"at step {st.best_step})")
        best = out / "best.pt"
        if cfg.metric and st.best_step == st.step and st.step and (
                not best.is_file() or load_checkpoint(best).get("step") != st.step):
            # killed between last.pt and best.pt: the weights just loaded ARE the best step's
            _Run(model, optimizer, scaler, out, cfg, meta, st).save_best()
    return st


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return json_safe(a) == json_safe(b)


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _all_reduce_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
