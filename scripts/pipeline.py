"""EncodeRec's whole pipeline in one command: fine-tune the encoder, then for the off-the-shelf and the tuned
encoder: retrieval (Table 1), EASE, UniSRec (+ SASRec-ID), VQ-Rec, semantic IDs and TIGER; then the report.

    python scripts/pipeline.py --dataset ../shared/data/lcrec/Scientific --budget smoke   # CPU minutes
    python scripts/pipeline.py --dataset D --budget paper                                # the papers' schedules

Each step is one `python train.py --stage ...` command (printed before it runs) into an ordinary run folder:
finished folders are reused, so a second call only reads, and a stopped pipeline continues where it was.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval as ev  # noqa: E402
import train  # noqa: E402
from ablations import stage  # noqa: E402
from data import DOCUMENT_FIELDS, ITEM_TEXT_FIELDS, load_dataset, parse_fields  # noqa: E402
from report import report  # noqa: E402

BUDGETS = {  # every schedule in one place
    # minutes on 2 CPU cores: every stage runs end to end; the numbers are not results
    "smoke": {"epochs": 1, "encoder_max_length": 32, "max_epochs": 2, "rqvae_epochs": 20, "max_steps": 30,
              "eval_every": 30, "warmup_steps": 10},
    # the published schedules (RQ-VAE: RQVAEConfig's; TIGER's 200k steps: a GPU job)
    "paper": {"epochs": 3, "encoder_max_length": 256, "max_epochs": None, "rqvae_epochs": None,
              "max_steps": 200_000, "eval_every": 1000, "warmup_steps": 1000},
}


def commands(args, ds) -> list[list[str]]:
    """The train.py commands of the pipeline on `ds`, in order (the tuned encoder's folder: '{tuned}')."""
    b = {k: [] if v is None else [str(v)] for k, v in BUDGETS[args.budget].items()}
    opt = lambda flag, key: [flag, *b[key]] if b[key] else []  # noqa: E731
    fields = parse_fields(args.fields, ITEM_TEXT_FIELDS)
    has_text = any(t is not None for t in ds.item_texts(fields))
    pairs = sum(bool(t and d) for t, d in zip(ds.title_texts(), ds.document_texts(DOCUMENT_FIELDS)))
    encoders = [args.backbone] if has_text else []
    text = ["--max-length", "256", *(["--fields", args.fields] if args.fields else [])]  # downstream embeddings
    out = []
    if not has_text:
        print(f"[pipeline] {ds.name} has no item text ({', '.join(fields)}): SASRec-ID only", file=sys.stderr)
    elif pairs < 2:
        print(f"[pipeline] {ds.name}: no (title, document) pair: off-the-shelf encoder only", file=sys.stderr)
    else:
        out.append(["--stage", "encoder", "--encoder", args.backbone, *opt("--epochs", "epochs"),
                    *opt("--max-length", "encoder_max_length")])
        encoders.append("{tuned}")
    for enc in encoders if pairs >= 2 else []:
        out.append(["--stage", "retrieval", "--encoder", enc, *opt("--max-length", "encoder_max_length")])
    out.append(["--stage", "ease"])
    out.append(["--stage", "unisrec", "--encoder", "none", *opt("--max-epochs", "max_epochs")])
    for enc in encoders:
        out.append(["--stage", "unisrec", "--encoder", enc, *text, *opt("--max-epochs", "max_epochs")])
    for enc in encoders:
        out.append(["--stage", "unisrec", "--mode", "vqrec", "--encoder", enc, *text,
                    *opt("--max-epochs", "max_epochs")])
    for enc in encoders:
        out.append(["--stage", "tiger", "--encoder", enc, *text, *opt("--rqvae-epochs", "rqvae_epochs"),
                    *opt("--max-steps", "max_steps"), *opt("--eval-every", "eval_every"),
                    *opt("--warmup-steps", "warmup_steps")])
    return out


def main(argv=None) -> int:
    ap = ev.one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False))
    ap.add_argument("--dataset", default=train.DEFAULT_DATASET, help="a name or a data folder (as train.py)")
    ap.add_argument("--budget", choices=list(BUDGETS), default="smoke", help="every schedule (smoke)")
    ap.add_argument("--backbone", default="minilm", help="the encoder fine-tuned (minilm)")
    ap.add_argument("--fields", help="the item text the recommenders embed (train.py's default)")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", default="0")
    args = ap.parse_args(argv)
    common = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--runs", args.runs,
              "--device", args.device, "--seed", args.seed, "--resume"]
    try:
        ds = load_dataset(args.dataset, args.data_dir)
        parse_fields(args.fields, ITEM_TEXT_FIELDS)
    except train.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tuned = ""
    for cmd in commands(args, ds):
        cmd = [tuned if c == "{tuned}" else c for c in cmd] + common
        print(f"[pipeline] python train.py {' '.join(cmd)}", file=sys.stderr, flush=True)
        res = stage(cmd)
        tuned = res["run"] if cmd[1] == "encoder" else tuned
    print(report(Path(args.runs), [ds.name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
