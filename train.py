"""One command line over the EncodeRec pipeline (arXiv 2601.10837).

    python train.py --stage encoder --backbone minilm --dataset D   # InfoNCE fine-tuning (title <-> document)
    python train.py --stage embed   --dataset D --encoder minilm    # frozen item embeddings
    python train.py --stage rqvae   --dataset D --encoder E         # semantic IDs
    python train.py --stage tiger   --dataset D --encoder E         # generative retrieval
    python train.py --stage unisrec --dataset D --encoder E         # text-based SASRec
    python train.py --stage all     --dataset D --backbone minilm   # everything, skipping what is done

Run folders (all under --runs, default ./runs):
    runs/<dataset>/encoderec-<backbone>/        fine-tuned encoder, sentence-transformers layout,
                                                + checkpoint.pt, history.json, run.json
    runs/<dataset>/<encoder>/item_emb-<fields>.npy   row i = catalog item i, float32 (N, d)
                                                + .json sidecar: what made it (encoder, fields, data)
    runs/<dataset>/<encoder>/semantic_ids-<tokenizer>[-<variant>]-<fields>.npy   (N, 4) int64, row i =
                                                item i: 3 codes + the dedup code; .json sidecar with
                                                vocab_sizes, config, collision audit; the RQ-VAE
                                                checkpoint beside it (same name, .pt). <variant>
                                                marks a non-default config: e<N> = N RQ-VAE epochs,
                                                nodcr = no dead-code restart

Every user error ends with a message and exit code 2, never a bare traceback.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from data import ITEM_TEXT_FIELDS, REGISTRY, DataError, file_sha256, load_dataset

WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # -> clear message
STAGES = {
    "encoder": "EncodeRec InfoNCE fine-tuning",
    "embed": "item embeddings from a frozen encoder",
    "rqvae": "semantic IDs of the items: RQ-VAE (--tokenizer rqvae) or residual k-means (rkmeans)",
    "tiger": "TIGER generative retrieval on semantic IDs (beam search), early stopping on valid NDCG@10",
    "unisrec": "UniSRec on frozen item embeddings, or SASRec-ID with --encoder none",
    "all": "the whole pipeline (issue 6)",
}


# ----------------------------------------------------------------------------- helpers
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename onto path, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def parse_fields(text: str | None, default):
    from eval import parse_fields as _parse
    return _parse(text) or tuple(default)


def encoder_key(encoder: str) -> str:
    """Folder-safe name of an encoder: 'minilm', or the run/model folder's name."""
    p = Path(encoder)
    return p.resolve().name if p.is_dir() else encoder.lower()


def weights_digest(folder: Path) -> str:
    """Identity of a weights folder: size + mtime of model.safetensors (cheap, changes on rewrite)."""
    st = (folder / "model.safetensors").stat()
    return hashlib.sha256(f"{folder.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def init_distributed(device: str) -> tuple[str, int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPU, gloo on CPU) and
    return (this rank's device, rank, world size); otherwise (device, 0, 1)."""
    import torch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0, 1
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    elif device == "auto":
        device = "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return device, torch.distributed.get_rank(), world


def embedding_path(runs: Path, dataset: str, encoder: str, fields) -> Path:
    return runs / dataset / encoder_key(encoder) / f"item_emb-{'+'.join(fields)}.npy"


TOKENIZERS = ("rqvae", "rkmeans")
RKMEANS = {"levels": 3, "k": 256, "iters": 50, "standardize": True}  # residual k-means = RQ-VAE's codebooks


def semantic_ids_path(runs: Path, dataset: str, encoder: str, tokenizer: str, fields,
                      rqvae_epochs: int | None = None, dead_code_restart: bool = True) -> Path:
    """(N, 4) int64 semantic IDs (row i = catalog item i); the .json sidecar and .pt checkpoint beside it.
    A non-default RQ-VAE config is part of the name (-e20 = 20 epochs, -nodcr = no dead-code restart),
    so that a smoke run and a full run of the same encoder keep separate files."""
    import rqvae as rq
    tag = tokenizer
    if tokenizer == "rqvae" and rqvae_epochs not in (None, rq.RQVAEConfig.epochs):
        tag += f"-e{rqvae_epochs}"
    if tokenizer == "rqvae" and not dead_code_restart:
        tag += "-nodcr"
    return Path(runs) / dataset / encoder_key(encoder) / f"semantic_ids-{tag}-{'+'.join(fields)}.npy"


def ensure_semantic_ids(args, ds) -> Path:
    """Semantic IDs of every item of `ds` from the `--encoder` embeddings of `--fields` (made with
    stage_embed when missing), tokenised by `--tokenizer` (rqvae | rkmeans). Written once; a sidecar
    that matches the same embedding bytes, data, fields and config means "up to date" (no work).
    Returns the .npy path: (N, 4) int64 = 3 codes + the dedup code, sidecar["vocab_sizes"] = 4 ints."""
    import time
    from dataclasses import asdict, replace

    import rqvae as rq

    tokenizer = getattr(args, "tokenizer", None) or "rqvae"
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown --tokenizer {tokenizer!r}; choose from {', '.join(TOKENIZERS)}")
    if str(args.encoder).lower() == "none":
        raise DataError("semantic IDs are made from item text embeddings: pass --encoder minilm or a "
                        "fine-tuned run folder, not 'none'")
    fields = parse_fields(getattr(args, "fields", None), ITEM_TEXT_FIELDS)
    emb_path = ensure_embeddings(args, ds, fields)
    emb = np.load(emb_path)
    if emb.ndim != 2 or emb.shape[0] != ds.n_items:
        raise DataError(f"{emb_path} has shape {emb.shape} but {ds.name} has {ds.n_items} items: delete "
                        f"it and re-run (it is re-made with train.py --stage embed)")
    epochs, restart = getattr(args, "rqvae_epochs", None), not getattr(args, "no_dead_code_restart", False)
    if tokenizer == "rqvae":
        cfg = rq.RQVAEConfig(input_dim=int(emb.shape[1]))
        if epochs is not None:
            cfg = replace(cfg, epochs=epochs)
        if not restart:
            cfg = replace(cfg, dead_code_restart=False)
        config = {"rqvae": asdict(cfg), "seed": args.seed}
    else:
        config = {"rkmeans": dict(RKMEANS), "seed": args.seed}
    config = json.loads(json.dumps(config))                      # tuples -> lists, as the sidecar holds them
    out = semantic_ids_path(Path(args.runs), ds.name, args.encoder, tokenizer, fields, epochs, restart)
    side = out.with_suffix(".json")
    inputs = {"tokenizer": tokenizer, "fields": list(fields), "embedding_sha256": file_sha256(emb_path),
              "embedding_bytes": emb_path.stat().st_size, "data_fingerprint": ds.fingerprint,
              "config": config}
    if out.exists() and side.exists():
        try:
            old = json.loads(side.read_text())
        except ValueError:
            old = {}
        if all(old.get(k) == v for k, v in inputs.items()):
            print(f"up to date: {out}", file=sys.stderr)
            return out
    t0 = time.time()
    ckpt = None
    if tokenizer == "rqvae":
        import torch
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        print(f"{ds.name}: RQ-VAE on {emb.shape[0]} x {emb.shape[1]} embeddings ({emb_path.name}), "
              f"{cfg.epochs} epochs, device {device}", file=sys.stderr)
        model, history = rq.train_rqvae(emb, cfg, seed=args.seed, device=device)
        codes = rq.tokenize(model, emb)                                              # (N, 3)
        ckpt = out.with_suffix(".pt")
        rq.save_rqvae(model, ckpt, history=history, meta={
            "dataset": ds.name, "data_fingerprint": ds.fingerprint, "embedding": str(emb_path),
            "fields": list(fields), "seed": args.seed, "git_commit": git_commit()})
    else:
        print(f"{ds.name}: residual k-means on {emb.shape[0]} x {emb.shape[1]} embeddings "
              f"({emb_path.name})", file=sys.stderr)
        codes = rq.residual_kmeans(emb, seed=args.seed, progress=True, **RKMEANS)    # (N, 3)
    ids, vocab = rq.semantic_ids(codes, RKMEANS["k"])                                # (N, 4), 4 ints
    stats = rq.collision_stats(codes, RKMEANS["k"])

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, ids)
    atomic_write(out, save)
    write_json(side, {**inputs, "vocab_sizes": list(vocab), "shape": list(ids.shape),
                      "encoder": str(args.encoder), "embedding": str(emb_path),
                      "checkpoint": str(ckpt) if ckpt else None, "collisions": stats,
                      "ids_unique": len(np.unique(ids, axis=0)) == len(ids),
                      "wall_time_s": round(time.time() - t0, 1), "git_commit": git_commit()})
    print(f"wrote {out} {ids.shape}, vocab sizes {list(vocab)}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- stages
def stage_encoder(args) -> None:
    """EncodeRec fine-tuning: in-batch InfoNCE between each item's title and its document."""
    import torch
    from encoderec import FinetuneConfig, finetune, load_encoder
    from eval import holdout_items, retrieval_eval

    ds = load_dataset(args.dataset, args.data_dir)
    doc_fields = parse_fields(args.doc_fields, ("features", "description", "brand", "categories"))
    titles, docs = ds.title_texts(), ds.document_texts(doc_fields)
    held = holdout_items(ds, args.holdout, args.seed, doc_fields) if args.holdout > 0 else np.zeros(0, int)
    held_set = set(held.tolist())
    pairs = [(titles[i], docs[i]) for i in range(ds.n_items)
             if titles[i] and docs[i] and i not in held_set]
    if len(pairs) < 2:
        raise DataError(f"{ds.name}: only {len(pairs)} items have both a title and a document "
                        f"({', '.join(doc_fields)}); EncodeRec fine-tuning needs text pairs. "
                        f"Choose other --doc-fields or a dataset with descriptions.")
    out = Path(args.out) if args.out else Path(args.runs) / ds.name / f"encoderec-{args.backbone}"
    if (out / "checkpoint.pt").exists() and not args.resume:
        raise DataError(f"{out} already holds a run: pass --resume to continue it, or --out NEW_DIR")
    cfg = FinetuneConfig(batch_size=args.batch_size, chunk_size=args.chunk_size, lr=args.lr or 5e-5,
                         epochs=args.epochs, temperature=args.temperature, symmetric=args.symmetric,
                         amp=args.amp, compile=args.compile, seed=args.seed, max_length=args.max_length)
    torch.manual_seed(args.seed)
    device, rank, world = init_distributed(args.device)
    enc = load_encoder(args.backbone, weights=args.weights, device=device,
                       max_length=args.max_length)
    if rank == 0:
        write_json(out / "run.json", {
            "stage": "encoder", "args": vars(args), "config": cfg.__dict__, "dataset": ds.name,
            "data_fingerprint": ds.fingerprint, "git_commit": git_commit(), "n_pairs": len(pairs),
            "doc_fields": list(doc_fields), "holdout_items": held.tolist(), "world_size": world})
        print(f"{ds.name}: {len(pairs)} (title, document) pairs, {len(held)} held-out items, "
              f"document = {' + '.join(doc_fields)}", file=sys.stderr)

    def eval_fn(encoder, epoch):
        m = retrieval_eval(encoder, ds, doc_fields=doc_fields,
                           query_items=held if len(held) else None)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}

    finetune(enc, pairs, out, cfg, resume=args.resume, eval_fn=None if args.no_eval else eval_fn,
             meta={"git_commit": git_commit(), "data_fingerprint": ds.fingerprint, "dataset": ds.name})
    if rank == 0:
        print(f"fine-tuned encoder written to {out}", file=sys.stderr)


def ensure_embeddings(args, ds, fields) -> Path:
    """The item-embedding file of args.encoder for `fields`, made (or re-made) by stage_embed when it
    is missing or its sidecar names other inputs (weights, data, fields, max length). A file without
    a sidecar was placed by hand and is used as it is."""
    path = embedding_path(Path(args.runs), ds.name, args.encoder, fields)
    if path.exists() and not path.with_suffix(".json").exists():
        print(f"{path} has no sidecar: used as it is", file=sys.stderr)
        return path
    if not path.exists():
        print(f"{path} is missing: embedding the items first", file=sys.stderr)
    return stage_embed(argparse.Namespace(**{**vars(args), "out": str(path), "batch_size": 64}))


def stage_embed(args) -> Path:
    """Item embeddings of a dataset with a frozen encoder: row i = catalog item i."""
    from encoderec import load_encoder, resolve_backbone

    ds = load_dataset(args.dataset, args.data_dir)
    fields = parse_fields(args.fields, ITEM_TEXT_FIELDS)
    texts = ds.item_texts(fields)
    missing = sum(t is None for t in texts)
    if missing == ds.n_items:
        raise DataError(f"{ds.name}: no item has any of the fields {', '.join(fields)}; "
                        f"choose --fields that the dataset has (see python data.py --stats)")
    if missing:
        print(f"warning: {missing} of {ds.n_items} items have none of {', '.join(fields)}: "
              f"they are embedded from the empty text", file=sys.stderr)
    folder = resolve_backbone(args.encoder, weights=args.weights)
    out = Path(args.out) if args.out else embedding_path(Path(args.runs), ds.name, args.encoder, fields)
    meta = {"dataset": ds.name, "data_fingerprint": ds.fingerprint, "encoder": str(args.encoder),
            "weights": str(folder), "weights_digest": weights_digest(folder), "fields": list(fields),
            "max_length": args.max_length, "items_without_text": missing, "git_commit": git_commit()}
    side = out.with_suffix(".json")
    if out.exists() and side.exists():
        old = json.loads(side.read_text())
        if all(old.get(k) == meta[k] for k in ("data_fingerprint", "weights_digest", "fields", "max_length")):
            print(f"up to date: {out}", file=sys.stderr)
            return out
    enc = load_encoder(folder, device=args.device, max_length=args.max_length)
    emb = enc.encode([t or "" for t in texts], batch_size=args.batch_size)   # (I, d) float32
    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, emb)
    atomic_write(out, save)
    write_json(side, {**meta, "shape": list(emb.shape)})
    print(f"wrote {out} {emb.shape}", file=sys.stderr)
    return out


def stage_rqvae(args) -> dict:
    """Semantic IDs (TIGER's 3 codes + dedup code) of every item; prints the collision audit as JSON."""
    ds = load_dataset(args.dataset, args.data_dir)
    path = ensure_semantic_ids(args, ds)
    side = json.loads(path.with_suffix(".json").read_text())
    summary = {"task": "rqvae", "dataset": ds.name, "semantic_ids": str(path),
               **{k: side[k] for k in ("tokenizer", "fields", "encoder", "vocab_sizes", "collisions",
                                       "ids_unique")}}
    print(json.dumps(summary, sort_keys=True))
    return summary


def stage_tiger(args) -> dict:
    """TIGER on the semantic IDs of the `--encoder` embeddings (`--tokenizer rqvae|rkmeans`, made by
    ensure_semantic_ids when missing): train with early stopping on valid NDCG@10 of constrained
    beam search, test the best checkpoint once (+ the popularity baseline on the same cases)."""
    import time
    import torch
    from eval import evaluate_tiger, popularity_ranks, summarize
    from tiger import Tiger, TigerConfig, TrainConfig, fit, load_semantic_ids

    # torchrun: rank 0 loads the data and makes the semantic IDs first (the others then find them
    # up to date), fit trains under DDP with the global batch, and rank 0 alone tests and writes
    device, rank, world = init_distributed(args.device)
    if rank > 0:
        torch.distributed.barrier()
    ds = load_dataset(args.dataset, args.data_dir)
    warmup = getattr(args, "warmup_steps", None)
    warmup = TrainConfig.warmup_steps if warmup is None else warmup
    if min(args.tiger_history, args.beam, args.eval_every, args.max_steps, warmup) < 1:
        raise DataError("--tiger-history, --beam, --eval-every, --max-steps and --warmup-steps must be >= 1 "
                        "(the learning rate decays as sqrt(warmup / step) after the warm-up)")
    sem_path = ensure_semantic_ids(args, ds)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    try:
        ids = load_semantic_ids(sem_path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{sem_path}: {e}; delete it and re-run train.py --stage rqvae") from e
    if ids.n_items != ds.n_items:
        raise DataError(f"{sem_path} has {ids.n_items} rows but {ds.name} has {ds.n_items} items: delete it "
                        f"and re-run train.py --stage rqvae")
    out = (Path(args.out) if args.out else
           Path(args.runs) / ds.name / f"tiger-{args.tokenizer}-{encoder_key(args.encoder)}")
    if (out / "last.pt").exists() and not args.resume:
        raise DataError(f"{out} already holds a run: pass --resume to continue it, or --out NEW_DIR")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch.manual_seed(args.seed)
    cfg = TigerConfig(vocab_sizes=list(ids.vocab_sizes), max_items=args.tiger_history)
    model = Tiger(cfg).to(device)
    tcfg = TrainConfig(lr=args.lr or 1e-3, batch_size=args.batch_size, max_steps=args.max_steps,
                       max_epochs=args.max_epochs, max_minutes=getattr(args, "max_minutes", None),
                       eval_every=args.eval_every, patience=args.patience,
                       beam=args.beam, amp=args.amp, compile=args.compile, seed=args.seed, warmup_steps=warmup,
                       group_by_length=args.group_by_length)
    train_hist, _ = ds.histories(ds.splits.train, args.tiger_history)      # (N, L), -1 = padding
    meta = {"dataset": ds.name, "data_fingerprint": ds.fingerprint, "git_commit": git_commit(),
            "semantic_ids": str(sem_path)}
    if rank == 0:
        write_json(out / "run.json", {
            "stage": "tiger", "args": vars(args), "model_config": cfg.__dict__, "train_config": tcfg.__dict__,
            "dataset": ds.name, "data_fingerprint": ds.fingerprint, "semantic_ids": str(sem_path),
            "semantic_ids_sha1": ids.fingerprint, "n_train_examples": len(train_hist), "git_commit": git_commit(),
            "world_size": world})
        print(f"{ds.name}: TIGER on {sem_path.name} (vocab {ids.vocab_sizes}), {len(train_hist)} training "
              f"prefixes, device {device}" + (f" x {world} ranks" if world > 1 else "") + f", writing {out}",
              file=sys.stderr)
    t0 = time.time()
    summary = fit(model, ids, train_hist, ds.splits.train.target,
                  lambda m: evaluate_tiger(m, ds, ds.splits.valid, ids, args.beam), out, tcfg,
                  resume=args.resume, meta=meta)
    if rank > 0:  # rank 0 alone tests the best checkpoint and writes results.json
        return summary
    test = ds.splits.test
    results = {"task": "tiger", "dataset": ds.name, "encoder": str(args.encoder), "tokenizer": args.tokenizer,
               "semantic_ids": str(sem_path), "run": str(out), "beam": args.beam, **summary,
               "test": evaluate_tiger(model, ds, test, ids, args.beam),
               "popularity": summarize(popularity_ranks(ds, test), (5, 10), cold=test.cold),
               "wall_time_this_call_s": round(time.time() - t0, 1)}
    write_json(out / "results.json", results)
    print(json.dumps(results, sort_keys=True))
    return results


def stage_unisrec(args) -> dict:
    """UniSRec on frozen item embeddings (`--encoder minilm|RUN_DIR`), or SASRec with item IDs
    only (`--encoder none`): train with early stopping on valid NDCG@10, test the best once."""
    import time
    import torch
    from eval import evaluate_unisrec
    from unisrec import SASRecID, TrainConfig, UniSRec, UniSRecConfig, fit

    ds = load_dataset(args.dataset, args.data_dir)
    text = args.encoder.lower() != "none"
    mode = args.mode if text else "id"
    emb_path = None
    if text:
        fields = parse_fields(args.fields, ITEM_TEXT_FIELDS)
        if args.emb and not Path(args.emb).is_file():
            raise DataError(f"--emb {args.emb}: no such file")
        emb_path = Path(args.emb) if args.emb else ensure_embeddings(args, ds, fields)
        item_emb = np.load(emb_path)
        if item_emb.shape[0] != ds.n_items:
            raise DataError(f"{emb_path} has {item_emb.shape[0]} rows but {ds.name} has {ds.n_items} items")
    name = f"unisrec-{mode}-{encoder_key(args.encoder)}" if text else "sasrec-id"
    out = Path(args.out) if args.out else Path(args.runs) / ds.name / name
    if (out / "last.pt").exists() and not args.resume:
        raise DataError(f"{out} already holds a run: pass --resume to continue it, or --out NEW_DIR")
    torch.manual_seed(args.seed)
    cfg = UniSRecConfig(mode=mode, max_seq_len=args.max_history)
    model = UniSRec(cfg, item_emb) if text else SASRecID(ds.n_items, cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model.to(device)
    tcfg = TrainConfig(lr=args.lr or 1e-3, batch_size=args.batch_size, max_epochs=args.max_epochs,
                       max_minutes=getattr(args, "max_minutes", None), patience=args.patience, amp=args.amp,
                       compile=args.compile, seed=args.seed)
    train_hist, _ = ds.histories(ds.splits.train, args.max_history)         # (N, L)
    write_json(out / "run.json", {
        "stage": "unisrec", "args": vars(args), "model_config": cfg.__dict__,
        "train_config": tcfg.__dict__, "dataset": ds.name, "data_fingerprint": ds.fingerprint,
        "item_emb": str(emb_path) if emb_path else None, "git_commit": git_commit()})
    t0 = time.time()
    summary = fit(model, train_hist, ds.splits.train.target,
                  lambda m: evaluate_unisrec(m, ds, ds.splits.valid, args.max_history, args.mask_history),
                  out, tcfg, resume=args.resume,
                  meta={"dataset": ds.name, "data_fingerprint": ds.fingerprint, "git_commit": git_commit()})
    results = {"task": "unisrec", "dataset": ds.name, "encoder": str(args.encoder), "mode": mode,
               "run": str(out), "max_epochs": args.max_epochs, **summary,
               "valid": evaluate_unisrec(model, ds, ds.splits.valid, args.max_history, args.mask_history),
               "test": evaluate_unisrec(model, ds, ds.splits.test, args.max_history, args.mask_history),
               "mask_history": args.mask_history, "wall_time_this_call_s": round(time.time() - t0, 1),
               "custom_emb": str(emb_path) if args.emb else None}
    write_json(out / "results.json", results)
    print(json.dumps(results, sort_keys=True))
    return results


# ----------------------------------------------------------------------------- the whole pipeline
BUDGETS = {
    # minutes on 2 CPU cores: proves every stage runs end to end; the numbers are not results
    "smoke": {"epochs": 1, "max_length": 32, "max_epochs": 2, "rqvae_epochs": 20,
              "max_steps": 30, "eval_every": 30, "warmup_steps": 10},
    # the published schedules: EncodeRec 3 epochs at 256 tokens, UniSRec to early stopping,
    # TIGER 200k steps (a GPU job), RQ-VAE rqvae.RQVAEConfig's default
    "paper": {"epochs": 3, "max_length": 256, "max_epochs": None, "rqvae_epochs": None,
              "max_steps": 200_000, "eval_every": 1000, "warmup_steps": 1000},
}


def _pipeline_step(label: str, out: Path, key: dict, done: str, run) -> None:
    """Run `run(resume)` unless `out` already finished (file `done`) with the same inputs `key`
    (fingerprints of the data, the upstream files and the config, kept in out/pipeline-key.json).
    A finished or partial run with another key is moved aside (never deleted); a partial run with
    the same key is resumed."""
    import time
    kf = out / "pipeline-key.json"
    try:
        old = json.loads(kf.read_text()) if kf.exists() else None
    except ValueError:
        old = None
    key = json.loads(json.dumps(key, default=str))
    if old == key and (out / done).exists() and not _time_capped(out / done):
        print(f"[all] {label}: up to date ({out})", file=sys.stderr)
        return
    if out.exists() and old != key and any(out.iterdir()):
        stale = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(stale)
        print(f"[all] {label}: inputs changed, previous run moved to {stale}", file=sys.stderr)
    print(f"[all] {label} -> {out}", file=sys.stderr)
    write_json(kf, key)
    run(old == key)


def _time_capped(done: Path) -> bool:
    """A results.json written by a --max-minutes stop: the run is not finished (--resume continues it)."""
    try:
        return done.suffix == ".json" and bool(json.loads(done.read_text()).get("time_capped"))
    except ValueError:
        return True


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def stage_all(args) -> None:
    """The paper's pipeline for one dataset: EncodeRec fine-tuning, title -> document retrieval and
    item embeddings for the off-the-shelf and the fine-tuned encoder, UniSRec on each (+ SASRec-ID),
    semantic IDs + collision audit and TIGER on each, then the report. Every step is skipped when its
    outputs exist for the same inputs and config; `--budget` sets all schedules in one place."""
    from eval import collect_report, report_markdown, retrieval_eval
    from encoderec import load_encoder, resolve_backbone

    budget = BUDGETS[args.budget]
    ds = load_dataset(args.dataset, args.data_dir)
    runs, tag = Path(args.runs), args.budget
    fields = parse_fields(args.fields, ITEM_TEXT_FIELDS)
    doc_fields = parse_fields(args.doc_fields, ("features", "description", "brand", "categories"))
    base = {"dataset": ds.name, "data_fingerprint": ds.fingerprint, "budget": budget, "seed": args.seed}
    opts = lambda *names: {k: getattr(args, k, None) for k in names}  # noqa: E731  (options a stage reads)
    # each stage keeps its own default learning rate (5e-5 encoder, 1e-3 UniSRec / TIGER): --lr is not passed
    # item embeddings are always made at 256 tokens (the encoder stage sets its own max_length)
    sub = lambda **kw: argparse.Namespace(**{**vars(args), "resume": False, "out": None, "lr": None,  # noqa: E731
                                             "max_length": 256, **kw})

    titles, docs, texts = ds.title_texts(), ds.document_texts(doc_fields), ds.item_texts(fields)
    has_pairs = sum(bool(t and d) for t, d in zip(titles, docs)) >= 2
    has_text = any(t is not None for t in texts)
    encoders = []
    if has_text:
        encoders.append(args.backbone)
    else:
        print(f"[all] {ds.name} has no item text ({', '.join(fields)}): SASRec-ID only", file=sys.stderr)

    # 1. EncodeRec fine-tuning (title <-> document), all items (--holdout 0)
    if has_text and has_pairs:
        ft = runs / ds.name / f"encoderec-{args.backbone}-{tag}"
        key = {**base, "stage": "encoder", "backbone": str(resolve_backbone(args.backbone, args.weights)),
               "batch_size": 512, "doc_fields": doc_fields, **opts("temperature", "symmetric")}
        _pipeline_step("EncodeRec fine-tuning", ft, key, "model.safetensors", lambda resume: stage_encoder(sub(
            stage="encoder", out=str(ft), resume=resume, epochs=budget["epochs"], max_length=budget["max_length"],
            batch_size=512, holdout=0.0, no_eval=True, doc_fields=",".join(doc_fields))))
        encoders.append(str(ft))
    elif has_text:
        print(f"[all] {ds.name}: no item has both a title and a document ({', '.join(doc_fields)}): "
              f"no fine-tuning, off-the-shelf encoder only", file=sys.stderr)

    # 2. retrieval (Table 1) and item embeddings of every encoder
    for enc_name in encoders:
        folder = resolve_backbone(enc_name, weights=args.weights)      # a fine-tuned folder names its own
        if has_pairs:
            out = runs / ds.name / encoder_key(enc_name) / f"retrieval-{'+'.join(doc_fields)}-len{budget['max_length']}.json"
            key = {"data_fingerprint": ds.fingerprint, "weights_digest": weights_digest(folder),
                   "doc_fields": list(doc_fields), "max_length": budget["max_length"]}
            if out.exists() and {k: json.loads(out.read_text()).get(k) for k in key} == key:
                print(f"[all] retrieval {encoder_key(enc_name)}: up to date ({out})", file=sys.stderr)
            else:
                enc = load_encoder(folder, device=args.device, max_length=budget["max_length"])
                m = retrieval_eval(enc, ds, doc_fields=doc_fields)
                write_json(out, {"task": "retrieval", "dataset": ds.name, "encoder": enc_name, **key, **m})
                print(f"[all] retrieval {encoder_key(enc_name)}: {json.dumps(m)}", file=sys.stderr)
        stage_embed(sub(stage="embed", encoder=enc_name, batch_size=64))

    # 3. UniSRec on each encoder's embeddings, and SASRec-ID
    for enc_name in ["none", *encoders]:
        name = "sasrec-id" if enc_name == "none" else f"unisrec-{args.mode}-{encoder_key(enc_name)}"
        out = runs / ds.name / (name if name.endswith(f"-{tag}") else f"{name}-{tag}")
        emb = None if enc_name == "none" else embedding_path(runs, ds.name, enc_name, fields)
        key = {**base, "stage": "unisrec", "encoder": enc_name, "fields": fields,
               "mode": "id" if enc_name == "none" else args.mode,
               **opts("patience", "max_history", "mask_history", "amp"),
               "embedding": _sidecar(emb) if emb else None}
        _pipeline_step(f"UniSRec ({encoder_key(enc_name)})", out, key, "results.json",
                       lambda resume, e=enc_name, o=out: stage_unisrec(sub(
                           stage="unisrec", encoder=e, out=str(o), resume=resume, batch_size=2048,
                           max_epochs=budget["max_epochs"], emb=None)))

    # 4. semantic IDs (+ collision audit in their sidecars) and TIGER on each encoder
    for enc_name in encoders:
        sem = ensure_semantic_ids(sub(stage="rqvae", encoder=enc_name, rqvae_epochs=budget["rqvae_epochs"]), ds)
        name = f"tiger-{args.tokenizer}-{encoder_key(enc_name)}"
        out = runs / ds.name / (name if name.endswith(f"-{tag}") else f"{name}-{tag}")
        key = {**base, "stage": "tiger", **opts("patience", "tiger_history", "beam", "amp", "group_by_length"),
               "semantic_ids_sha256": file_sha256(sem),                 # the very IDs, not just their recipe
               "semantic_ids": {k: v for k, v in _sidecar(sem).items() if k in ("embedding_sha256", "config", "tokenizer")}}
        tiger_kw = {"max_steps": budget["max_steps"], "eval_every": budget["eval_every"]}
        if hasattr(args, "warmup_steps"):
            tiger_kw["warmup_steps"] = budget["warmup_steps"]
        _pipeline_step(f"TIGER ({encoder_key(enc_name)})", out, key, "results.json",
                       lambda resume, e=enc_name, o=out: stage_tiger(sub(
                           stage="tiger", encoder=e, out=str(o), resume=resume, batch_size=256,
                           rqvae_epochs=budget["rqvae_epochs"], max_epochs=None, **tiger_kw)))

    # 5. the report of everything under runs/<dataset>
    print(report_markdown(collect_report(runs, [ds.name])))


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train one stage of the EncodeRec pipeline.")
    ap.add_argument("--stage", required=True, choices=list(STAGES))
    ap.add_argument("--dataset", help=f"{' | '.join(REGISTRY)} | PATH (LC-Rec folder or raw files)")
    ap.add_argument("--data-dir", default="data", help="download and cache folder (default ./data)")
    ap.add_argument("--runs", default="runs", help="where run folders go (default ./runs)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (encoder) or .npy file (embed)")
    ap.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    ap.add_argument("--max-length", type=int, default=256, help="token limit (MiniLM card: 256)")
    ap.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="CUDA autocast dtype")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="encoder: pairs per InfoNCE batch (paper: 512); embed: texts per batch (64)")
    e = ap.add_argument_group("encoder (EncodeRec fine-tuning)")
    e.add_argument("--backbone", default="minilm", help="minilm | a BERT-architecture folder")
    e.add_argument("--weights", default=None, help="folder with the backbone files (skips lookup)")
    e.add_argument("--epochs", type=int, default=3)
    e.add_argument("--chunk-size", type=int, default=64, help="GradCache chunk (memory ~ chunk, not batch)")
    e.add_argument("--lr", type=float, default=None, help="encoder 5e-5 (default), unisrec 1e-3")
    e.add_argument("--temperature", type=float, default=0.05, help="InfoNCE tau (the paper does not state it)")
    e.add_argument("--symmetric", action="store_true", help="add the document -> title direction")
    e.add_argument("--holdout", type=float, default=0.0,
                   help="seeded share of items kept out of training for the retrieval check")
    e.add_argument("--doc-fields", default=None, help="fields of the document (default: "
                   "features,description,brand,categories)")
    e.add_argument("--no-eval", action="store_true", help="skip the per-epoch retrieval check")
    m = ap.add_argument_group("embed / unisrec")
    m.add_argument("--encoder", default="minilm",
                   help="minilm | a fine-tuned run folder | a BERT folder | none (unisrec: SASRec-ID)")
    m.add_argument("--fields", default=None, help="item text fields (default: title,categories,brand)")
    q = ap.add_argument_group("rqvae (semantic IDs)")
    q.add_argument("--tokenizer", choices=TOKENIZERS, default="rqvae",
                   help="RQ-VAE (TIGER) or residual k-means (no network)")
    q.add_argument("--rqvae-epochs", type=int, default=None,
                   help="RQ-VAE training epochs (default: RQVAEConfig.epochs = 150; TIGER: 20k)")
    q.add_argument("--no-dead-code-restart", action="store_true",
                   help="the plain TIGER recipe: never restart unused codes (see rqvae.py)")
    t = ap.add_argument_group("tiger (also --tokenizer, --max-epochs, --patience, --lr, --batch-size 256)")
    t.add_argument("--max-steps", type=int, default=200_000, help="training steps (TIGER: 200k)")
    t.add_argument("--eval-every", type=int, default=1000, help="steps between validations (beam search)")
    t.add_argument("--beam", type=int, default=10, help="beam width = generated IDs (TIGER: 10)")
    t.add_argument("--warmup-steps", type=int, default=None,
                   help="linear lr warm-up steps, then inverse-sqrt decay (default: TrainConfig.warmup_steps "
                        "= 1000; TIGER: 10k of 200k)")
    t.add_argument("--tiger-history", type=int, default=20, help="history items (TIGER: last 20)")
    t.add_argument("--group-by-length", type=int, default=50,
                   help="batch training prefixes of similar history length, sorted in spans of this many "
                        "batches of the shuffle (tiger.epoch_order); 0 = plain shuffle")
    u = ap.add_argument_group("unisrec")
    u.add_argument("--mode", choices=["inductive", "transductive"], default="inductive",
                   help="text only (the paper's setting) or text + item-ID embedding")
    u.add_argument("--emb", default=None, help="use this item-embedding .npy instead of the encoder's")
    u.add_argument("--max-history", type=int, default=50, help="history length (UniSRec: 50)")
    u.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (default: early stop only)")
    u.add_argument("--max-minutes", type=float, default=None,
                   help="unisrec / tiger: stop at the first validation after this much wall time "
                        "(results.json says time_capped; --resume continues)")
    u.add_argument("--patience", type=int, default=10,
                   help="epochs (unisrec) / validations (tiger) without valid NDCG@10 gain")
    u.add_argument("--mask-history", action="store_true", help="mask history items when ranking")
    a = ap.add_argument_group("all (the whole pipeline)")
    a.add_argument("--budget", choices=list(BUDGETS), default="smoke",
                   help="schedules of every stage: smoke (minutes on CPU) or paper (published; GPU for TIGER)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    runners = {"encoder": stage_encoder, "embed": stage_embed, "rqvae": stage_rqvae, "unisrec": stage_unisrec,
               "tiger": stage_tiger, "all": stage_all}
    if args.stage not in runners:
        print(f"error: --stage {args.stage} ({STAGES[args.stage]}) is not implemented yet",
              file=sys.stderr)
        return 2
    if not args.dataset:
        print("error: --dataset is required (a registered name or a folder)", file=sys.stderr)
        return 2
    if args.batch_size is None:
        args.batch_size = {"encoder": 512, "unisrec": 2048, "tiger": 256}.get(args.stage, 64)
    from encoderec import BackboneError, WeightsError
    try:
        runners[args.stage](args)
    except (DataError, BackboneError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a NaN/inf loss: the last good checkpoint is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        print(f"error: cannot write {e.filename or 'the output'}: {e.strerror}. Free some space or "
              f"choose a writable --runs / --out folder; files written before are intact (writes are "
              f"atomic), so --resume continues from the last checkpoint.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
