"""The guest side of the emulated arm64 device: run by the arm64 Python under qemu-aarch64 (see
device_runtime.qemu), with only device_runtime and the aarch64 wheels on its path.

`python -m device_runtime.qemu_guest JOB.json`. Mode "run": one inference, outputs to an .npz.
Mode "bench": regions of work delimited by marks, an unused syscall number (job's
`mark_syscall`) that the instruction-count plugin records with its counters; the guest gets
ENOSYS back. Region k is marked 2k at its start and 2k+1 at its end; the host subtracts. The
result (region names, versions, emulated wall-clock) goes to the job's `result` path.
"""

from __future__ import annotations

import ctypes
import gc
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from device_runtime.errors import MntoolError
from device_runtime.hotswap import HotSwap
from device_runtime.patch import TrustPolicy, apply_patch_bytes
from device_runtime.runners import RunnerConfig, find_weight_map, open_runner, runtime_for
from device_runtime.weight_map import read_artifact_files

WHEELS = ("ai-edge-litert", "onnxruntime", "numpy", "cryptography", "blake3")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _versions() -> dict[str, str]:
    out = {}
    for name in WHEELS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


class Marks:
    def __init__(self, number: int) -> None:
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long
        self._number = number
        self.regions: dict[str, int] = {}

    def begin(self, name: str) -> int:
        k = len(self.regions)
        self.regions[name] = k
        self._syscall(self._number, 2 * k)
        return k

    def end(self, k: int) -> None:
        self._syscall(self._number, 2 * k + 1)


def _noop(arrays) -> None:
    return None


def bench(job: dict, result: dict) -> None:
    artifact = Path(job["artifact"])
    config = RunnerConfig(**job["runner"])
    weight_map = find_weight_map(artifact)
    runtime = runtime_for(artifact, weight_map)
    feeds = _load_npz(job["inputs"])
    files = read_artifact_files(artifact, weight_map.files if weight_map else [artifact.name])
    policy = TrustPolicy(device_id=job["device_id"])
    patches = {p: Path(p).read_bytes() for p in job["patches"]}
    marks = Marks(job["mark_syscall"])
    runs, rounds = job["runs"], job["rounds"]

    def load(from_files):
        return open_runner(artifact, runtime=runtime, files=from_files, weight_map=weight_map, config=config)

    gc.collect()
    gc.disable()
    k = marks.begin("first_load_in_process")  # imports and initialises the runtime
    load(None).close()
    marks.end(k)
    k = marks.begin("empty")
    marks.end(k)
    k = marks.begin("load_file")
    runner = load(None)
    marks.end(k)
    runner.close()
    k = marks.begin("load_memory")
    runner = load(files)
    marks.end(k)
    k = marks.begin("first_run")
    runner.run(feeds)
    marks.end(k)
    runner.close()
    for data in list(patches.values())[:1]:  # uncounted: the first apply imports the signature code
        apply_patch_bytes(files, data, weight_map, policy=policy, check_artifact=False)
    for path, data in patches.items():
        k = marks.begin(f"apply:{path}")
        apply_patch_bytes(files, data, weight_map, policy=policy, check_artifact=False)
        marks.end(k)
        swapper = HotSwap(artifact, weight_map=weight_map, files=files, runtime=runtime, config=config, policy=policy)
        k = marks.begin(f"swap:{path}")  # patch bytes in hand -> verified, written, reloaded, first output
        swapped, _ = swapper.swap(data)
        swapped.run(feeds)
        marks.end(k)
        swapper.close()

    variants = {"unpatched": load(files)}
    for path, data in patches.items():
        variants[path] = load(apply_patch_bytes(files, data, weight_map, policy=policy, check_artifact=False))
    arrays = {key: v.prepare(feeds) for key, v in variants.items()}
    for i, (key, v) in enumerate(variants.items()):
        for _ in range(job["warmup"]):
            v.invoke(arrays[key])
        np.savez(Path(job["outputs_dir"]) / f"{i}.npz", **v.run(feeds))
    a = arrays["unpatched"]
    k = marks.begin("loop")  # the loop itself, calling a function that does nothing
    for _ in range(runs):
        _noop(a)
    marks.end(k)
    wall = {key: 0.0 for key in variants}
    for r in range(rounds):
        for key, v in variants.items():
            invoke, x = v.invoke, arrays[key]
            t0 = time.perf_counter()
            k = marks.begin(f"{key}/round{r}")
            for _ in range(runs):
                invoke(x)
            marks.end(k)
            wall[key] += (time.perf_counter() - t0) * 1e3 / rounds
    for v in variants.values():
        v.close()
    gc.enable()
    result.update(
        regions=marks.regions,
        variants=list(variants),
        wall_ms=wall,
        versions=_versions(),
        python=platform.python_version(),
        machine=platform.machine(),
    )


def run(job: dict, result: dict) -> None:
    artifact = Path(job["artifact"])
    weight_map = find_weight_map(artifact)
    with open_runner(artifact, weight_map=weight_map, config=RunnerConfig(**job["runner"])) as runner:
        outputs = runner.run(_load_npz(job["inputs"]))
    np.savez(job["outputs"], **outputs)
    result.update(versions=_versions(), python=platform.python_version(), machine=platform.machine())


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    result: dict = {}
    try:
        {"run": run, "bench": bench}[job["mode"]](job, result)
    except MntoolError as err:
        result = {"error": str(err)}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
