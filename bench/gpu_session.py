"""One GPU session, prepared: versions, the CUDA tests, the Table 1 GPU table and the sweep-throughput bench.

    python3 bench/gpu_session.py                        # on the GPU machine: under 7 minutes on one H100
    OUT=/tmp/out python3 bench/gpu_session.py           # where everything goes (default bench/out)
    .venv/bin/python bench/gpu_session.py --cpu-smoke   # the same parts, tiny, on the CPU: under 2 minutes

Installs nothing (the GPU machine has no network): it runs with the Python it is started with, the repository's
src/ on PYTHONPATH. Each part is a subprocess with its own time limit (budgeted so that the whole stays under 7
minutes, torch.compile warm-ups included); a part that fails or runs out of time is recorded and the next one
runs. Everything lands under $OUT: env.txt (nvidia-smi, torch, CUDA), one <part>.log each, table1.csv,
sweep.csv and summary.txt (each part's exit status and time).

Parts, in order (time limit in seconds; measured on an H200, 2026-11-27, in brackets):
  table1  bench/train.py --gpu: every Table 1 shape eager (the baseline) and graph+compile (--cuda-graph
          --compile, the best mode), WRN-28-2 also graph (eager kernels); 12,800 images a row, images/s
          of the second epoch; rows in order of importance, each written to table1.csv when measured   290 [~60 s
          a compiled row, ~12 s an eager one]
  sweep   bench/sweep_throughput.py: 8 WRN-28-2 runs, --runs-per-gpu 1 (the baseline) 2 4 8              110 [~110]
  tests   only with --with-tests: tests/test_cuda.py (Loader, eager, compiled and --cuda-graph training)   90 [61]
With the limits the session ends within 7 minutes (6.9 with --with-tests left out, 8.4 with it).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parts(smoke: bool, out: Path) -> list[tuple[str, int, list[str]]]:
    py = sys.executable
    if smoke:  # the same scripts and code paths, tiny, on the CPU
        return [
            ("tests", 60, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]),
            ("table1", 60, [py, "bench/train.py", "--gpu", "--device", "cpu", "--images", "256", "--shape", "16", "8",
                            "1", "--compile-models", "8-1", "--compile-modes", "graph", "--csv",
                            str(out / "table1.csv")]),
            ("sweep", 90, [py, "bench/sweep_throughput.py", "--cpu", "--runs", "2", "--runs-per-gpu", "1", "2",
                           "--images", "256", "--size", "16", "--depth", "8", "--width", "1", "--epochs", "1",
                           "--csv", str(out / "sweep.csv")]),
        ]
    return [
        ("table1", 290, [py, "bench/train.py", "--gpu", "--images", "12800", "--compile-models", "28-2", "28-10",
                         "20-10", "36-2", "--compile-modes", "graph+compile", "--also", "28-2:graph",
                         "--csv", str(out / "table1.csv")]),
        ("sweep", 110, [py, "bench/sweep_throughput.py", "--images", "3840", "--csv", str(out / "sweep.csv")]),
        ("tests", 90, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]),
    ]


def environment(smoke: bool) -> str:
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"python: {sys.version.split()[0]} ({sys.executable})"]
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        lines.append(smi.stdout or smi.stderr)
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"nvidia-smi: {e}")
    probe = ("import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', "
             "torch.cuda.is_available()); torch.cuda.is_available() and print('device', torch.cuda.get_device_name(),"
             " 'count', torch.cuda.device_count())")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    lines.append(r.stdout + r.stderr)
    for mod in ("numpy", "pytest", "optuna", "yaml", "triton"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True,
                           text=True, timeout=60)
        lines.append(f"{mod}: {r.stdout.strip() or (r.stderr.strip().splitlines() or ['?'])[-1]}")
    if smoke:
        lines.append("--cpu-smoke: tiny runs on the CPU, no figure here is a measurement")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="run every part tiny, on the CPU (tests the script)")
    p.add_argument("--only", nargs="*", help="run only these parts (table1, sweep, tests)")
    p.add_argument("--with-tests", action="store_true", help="also run tests/test_cuda.py (90 s more)")
    args = p.parse_args()
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    (out / "env.txt").write_text(environment(args.cpu_smoke))
    print((out / "env.txt").read_text(), flush=True)
    summary = []
    for name, limit, cmd in parts(args.cpu_smoke, out):
        if (args.only and name not in args.only) or (name == "tests" and not (args.with_tests or args.cpu_smoke
                                                                                   or "tests" in (args.only or []))):
            continue
        t = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            log.write(f"$ {' '.join(cmd)}  (limit {limit} s)\n")
            log.flush()
            # its own process group: a part out of time is killed with the workers it spawned (a sweep's)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                status = f"exit {proc.wait(timeout=limit)}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = f"TIMED OUT after {limit} s (what it printed before is in the log)"
        line = f"{name}: {status}, {time.perf_counter() - t:.0f} s"
        summary.append(line)
        print(line, flush=True)
        print((out / f"{name}.log").read_text()[-6000:], flush=True)
    summary.append(f"total: {time.perf_counter() - start:.0f} s")
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print(summary[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
