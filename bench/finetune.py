"""Benchmark: one EncodeRec fine-tuning step (encoderec.cached_info_nce) vs sentence-transformers'
CachedMultipleNegativesRankingLoss on the same batch.

Batch = the first --pairs (title, document) pairs of ../shared/data/lcrec/Scientific in item order whose
title and document are both distinct (so false-negative masking has nothing to mask), loaded through
data.py; document = EncodeRec's fields. Same weights (the --backbone's folder, data.weights_folder), same
token limit (--max-length, default the folder's: MiniLM 256), GradCache chunks of --chunk-size 64 on both
sides, tau 0.05 = ST's scale 20, AdamW lr 5e-5, fp32, CPU.

First the loss of the batch with dropout off on both sides (it must agree to 1e-5); then, in training mode,
--repeats timed steps each (loss, backward, AdamW step), interleaved (ours, ST, ours, ...), after one
warm-up step each unless --no-warmup. Prints pairs/s and the ratio. --against REV adds encoderec.py as
committed at git revision REV (its cached_info_nce on a copy of the same encoder): a change timed against
the code before it, in the same run.

    python bench/finetune.py [--pairs 512] [--repeats 1] [--no-warmup] [--threads N] [--max-length 256] \
        [--against REV]
"""

import argparse
import copy
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import encoderec  # noqa: E402
from data import BACKBONES, DOCUMENT_FIELDS, DataError, load_dataset, weights_folder  # noqa: E402
from encode import DATA, timed  # noqa: E402


def load_pairs(n: int) -> tuple[list[str], list[str]]:
    """The first n pairs whose title and document both occur once among the chosen pairs."""
    try:
        ds = load_dataset(str(DATA), data_dir=ROOT / "data")
    except DataError as e:
        sys.exit(f"{e}\nThe benchmark needs the shared Scientific data (../shared/data beside the checkout).")
    seen_t, seen_d, qs, ds_ = set(), set(), [], []
    for t, d in zip(ds.title_texts(), ds.document_texts(DOCUMENT_FIELDS)):
        if t and d and t not in seen_t and d not in seen_d and len(qs) < n:
            seen_t.add(t), seen_d.add(d), qs.append(t), ds_.append(d)
    return qs, ds_


def module_at(rev: str, name: str = "encoderec") -> types.ModuleType:
    """The module `name` as committed at `rev` (encoderec's functions take this checkout's encoder objects)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}.py"], capture_output=True,
                         text=True, check=True).stdout
    mod = sys.modules[f"{name}_at_{rev}"] = types.ModuleType(f"{name}_at_{rev}")  # dataclasses look it up
    exec(compile(src, f"{name}.py@{rev}", "exec"), mod.__dict__)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", choices=list(BACKBONES), default="minilm")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--against", metavar="REV", help="also time encoderec.py at this git revision")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    folder = weights_folder(args.backbone)
    queries, docs = load_pairs(args.pairs)
    ours = encoderec.load_encoder(folder, max_length=args.max_length)
    st = SentenceTransformer(str(folder), device="cpu")
    st.max_seq_length = ours.max_length
    cmnrl = CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=args.chunk_size)
    tokenize = getattr(st, "preprocess", st.tokenize)  # `tokenize` before sentence-transformers 6
    st_features = [tokenize(queries), tokenize(docs)]
    print(f"{len(queries)} pairs of Scientific (title, document), {ours.max_length} tokens, chunks of "
          f"{args.chunk_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    ours.eval(), st.eval()  # dropout off: the losses must agree
    with torch.no_grad():
        ref = ours.bert.embeddings.word_embeddings.weight.clone()
    a = encoderec.cached_info_nce(ours, queries, docs, args.chunk_size, 0.05).item()
    b = cmnrl(copy.copy(st_features), None).item()
    assert torch.equal(ref, ours.bert.embeddings.word_embeddings.weight), "the loss changed the weights"
    print(f"first-step loss (dropout off): ours {a:.6f}, sentence-transformers {b:.6f}, |diff| {abs(a - b):.2e}")
    steps, labels = {}, {"ours": "encoderec.cached_info_nce", "st": "ST CachedMultipleNegativesRankingLoss"}
    if args.against:
        old, before = module_at(args.against), copy.deepcopy(ours)
        c = old.cached_info_nce(before, queries, docs, args.chunk_size, 0.05).item()
        print(f"first-step loss (dropout off) of encoderec.py at {args.against}: {c:.6f}, |diff| to ours "
              f"{abs(a - c):.2e}")
        before.train()
        opt_before = torch.optim.AdamW(before.parameters(), lr=5e-5)

        def step_before():
            opt_before.zero_grad()
            old.cached_info_nce(before, queries, docs, args.chunk_size, 0.05).backward()
            opt_before.step()
        steps["before"], labels["before"] = step_before, f"cached_info_nce at {args.against}"

    ours.train(), st.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=5e-5)
    opt_st = torch.optim.AdamW(st.parameters(), lr=5e-5)

    def step_ours():
        opt_ours.zero_grad()
        encoderec.cached_info_nce(ours, queries, docs, args.chunk_size, 0.05).backward()
        opt_ours.step()

    def step_st():
        opt_st.zero_grad()
        cmnrl(copy.copy(st_features), None).backward()
        opt_st.step()
    t0 = time.perf_counter()
    med, _ = timed({"ours": step_ours, "st": step_st, **steps}, args.repeats, warmup=not args.no_warmup)
    print(f"\n| step (loss + backward + AdamW) | s / step (median of {args.repeats}) | pairs/s |")
    print("|---|---|---|")
    for name, label in labels.items():
        print(f"| {label} | {med[name]:.2f} | {len(queries) / med[name]:.1f} |")
    print(f"\nours / ST pairs/s: {med['st'] / med['ours']:.2f}x", end="")
    print(f"; ours / {args.against}: {med['before'] / med['ours']:.2f}x" if args.against else "", end="")
    print(f" (whole benchmark {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
