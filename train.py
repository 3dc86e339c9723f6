"""One command line over the EncodeRec pipeline (arXiv 2601.10837).

    python train.py --stage encoder --backbone minilm --dataset D   # InfoNCE fine-tuning (title <-> document)
    python train.py --stage embed   --dataset D --encoder minilm    # frozen item embeddings
    python train.py --stage rqvae   --dataset D --encoder E         # semantic IDs
    python train.py --stage tiger   --dataset D --encoder E         # generative retrieval
    python train.py --stage unisrec --dataset D --encoder E         # text-based SASRec
    python train.py --stage all     --dataset D --backbone minilm   # everything, skipping what is done

Runs are written under runs/<dataset>/... ; every user error ends with a message and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from data import REGISTRY, DataError

STAGES = {
    "encoder": "EncodeRec InfoNCE fine-tuning (issue 3)",
    "embed": "item embeddings from a frozen encoder (issue 3)",
    "rqvae": "RQ-VAE / residual k-means semantic IDs (issue 5)",
    "tiger": "TIGER generative retrieval (issue 5)",
    "unisrec": "UniSRec / SASRec (issue 4)",
    "all": "the whole pipeline (issue 6)",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train one stage of the EncodeRec pipeline.")
    ap.add_argument("--stage", required=True, choices=list(STAGES))
    ap.add_argument("--dataset", help=f"{' | '.join(REGISTRY)} | PATH (LC-Rec folder or raw files)")
    ap.add_argument("--data-dir", default="data", help="download and cache folder (default ./data)")
    ap.add_argument("--runs", default="runs", help="where run folders go (default ./runs)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(f"error: --stage {args.stage} ({STAGES[args.stage]}) is not implemented yet",
              file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
