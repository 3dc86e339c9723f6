"""EncodeRec's whole pipeline in one command: fine-tune the encoder, then for the off-the-shelf and the tuned
encoder: retrieval (Table 1), EASE, UniSRec (+ SASRec-ID), VQ-Rec, semantic IDs and TIGER; then the report.

    python scripts/pipeline.py --dataset ../shared/data/lcrec/Scientific --budget smoke  # CPU minutes
    python scripts/pipeline.py --dataset D --budget paper --amp bf16 --seeds 0 1 2      # papers' schedules

Each step is one `python train.py --stage ...` command (printed before it runs) into an ordinary run folder:
finished folders are reused, so a second call only reads, and a stopped pipeline continues where it was.
Any other train.py flag (--amp, --compile, --device, --patience, --doc-fields, ...) goes to the stages it
applies to; the budget's schedules are not flags.
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import encoderec as er  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402
from ablations import stage  # noqa: E402  (train.main -> its results; a failed stage ends the pipeline)
from data import DOCUMENT_FIELDS, ITEM_TEXT_FIELDS, DataError, load_dataset, parse_fields, \
    weights_folder  # noqa: E402
from report import report  # noqa: E402

BUDGETS = {  # every schedule in one place
    # minutes on 2 CPU cores: every stage runs end to end; the numbers are not results
    "smoke": {"epochs": 1, "encoder_max_length": 32, "max_epochs": 2, "rqvae_epochs": 20, "max_steps": 30,
              "eval_every": 30, "warmup_steps": 10},
    # the published schedules (RQ-VAE: RQVAEConfig's; TIGER's 200k steps: a GPU job)
    "paper": {"epochs": 3, "encoder_max_length": 256, "max_epochs": None, "rqvae_epochs": None,
              "max_steps": 200_000, "eval_every": 1000, "warmup_steps": 1000},
}
# set by the pipeline (the budget, the encoder it tunes, every stage's default batch and lr): not passed on
OWN = {"stage", "dataset", "encoder", "emb", "out", "seed", "seeds", "mode", "max_length", "epochs",
       "max_epochs", "rqvae_epochs", "max_steps", "eval_every", "warmup_steps", "holdout", "corpus",
       "batch_size", "lr"}


def commands(budget: str, backbone: str, ds, fields: str | None) -> list[list[str]]:
    """The train.py commands of the pipeline on `ds`, in order; TUNED stands for the tuned encoder's
    folder."""
    positions = er.BertConfig.from_json(weights_folder(backbone) / "config.json").max_tokens
    b = {**BUDGETS[budget], "encoder_max_length": min(BUDGETS[budget]["encoder_max_length"], positions)}

    def flag(name, key):  # a budget's schedule as flags (none: the stage's default)
        return [] if b[key] is None else [name, str(b[key])]
    has_text = any(t is not None for t in ds.item_texts(parse_fields(fields, ITEM_TEXT_FIELDS)))
    pairs = sum(bool(t and d) for t, d in zip(ds.title_texts(), ds.document_texts(DOCUMENT_FIELDS)))
    encoders = [backbone] if has_text else []
    text = ["--max-length", str(min(256, positions))]  # the downstream embeddings, whatever the encoder
    out = []
    if not has_text:
        print(f"[pipeline] {ds.name} has no item text: SASRec-ID only", file=sys.stderr)
    elif pairs < 2:
        print(f"[pipeline] {ds.name}: no (title, document) pair: off-the-shelf encoder only", file=sys.stderr)
    else:
        out.append(["--stage", "encoder", "--encoder", backbone, *flag("--epochs", "epochs"),
                    *flag("--max-length", "encoder_max_length")])
        encoders.append(TUNED)
    for enc in encoders if pairs >= 2 else []:
        out.append(["--stage", "retrieval", "--encoder", enc, *flag("--max-length", "encoder_max_length")])
    out.append(["--stage", "ease"])
    out.append(["--stage", "unisrec", "--encoder", "none", *flag("--max-epochs", "max_epochs")])
    for enc in encoders:
        out.append(["--stage", "unisrec", "--encoder", enc, *text, *flag("--max-epochs", "max_epochs")])
    for enc in encoders:
        out.append(["--stage", "unisrec", "--mode", "vqrec", "--encoder", enc, *text,
                    *flag("--max-epochs", "max_epochs")])
    for enc in encoders:
        out.append(["--stage", "tiger", "--encoder", enc, *text, *flag("--rqvae-epochs", "rqvae_epochs"),
                    *flag("--max-steps", "max_steps"), *flag("--eval-every", "eval_every"),
                    *flag("--warmup-steps", "warmup_steps")])
    return out


TUNED = "<the tuned encoder>"


def passed_on(ap: argparse.ArgumentParser, extra: list[str]):
    """train.py's flags in `extra` as (dest, tokens) and as train.py's parser `ap` reads them (types and
    choices checked there: its error is one line, exit 2); the pipeline's own refused."""
    ns = ap.parse_args(["--stage", "encoder", *extra])
    dest = {o: a.dest for a in ap._actions for o in a.option_strings}
    out = []
    for tok in extra:
        if tok.startswith("--"):
            out.append((dest[tok.split("=")[0]], [tok]))
        else:
            out[-1][1].append(tok)
    if own := [toks[0] for d, toks in out if d in OWN]:
        raise DataError(f"{own[0]} is set by the pipeline (its --budget, --seeds and stages): drop it")
    return out, ns


def main(argv=None) -> int:
    ap = ev.one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False))
    ap.add_argument("--dataset", default=train.DEFAULT_DATASET, help="a data folder or a prepared name")
    ap.add_argument("--budget", choices=list(BUDGETS), default="smoke", help="every schedule (smoke)")
    ap.add_argument("--backbone", default="minilm", help="the encoder fine-tuned (minilm)")
    ap.add_argument("--seeds", type=ev.SEED, nargs="+", default=[0], help="the whole pipeline once per seed")
    ap.add_argument("--runs", default="runs", help="where run folders go (./runs)")
    args, extra = ap.parse_known_args(argv)
    try:
        train_ap, tuned = train.build_parser(), ""
        flags, ns = passed_on(train_ap, extra)
        ds = load_dataset(args.dataset, ns.data_dir)
        for seed in args.seeds:
            for cmd in commands(args.budget, args.backbone, ds, ns.fields):
                no_text = {"fields"} if "none" in cmd else set()  # SASRec-ID: refused with --encoder none
                allowed = ev.flags_of(train_ap, cmd[1]) - no_text
                cmd = [tuned if c == TUNED else c for c in cmd]
                cmd += ["--dataset", args.dataset, "--runs", args.runs, "--resume"]
                cmd += [t for d, toks in flags if d in allowed for t in toks]
                cmd += ["--seed", str(seed)] if "seed" in allowed else []
                print(f"[pipeline] python train.py {shlex.join(cmd)}", file=sys.stderr, flush=True)
                res = stage(cmd)
                tuned = res["run"] if cmd[1] == "encoder" else tuned
    except (Exception, KeyboardInterrupt) as e:
        return ev.cli_error(e, resumable=True)
    print(report(Path(args.runs), [ds.name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
