"""The one training loop: the EncodeRec encoder, UniSRec, TIGER and the RQ-VAE all train here.

Recommender-agnostic (as minGPT's trainer.py): a model hands `fit` a loss over example indices, its
optimizer and, optionally, an evaluation:

    summary = fit(model, lambda idx: model.loss(x[idx], y[idx]), len(y), optimizer, "runs/x",
                  TrainConfig(max_epochs=10, patience=10), evaluate=lambda m: {"ndcg@10": ...})

The loop owns CUDA autocast (bf16), clipping, the learning rate per step, evaluation with
early stopping, atomic checkpoints read without pickle, exact resume, a time cap, a stop on a non-finite
loss, torchrun.
* Epoch e (1-based) visits `order(e)` (default: a permutation seeded by (cfg.seed, e)) in batches of
  cfg.batch_size; with the RNG states in last.pt a resumed run continues exactly (CPU: same weights).
* Under torchrun every rank draws the same global batch; `loss_fn` takes its rows with `rank_share(idx)`
  and returns its part of the global batch loss (summed over the ranks: the global loss and gradients).
  The loop all-reduces each gradient (not DDP's buckets: simpler, and the encoder's GradCache needs it).
  Rank r draws dropout from seed + r; rank 0 alone evaluates and writes files.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None


@dataclass
class TrainConfig:
    lr: float = 1e-3  # peak; schedule(step) multiplies it
    batch_size: int = 256  # the GLOBAL batch (all ranks)
    max_epochs: int | None = None  # None: no cap
    max_steps: int | None = None  # None: no cap
    eval_every: int | None = None  # steps between evaluations; None: each epoch end
    metric: str | None = "ndcg@10"  # evaluate()'s key for best.pt and early stopping; None: best = last
    patience: int | None = None  # evaluations without gain before stopping; None: never
    grad_clip: float = 0.0  # max gradient norm; 0: off
    amp: str = "off"  # off | bf16 (autocast)
    max_minutes: float | None = None  # stop at the first evaluation after this long (per call)
    checkpoint_minutes: float | None = 5.0  # also write last.pt this often between evaluations
    seed: int = 0

    # may change on resume: they change when or how long a run learns, not what
    RESUMABLE = ("max_epochs", "max_steps", "max_minutes", "checkpoint_minutes")


@dataclass
class TrainState:
    """Where a run is (kept in last.pt)."""
    step: int = 0  # optimizer steps done; every epoch has the same number of batches
    best: float = -math.inf  # best value of cfg.metric so far
    best_step: int = 0
    best_valid: dict | None = None
    evals_without_improvement: int = 0
    stopped: bool = False  # early stopping fired
    wall_s: float = 0.0  # summed over resumed calls
    train_s: float = 0.0  # in training steps, not evaluation
    examples: int = 0
    history: list = field(default_factory=list)


# ---- schedules and batch orders that models pass to `fit`
def lr_factor(step: int, warmup: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up to 1 over `warmup` steps,
    then sqrt(warmup / (step + 1)). The decay is scaled by the warm-up, so warmup must be >= 1."""
    if warmup < 1:
        raise ValueError(f"warmup_steps must be >= 1 (the decay is sqrt(warmup / step)), got {warmup}")
    s = step + 1
    return s / warmup if s < warmup else math.sqrt(warmup / s)


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, buckets: int) -> np.ndarray:
    """The N examples in epoch `epoch`'s order (consecutive runs of batch_size = the batches): a permutation
    seeded by (seed, epoch); with buckets > 1 each run of `buckets` batches is sorted by history length
    (`lengths` (N,)) and the full batches shuffled, so a batch pads little while its users still come from the
    whole shuffle. TIGER's default (--group-by-length 50)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    if buckets <= 1 or not len(perm):
        return perm
    span = batch_size * buckets
    order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                            for c in np.array_split(perm, range(span, len(perm), span))])
    n_full = len(order) // batch_size * batch_size
    batches = order[:n_full].reshape(-1, batch_size)                       # (n_full / bs, bs)
    return np.concatenate([batches[rng.permutation(len(batches))].ravel(), order[n_full:]])


# ---- files
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
    except OSError as e:  # name the real file, not the temp one
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path, obj) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(json_safe(obj), indent=2)))


def save_torch(path, obj) -> Path:
    """torch.save through memory, so that a full disk is an OSError naming `path` (torch's own writer
    raises an opaque RuntimeError)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getbuffer()))


def digest(obj) -> str:
    """A short sha256 of an object's canonical JSON: a run folder's identity."""
    return hashlib.sha256(json.dumps(json_safe(obj), sort_keys=True).encode()).hexdigest()[:10]


def save_npy(path, array: np.ndarray) -> Path:
    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, array)
    return atomic_write(path, save)


def json_safe(obj):
    """A copy with JSON types only (numpy scalars -> numbers, else str; NaN/inf -> None)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)),
                      parse_constant=lambda nan_or_inf: None)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not written by fit."""


def load_checkpoint(path, keys=("model",)) -> dict:
    """A last.pt / best.pt of `fit`, read without pickle, with `keys`; else a CheckpointError that says
    how to recover."""
    path = Path(path)
    fix = ("delete it, and --resume starts this run over" if path.name == "last.pt" else
           f"delete {path.parent} and train again")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; {fix}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle payload: all refused alike
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); {fix}") from None
    if not (isinstance(ck, dict) and all(k in ck for k in keys) and isinstance(ck["model"], dict)
            and all(isinstance(ck.get(k, {}), dict) for k in ("meta", "train_config", "state"))
            and all(isinstance(v, torch.Tensor) for v in ck["model"].values())):
        raise CheckpointError(f"{path} was not written by trainer.fit (it needs {', '.join(keys)}); {fix}")
    return ck


def load_weights(model: torch.nn.Module, ck: dict, path) -> None:
    """ck['model'] into model, strictly; a checkpoint of another model is a CheckpointError."""
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[-1].strip()[:160]
        raise CheckpointError(f"{path} holds weights of another model ({first}); delete it and train "
                              f"again, or evaluate the run it belongs to") from None
    own = model.state_dict()
    if bad := next((k for k, v in ck["model"].items() if v.dtype != own[k].dtype or v.is_floating_point()
                    and not v.isfinite().all()), None):
        raise CheckpointError(f"{path}: weight {bad} is {ck['model'][bad].dtype} with NaN/inf or of another "
                              f"dtype than {own[bad].dtype}; delete the run and train again")


def _save_best(out: Path, model, st: TrainState, meta: dict) -> None:
    save_torch(out / "best.pt", {"model": model.state_dict(), "step": st.step, "valid": st.best_valid,
                                 "meta": meta})


# ---- run folders: provenance and one writer
def git_commit() -> str | None:
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True)
        return git.stdout.decode().strip() or None
    except OSError:
        return None


_LOCKS: dict[Path, int] = {}  # run folders this process writes -> their locked .lock file


def lock_folder(out: Path) -> None:
    """One writer per run folder: an exclusive flock on out/.lock, held until release_locks() (or exit,
    kill -9 included); a second writer is refused with the owner's pid, host and start time."""
    if fcntl is None or out in _LOCKS:  # fcntl: POSIX only
        return
    out.mkdir(parents=True, exist_ok=True)
    try:  # O_NOFOLLOW: a planted symlink never gets our pid written over its target
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ValueError(f"{out / '.lock'} is not a plain file ({e.strerror}): delete it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(f"{out} is being written by {owner}: wait for it, or stop it and --resume") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
    _LOCKS[out] = fd


def release_locks() -> None:
    for fd in _LOCKS.values():
        os.close(fd)  # closing releases the flock
    _LOCKS.clear()


# ---- torchrun
def init_distributed(device: str = "auto") -> tuple[str, int, int]:
    """(device, rank, world); under torchrun, after joining the process group. A torchrun environment that
    does not hold together is a ValueError naming it."""
    env = {k: os.environ.get(k, d) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"))}
    where = ", ".join(f"{k}={v}" for k, v in env.items())
    if not all(v.isdigit() for v in env.values()) or int(env["RANK"]) >= int(env["WORLD_SIZE"]) > 0 or \
            int(env["LOCAL_RANK"]) >= int(env["WORLD_SIZE"]):
        raise ValueError(f"{where}: ranks must be whole numbers below WORLD_SIZE; launch with torchrun, or "
                         "unset them")
    world = int(env["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if world <= 1:
        return check_device(device), 0, 1
    if env["RANK"] == "0":  # the rendezvous blocks until every rank has joined
        print(f"waiting for {world} ranks at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
              flush=True)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        except RuntimeError as e:
            raise ValueError(f"{where}: {str(e).strip()[:200]}; launch with torchrun, or unset "
                             "them") from None
    return device, torch.distributed.get_rank(), world


def check_device(device: str) -> str:
    """'auto' -> cuda if available, else cpu; a device this machine lacks is a ValueError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device: use auto, cpu or cuda[:N]") from None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= n:
        raise ValueError(f"--device {device}: this machine has {n} CUDA device(s); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda[:N] are supported")
    return str(dev)


def rank_world() -> tuple[int, int]:
    """(rank, world size) in a process group of > 1 process, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        return d.get_rank(), d.get_world_size()
    return 0, 1


def rank_share(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's rows of idx (B,) and the weight n_rank / B of their mean loss (none: row 0, weight 0)."""
    rank, world = rank_world()
    if world == 1:
        return idx, 1.0
    share = idx.tensor_split(world)[rank]
    return (share, len(share) / len(idx)) if len(share) else (idx[:1], 0.0)


def _rng_state(dev: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(dev: torch.device, state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dev)


def _all_reduce_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)


# ---- the loop
def fit(model: torch.nn.Module, loss_fn, n_examples: int, optimizer: torch.optim.Optimizer, out_dir,
        cfg: TrainConfig, *, schedule=None, evaluate=None, order=None, resume: bool = False,
        meta: dict | None = None, desc: str = "train") -> dict:
    """Train `model`, load its best weights back (cfg.metric set) and return a JSON-ready summary.

    loss_fn(idx (B,) CPU int64) -> scalar loss; schedule(0-based step) -> factor of cfg.lr; evaluate(model)
    -> dict of metrics; order(epoch) -> indices. An evaluation writes last.pt, then best.pt if cfg.metric
    improved, then history.json. resume=True continues from last.pt, whose meta (e.g. data fingerprint)
    must equal `meta` but for 'git_commit'."""
    dev = next(model.parameters()).device
    _check_config(cfg)
    out, meta, rank = Path(out_dir), meta or {}, rank_world()[0]
    order = order or (lambda e: np.random.default_rng([cfg.seed, e]).permutation(n_examples))
    n_batches = math.ceil(len(order(1)) / cfg.batch_size)
    if n_batches == 0:
        raise ValueError(f"{desc}: no training examples")
    epoch_cap = None if cfg.max_epochs is None else cfg.max_epochs * n_batches
    cap = min((c for c in (cfg.max_steps, epoch_cap) if c is not None), default=None)
    st = TrainState()
    if resume and (out / "last.pt").is_file():
        st = _resume(model, optimizer, out, cfg, meta, dev)
    else:
        if resume and rank == 0:
            print(f"no {out / 'last.pt'} to resume from: starting fresh")
        torch.manual_seed(cfg.seed + rank)
    run = _Run(model, optimizer, out, cfg, meta, st)
    t_call, wall0, capped, perm = time.perf_counter(), st.wall_s, False, None
    bar = tqdm(total=cap, initial=min(st.step, cap or st.step), desc=desc, unit="step", disable=rank > 0,
               dynamic_ncols=True)
    try:
        while not st.stopped and (cap is None or st.step < cap):
            model.train()
            epoch, batch = divmod(st.step, n_batches)  # epochs done, batches done in this one
            if perm is None or batch == 0:
                perm = torch.as_tensor(order(epoch + 1), dtype=torch.int64)
                bar.set_description(f"{desc} epoch {epoch + 1}")
            idx = perm[batch * cfg.batch_size:(batch + 1) * cfg.batch_size]  # (B,) the global batch
            lr = cfg.lr * (schedule(st.step) if schedule else 1.0)
            with torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext():
                loss = loss_fn(idx)
            value = run.step(loss, lr, len(idx))
            st.step, st.examples = st.step + 1, st.examples + len(idx)
            run.forecast(cap, n_batches, desc)
            end_of_epoch = st.step % n_batches == 0
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
            capped = time_up and not st.stopped and not done
            if capped:
                if rank == 0:
                    print(f"time cap: stop at step {st.step} ({cfg.max_minutes:g} min/call); --resume "
                          "continues")
                break
    finally:
        bar.close()  # before any error message
    if st.stopped and rank == 0:
        print(f"early stop: no better {cfg.metric} for {cfg.patience} evaluations "
              f"(best {st.best:.4f} at step {st.best_step})")
    if rank_world()[1] > 1:
        torch.distributed.barrier()  # rank 0's best.pt is written
    if cfg.metric and (out / "best.pt").is_file():
        load_weights(model, load_checkpoint(out / "best.pt"), out / "best.pt")
    model.eval()
    return {"steps": st.step, "epochs": round(st.step / n_batches, 3), "best_step": st.best_step,
            "best_epoch": round(st.best_step / n_batches, 3), "best_valid": st.best_valid,
            "stopped_early": st.stopped, "time_capped": capped, "wall_time_s": round(st.wall_s, 3),
            "examples_per_s": round(st.examples / max(st.train_s, 1e-9), 1)}


class _Run:
    """fit's step and evaluation point."""

    def __init__(self, model, optimizer, out: Path, cfg: TrainConfig, meta: dict, st: TrainState):
        self.model, self.optimizer, self.out = model, optimizer, out
        self.cfg, self.meta, self.st = cfg, meta, st
        self.rank, self.world = rank_world()
        self.dev = next(model.parameters()).device
        self.t_saved = self.t_seg = time.perf_counter()
        self.seg_loss, self.seg_n = 0.0, 0
        self.first, self.t1 = st.step, 0.0

    def forecast(self, cap: int | None, n_batches: int, desc: str) -> None:
        """Once, at this call's 4th step: the training time ahead, timed on steps 2 to 4."""
        if self.st.step == self.first + 1:
            self.t1 = time.perf_counter()
        elif self.st.step == self.first + 4 and self.rank == 0:
            per, left = (time.perf_counter() - self.t1) / 3, cap - self.st.step if cap else n_batches
            tqdm.write(f"{desc}: {per:.2f} s a step, ~{per * left / 60:.1f} min of steps "
                       f"{'to the end' if cap else 'an epoch'} (evaluations aside)", file=sys.stderr)

    def step(self, loss: torch.Tensor, lr: float, n: int) -> float:
        """One update; returns the global batch loss (non-finite: raises before the update)."""
        value = loss.detach().float().reshape(1)
        if self.world > 1:
            torch.distributed.all_reduce(value)  # the same on every rank
        value = float(value)
        if not math.isfinite(value):
            last = self.out / "last.pt"
            kept = (f"{last} holds the state of step {self.st.step}: lower the learning rate or use --amp "
                    f"off, then --resume" if last.is_file() else "no checkpoint was written yet: lower the "
                    "learning rate or use --amp off and start again")
            raise FloatingPointError(f"training loss {value} at step {self.st.step + 1}; stopped before the "
                                     f"update. {kept}.")
        if value == 0 and not self.st.step:  # e.g. InfoNCE over identical texts: no gradient, ever
            raise ValueError("training loss exactly 0 at the first step: the data leave nothing to learn")
        opt = self.optimizer
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            _all_reduce_grads(self.model)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        opt.step()
        self.seg_loss, self.seg_n = self.seg_loss + value * n, self.seg_n + n
        return value

    def save_last(self) -> None:
        rngs = [_rng_state(self.dev)]
        if self.world > 1:  # a collective: every rank calls it
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, _rng_state(self.dev))
        if self.rank == 0:
            ck = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                  "state": asdict(self.st), "rng": rngs, "train_config": json_safe(asdict(self.cfg)),
                  "meta": self.meta}
            save_torch(self.out / "last.pt", ck)

    def maybe_save_between(self) -> None:
        # one process only: save_last is a collective
        every = self.cfg.checkpoint_minutes
        if self.world == 1 and every is not None and time.perf_counter() - self.t_saved > 60 * every:
            self.save_last()
            self.t_saved = time.perf_counter()

    def evaluation_point(self, evaluate, lr: float, n_batches: int, time_up: bool) -> bool:
        """Rank 0 evaluates (its verdict goes to every rank); write the files; return whether time is up."""
        st, now = self.st, time.perf_counter()
        st.train_s += now - self.t_seg
        rec = {"step": st.step, "epoch": round(st.step / n_batches, 3), "lr": lr,
               "loss": self.seg_loss / max(self.seg_n, 1),
               "examples_per_s": round(self.seg_n / max(now - self.t_seg, 1e-9), 1)}
        improved = self.rank == 0 and _evaluate(self.model, evaluate, self.cfg, st, rec)
        if self.world > 1:
            box = [asdict(st), time_up, improved]
            torch.distributed.broadcast_object_list(box, src=0)
            self.st, time_up, improved = TrainState(**box[0]), *box[1:]
        self.save_last()  # last.pt first, then best.pt (see _resume)
        if self.rank == 0:
            if improved:
                _save_best(self.out, self.model, self.st, self.meta)
            write_json(self.out / "history.json", self.st.history)
            tqdm.write(_summary_line(rec, self.st, self.cfg, improved))
        self.t_saved = self.t_seg = time.perf_counter()
        self.seg_loss, self.seg_n = 0.0, 0
        return time_up


def _check_config(cfg: TrainConfig) -> None:
    if cfg.amp not in ("off", "bf16"):
        raise ValueError(f"amp={cfg.amp!r}: use off or bf16")
    for name, low in (("batch_size", 1), ("max_epochs", 0), ("max_steps", 0), ("eval_every", 1),
                      ("patience", 1)):
        if (v := getattr(cfg, name)) is not None and v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")
    if cfg.max_epochs is None and cfg.max_steps is None and cfg.patience is None:
        raise ValueError("set max_epochs, max_steps or patience: nothing would end the training")


def _evaluate(model, evaluate, cfg: TrainConfig, st: TrainState, rec: dict) -> bool:
    """evaluate (if any) into rec, st.history and best / patience; True when cfg.metric improved."""
    t0, res, improved = time.perf_counter(), {}, False
    if evaluate is not None:
        model.eval()
        with torch.no_grad():
            res = dict(evaluate(model) or {})
    rec.update(valid=json_safe(res), eval_s=round(time.perf_counter() - t0, 3))
    if cfg.metric is not None and evaluate is not None:
        if cfg.metric not in res:
            raise ValueError(f"evaluate returned {sorted(res)}, not the early-stop metric {cfg.metric!r}")
        value = float(res[cfg.metric])
        improved = not math.isnan(value) and value > st.best
        if improved:
            st.best, st.best_step, st.best_valid = value, st.step, rec["valid"]
        st.evals_without_improvement = 0 if improved else st.evals_without_improvement + 1
        st.stopped = cfg.patience is not None and st.evals_without_improvement >= cfg.patience
    rec["improved"] = improved
    st.history.append(rec)
    return improved


def _summary_line(rec: dict, st: TrainState, cfg: TrainConfig, improved: bool) -> str:
    line = (f"step {st.step} (epoch {rec['epoch']:g}) | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"{rec['examples_per_s']:.0f} ex/s")
    valid = " ".join(f"{k} {v:.4f}" for k, v in rec["valid"].items() if type(v) is float)  # not counts
    line += f" | valid {valid} ({rec['eval_s']:.1f}s)" if valid else ""
    if cfg.metric and rec["valid"]:
        bad = st.evals_without_improvement
        line += " | best" if improved else f" | {bad}/{cfg.patience or '-'} without gain"
    return line


def _resume(model, optimizer, out: Path, cfg: TrainConfig, meta: dict, dev) -> TrainState:
    """Load last.pt (checked: the same run) into model, optimizer and RNG."""
    path, keep = out / "last.pt", TrainConfig.RESUMABLE
    ck = load_checkpoint(path, ("model", "optimizer", "state", "rng", "train_config", "meta"))
    old, old_meta = ck.get("train_config", {}), ck.get("meta", {})
    pairs = [(k, old.get(k), v) for k, v in json_safe(asdict(cfg)).items() if k not in keep]
    pairs += [(f"meta.{k}", old_meta.get(k), v) for k, v in meta.items()  # where files lie may change;
              if k != "git_commit" and not k.endswith("_path")                # keys newer than last.pt:
              and (k in old_meta or k == "data_fingerprint")]                 # nothing to compare
    changes = ", ".join(f"{k}: {a} -> {b}" for k, a, b in pairs if not _equal(a, b))
    if changes:
        raise CheckpointError(f"{path} belongs to another run ({changes}); resume with the same data and "
                              f"settings (only {', '.join(keep)} may change) or use a fresh folder")
    load_weights(model, ck, path)
    rank, world = rank_world()
    try:
        optimizer.load_state_dict(ck["optimizer"])
        st = TrainState(**ck["state"])
        types = {"step": int, "best_step": int, "evals_without_improvement": int, "examples": int,
                 "stopped": bool, "history": list, "best": float, "wall_s": float, "train_s": float}
        if bad := [k for k, t in types.items() if not isinstance(getattr(st, k), t) or t is int and
                   getattr(st, k) < 0 or k == "best" and math.isnan(st.best)]:
            raise ValueError(f"state.{bad[0]} = {getattr(st, bad[0])!r}")
        if not (isinstance(ck["rng"], list) and ck["rng"] and all(
                isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor) for r in ck["rng"])):
            raise ValueError("rng is not a list of RNG states")
        if len(ck["rng"]) == world:
            _set_rng_state(dev, ck["rng"][rank])
        else:  # another world size than last.pt's: fresh, distinct dropout streams
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank, st.step]).generate_state(1)[0]))
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: its optimizer, state or RNG does not fit this run "
                              f"({type(e).__name__}: {str(e)[:80]}); delete it, and --resume starts this run "
                              "over") from None
    if rank == 0:
        print(f"resumed from {path} at step {st.step} (best {cfg.metric} {st.best:.4f} "
              f"at step {st.best_step})")
    try:  # a lost best.pt: rebuilt from last.pt if it holds the best step, else by the next evaluation
        intact = not (cfg.metric and st.best_step) or \
            load_checkpoint(out / "best.pt", ("model", "step"))["step"] == st.best_step
    except CheckpointError:
        intact = False
    if not intact and st.best_step == st.step and rank == 0:
        _save_best(out, model, st, meta)
    elif not intact and st.best_step != st.step:
        print(f"warning: {out / 'best.pt'} is missing or damaged: the next evaluation writes a new one")
        st.best, st.best_step, st.best_valid, st.evals_without_improvement = -math.inf, 0, None, 0
    return st


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return json_safe(a) == json_safe(b)
