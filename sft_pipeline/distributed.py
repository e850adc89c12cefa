"""Several training processes (DDP) on the launchers users already run: torchrun and accelerate launch.

`train.processes: N` (N > 1) makes `python -m stages.train` (what `dvc repro` runs) start itself N times under
`python -m torch.distributed.run --standalone --nproc-per-node N`; started by a launcher (torchrun, `accelerate
launch`, a cluster's own), train reads the world from the launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK)
instead. Either way train.batch_size is the global batch: each process takes batch_size / N rows per step, and the
rows of each step are those one process would take with the same batch_size (sft_pipeline.training.RankBatches).
Process 0 alone checks the disks and the MLflow store, resumes or deletes checkpoints, opens and ends the MLflow run,
writes the reports and saves the model; the others wait for it where they need its decisions.

On a CPU the processes use the gloo backend and share the cores (OMP_NUM_THREADS = cores / N unless set; torchrun
would set 1); on GPUs NCCL, one GPU per process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from sft_pipeline.io import StageError


def world_size() -> int:
    """How many training processes a launcher started (1 without one)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a process that torchrun, accelerate launch or another launcher started (it sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str) -> None:
    """Join the launcher's process group (gloo on a CPU, NCCL on GPUs) before anything needs it; no-op alone.
    Accelerate's PartialState is what the Trainer uses as well, so both share the one group."""
    if world_size() == 1:
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def from_main(value):
    """`value` as process 0 has it, on every process (process 0's decision, e.g. the checkpoint to resume)."""
    dist = _dist()
    if dist is None:
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flag: bool, device: str) -> bool:
    """True on every process when `flag` is true on any (so all stop at the same step after a signal)."""
    dist = _dist()
    if dist is None:
        return flag
    import torch

    where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device == "cuda" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=where)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def describe() -> dict:
    """What train.json and MLflow record of the processes."""
    dist = _dist()
    return {"processes": world_size(), "backend": dist.get_backend() if dist is not None else "none"}


def per_process(total: int, name: str) -> int:
    """`total` rows per step shared by the processes: a StageError when they cannot share it evenly."""
    n = world_size()
    if total % n:
        raise StageError(f"{name} is {total}, the global batch, which {n} processes cannot share evenly; make it a "
                         f"multiple of {n}")
    return total // n


def launch(module: str, processes: int, argv: list[str], device: str) -> int:
    """Run `python -m module argv` as `processes` processes under torchrun on this machine and wait for them.

    SIGTERM and SIGINT are passed on to torchrun once each (it passes them to every process, which then stops at
    the same step with a checkpoint); its own session keeps a terminal's Ctrl-C from reaching the processes twice.
    The exit status is the processes' (128 + the signal after a stop)."""
    if device == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if processes > visible:
            raise StageError(f"train.processes is {processes} but {visible} CUDA device(s) are visible; one process "
                             f"drives one GPU: set train.processes to {visible} or fewer")
    env = dict(os.environ)
    if device == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", module, *argv]
    each = f"gloo, {env.get('OMP_NUM_THREADS', 'torch default')} threads each" if device == "cpu" else \
        "NCCL, one GPU each"
    print(f"train: {processes} processes ({each}): {' '.join(command[1:])}", flush=True)
    child = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + received[0]
    return code
