"""The encoder-recipe ablations of issue 18, one command: each variant fine-tunes an encoder with 10 % of the
items held out (their title -> document retrieval measured), then trains UniSRec on it (--dataset) and makes
RQ-VAE semantic IDs with it (each --collisions dataset); one table of all variants.

    python scripts/ablations.py --dataset ../shared/data/lcrec/Scientific \
        --collisions ../shared/data/lcrec/Scientific ../shared/data/lcrec/Beauty            # paper settings
    python scripts/ablations.py ... --budget cpu     # 32 tokens, 1 epoch, UniSRec capped at 1 epoch

Runs are ordinary train.py run folders (finished ones are reused), so the grid can be stopped and rerun.
"""
import argparse
import io
import json
import shlex
import sys
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

# variant -> train.py encoder options changed from the base recipe (temperature 0.05, every document field,
# all items, symmetric off; the budget's length and epochs)
VARIANTS = {
    "base": [],
    "temperature 0.02": ["--temperature", "0.02"],
    "temperature 0.1": ["--temperature", "0.1"],
    "max length 64": ["--max-length", "64"],
    "max length 128": ["--max-length", "128"],
    "max length 256": ["--max-length", "256"],
    "symmetric loss": ["--symmetric"],
    "description only": ["--doc-fields", "description"],
    "25 % of items": ["--corpus", "0.25"],
    "50 % of items": ["--corpus", "0.5"],
    "1 epoch": ["--epochs", "1"],
    "3 epochs": ["--epochs", "3"],
    "5 epochs": ["--epochs", "5"],
}
BUDGETS = {  # (encoder options, unisrec options, rqvae options)
    "paper": (["--max-length", "256", "--epochs", "3"], [], []),
    "cpu": (["--max-length", "32", "--epochs", "1"], ["--max-epochs", "1"], ["--rqvae-epochs", "50"]),
}


def stage(argv: list[str]) -> dict:
    """train.main(argv) -> its results (the last stdout line); a failed stage ends the grid."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = train.main(argv)
    if code:
        sys.exit(code)
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--dataset", required=True, help="fine-tuning and UniSRec data")
    ap.add_argument("--collisions", nargs="+", default=[], help="datasets whose semantic IDs are audited")
    ap.add_argument("--budget", choices=list(BUDGETS), default="paper")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    common = ["--runs", args.runs, "--data-dir", args.data_dir, "--device", args.device]
    enc_opts, unisrec_opts, rqvae_opts = BUDGETS[args.budget]
    rows = []
    for name in args.variants:
        print(f"--- {name}", file=sys.stderr, flush=True)
        opts = enc_opts + VARIANTS[name]  # argparse: a later option wins
        enc = stage(["--stage", "encoder", "--backbone", args.backbone, "--dataset", args.dataset,
                     "--holdout", "0.1", *opts, *common])
        history = json.loads((Path(enc["run"]) / "history.json").read_text())
        held = [h["valid"] for h in history if h["valid"]]
        rec = stage(["--stage", "unisrec", "--dataset", args.dataset, "--encoder", enc["run"], *unisrec_opts,
                     *common])
        col = [stage(["--stage", "rqvae", "--dataset", d, "--encoder", enc["run"], *rqvae_opts, *common])
               ["collisions"] for d in args.collisions]
        held = held[-1] if held else {"recall@10": float("nan"), "ndcg@10": float("nan")}  # none held out
        rows.append([name, held["recall@10"], held["ndcg@10"], rec["test"]["recall@10"],
                     rec["test"]["ndcg@10"], *(c["collision_rate"] for c in col)])
    head = ["variant", "held-out R@10", "held-out N@10", "UniSRec R@10", "UniSRec N@10",
            *(f"collisions {Path(d).name}" for d in args.collisions)]
    table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                       *("| " + " | ".join([r[0], *(f"{v:.4f}" for v in r[1:])]) + " |" for r in rows)])
    path = Path(args.runs) / f"ablations-{Path(args.dataset).name}-{args.budget}.md"
    path.write_text(f"python scripts/ablations.py {shlex.join(argv or sys.argv[1:])}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
