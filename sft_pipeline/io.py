"""File helpers shared by every stage: atomic writes and the stage error type.

Outputs are written next to their final path under a temporary name and renamed into place, so a stage killed
half-way never leaves a file (or folder) that looks complete to the next run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("sft_pipeline")

# One schema for every rejected-rows file: where the row came from, why it stops, and its original text.
REJECTED_COLUMNS = ["source_file", "line", "id", "reason", "detail", "text"]


class StageError(RuntimeError):
    """A problem with the inputs that the user must fix; `main` prints it and exits with status 1."""


@contextlib.contextmanager
def atomic_path(final: Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if directory and final.exists():
        # A folder cannot be replaced by rename in one step: move the old one aside first.
        old = final.with_name(f".{final.name}.old")
        _remove(old)
        final.rename(old)
        tmp.rename(final)
        _remove(old)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_frame(path: Path, frame, **kwargs) -> None:
    """Write a DataFrame as Parquet or CSV, chosen by the suffix."""
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False, **kwargs)
        elif path.suffix == ".csv":
            frame.to_csv(tmp, index=False, **kwargs)
        else:
            raise ValueError(f"{path}: unsupported output format (use .parquet or .csv)")


def read_json(path: Path) -> Any:
    with Path(path).open(encoding="utf-8") as fh:
        return json.load(fh)


def run_main(run: Callable[[], Any], stage: str = "", outputs: Callable[[], Any] = tuple) -> int:
    """Run a stage body: user-facing errors become one clear message on stderr and exit status 1.

    A failure for lack of disk space (sft_pipeline.faults.no_space) is named in one line, with the free space of
    the stage's `outputs()` and what to do, before its traceback and again after it, so neither the first nor the
    last line of a long log blames something else (a torch zip writer, SQLite).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    import traceback

    from sft_pipeline import faults
    from sft_pipeline.params import ParamsError

    try:
        run()
    except (StageError, ParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not faults.no_space(exc):
            raise
        try:
            line = faults.space_message(stage, list(outputs()), exc)
        except Exception:  # noqa: BLE001 - the message must not replace the error it reports
            line = f"error: {stage or 'stage'}: no space left on the device; the original error follows"
        print(line, file=sys.stderr, flush=True)
        traceback.print_exc()
        print(line.removesuffix("; the original error follows").removesuffix(
            f". The original error ({type(exc).__name__}) follows"), file=sys.stderr, flush=True)
        return 1
    return 0


def stage_main(argv: list[str] | None, doc: str, call: Callable[[Any], Any]) -> int:
    """The `main` of every stage: parse `--params`, load it, `call(params)`, map user errors to exit status 1."""
    import argparse
    import re

    from sft_pipeline.params import add_params_argument, load

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_params_argument(parser)
    args = parser.parse_args(argv)
    stage = re.match(r"Stage `(\w+)`", doc)
    loaded = []

    def body():
        loaded.append(load(args.params))
        call(loaded[0])

    def outputs():
        # Where the stage writes: every path of params.paths (the folders the message compares), once loaded.
        return [p for p in loaded[0].paths.model_dump().values() if p is not None] if loaded else [Path(".")]

    return run_main(body, stage.group(1) if stage else "", outputs)
