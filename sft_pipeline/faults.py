"""What a long run meets besides bad data: a stop signal (preemption, a cancelled flow), a full disk.

- `GracefulStop`: while training, SIGTERM or SIGINT asks the Trainer to save a checkpoint at the end of the current
  optimizer step and to stop there; train then ends its MLflow run as KILLED and exits with 128 + the signal (143,
  130). If the step and the save do not finish within `train.stop_grace_s`, or a second signal comes, the process
  exits at once, after removing the checkpoint folder it was writing (the next run resumes from the last complete
  one, as after kill -9).
- `no_space` recognises a full disk (or quota) in an exception and its causes, including the errors that do not say
  so: torch's `unexpected pos ... vs ...` and `iostream error` when a checkpoint's optimizer state is cut short,
  SQLite's `database or disk is full`. `space_message` is the one line a stage prints for it.
- `checkpoint_estimate` and `check_space`: before training, what the checkpoints and the model will take, against
  the free space of the volumes they go to.

Nothing here imports torch or the Trainer at module level: every stage's `main` imports it.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from sft_pipeline.io import StageError

# Checkpoints on disk at the worst moment: the Trainer keeps two (save_total_limit=2) plus the best one when it is
# older, and writes the next one before it removes the oldest.
CHECKPOINTS_AT_ONCE = 3
# trainer_state.json, scheduler, RNG states, tokenizer files: a few MB at most beside the weights.
CHECKPOINT_OVERHEAD = 8 * 2**20
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Texts of errors that mean a full disk without an errno: SQLite, torch's zip writer (a cut-short optimizer state).
_SPACE_TEXTS = ("no space left", "disk is full", "disk quota exceeded", "unexpected pos", "iostream error",
                "file write failed", "not enough space")


class Stopped(SystemExit):
    """Training stopped on a signal after saving a checkpoint; the exit status is 128 + the signal number."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def checkpoint_complete(folder: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint folder without it was cut short."""
    return (Path(folder) / "trainer_state.json").is_file()


def checkpoint_folders(checkpoints_dir: Path) -> list[Path]:
    """checkpoint-<step> folders, by step."""
    found = [p for p in Path(checkpoints_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def newest_complete(checkpoints_dir: Path) -> Path | None:
    done = [p for p in checkpoint_folders(checkpoints_dir) if checkpoint_complete(p)]
    return done[-1] if done else None


def remove_incomplete(checkpoints_dir: Path) -> list[str]:
    """Remove every checkpoint folder a stop or a failure cut short; returns their names."""
    removed = []
    for folder in checkpoint_folders(checkpoints_dir):
        if not checkpoint_complete(folder):
            for _ in range(3):  # the writer may still be adding files while this runs
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():
                    break
            removed.append(folder.name)
    return removed


class GracefulStop:
    """Handle SIGTERM and SIGINT while training: stop at the end of the current step with a checkpoint.

        with GracefulStop(grace_s, checkpoints_dir, on_timeout) as stop:
            trainer.add_callback(stop.callback())   # sets should_save / should_training_stop
            trainer.train()
        if stop.stopping: ...                       # stopped early: report and exit 128 + signum

    `on_timeout` runs (best effort) before the process exits when the grace period or a second signal cuts the
    stop short, e.g. to end the MLflow run. Outside the main thread no handler can be installed: nothing changes.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float, checkpoints_dir: Path, on_timeout=None, stream=None, tidies: bool = True):
        self.grace_s = grace_s
        # Whether this process removes an unfinished checkpoint when it exits (under DDP, process 0 only).
        self.tidies = tidies
        self.checkpoints_dir = Path(checkpoints_dir)
        self.on_timeout = on_timeout
        self.stream = sys.stderr if stream is None else stream
        self.signum: int | None = None
        # Under DDP: another process got the signal first (this one stops at the same step; its own comes soon).
        self.peer_stopped = False
        self._previous: dict = {}
        self._timer: threading.Timer | None = None
        self._exiting = threading.Lock()

    @property
    def stopping(self) -> bool:
        return self.signum is not None or self.peer_stopped

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._print(f"train: second {signal_name(signum)}: exiting now without waiting for the checkpoint")
            self.exit_now(signum)
        self.signum = signum
        self._print(f"train: {signal_name(signum)} received: saving a checkpoint at the end of this step and "
                    f"stopping (at most {self.grace_s:g} s, train.stop_grace_s)")
        self._timer = threading.Timer(self.grace_s, self._timed_out)
        self._timer.daemon = True
        self._timer.start()

    def _timed_out(self) -> None:
        self._print(f"train: the step and its checkpoint did not finish within train.stop_grace_s = {self.grace_s:g} "
                    f"s; exiting without them")
        self.exit_now(self.signum or signal.SIGTERM)

    def exit_now(self, signum: int) -> None:
        """Remove the checkpoint being written, run `on_timeout`, and end the process with 128 + signum."""
        with self._exiting:
            # Under DDP process 0 alone tidies the checkpoints folder (the others' deletions would race with it).
            removed = remove_incomplete(self.checkpoints_dir) if self.tidies else []
            last = newest_complete(self.checkpoints_dir)
            self._print(f"train: stopped by {signal_name(signum)}"
                        + (f"; removed the unfinished {', '.join(removed)}" if removed else "")
                        + (f"; `dvc repro` resumes from {last.name}" if last else "; no checkpoint to resume from"))
            if self.on_timeout is not None:
                try:
                    self.on_timeout(signum)
                except Exception as exc:  # noqa: BLE001 - exiting anyway; say what was not done
                    self._print(f"train: warning: {type(exc).__name__}: {exc}")
            self.stream.flush()
            os._exit(128 + signum)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def callback(self, agree=None):
        """The Trainer callback. `agree(flag)`: True on every process when `flag` is on any (under DDP:
        sft_pipeline.distributed.any_process), so that all stop after the same step."""
        from transformers import TrainerCallback

        stop = self
        agree = agree or (lambda flag: flag)

        class StopOnSignal(TrainerCallback):
            """After a signal: save at the end of the step and stop. When the step ends an epoch, the epoch's own
            validation and checkpoint run as usual; a cut epoch is not validated (its metrics would not be an
            epoch's, and the resumed run validates it when it ends)."""

            @staticmethod
            def _epoch_done(state) -> bool:
                return state.epoch is not None and abs(state.epoch - round(state.epoch)) < 1e-6

            def on_step_end(self, args, state, control, **kwargs):
                # Under DDP every process stops at the step where the first got the signal (one all-reduce of a
                # flag per step): a process that went on alone would wait for the others forever.
                if agree(stop.signum is not None):
                    stop.peer_stopped = stop.signum is None
                    control.should_training_stop = True
                    if not self._epoch_done(state):
                        control.should_save = True
                return control

            def on_epoch_end(self, args, state, control, **kwargs):
                if stop.stopping and not self._epoch_done(state):
                    control.should_evaluate = False
                    control.should_save = False
                return control

        return StopOnSignal()


# ------------------------------------------------------------------------------------------------ disk space


def no_space(exc: BaseException | None) -> bool:
    """True when `exc`, or an exception it was raised from or during, says the disk (or the quota) is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
            return True
        text = str(exc).lower()
        if any(t in text for t in _SPACE_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free space for this user on the volume that holds (or will hold) `path`."""
    return shutil.disk_usage(existing_ancestor(path)).free


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _filename(exc: BaseException | None) -> str | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.filename:
            return str(exc.filename)
        exc = exc.__cause__ or exc.__context__
    return None


def space_message(stage: str, paths, exc: BaseException) -> str:
    """One line: the stage ran out of space, where (the file the error names, else the stage's output folder with the
    least free space), how much is free there, and what to do."""
    named = _filename(exc)
    candidates = [Path(named)] if named else [Path(p) for p in paths]
    if candidates:
        where = min(candidates, key=lambda p: free_bytes(p))
        place = f"writing under {where}" if not named else f"writing {where}"
        free = f"{human(free_bytes(where))} free on its volume ({existing_ancestor(where)})"
    else:
        place, free = "writing its outputs", "free space unknown"
    return (f"error: {stage or 'stage'}: no space left on the device while {place}; {free}. Free space there (old "
            f"checkpoints, the DVC cache: `dvc gc`), or point the path in params.yaml at a larger volume, then rerun "
            f"`dvc repro`{' (train resumes from its last complete checkpoint)' if stage == 'train' else ''}. "
            f"The original error ({type(exc).__name__}) follows")


@dataclass(frozen=True)
class Estimate:
    """Bytes one checkpoint and the final model take, from the model's parameters."""

    weights: int  # the weights a checkpoint holds (all of them, or the trainable ones for adapter strategies)
    optimizer: int  # AdamW: two fp32 moments per trainable parameter
    model: int  # the model folder train writes

    @property
    def checkpoint(self) -> int:
        return self.weights + self.optimizer + CHECKPOINT_OVERHEAD

    @property
    def checkpoints(self) -> int:
        return CHECKPOINTS_AT_ONCE * self.checkpoint


def checkpoint_estimate(model, adapter_only: bool) -> Estimate:
    """What train's checkpoints and model will take: the saved weights (every parameter and buffer, or only the
    trainable ones for an adapter strategy), AdamW's two fp32 moments per trainable parameter."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() * p.element_size() for p in trainable_params)
    moments = sum(2 * p.numel() * 4 for p in trainable_params)
    weights = trainable if adapter_only else total
    return Estimate(weights=weights, optimizer=moments, model=weights + CHECKPOINT_OVERHEAD)


def check_space(estimate: Estimate, checkpoints_dir: Path, model_dir: Path, on_disk: int = 0) -> dict:
    """Refuse to train (StageError with the numbers) when the volumes cannot hold the checkpoints and the model.

    `on_disk`: bytes of checkpoints already in checkpoints_dir that the Trainer will rotate away (they count as
    space it gets back). Checkpoints and model on one volume add up. Returns {volume: (needed, free)}.
    """
    needs: dict[int, list] = {}
    for path, need, what in ((checkpoints_dir, max(0, estimate.checkpoints - on_disk),
                              f"{CHECKPOINTS_AT_ONCE} checkpoints of {human(estimate.checkpoint)} (weights "
                              f"{human(estimate.weights)}, optimizer state {human(estimate.optimizer)})"),
                             (model_dir, estimate.model, f"the model ({human(estimate.model)})")):
        anchor = existing_ancestor(path)
        entry = needs.setdefault(os.stat(anchor).st_dev, [anchor, 0, []])
        entry[1] += need
        entry[2].append(f"{what} in {path}")
    result = {}
    for anchor, need, whats in needs.values():
        free = free_bytes(anchor)
        result[str(anchor)] = (need, free)
        if need > free:
            raise StageError(
                f"not enough disk space to train: about {human(need)} needed on the volume of {anchor} for "
                f"{' and '.join(whats)}"
                + (f", less {human(on_disk)} of checkpoints already there" if on_disk else "")
                + f"; {human(free)} free. Free space there, or set paths.checkpoints_dir / paths.model_dir to a "
                f"larger volume; nothing was trained or deleted")
    return result
