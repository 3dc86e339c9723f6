"""Which tokenizer setting, if any, removes semantic-ID collisions, and does the encoder matter?

For each dataset and encoder, makes the semantic IDs with every (tokenizer, setting) of SETTINGS and each
seed, as ordinary `train.py --stage rqvae` run folders (finished ones are reused), then prints the
report's collision table (mean ± std over seeds; Welch's t-test of each fine-tuned encoder against its
backbone) and what the embeddings allow (`rqvae.embedding_stats` of the L2-normalised vectors the
tokenizers see: the floor set by identical embeddings, mean pairwise cosine, effective rank).

    python scripts/collision_seeds.py --datasets ../shared/data/lcrec/Scientific \\
        --encoders minilm runs/Scientific/encoder-minilm-<hash> --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import eval as ev  # noqa: E402
import rqvae as rq  # noqa: E402
from ablations import stage  # noqa: E402  (train.main -> its last results.json; a failure exits)
from data import read_array  # noqa: E402
from report import collect_report, report_markdown  # noqa: E402

SETTINGS = {  # name -> train.py options; the first of each tokenizer is the project's default
    "rqvae": ["--tokenizer", "rqvae"],
    "rqvae, no dead-code restart": ["--tokenizer", "rqvae", "--no-dead-code-restart"],
    "rqvae, unscaled": ["--tokenizer", "rqvae", "--no-standardize"],
    "rkmeans": ["--tokenizer", "rkmeans"],
    "rkmeans, unscaled": ["--tokenizer", "rkmeans", "--no-standardize"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--datasets", nargs="+", required=True)
    ap.add_argument("--encoders", nargs="+", default=["minilm"], help="minilm | encoder run folders")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--fields", nargs="+", help="each dataset's item text (train.py --fields)")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if args.fields and len(args.fields) != len(args.datasets):
        ap.error("--fields needs one entry per --datasets")
    common = ["--runs", args.runs, "--data-dir", args.data_dir, "--device", args.device]
    fields = args.fields or [None] * len(args.datasets)
    geometry, names = [], []
    for dataset, f in zip(args.datasets, fields):
        for enc in args.encoders:
            for setting in args.settings:
                print(f"--- {dataset} / {enc} / {setting}", file=sys.stderr, flush=True)
                res = stage(["--stage", "rqvae", "--dataset", dataset, "--encoder", enc, *SETTINGS[setting],
                             "--seeds", *map(str, args.seeds), *common, *(["--fields", f] if f else [])])
            emb = ev.l2_rows(read_array(res["embeddings"], "item embeddings"))
            geometry.append((res["dataset"], enc, rq.embedding_stats(emb)))
            names.append(res["dataset"])
    recs = [r for r in collect_report(args.runs, list(dict.fromkeys(names))) if r["table"] == "collisions"]
    print(report_markdown(recs))
    print("| dataset | encoder | floor (identical embeddings) | mean cosine | effective rank |")
    print("|---|---|---|---|---|")
    for name, enc, g in geometry:
        print(f"| {name} | {enc} | {g['collision_floor']:.4f} ({g['repeated_embeddings']}) | "
              f"{g['mean_cosine']:.3f} | {g['effective_rank']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
