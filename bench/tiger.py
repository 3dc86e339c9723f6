"""Benchmark: tiger.py against Hugging Face `transformers.T5ForConditionalGeneration` configured the
same way (TIGER's T5: d_model 128, d_kv 64, 6 heads, d_ff 1024, 4 + 4 layers, ReLU, dropout 0.1,
the same vocabulary, tied head) and holding the SAME weights (tests/t5_helpers.t5_state_dict).

Training: examples/s of one optimizer step (forward + backward + AdamW, float32, both models in
train mode) on the same seeded batches of --batch-size training prefixes (history <= 20 items ->
next item, ds.histories(ds.splits.train, 20)); HF gets input_ids / attention_mask / labels, the
way a T5 fine-tuning script feeds it. Ours is timed eagerly as train.py runs it on the device (length
buckets on CPU, off on CUDA: Tiger.length_buckets) and on the fixed-shape path train.py takes on a GPU
(every history padded to the 20-item cap, 81 tokens, pre-tokenised, no host-side checks, fused AdamW on
CUDA; --compile: torch.compile, mode "reduce-overhead" = CUDA graphs on a GPU). Decoding: users/s
of beam search, width 10, 10 returned IDs, constrained to the catalog's IDs, both models in eval
mode, on the same batch of --decode-users validation users; HF = generate(num_beams=10,
num_return_sequences=10, max_new_tokens=4, prefix_allowed_tokens_fn=<dict lookup of the catalog's
prefixes>). Repeats are interleaved (ours, then HF, on the same batch) after one untimed warm-up
each; the table shows medians and ratios ours / HF. It also reports how often the two decoders
return the same top-10 list (same weights, so they should agree up to float ties).

Data: --dataset (default ../shared/data/lcrec/Beauty). Semantic IDs: --sem-ids FILE (a semantic_ids.npy of
train.py --stage rqvae), else the newest runs/<dataset>/ids-rqvae-*/semantic_ids.npy, else random unique IDs
with the real catalog size (t5_helpers.random_semantic_ids: 3 x 256 codes + a dedup level); the
header says which. Speed does not depend on the ID values, but the constraint tables do.

    python bench/tiger.py [--threads 1] [--repeats 3] [--batch-size 256] [--decode-users 128] [--device cuda]
                          [--compile]

The targets (>= 1.5x training, >= 3x decoding) are for CPU; --device cuda runs the same comparison
on a GPU (float32 on both sides, synchronised timers).
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from t5_helpers import random_semantic_ids, t5_config_kwargs, t5_state_dict

import tiger as tg
from data import load_dataset

DATA = ROOT.parent / "shared" / "data" / "lcrec" / "Beauty"


def find_sem_ids(args, ds) -> tuple[tg.SemanticIDs, str]:
    """--sem-ids (a semantic_ids.npy of train.py --stage rqvae), else the newest in runs/<dataset>/ids-rqvae-*,
    else random unique IDs of the real catalog size."""
    found = sorted((ROOT / "runs" / ds.name).glob("ids-rqvae-*/semantic_ids.npy"), key=lambda p: p.stat().st_mtime)
    path = Path(args.sem_ids) if args.sem_ids else (found[-1] if found else None)
    if path is not None:
        vocab = json.loads((path.parent / "results.json").read_text())["vocab_sizes"]
        ids = tg.SemanticIDs(np.load(path), vocab)
        if ids.n_items != ds.n_items:
            sys.exit(f"error: {path} has {ids.n_items} rows but {ds.name} has {ds.n_items} items")
        return ids, f"{path} (vocab {ids.vocab_sizes})"
    codes, vocab = random_semantic_ids(ds.n_items, seed=args.seed)
    return tg.SemanticIDs(codes, vocab), f"random unique IDs, real catalog size (vocab {vocab})"


def hf_prefix_fn(ids: tg.SemanticIDs):
    """prefix_allowed_tokens_fn: decoded tokens so far (start token first) -> allowed next tokens."""
    allowed: dict[tuple, set] = {}
    for row in ids.tokens.tolist():
        for lvl in range(len(row)):
            allowed.setdefault(tuple(row[:lvl]), set()).add(row[lvl])
    allowed = {k: sorted(v) for k, v in allowed.items()}

    def fn(batch_id, input_ids):
        return allowed.get(tuple(input_ids[1:].tolist()), [])
    return fn


def key_of(ids: tg.SemanticIDs, codes: torch.Tensor) -> torch.Tensor:
    """Mixed-radix key of full codes (..., n_levels) -> (...,), as SemanticIDs keys its items."""
    key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
    for lvl, v in enumerate(ids.vocab_sizes):
        key = key * v + codes[..., lvl]
    return key


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--sem-ids", default=None, help="semantic_ids-*.npy (default: a run's, else random)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=256, help="training batch (TIGER: 256)")
    ap.add_argument("--decode-users", type=int, default=128, help="users per decoding batch")
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the fixed-shape path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (the targets' setting) | cuda[:N]")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    try:
        import transformers
        from transformers import T5Config, T5ForConditionalGeneration
    except ImportError:
        print("transformers is not installed: nothing to compare against (pip install transformers)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.dataset).exists():
        print(f"dataset {args.dataset} is absent (expected ../shared/data beside the checkout): skipping")
        return 0
    ds = load_dataset(args.dataset, args.data_dir)
    ids, ids_note = find_sem_ids(args, ds)
    ids = ids.to(device)
    hist, _ = ds.histories(ds.splits.train, 20)                        # (N, 20), -1 = padding
    target = ds.splits.train.target
    vhist, _ = ds.histories(ds.splits.valid, 20)

    torch.manual_seed(args.seed)
    cfg = tg.TigerConfig(vocab_sizes=ids.vocab_sizes)
    ours = tg.Tiger(cfg).to(device)
    hf = T5ForConditionalGeneration(T5Config(**t5_config_kwargs(cfg))).to(device)
    hf.load_state_dict(t5_state_dict(ours))
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    fast = copy.deepcopy(ours)  # the fixed-shape path: same weights, its own optimizer (fused on CUDA)
    fast.length_buckets = False
    if args.compile:
        fast.compile_core(fixed=device.type == "cuda")
    opt_fast = torch.optim.AdamW(fast.parameters(), lr=1e-3, fused=device.type == "cuda")
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-3)
    rng = np.random.default_rng(args.seed)
    print(f"TIGER benchmark: {ds.name} ({ds.n_items:,} items, {len(target):,} training prefixes); semantic IDs: "
          f"{ids_note}; device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; CPU threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; float32; {args.repeats} interleaved repeats (median)", flush=True)

    # ---- training
    H = tg.tokenize_histories(hist, ids, fixed=True)                   # (N, 81): train.py's GPU path, once
    T = tg.target_tokens(target, ids)

    def batch():
        idx = rng.choice(len(target), args.batch_size, replace=False)
        return tg.tokenize_histories(hist[idx], ids), T[idx], H[idx]

    cpu = device.type == "cpu"
    ours.length_buckets = cpu                                           # as train.py: buckets pay on CPU

    def step_ours(src, tgt, model=ours, opt=opt_ours, checked=True):
        loss = model.loss(src, tgt, checked=checked)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_hf(src, tgt):
        out = hf(input_ids=src, attention_mask=(src != tg.PAD).long(), labels=tgt)
        opt_hf.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_hf.step()

    def step_fast(src, tgt):
        step_ours(src, tgt, fast, opt_fast, checked=False)

    for m in (ours, fast, hf):
        m.train()
    src, tgt, fixed = batch()
    for _ in range(3 if args.compile else 1):                          # warm-up (untimed; compile, graphs)
        step_ours(src, tgt)
        step_fast(fixed, tgt)
        step_hf(src, tgt)
    t = {"ours": [], "fixed": [], "hf": []}
    widths, real = [], []
    for r in range(args.repeats):
        src, tgt, fixed = batch()
        widths.append(src.shape[1])
        real.append(float((src != tg.PAD).sum(1).float().mean()))
        t["ours"].append(timed(lambda s=src, y=tgt: step_ours(s, y), device)[1])
        t["fixed"].append(timed(lambda s=fixed, y=tgt: step_fast(s, y), device)[1])
        t["hf"].append(timed(lambda s=src, y=tgt: step_hf(s, y), device)[1])
        print(f"  train repeat {r + 1}: width {src.shape[1]} | " + " | ".join(
            f"{k} {v[-1]:.2f}s" for k, v in t.items() if v), flush=True)
    ours.length_buckets = True                                         # decoding buckets everywhere
    train = {k: args.batch_size / statistics.median(v) for k, v in t.items() if v}

    # ---- decoding (same weights again, eval mode)
    hf.load_state_dict(t5_state_dict(ours))
    ours.eval()
    hf.eval()
    fn = hf_prefix_fn(ids)

    def dec_ours(src):
        return tg.beam_search(ours, src, ids, beam=args.beam)[0]

    def dec_hf(src):
        with torch.inference_mode():
            out = hf.generate(input_ids=src, attention_mask=(src != tg.PAD).long(), num_beams=args.beam,
                              num_return_sequences=args.beam, max_new_tokens=ids.n_levels, do_sample=False,
                              prefix_allowed_tokens_fn=fn)
        codes = out[:, 1:1 + ids.n_levels] - torch.tensor(ids.offsets, device=out.device)  # (B*beam, 4) -> codes
        return ids.lookup(key_of(ids, codes)).view(len(src), args.beam)

    users = rng.choice(len(vhist), args.decode_users * (args.repeats + 1), replace=False)
    groups = users.reshape(args.repeats + 1, args.decode_users)
    src = tg.tokenize_histories(vhist[groups[0]], ids)
    dec_ours(src)                                                       # warm-up (untimed)
    dec_hf(src)
    d = {"ours": [], "hf": []}
    same = []
    for r in range(args.repeats):
        src = tg.tokenize_histories(vhist[groups[r + 1]], ids)
        res = {}
        for name, f in (("ours", dec_ours), ("hf", dec_hf)):
            res[name], secs = timed(lambda f=f: f(src), device)
            d[name].append(secs)
        same.append((res["ours"] == res["hf"]).all(1).float().mean().item())
        print(f"  decode repeat {r + 1}: width {src.shape[1]} | ours {d['ours'][-1]:.2f}s | hf {d['hf'][-1]:.2f}s",
              flush=True)
    dec = {k: args.decode_users / statistics.median(v) for k, v in d.items()}

    # ---- table
    rows = [(f"training examples/s (batch {args.batch_size}, eager, buckets {'on' if cpu else 'off'})",
             train["ours"], train["hf"]),
            (f"training examples/s, fixed shapes (81 tokens{', compiled' if args.compile else ''})",
             train["fixed"], train["hf"])]
    rows.append((f"decoding users/s (beam {args.beam}, constrained, {args.decode_users} users)", dec["ours"],
                 dec["hf"]))
    w = max(len(r[0]) for r in rows)
    print()
    print(f"| {'measure'.ljust(w)} | {'tiger.py':>9} | {'HF T5':>9} | {'ratio':>6} |")
    print(f"|{'-' * (w + 2)}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    for name, a, b in rows:
        print(f"| {name.ljust(w)} | {a:9.1f} | {b:9.1f} | {a / b:5.2f}x |")
    print(f"\nbatch widths (tokens) {widths}, mean real tokens per row {statistics.mean(real):.1f}; "
          f"same top-{args.beam} list as HF (same weights): {100 * statistics.mean(same):.1f}% of users")
    print(f"targets (CPU): training >= 1.5x: {'met' if train['ours'] / train['hf'] >= 1.5 else 'NOT met'} "
          f"({train['ours'] / train['hf']:.2f}x); decoding >= 3x: "
          f"{'met' if dec['ours'] / dec['hf'] >= 3 else 'NOT met'} ({dec['ours'] / dec['hf']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
