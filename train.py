"""EncodeRec's command line (arXiv 2601.10837): the stages, their wiring to trainer.fit, run folders.

    python train.py --stage encoder --backbone minilm        # InfoNCE fine-tuning (default data: scientific)
    python train.py --stage embed   --dataset D --encoder E  # frozen item embeddings
    python train.py --stage rqvae   --dataset D --encoder E  # semantic IDs + collision audit
    python train.py --stage unisrec --dataset D --encoder E  # text-based SASRec (E = none: SASRec-ID)
    python train.py --stage tiger   --dataset D --encoder E  # generative retrieval on semantic IDs
    python train.py --stage ease    --dataset D              # the linear anchor (Steck, 2019)
    python train.py --stage retrieval --dataset D --encoder E  # title -> document retrieval (Table 1)

E = minilm | mpnet | a run or BERT/MPNet folder. Run folder = runs/<dataset>/<stage>-<label>-<hash of the
inputs: the data fingerprint, CONTENT hashes of upstream files, the options that change the result>,
finished (so skipped) once it holds results.json. Stages make the upstream folders they need; --resume
continues an unfinished one. A user error is one line and exit code 2. The whole pipeline in one command:
scripts/pipeline.py; the tables: scripts/report.py.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch


import encoderec as er
import eval as ev
import rqvae as rq
import tiger as tg
import trainer
import unisrec as us
from data import DOCUMENT_FIELDS, ITEM_TEXT_FIELDS, DataError, file_sha256, load_dataset, \
    parse_fields, read_array, read_json, record, weights_folder

DEFAULT_DATASET = "scientific"  # the one set with item descriptions, which EncodeRec's documents need
RKMEANS = {"levels": 3, "k": 256, "iters": 50, "standardize": True}  # residual k-means = RQ-VAE's codebooks
PQ_SHAPE = (32, 256)  # VQ-Rec's OPQ32,IVF1,PQ32x8: 32 sub-vectors of 256 codes


# ----------------------------------------------------------------------------- run folders
def run_folder(args, stage: str, label: str, key: dict) -> Path:
    """runs/<dataset>/<stage>-<label>-<hash of key>, or --out; refused when it is unfinished (without
    --resume) or holds a run of other inputs."""
    key = trainer.json_safe({"stage": stage, **key})
    digest = trainer.digest(key)
    out = Path(args.out) if args.out else Path(args.runs) / key["dataset"] / f"{stage}-{label}-{digest}"
    info, (rank, world) = out / "run.json", trainer.rank_world()
    RUN_KEYS[out] = digest  # every rank: checkpoints record it (_meta)
    if world > 1 and stage in ("embed", "ids", "codes") and not done(out):
        raise DataError(f"make the {stage} folder first, in one process: torchrun runs encoder/unisrec/tiger")
    if os.path.lexists(out) and not out.is_dir():
        raise DataError(f"{out} is {'a dangling or looping link' if out.is_symlink() else 'a file'}, not a "
                        "run folder: choose another --out")
    if rank > 0:  # rank 0 checks and writes the folder
        return out
    if out.is_dir() and not info.is_file() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise DataError(f"{out} is not empty and holds no run.json: choose another --out")
    if not done(out):  # a finished folder is only read
        trainer.lock_folder(out)
    if info.is_file():
        try:
            old = read_json(info)["key"]
        except (DataError, KeyError, TypeError) as e:
            raise DataError(f"{info} is unreadable ({e}): delete {out} to start over") from None
        if old != key:
            diff = sorted(k for k in {*old, *key} if old.get(k) != key.get(k)) if isinstance(old, dict) \
                else []
            raise DataError(f"{out} holds a run of other inputs ({', '.join(diff) or 'its key'} differ): "
                            "choose another --out or delete it")
        started = any(p.name != "run.json" and not p.name.startswith(".") for p in out.iterdir())
        if started and not done(out) and not args.resume:
            raise DataError(f"{out} holds an unfinished run of these inputs: pass --resume to continue it, "
                            f"or delete the folder to start over")
    else:
        trainer.write_json(info, {"key": key, "argv": args.argv, "git_commit": trainer.git_commit(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    return out


RUN_KEYS: dict[Path, str] = {}  # run folder -> the digest of its key


def done(out: Path) -> bool:
    return (Path(out) / "results.json").is_file()


def finish(out: Path, results: dict | None = None) -> None:
    """Write results.json, the folder's finished mark (None: it was up to date); print it on stdout."""
    if results is None:
        say(f"up to date: {out}")
        results = ev.run_results(out)
    else:  # then the sha256 of every file it holds, which each reader checks
        trainer.write_json(out / "results.json", results)
        record([f for f in out.iterdir() if f.is_file() and f.suffix != ".pt" and f.name[0] != "."])
    ev.print_json(results)


def with_(args, **kw) -> argparse.Namespace:
    """The options with some replaced (a stage running another)."""
    return argparse.Namespace(**{**vars(args), **kw})


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def source(args) -> str:
    """Where the item embeddings come from: the --emb file, else the --encoder."""
    return str(args.emb or args.encoder)


def _weights(args, ds, encoder: str) -> tuple[Path, dict, int]:
    """An encoder's folder, the start of a key (the data and the weights' content) and the token limit
    (--max-length, else the folder's own)."""
    folder = weights_folder(encoder)
    n = er.BertConfig.from_json(folder / "config.json").max_tokens
    if (args.max_length or 0) > n:
        raise DataError(f"--max-length {args.max_length}: {encoder} reads at most {n} tokens")
    weights = file_sha256(folder / "model.safetensors")
    return folder, {"dataset": ds.name, "data": ds.fingerprint, "weights": weights}, \
        args.max_length or er.default_max_length(folder)


def _meta(ds, out: Path, **kw) -> dict:
    """What a checkpoint records of its making (data, catalog size, run key); resume and eval check it."""
    return {"dataset": ds.name, "data_fingerprint": ds.fingerprint, "n_items": ds.n_items,
            "run_key": RUN_KEYS[out], "git_commit": trainer.git_commit(), **kw}


def _adamw(model, weight_decay: float, no_decay) -> torch.optim.AdamW:
    """AdamW with weight decay on the parameters whose name no_decay(name) rejects."""
    named = list(model.named_parameters())
    groups = [[p for k, p in named if not no_decay(k)], [p for k, p in named if no_decay(k)]]
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": weight_decay},
                              {"params": groups[1], "weight_decay": 0.0}], fused=named[0][1].is_cuda)


# ----------------------------------------------------------------------------- encoder
def stage_encoder(args) -> Path:
    """EncodeRec (Sec. 3): in-batch InfoNCE of each item's title against its document; AdamW, linear warm-up
    over 10 % of the steps then linear decay, clipping at 1 (sentence-transformers' defaults)."""
    ds = load_dataset(args.dataset, args.data_dir)
    doc_fields = parse_fields(args.doc_fields, DOCUMENT_FIELDS)
    titles, docs = ds.title_texts(), ds.document_texts(doc_fields)
    held = ev.holdout_items(ds, args.holdout, args.seed, doc_fields) if args.holdout > 0 else np.zeros(0, int)
    pairs = [(titles[i], docs[i]) for i in sorted(set(range(ds.n_items)) - set(held.tolist()))
             if titles[i] and docs[i]]
    if len(pairs) < 2:
        cause = f"after --holdout {args.holdout} keeps {len(held)} out" if len(held) else \
            f"({', '.join(doc_fields)}); choose other --doc-fields or data with descriptions"
        raise DataError(f"{ds.name}: only {len(pairs)} items have a title and a document {cause}")
    if args.corpus < 1:  # an ablation: a seeded share of the training pairs
        keep = np.random.default_rng(args.seed).permutation(len(pairs))[:round(args.corpus * len(pairs))]
        if len(keep) < 2:
            raise DataError(f"--corpus {args.corpus} keeps {len(keep)} of the {len(pairs)} pairs; 2 needed")
        pairs = [pairs[i] for i in sorted(keep)]
    for side in (0, 1):  # identical texts (spaces, zero-width characters aside): nothing to tell apart
        if len({" ".join("".join(filter(str.isprintable, pair[side])).split()) for pair in pairs}) < 2:
            raise DataError(f"{ds.name}: every training {('title', 'document')[side]} is the same text; "
                            "InfoNCE cannot learn from them")
    bs, lr = min(args.batch_size or 512, len(pairs)), args.lr or 5e-5
    folder, key, max_len = _weights(args, ds, args.encoder)
    key.update(doc_fields=doc_fields, holdout=args.holdout, batch_size=bs, lr=lr, epochs=args.epochs,
               corpus=args.corpus, amp=args.amp, temperature=args.temperature, symmetric=args.symmetric,
               max=max_len, seed=args.seed)
    out = run_folder(args, "encoder", ev.encoder_label(args.encoder), key)
    if done(out):
        return finish(out) or out
    device, rank = args.device, trainer.rank_world()[0]
    enc = er.load_encoder(folder, device=device, max_length=max_len)
    if args.compile:
        enc.compile_bert(dynamic=True)
    say(f"{ds.name}: {args.encoder} on {len(pairs)} (title, {' + '.join(doc_fields)}) pairs, batch {bs}, "
        f"{args.epochs} epochs, {device}; writing {out}")
    q_vocab, d_vocab = {}, {}  # integer ids of identical texts, for false-negative masking
    q_ids = torch.tensor([q_vocab.setdefault(t, len(q_vocab)) for t, _ in pairs])
    d_ids = torch.tensor([d_vocab.setdefault(d, len(d_vocab)) for _, d in pairs])
    evaluate = None
    if len(held):
        def evaluate(m):
            return ev.retrieval_eval(m, ds, doc_fields=doc_fields, query_items=held, progress=False)
        if rank == 0:
            say(f"held-out retrieval before training: {json.dumps(evaluate(enc.eval()))}")

    def loss_fn(idx):
        share, w = trainer.rank_share(idx)
        share = share if w > 0 else share[:0]
        q, d = [pairs[i][0] for i in share], [pairs[i][1] for i in share]
        return er.cached_info_nce(enc, q, d, args.chunk_size, args.temperature, args.symmetric, q_ids[share],
                                  d_ids[share], progress=rank == 0)

    n = len(pairs) - (len(pairs) % bs == 1)                  # a 1-pair last batch has no negatives: dropped

    def order(epoch):  # a permutation seeded by (seed + epoch)
        return torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed + epoch))[:n]

    total = args.epochs * -(-n // bs)
    warmup = -(-total // 10)
    cfg = trainer.TrainConfig(lr=lr, batch_size=bs, max_epochs=args.epochs, metric=None, grad_clip=1.0,
                              amp=args.amp, seed=args.seed, max_minutes=args.max_minutes)
    opt = _adamw(enc.bert, 0.01, lambda name: name.endswith("bias") or "LayerNorm" in name)
    summary = trainer.fit(
        enc, loss_fn, len(pairs), opt, out, cfg, evaluate=evaluate, resume=args.resume, meta=_meta(ds, out),
        schedule=lambda s: s / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)),
        order=order, desc="encoder")
    if rank == 0 and not summary["time_capped"]:
        er.save_pretrained(enc, out)
        finish(out, {"task": "encoder", "dataset": ds.name, "backbone": str(args.encoder), "run": str(out),
                     "n_pairs": len(pairs), "holdout_items": held.tolist(), **summary})
    return out


# ----------------------------------------------------------------------------- embeddings and semantic IDs
def stage_embed(args, ds=None) -> Path:
    """Item embeddings of a frozen encoder: embed-<encoder>-<hash>/item_emb.npy, row i = item i: the RAW
    mean-pooled vectors, as UniSRec's own preprocessing writes them (each consumer normalises if it wants)."""
    ds = ds or load_dataset(args.dataset, args.data_dir)
    fields = parse_fields(args.fields, ITEM_TEXT_FIELDS)
    texts = ds.item_texts(fields)
    missing = sum(t is None for t in texts)
    if missing == ds.n_items:
        raise DataError(f"{ds.name}: no item has any of the fields {', '.join(fields)}; choose other "
                        f"--fields (python scripts/prepare_data.py --dataset {args.dataset} --stats "
                        "lists them)")
    folder, key, max_len = _weights(args, ds, args.encoder)
    key.update(fields=fields, max=max_len, pooled="raw")
    out = run_folder(args, "embed", ev.encoder_label(args.encoder), key)
    if done(out):
        return finish(out) or out / "item_emb.npy"
    if missing:
        say(f"warning: {missing} of {ds.n_items} items have none of {', '.join(fields)}: embedded from ''")
    say(f"{ds.name}: embedding {ds.n_items} items with {ev.encoder_label(args.encoder)} into {out}")
    emb = er.load_encoder(folder, device=args.device, max_length=max_len).encode(
        [t or "" for t in texts], batch_size=64, normalize=False)                      # (I, d) float32
    if not np.isfinite(emb).all():
        raise DataError(f"{args.encoder} embeds items to NaN or inf; its weights are damaged")
    if len(emb) > 1 and (emb == emb[0]).all():
        raise DataError(f"{ds.name}: every item's {', '.join(fields)} text is the same: choose other "
                        "--fields")
    trainer.save_npy(out / "item_emb.npy", emb)
    finish(out, {"task": "embed", "dataset": ds.name, "encoder": str(args.encoder), "shape": list(emb.shape),
                 "items_without_text": missing, "normalized": False})
    return out / "item_emb.npy"


def _embeddings(args, ds) -> tuple[np.ndarray, Path]:
    """--emb or the --encoder's item embeddings (made on the way), and the file."""
    path = Path(args.emb) if args.emb else stage_embed(with_(args, out=None, resume=True), ds)
    emb = read_array(path, "item embeddings", rows=ds.n_items, fix="pass a float (items, d) .npy")
    return emb.astype(np.float32, copy=False), path


def stage_rqvae(args, ds=None) -> Path:
    """Item codes from the --encoder's embeddings: TIGER's semantic IDs (rqvae, rkmeans: 3 codes + the
    dedup code) in ids-<tokenizer>-<encoder>-<hash>/semantic_ids.npy (N, 4), or VQ-Rec's product codes
    (opq, pq: PQ_SHAPE, fitted on the training items) in codes-.../codes.npy (N, 32); the audit in
    results.json."""
    ds = ds or load_dataset(args.dataset, args.data_dir)
    if str(args.encoder).lower() == "none":
        raise DataError("item codes are made from item text embeddings: --encoder minilm, mpnet or a run "
                        "folder")
    emb, emb_path = _embeddings(args, ds)
    tok, pq = args.tokenizer, args.tokenizer in ("opq", "pq")
    emb = emb if pq else ev.l2_rows(emb)  # VQ-Rec's faiss gets raw vectors; TIGER's Sentence-T5 unit ones
    std, restart = not args.no_standardize, not args.no_dead_code_restart
    cfg = rq.RQVAEConfig(input_dim=emb.shape[1], dead_code_restart=restart, standardize=std)
    cfg = cfg if args.rqvae_epochs is None else replace(cfg, epochs=args.rqvae_epochs)
    rk = {**RKMEANS, "standardize": std}
    key = {"dataset": ds.name, "embeddings": file_sha256(emb_path), "l2": not pq, "tokenizer": tok,
           "config": {"rqvae": asdict(cfg), "rkmeans": rk}.get(tok, PQ_SHAPE), "seed": args.seed,
           **({"data": ds.fingerprint} if pq else {})}  # the split picks the fitted items
    out = run_folder(args, "codes" if pq else "ids", f"{tok}-{ev.encoder_label(source(args))}", key)
    path = out / ("codes.npy" if pq else "semantic_ids.npy")
    if done(out):
        return finish(out) or path
    say(f"{ds.name}: {tok} on {emb.shape[0]} x {emb.shape[1]} embeddings ({emb_path}) into {out}")
    res = {"task": "codes" if pq else "rqvae", "dataset": ds.name, "encoder": source(args), "seed": args.seed,
           "tokenizer": tok, "embeddings": str(emb_path)}
    if pq:
        fit = np.flatnonzero(ds.splits.train_items)
        out_pq = rq.product_codes(emb, *PQ_SHAPE, rotate=tok == "opq", seed=args.seed, fit_rows=fit)
        trainer.save_npy(path, out_pq["codes"])
        d = out_pq["distortion"]
        res.update(fit_items=len(fit), distortion=[d[0], d[-1]],
                   collisions=rq.collision_stats(out_pq["codes"], PQ_SHAPE[1]))  # of the whole code
    else:
        codes = rq.tokenize(fit_rqvae(emb, cfg, out, args.seed, args.device, _meta(ds, out)), emb) \
            if tok == "rqvae" else rq.residual_kmeans(emb, seed=args.seed, progress=True, **rk)  # (N, 3)
        ids, vocab = tg.semantic_ids(codes, RKMEANS["k"])                                       # (N, 4)
        trainer.save_npy(path, ids)
        res.update(vocab_sizes=list(vocab), standardize=std, collisions=rq.collision_stats(codes),
                   dead_code_restart=restart if tok == "rqvae" else None,
                   ids_unique=len(np.unique(ids, axis=0)) == len(ids))
    finish(out, res)
    return path


def fit_rqvae(emb: np.ndarray, cfg: rq.RQVAEConfig, out: Path, seed: int, device: str, meta: dict):
    """The RQ-VAE with its recipe (rqvae.Recipe) through trainer.fit; AdamW without decay on the codebooks."""
    torch.manual_seed(seed)
    model = rq.RQVAE(cfg).to(device)
    recipe = rq.Recipe(model, emb, seed)
    tcfg = trainer.TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, max_epochs=cfg.epochs, metric=None,
                               checkpoint_minutes=None, seed=seed)
    opt = _adamw(model, cfg.weight_decay, lambda name: name == "codebooks")
    trainer.fit(model, recipe.loss, len(emb), opt, out, tcfg, evaluate=recipe.end_of_epoch, resume=True,
                desc="rq-vae", meta={**meta, "rqvae_config": asdict(cfg)})
    recipe.init_codebooks(torch.arange(min(cfg.batch_size, len(emb))))  # epochs 0: no batch did
    return model.eval()


# ----------------------------------------------------------------------------- recommenders
def _loop(args, **kw) -> trainer.TrainConfig:
    """The loop settings of a recommender from the command line."""
    return trainer.TrainConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.max_epochs,
                               amp=args.amp, patience=args.patience, seed=args.seed,
                               max_minutes=args.max_minutes, **kw)


def _length_order(args, hist: np.ndarray):
    """trainer.fit's epoch order over histories (N, L) (-1 = pad): --group-by-length spans sorted by
    length."""
    lengths = (hist >= 0).sum(1)  # (N,)
    return lambda e: trainer.epoch_order(lengths, args.batch_size, args.seed, e, args.group_by_length)


def _recommender_folder(args, ds, stage: str, label: str, loop: trainer.TrainConfig, key: dict) -> Path:
    loop = {k: v for k, v in asdict(loop).items() if k not in ("max_minutes", "checkpoint_minutes")}
    return run_folder(args, stage, label, {"dataset": ds.name, "data": ds.fingerprint, **key, "loop": loop})


def stage_unisrec(args) -> Path:
    """UniSRec on frozen item embeddings, or SASRec on item IDs (--encoder none): Adam, full softmax, early
    stopping on valid NDCG@10 (UniSRec's fine-tuning); the best model tested."""
    ds = load_dataset(args.dataset, args.data_dir)
    args = with_(args, max_history=args.max_history or 50,  # UniSRec's
                 group_by_length=args.group_by_length or 0)
    _has_cases(ds, max_history=args.max_history)
    text = str(args.encoder).lower() != "none"
    mode = args.mode if text else "id"
    tok = args.tokenizer if args.tokenizer == "pq" else "opq"  # vqrec's codes
    codes_path = stage_rqvae(with_(args, out=None, resume=True, tokenizer=tok), ds) if mode == "vqrec" \
        else None
    codes = read_array(codes_path, "product codes", "i", ds.n_items) if codes_path else None
    emb, emb_path = _embeddings(args, ds) if text and not codes_path else (None, None)
    emb = ev.l2_rows(emb) if emb is not None and args.normalize else emb  # default: raw, as UniSRec's
    args = with_(args, lr=args.lr or 1e-3, batch_size=args.batch_size or 2048)   # UniSRec's finetune.yaml
    key = {"embeddings": file_sha256(emb_path) if emb_path else None, "mode": mode,
           **({"codes": file_sha256(codes_path)} if codes_path else {}),
           "grouping": args.group_by_length, "max_history": args.max_history, "normalize": args.normalize}
    label = f"{mode}-{ev.encoder_label(source(args))}" if text else "id"
    loop = _loop(args)
    out = _recommender_folder(args, ds, "unisrec", label, loop, key)
    if done(out):
        return finish(out) or out
    device, rank = args.device, trainer.rank_world()[0]
    torch.manual_seed(args.seed)
    cfg = us.UniSRecConfig(mode=mode, max_seq_len=args.max_history)
    model = (us.UniSRec(cfg, emb, codes) if text else us.SASRecID(ds.n_items, cfg)).to(device)
    if args.compile:
        model.compile_core()
    hist = ds.histories(ds.splits.train, args.max_history)[0]                               # (N, L), -1 = pad
    H = torch.as_tensor(hist, device=device)
    T = torch.as_tensor(ds.splits.train.target, device=device)                              # (N,)
    say(f"{ds.name}: {mode} UniSRec on {len(T)} training prefixes, {device}; writing {out}")

    def loss_fn(idx):
        share, w = trainer.rank_share(idx.to(device))
        return w * model.loss(H[share], T[share])

    def evaluate(m, cases=ds.splits.valid, ranks_to=None):
        return ev.evaluate_unisrec(m, ds, cases, args.max_history, ranks_to=ranks_to)

    meta = _meta(ds, out, model_config=asdict(model.cfg), item_emb_path=str(emb_path) if emb_path else None,
                 codes_path=str(codes_path) if codes_path else None,
                 normalize_input=args.normalize)
    summary = trainer.fit(model, loss_fn, len(T), torch.optim.Adam(model.parameters()), out, loop,
                          evaluate=evaluate, resume=args.resume, meta=meta, desc="unisrec",
                          order=_length_order(args, hist))
    if rank == 0 and not summary["time_capped"]:
        finish(out, {"task": "unisrec", "dataset": ds.name, "encoder": source(args), "mode": mode,
                     "run": str(out), "seed": args.seed, "normalize": args.normalize,
                     "max_epochs": args.max_epochs, **summary,
                     "valid": evaluate(model),
                     "test": evaluate(model, ds.splits.test, ranks_to=out / "test_ranks.npy")})
    return out


# TIGER (Sec. 4.1) trained 200k steps of batch 256 with Adafactor, lr 0.01 and inverse-sqrt decay after 10k
# warm-up steps. Ours: AdamW (it needs a smaller peak lr, --lr 1e-3), weight decay 0.01 on Linear weights
# only, gradients clipped at norm 1, 1,000 warm-up steps (--warmup-steps).
TIGER_WEIGHT_DECAY, TIGER_GRAD_CLIP, TIGER_WARMUP = 0.01, 1.0, 1000
TIGER_STEPS = {"max_steps": 200_000, "eval_every": 1000, "warmup_steps": TIGER_WARMUP}  # at batch 256


def stage_ease(args) -> Path:
    """EASE (eval.ease_run): the recommender tables' linear anchor, its L2 weight chosen on validation."""
    ds = load_dataset(args.dataset, args.data_dir)
    _has_cases(ds)
    key = {"dataset": ds.name, "data": ds.fingerprint, "lambdas": ev.EASE_LAMBDAS}
    out = run_folder(args, "ease", "items", key)
    if done(out):
        return finish(out) or out
    say(f"{ds.name}: EASE on {ds.n_items} items into {out}")
    res = ev.ease_run(ds, ranks_to=out / "test_ranks.npy", device=args.device)
    finish(out, {"task": "ease", "dataset": ds.name, **res})
    return out


def stage_tiger(args) -> Path:
    """TIGER on the semantic IDs of the --encoder: teacher forcing, early stopping on the valid NDCG@10 of
    constrained beam search; the best checkpoint tested beside popularity."""
    ds = load_dataset(args.dataset, args.data_dir)
    args = with_(args, max_history=args.max_history or 20,  # TIGER's
                 group_by_length=50 if args.group_by_length is None else args.group_by_length)
    _has_cases(ds, max_history=args.max_history, beam=args.beam)
    s = (args.batch_size or 256) / 256  # same examples: steps / s; lr * sqrt(s) (Adam's rule)
    args = with_(args, lr=args.lr or 1e-3 * s ** 0.5, batch_size=args.batch_size or 256,
                 **{k: max(1, round(v / s)) for k, v in TIGER_STEPS.items() if getattr(args, k) in (None, v)})
    warmup = args.warmup_steps or TIGER_WARMUP
    if warmup > args.max_steps:
        raise DataError(f"--warmup-steps {warmup} > --max-steps {args.max_steps}: the peak lr would never be "
                        "reached")
    device, (rank, world) = args.device, trainer.rank_world()
    sem_path = stage_rqvae(with_(args, out=None, resume=True), ds)
    ids = ev.read_semantic_ids(sem_path, ds.n_items, device)
    loop = _loop(args, max_steps=args.max_steps, eval_every=args.eval_every, grad_clip=TIGER_GRAD_CLIP)
    key = {"semantic_ids": file_sha256(sem_path), "history": args.max_history, "warmup": warmup,
           "beam": args.beam, "grouping": args.group_by_length}
    label = f"{args.tokenizer}-{ev.encoder_label(source(args))}"
    out = _recommender_folder(args, ds, "tiger", label, loop, key)
    if done(out):
        return finish(out) or out
    torch.manual_seed(args.seed)
    cfg = tg.TigerConfig(vocab_sizes=list(ids.vocab_sizes), max_items=args.max_history)
    model = tg.Tiger(cfg).to(device)
    fixed = torch.device(device).type == "cuda"  # GPU: one shape, the epoch on the device, no host syncs
    model.length_buckets = not fixed             # CPU: length buckets (small kernel launches are cheap)
    if args.compile:
        model.compile_core(fixed=fixed)
    hist = ds.histories(ds.splits.train, args.max_history)[0]                      # (N, L), -1 = padding
    H, T = torch.as_tensor(hist, device=device), torch.as_tensor(ds.splits.train.target, device=device)
    if fixed:  # (N, 1 + levels * history) and (N, levels), tokenised and checked once
        H, T = tg.tokenize_histories(H, ids, cfg.max_items, fixed=True), ids.tokens[T]
    say(f"{ds.name}: TIGER on {len(T)} training prefixes, {device} x {world}; writing {out}")

    def loss_fn(idx):
        share, w = trainer.rank_share(idx.to(device))
        if fixed:
            return w * model.loss(H[share], T[share], checked=False)
        return w * model.loss(tg.tokenize_histories(H[share], ids, cfg.max_items), ids.tokens[T[share]])

    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    opt = _adamw(model, TIGER_WEIGHT_DECAY, lambda k: id(model.get_parameter(k)) not in decay)
    meta = _meta(ds, out, model_config=asdict(model.cfg), semantic_ids=torch.as_tensor(ids.codes_np),
                 semantic_ids_path=str(sem_path))
    summary = trainer.fit(
        model, loss_fn, len(T), opt, out, loop, schedule=lambda s: trainer.lr_factor(s, warmup),
        evaluate=lambda m: ev.evaluate_tiger(m, ds, ds.splits.valid, ids, args.beam),
        order=_length_order(args, hist),
        resume=args.resume, meta=meta, desc="tiger")
    if rank == 0 and not summary["time_capped"]:
        test = ds.splits.test
        finish(out, {"task": "tiger", "dataset": ds.name, "encoder": source(args),
                     "tokenizer": args.tokenizer, "semantic_ids": str(sem_path), "run": str(out),
                     "seed": args.seed, "beam": args.beam, **summary,
                     "test": ev.evaluate_tiger(model, ds, test, ids, args.beam,
                                               ranks_to=out / "test_ranks.npy"),
                     "popularity": ev.summarize(ev.popularity_ranks(ds, test), (5, 10), cold=test.cold)})
    return out


def stage_retrieval(args) -> Path:
    """Title -> document retrieval of the --encoder over all items (Table 1, eval.run_retrieval) as a run
    folder."""
    ds = load_dataset(args.dataset, args.data_dir)
    doc_fields = parse_fields(args.doc_fields, DOCUMENT_FIELDS)
    _, key, max_len = _weights(args, ds, args.encoder)
    key.update(docs=doc_fields, max=max_len)
    out = run_folder(args, "retrieval", ev.encoder_label(args.encoder), key)
    if done(out):
        return finish(out) or out
    res = ev.run_retrieval(with_(args, max_length=max_len, holdout=0.0, batch_size=64, ranks=None), ds)
    finish(out, {**res, "run": str(out)})
    return out


# ----------------------------------------------------------------------------- command line
STAGES = {"encoder": stage_encoder, "embed": stage_embed, "rqvae": stage_rqvae, "unisrec": stage_unisrec,
          "tiger": stage_tiger, "ease": stage_ease, "retrieval": stage_retrieval}


def build_parser() -> argparse.ArgumentParser:
    """The flags, each in the group of the stages it applies to (check_args refuses it elsewhere)."""
    ap = ev.one_line_errors(argparse.ArgumentParser(
        description="A stage of EncodeRec; the last stdout line: its results.", allow_abbrev=False))
    ap.add_argument("--stage", required=True, choices=list(STAGES))
    g = ap.add_argument_group("every stage")
    g.add_argument("--dataset", help="a data folder, or a name prepared under --data-dir by "
                   f"scripts/prepare_data.py ({DEFAULT_DATASET})")
    g.add_argument("--data-dir", default="data", help="prepared datasets and the processed cache (./data)")
    g.add_argument("--runs", default="runs", help="where run folders go (./runs)")
    g.add_argument("--out", help="this stage's run folder instead of runs/<dataset>/<stage>-...")
    g.add_argument("--resume", action="store_true", help="continue the unfinished run in the folder")
    g.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:N]")
    g = ev.group(ap, "encoder rqvae unisrec tiger")
    g.add_argument("--seed", type=ev.SEED, default=0, help="(0; CPU runs are deterministic)")
    g.add_argument("--seeds", type=ev.SEED, nargs="+",
                   help="the stage once per seed (the report averages them)")
    g = ev.group(ap, "encoder embed rqvae unisrec tiger retrieval")
    g.add_argument("--encoder", "--backbone", default="minilm", help="minilm | mpnet | a run or model "
                   "folder | none (unisrec: no text); --stage encoder: the backbone fine-tuned")
    g.add_argument("--max-length", type=ev.COUNT, help="token limit (the model folder's "
                   "sentence_bert_config: MiniLM 256, MPNet 384)")
    ev.group(ap, "embed rqvae unisrec tiger").add_argument(
        "--fields", help=f"the item text to embed ({','.join(ITEM_TEXT_FIELDS)})")
    g = ev.group(ap, "encoder unisrec tiger")
    g.add_argument("--amp", choices=["off", "bf16"], default="off", help="CUDA autocast (off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (README: what it costs)")
    g.add_argument("--max-minutes", type=ev.POSITIVE, help="stop at the first evaluation after it")
    g.add_argument("--batch-size", type=ev.COUNT, help="encoder: pairs (512); unisrec 2048; tiger 256")
    g.add_argument("--lr", type=ev.bounded(float, 0, 1, open_low=True),
                   help="peak learning rate (encoder 5e-5, unisrec and tiger 1e-3)")
    g = ev.group(ap, "encoder")
    g.add_argument("--epochs", type=ev.COUNT, default=3, help="epochs (3)")
    g.add_argument("--chunk-size", type=ev.COUNT, default=64, help="GradCache chunk (64)")
    g.add_argument("--temperature", type=ev.bounded(float, 1e-3, 10), default=0.05, help="InfoNCE tau (0.05)")
    g.add_argument("--symmetric", action="store_true", help="add document -> title")
    g.add_argument("--holdout", type=ev.bounded(float, 0, 1, open_high=True), default=0.0,
                   help="share of items kept out, their retrieval evaluated each epoch (0)")
    g.add_argument("--corpus", type=ev.bounded(float, 0, 1, open_low=True), default=1.0,
                   help="share of the pairs trained on (1)")
    ev.group(ap, "encoder retrieval").add_argument(
        "--doc-fields", help=f"the document ({','.join(DOCUMENT_FIELDS)})")
    g = ev.group(ap, "rqvae unisrec tiger")
    g.add_argument("--emb", help="this item-embedding .npy instead of the --encoder's")
    g.add_argument("--tokenizer", choices=["rqvae", "rkmeans", "opq", "pq"], default="rqvae",
                   help="semantic IDs: RQ-VAE or residual k-means; VQ-Rec's product codes: OPQ or PQ")
    g = ev.group(ap, "rqvae tiger")
    g.add_argument("--rqvae-epochs", type=ev.NON_NEGATIVE, help=f"({rq.RQVAEConfig.epochs})")
    g.add_argument("--no-dead-code-restart", action="store_true", help="TIGER's plain recipe (rqvae.py)")
    g.add_argument("--no-standardize", action="store_true", help="unscaled coordinates (rqvae.py)")
    g = ev.group(ap, "unisrec tiger")
    g.add_argument("--max-epochs", type=ev.COUNT, help="cap on epochs (none: early stopping only)")
    g.add_argument("--patience", type=ev.COUNT, default=10,
                   help="evaluations without a better valid NDCG@10 (10)")
    g.add_argument("--max-history", type=ev.COUNT, help="history items (unisrec 50, tiger 20: the papers')")
    g.add_argument("--group-by-length", type=ev.NON_NEGATIVE, help="batches of similar history length, "
                   "sorted in spans of this many batches (tiger 50; unisrec 0 = plain shuffle, on CPU padded "
                   "per length group)")
    g = ev.group(ap, "unisrec")
    g.add_argument("--mode", choices=["inductive", "transductive", "vqrec"], default="inductive",
                   help="text only (the paper's), + item-ID embedding, or VQ-Rec (--tokenizer opq)")
    g.add_argument("--normalize", action="store_true", help="L2-normalise the item embeddings (default: the "
                   "raw pooled vectors, as UniSRec's preprocessing)")
    g = ev.group(ap, "tiger")
    g.add_argument("--max-steps", type=ev.COUNT, default=200_000, help="training steps (200k, TIGER's)")
    g.add_argument("--eval-every", type=ev.COUNT, default=1000, help="steps between validations (1000)")
    g.add_argument("--warmup-steps", type=ev.COUNT,
                   help=f"linear warm-up, then inverse sqrt ({TIGER_WARMUP})")
    g.add_argument("--beam", type=ev.COUNT, default=10, help="beam width = returned IDs (10)")
    return ap


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Before anything runs: no flag the stage ignores (argparse checked each one's range), and the rules
    between flags."""
    ev.check_flags(ap, args, "--stage", args.stage)

    def given(*names):
        return next((f"--{k.replace('_', '-')}" for k in names if getattr(args, k) != ap.get_default(k)),
                    None)
    none = str(args.encoder).lower() == "none"
    checks = [
        (args.stage == "encoder" and args.batch_size == 1,
         "--batch-size 1 leaves InfoNCE no in-batch negative: use >= 2"),
        (none and args.stage != "unisrec", "--encoder none (SASRec on item IDs) is for --stage unisrec only"),
        (none and given("emb", "mode", "fields", "max_length"),
         f"{given('emb', 'mode', 'fields', 'max_length')} does not apply to --encoder none (no text)"),
        (args.emb and given("encoder", "fields", "max_length"),
         f"--emb replaces the encoder's embeddings: drop {given('encoder', 'fields', 'max_length')}"),
        (args.stage == "unisrec" and (args.normalize if args.mode == "vqrec" else given("tokenizer")),
         "--mode vqrec codes the raw vectors (--tokenizer opq or pq); --normalize is for the text modes"),
        (args.tokenizer in ("opq", "pq") and args.stage == "tiger" or args.stage == "unisrec" and
         args.tokenizer in ("rqvae", "rkmeans") and given("tokenizer"),
         f"--tokenizer {args.tokenizer}: TIGER takes semantic IDs (rqvae, rkmeans), VQ-Rec product codes "
         "(opq, pq)"),
        (args.tokenizer != "rqvae" and given("rqvae_epochs", "no_dead_code_restart"),
         f"{given('rqvae_epochs', 'no_dead_code_restart')} is an RQ-VAE option, not one of --tokenizer "
         f"{args.tokenizer}"),
        (args.tokenizer in ("opq", "pq") and args.no_standardize,
         f"--no-standardize is for semantic IDs (rqvae, rkmeans), not --tokenizer {args.tokenizer}"),
        (args.seeds and given("seed"), "--seed and --seeds: pass one"),
        (args.seeds and args.out, "--out names one folder; --seeds makes one per seed: drop --out"),
    ]
    if msg := next((m for bad, m in checks if bad), None):
        raise DataError(msg)


def _has_cases(ds, **sizes) -> None:
    """Training, early stopping and the test need examples and cases; histories beyond the longest
    sequence and beams beyond the catalog only cost memory."""
    longest = int(ds.seq_lengths.max())
    for name, v in sizes.items():  # room for longer histories than this catalog's, not for typos
        limit = max(ds.n_items, 10) if name == "beam" else max(4 * longest, 200)
        if v > limit:
            what = f"{ds.n_items} items" if name == "beam" else \
                f"longest sequence ({longest}); the limit is {limit}"
            raise DataError(f"--{name.replace('_', '-')} {v} is more than {ds.name}'s {what}")
    if not len(ds.splits.train) or not len(ds.splits.valid) or not len(ds.splits.test):
        need = "leave-one-out: users with >= 3 interactions" if ds.protocol == "loo" else "the time split"
        raise DataError(f"{ds.name}: {len(ds.splits.train)} training examples, {len(ds.splits.valid)} "
                        f"validation and {len(ds.splits.test)} test cases; a recommender needs all three "
                        f"({need})")


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    sigterm = signal.signal(signal.SIGTERM, ev.sigterm_as_interrupt)
    try:
        check_args(ap, args)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # run.json records the command
        if args.dataset is None:
            args.dataset = DEFAULT_DATASET
            say(f"no --dataset given: using {DEFAULT_DATASET} (Amazon 2018 Industrial_and_Scientific 5-core, "
                f"the one set with item descriptions)")
        args.device = trainer.init_distributed(args.device)[0]  # joins torchrun's group, if any
        for seed in args.seeds or [args.seed]:
            if args.seeds:
                say(f"--- seed {seed}")
            STAGES[args.stage](with_(args, seed=seed))
    except (Exception, KeyboardInterrupt) as e:
        return ev.cli_error(e, resumable=True)
    finally:
        trainer.release_locks()
        signal.signal(signal.SIGTERM, sigterm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
