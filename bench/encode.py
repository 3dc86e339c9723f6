"""Benchmark: encoderec.TextEncoder.encode vs sentence-transformers on 1,000 real Scientific documents.

Documents = the first 1,000 non-empty descriptions in item order of ../shared/data/lcrec/Scientific,
loaded through data.py (HTML-unescaped, whitespace-normalised). Same weights (the --backbone's folder as
data.weights_folder finds it), its own token limit (MiniLM 256, MPNet 384), batch 64, fp32, CPU.
Warm-up once each (unless --no-warmup), then the median of --repeats timed runs each, interleaved (ours,
ST, ours, ...). Also checks that a folder written by save_pretrained loads in sentence-transformers and
reproduces our embeddings; `--saved DIR` runs that check on an existing folder too (e.g. a fine-tuned run
from `train.py --stage encoder`).

    python bench/encode.py [--backbone minilm|mpnet] [--n 1000] [--repeats 3] [--no-warmup] [--threads N]
                           [--batch-size 64] [--saved DIR]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import encoderec  # noqa: E402
from data import BACKBONES, DataError, load_dataset, weights_folder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "lcrec" / "Scientific"


def load_docs(n: int) -> list[str]:
    try:
        ds = load_dataset(str(DATA), data_dir=ROOT / "data")
    except DataError as e:
        sys.exit(f"{e}\nThe benchmark needs the shared Scientific data (../shared/data beside the checkout).")
    return [it.description for it in ds.items if it.description][:n]


def st_delta(folder, ours_emb, docs, batch_size) -> float:
    """Max |delta| between SentenceTransformer(folder) and our embeddings of the same docs."""
    from sentence_transformers import SentenceTransformer
    e = SentenceTransformer(str(folder), device="cpu").encode(docs, batch_size=batch_size)
    return float(np.abs(e - ours_emb).max())


def timed(fns: dict, repeats: int, warmup: bool = True) -> tuple[dict, dict]:
    """Warm up each fn once, then time them interleaved (A B A B ...) so drifting machine load
    hits both alike; returns median seconds and the last output of each."""
    outs = {name: fn() for name, fn in fns.items()} if warmup else {}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=list(BACKBONES), default="minilm")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true", help="time from the first run (a slow model)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--saved", default=None, help="also check this saved/fine-tuned folder in ST")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    try:
        path = str(weights_folder(args.backbone))
    except DataError as e:
        sys.exit(f"error: {e}")
    docs = load_docs(args.n)
    ours = encoderec.load_encoder(path, device="cpu")
    st = SentenceTransformer(path, device="cpu")
    tok_lens = [len(e.ids) for e in ours.tokenizer.encode_batch(docs)]
    print(f"{args.backbone} ({path}): {len(docs)} Scientific descriptions, {sum(tok_lens)} tokens after "
          f"truncation to {ours.max_length} (mean {np.mean(tok_lens):.0f}), batch {args.batch_size}, fp32, CPU, "
          f"{args.threads} threads, median of {args.repeats}, torch {torch.__version__}")

    med, outs = timed({
        "ours": lambda: ours.encode(docs, batch_size=args.batch_size, show_progress=False),
        "st": lambda: st.encode(docs, batch_size=args.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False),
    }, args.repeats, not args.no_warmup)
    t_ours, t_st, e_ours, e_st = med["ours"], med["st"], outs["ours"], outs["st"]
    d = float(np.abs(e_ours - e_st).max())

    with tempfile.TemporaryDirectory() as tmp:
        encoderec.save_pretrained(ours, tmp)
        d_saved = st_delta(tmp, e_ours[:200], docs[:200], args.batch_size)
    if args.saved:
        tuned = encoderec.load_encoder(args.saved, device="cpu")
        e_tuned = tuned.encode(docs[:200], batch_size=args.batch_size, show_progress=False)
        d_tuned = st_delta(args.saved, e_tuned, docs[:200], args.batch_size)

    print()
    print(f"| {'encoder':<24} | {'items/s':>8} | {'seconds':>7} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 9}|")
    print(f"| {'encoderec (ours)':<24} | {len(docs) / t_ours:8.1f} | {t_ours:7.2f} |")
    print(f"| {'sentence-transformers':<24} | {len(docs) / t_st:8.1f} | {t_st:7.2f} |")
    print()
    print(f"ratio ours/ST items/s: {t_st / t_ours:.2f}x   (target >= 1.3)")
    print(f"max |ours - ST| over {len(docs)} embeddings: {d:.2e}")
    print(f"save_pretrained -> SentenceTransformer(folder) reproduces ours: max |delta| {d_saved:.2e} (200 docs)")
    if args.saved:
        print(f"{args.saved}: SentenceTransformer(folder) vs load_encoder(folder): max |delta| "
              f"{d_tuned:.2e} (200 docs)")


if __name__ == "__main__":
    main()
