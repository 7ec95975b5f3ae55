"""Fuzzing the official-format readers: valid batch files (pickles of protocols 2-5, our writer's pickles, npz,
compressed npz, and zips of them) mutated by a seeded numpy Generator (flipped bytes, truncation, splices,
repeated ranges, inserted bytes, forged sizes), each read through the public reader. Every outcome must be a
well-formed batch or a DSImageNetError: never another exception, never a hang, never memory beyond a bound.

The loop runs in a fresh interpreter (``python tests/test_fuzz_official.py N SEED``) so that its peak RSS
(``ru_maxrss``) measures the reads alone; it prints one JSON line with the figures."""

import io
import json
import pickle
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dsimagenet.errors import DSImageNetError
from dsimagenet.formats import official

PER_READ_SECONDS = 20  # a hang, on any machine: a read of these files takes milliseconds
RSS_BOUND_MB = 64  # the files are under 100 KB; reading one well-formed takes under 1 MB


def base_files(tmp: Path) -> list[tuple[str, bytes, dict]]:
    """(file name, bytes, the batch it holds) for every kind of valid file the reader accepts."""
    rng = np.random.default_rng(0)
    n, size = 40, 8
    d = {"data": rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8),
         "labels": rng.integers(1, 1001, n).tolist(), "mean": rng.uniform(0, 255, 3 * size * size)}
    files = []
    for protocol in (2, 3, 4, 5):
        files.append(("train_data_batch_1", pickle.dumps(d, protocol=protocol), d))
    official.write_batch(tmp / "train_data_batch_2", d["data"], d["labels"], d["mean"], "pickle")
    files.append(("train_data_batch_2", (tmp / "train_data_batch_2").read_bytes(), d))
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, data=d["data"], labels=np.asarray(d["labels"]), mean=d["mean"])
        files.append(("train_data_batch_3.npz", buf.getvalue(), d))
    for name, raw in [files[1][:2], files[5][:2]]:
        for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", compression) as z:
                z.writestr(f"Imagenet8_train/{name}", raw)
            files.append(("Imagenet8_train.zip", buf.getvalue(), d))
    return files


def mutate(raw: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(raw)
    for _ in range(int(rng.integers(1, 4))):
        if not b:
            break
        kind = int(rng.integers(0, 7))
        i = int(rng.integers(0, len(b)))
        j = int(rng.integers(i, min(len(b), i + 4096) + 1))
        if kind == 0:  # flip a few bits
            for k in rng.integers(0, len(b), int(rng.integers(1, 9))):
                b[k] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:  # truncate
            del b[i:]
        elif kind == 2:  # splice: a range copied over another place
            src = int(rng.integers(0, len(b)))
            b[i:i + (j - i)] = b[src:src + (j - i)]
        elif kind == 3:  # repeat a range
            b[i:i] = bytes(b[i:j]) * int(rng.integers(1, 50))
        elif kind == 4:  # insert random bytes
            b[i:i] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        elif kind == 5:  # delete a range
            del b[i:j]
        else:  # forge a size: an extreme integer of 1, 2, 4 or 8 bytes
            width = int(rng.choice([1, 2, 4, 8]))
            value = [0, 1, 2**(8 * width - 1) - 1, 2**(8 * width - 1), 2**(8 * width) - 1][int(rng.integers(0, 5))]
            b[i:i + width] = value.to_bytes(width, "little")
    return bytes(b)


def well_formed(b: official.Batch) -> bool:
    return (b.data.dtype == np.uint8 and b.data.ndim == 2 and b.data.shape[1] == 3 * b.image_size ** 2
            and b.labels.dtype == np.int64 and b.labels.shape == (len(b.data),)
            and (b.labels.size == 0 or (b.labels.min() >= 1 and b.labels.max() <= 1000))
            and (b.mean is None or (b.mean.dtype == np.float64 and b.mean.shape == (b.data.shape[1],)
                                    and bool(np.isfinite(b.mean).all()))))


def same(b: official.Batch, d: dict) -> bool:
    return (np.array_equal(b.data, d["data"]) and b.labels.tolist() == list(d["labels"])
            and b.mean is not None and np.array_equal(b.mean, d["mean"]))


class Hang(Exception):
    pass


def read_all(path: Path, name: str) -> list[official.Batch]:
    if name.endswith(".zip"):
        return [m.read() for m in official.find_members(path)]
    with open(path, "rb") as f:
        return [official.read_batch(f, str(path), "npz" if name.endswith(".npz") else "pickle")]


def fuzz(iterations: int, seed: int, tmp: Path) -> dict:
    files = base_files(tmp)
    rng = np.random.default_rng(seed)
    counts = {"error": 0, "same": 0, "changed": 0}
    failures, slowest = [], 0.0

    def on_alarm(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for it in range(iterations):
        name, raw, d = files[it % len(files)]
        data = mutate(raw, rng)
        path = tmp / name
        path.write_bytes(data)
        t = time.perf_counter()
        signal.alarm(PER_READ_SECONDS)
        try:
            batches = read_all(path, name)
            signal.alarm(0)
            if not batches:
                counts["error"] += 1  # no batch file found in the zip: split_members says so
            elif not all(well_formed(b) for b in batches):
                failures.append(f"iteration {it} ({name}): a batch that is not well formed")
            elif all(same(b, d) for b in batches):
                counts["same"] += 1
            else:
                counts["changed"] += 1  # bytes of pixels, labels or mean changed: read as they now are
        except DSImageNetError:
            signal.alarm(0)
            counts["error"] += 1
        except Hang:
            failures.append(f"iteration {it} ({name}): no answer in {PER_READ_SECONDS} s")
        except Exception as e:  # noqa: BLE001  (any other exception is what this test looks for)
            signal.alarm(0)
            failures.append(f"iteration {it} ({name}): {type(e).__name__}: {e}"[:300])
        slowest = max(slowest, time.perf_counter() - t)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"iterations": iterations, "seed": seed, **counts, "failures": failures,
            "rss_growth_mb": round((rss_after - rss_before) / 1024, 1), "max_rss_mb": round(rss_after / 1024, 1),
            "slowest_read_s": round(slowest, 3)}


def run_fuzz(tmp_path, iterations, seed):
    r = subprocess.run([sys.executable, __file__, str(iterations), str(seed), str(tmp_path)],
                       capture_output=True, text=True, timeout=iterations * PER_READ_SECONDS + 120)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(result))
    assert result["failures"] == [], "\n".join(result["failures"][:20])
    assert result["rss_growth_mb"] < RSS_BOUND_MB, result
    assert result["error"] + result["same"] + result["changed"] == iterations
    assert result["error"] > iterations // 4 and result["same"] + result["changed"] > 0  # the fuzzer reaches both
    return result


def test_fuzz_official_readers_short(tmp_path):
    run_fuzz(tmp_path, 100, seed=1)


@pytest.mark.reliability
def test_fuzz_official_readers(tmp_path):
    run_fuzz(tmp_path, 5000, seed=2026)


def test_mutations_are_what_they_say():
    rng = np.random.default_rng(0)
    raw = bytes(range(256)) * 4
    outs = {mutate(raw, rng) for _ in range(50)}
    assert raw not in outs or len(outs) > 40  # nearly every mutation changes the file
    assert any(len(o) < len(raw) for o in outs) and any(len(o) > len(raw) for o in outs)


if __name__ == "__main__":
    print(json.dumps(fuzz(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))))
