"""Which GPU each worker of a sweep or a search runs on: a pure assignment, and the worker pool that applies it.

    assign((0, 1, 2, 3), runs_per_gpu=2, jobs=None)   # [0, 1, 2, 3, 0, 1, 2, 3]: 8 workers, 2 a GPU
    assign((0, 1), runs_per_gpu=None, jobs=3)          # [0, 1, 0]: --jobs spread round-robin
    p = resolve(gpus=None, runs_per_gpu=2, jobs=None, device="auto")   # every visible GPU, 2 runs each
    with pool(p) as ex: ...                                          # each worker sees only its own GPU

How ``--gpus``, ``--runs-per-gpu`` and ``--jobs`` (``tune --workers``) combine, on a machine whose runs use CUDA:
``--gpus`` lists the GPUs (torch's indices as this process sees them; default every visible one);
``--runs-per-gpu K`` is how many runs share one GPU; ``--jobs N`` is how many runs this machine runs at a time.
Given neither, one run a GPU; given only K, K on every listed GPU; given only N, N workers round-robin over the
GPUs; given both, N workers round-robin, and N may not exceed (number of GPUs) x K. Where the runs train on the
CPU (``--device cpu``, or ``auto`` without CUDA) ``--jobs`` alone counts (default 1), and ``--gpus`` or
``--runs-per-gpu`` is an error naming the reason. Job arrays (``sweep --index/--of``) and a shared Optuna
``--storage`` work the same way on every node: each node places its own workers over its own GPUs.

Each worker is a spawned process whose ``CUDA_VISIBLE_DEVICES`` is set, before torch initialises CUDA, to its
GPU's entry of this process's own ``CUDA_VISIBLE_DEVICES`` (so a scheduler's ``2,3`` with ``--gpus 1`` gives the
worker ``3``), or to the index itself where none is set: inside it the GPU is ``cuda:0``. A run records where it
ran (``device_facts``: the GPU's index as the node sees it and its name) in config.json and result.json.

Test hook: ``DSIMAGENET_FAKE_GPUS=N`` makes this module see N GPUs (and workers place even ``--device cpu``
runs by them), so that the multi-process behaviour is tested on a machine without any.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dsimagenet.errors import ConfigError

FAKE = "DSIMAGENET_FAKE_GPUS"  # test hook: this many visible GPUs, CPU runs placed by them too


@dataclass(frozen=True)
class Placement:
    """The workers of one machine: each one's ``CUDA_VISIBLE_DEVICES`` (None: the environment as it is, a CPU
    worker), and the GPUs (torch's indices here) they were assigned."""

    visible: tuple[str | None, ...]
    gpus: tuple[int | None, ...]

    @property
    def workers(self) -> int:
        return len(self.visible)

    @property
    def pinned(self) -> bool:
        return any(v is not None for v in self.visible)


def parse_gpus(value, flag: str = "--gpus") -> tuple[int, ...] | None:
    """``"0,1,2,3"`` (or ``"0 1"``, or a sequence of integers) as a tuple of different indices >= 0; None stays
    None (every visible GPU). ConfigError naming ``flag`` otherwise."""
    if value is None:
        return None
    usage = f"{flag} takes different GPU indices >= 0, comma-separated (e.g. 0,1,2,3)"
    if isinstance(value, str):
        parts = [x for x in value.replace(",", " ").split()]
        if not parts or not all(x.isdigit() for x in parts):
            raise ConfigError(f"{usage}, not {value!r}")
        gpus = tuple(int(x) for x in parts)
    elif isinstance(value, Sequence) and value and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                       for x in value):
        gpus = tuple(value)
    else:
        raise ConfigError(f"{usage}, not {value!r}")
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"{flag} {','.join(map(str, gpus))} names a GPU twice: to run several runs on one GPU "
                          "use --runs-per-gpu")
    return gpus


def check_count(value, flag: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{flag} must be an integer >= 1, not {value!r}")


def assign(gpus: Sequence[int], runs_per_gpu: int | None, jobs: int | None,
           jobs_flag: str = "--jobs") -> list[int]:
    """The GPU of each worker: a pure function of the GPUs, the runs a GPU takes and the workers asked for (see
    the module's docstring). Round-robin, so that the first runs of a sweep go to different GPUs and no GPU has
    more than one worker above another."""
    if not gpus:
        raise ConfigError("no GPU to place workers on")
    check_count(runs_per_gpu, "--runs-per-gpu")
    check_count(jobs, jobs_flag)
    per_gpu = runs_per_gpu or 1
    if jobs is None:
        jobs = len(gpus) * per_gpu
    elif runs_per_gpu is not None and jobs > len(gpus) * runs_per_gpu:
        raise ConfigError(f"{jobs_flag} {jobs} is more than {len(gpus)} GPU(s) x --runs-per-gpu {runs_per_gpu} = "
                          f"{len(gpus) * runs_per_gpu} runs at a time")
    return [gpus[i % len(gpus)] for i in range(jobs)]


def visible_gpus() -> int:
    """How many GPUs torch sees here (the test hook's count where it is set)."""
    fake = os.environ.get(FAKE)
    if fake is not None:
        return int(fake)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _parent_visible() -> list[str] | None:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _no_gpu_reason() -> str:
    if os.environ.get(FAKE) is not None:
        return f"{FAKE}=0"
    import torch

    if not torch.version.cuda:
        return f"torch {torch.__version__} is a build without CUDA"
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else "no CUDA device or driver found"


def resolve(gpus, runs_per_gpu: int | None, jobs: int | None, device: str | set[str],
            jobs_flag: str = "--jobs") -> Placement:
    """The workers of this machine for runs on ``device`` (a TrainConfig's, or the set of a grid's): checked
    against the GPUs visible here, ConfigError naming the flag if they cannot be placed."""
    gpus = parse_gpus(gpus)
    check_count(runs_per_gpu, "--runs-per-gpu")
    check_count(jobs, jobs_flag)
    devices = {device} if isinstance(device, str) else set(device)
    fake = os.environ.get(FAKE) is not None
    asked = gpus is not None or runs_per_gpu is not None
    if devices == {"cpu"} and not fake:
        if asked:
            raise ConfigError(f"{'--gpus' if gpus is not None else '--runs-per-gpu'} places runs on GPUs, but they "
                              "train on the CPU (--device cpu): leave it out, or use --device cuda or auto")
        return Placement((None,) * (jobs or 1), (None,) * (jobs or 1))
    count = visible_gpus()
    if count == 0:
        if asked or "cuda" in devices:
            flag = "--gpus" if gpus is not None else "--runs-per-gpu" if runs_per_gpu is not None else "--device cuda"
            raise ConfigError(f"{flag}: no CUDA GPU is visible here ({_no_gpu_reason()}); use --device cpu (or auto) "
                              "without --gpus and --runs-per-gpu")
        return Placement((None,) * (jobs or 1), (None,) * (jobs or 1))  # auto on a CPU-only machine
    if gpus is None:
        gpus = tuple(range(count))
    hidden = [g for g in gpus if g >= count]
    if hidden:
        raise ConfigError(f"--gpus {','.join(map(str, gpus))}: GPU {hidden[0]} is not visible here ({count} visible: "
                          f"{'0' if count == 1 else f'0..{count - 1}'})")
    workers = assign(gpus, runs_per_gpu, jobs, jobs_flag)
    parent = _parent_visible()
    names = parent if parent is not None and len(parent) >= count else [str(i) for i in range(count)]
    return Placement(tuple(names[g] for g in workers), tuple(workers))


# --- the workers

def _pin(slots) -> None:
    """A worker's initializer: take one slot (its CUDA_VISIBLE_DEVICES) before anything initialises CUDA."""
    from dsimagenet.progress import drop_closed_pipes

    drop_closed_pipes()  # its parent's reader may leave (`sweep ... | head`): its run goes on regardless
    visible = slots.get()
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible


def pool(p: Placement) -> cf.ProcessPoolExecutor:
    """A pool of ``p.workers`` spawned processes, each pinned to its slot of ``p`` for its whole life (a pool
    never starts more processes than that, so every slot is taken exactly once)."""
    ctx = multiprocessing.get_context("spawn")  # a forked child would inherit a parent's CUDA state
    slots = ctx.Queue()
    for v in p.visible:
        slots.put(v)
    return cf.ProcessPoolExecutor(p.workers, mp_context=ctx, initializer=_pin, initargs=(slots,))


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def device_facts(device) -> dict:
    """Where a run ran, for config.json and result.json: the GPU's index as the node sees it (its entry of
    CUDA_VISIBLE_DEVICES where that is set and numeric, else torch's index; None on a CPU or for a UUID), its
    name, and CUDA_VISIBLE_DEVICES as the run saw it."""
    import torch

    device = torch.device(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    facts = {"gpu_index": None, "gpu_name": None, "cuda_visible_devices": visible}
    if device.type != "cuda":
        return facts
    local = device.index if device.index is not None else torch.cuda.current_device()
    entries = _parent_visible()
    if entries is None:
        facts["gpu_index"] = local
    elif local < len(entries) and entries[local].isdigit():
        facts["gpu_index"] = int(entries[local])
    facts["gpu_name"] = torch.cuda.get_device_name(local)
    return facts
