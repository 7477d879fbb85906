"""Side by side: the default SASRec device model and a larger variant on PyTorch eager, LiteRT,
ONNX Runtime, ExecuTorch-XNNPACK (everything delegated) and mntool's ExecuTorch target (XNNPACK
backbone, adaptive head on portable kernels, `.ptd`), batch 1, one thread each, timed in one process by the same
interleaved loop (`device_runtime.bench.time_interleaved`), so every ratio compares runs that
shared the host's conditions. Writes a markdown table and a PNG.

    .venv/bin/python benchmarks/compare.py --runs 3000 --out docs

ExecuTorch is the optional `peers` extra (pip install executorch); without it its rows say why.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from device_runtime.bench import LatencyStats, empty_call, time_interleaved
from device_runtime.runners import PACKAGE_OF_RUNTIME, RunnerConfig, open_runner
from exporters import export
from exporters.executorch import available as executorch_available
from mntool.models import BackboneConfig, build_model
from mntool.plots import plot_latency

ML100K_ITEMS = 1682  # items in MovieLens-100k: the default device model's vocabulary
MODELS = {
    "default": (ML100K_ITEMS, BackboneConfig()),
    "large": (20_000, BackboneConfig(dim=128, max_history=50)),
}


@dataclass
class Peer:
    runtime: str
    call: Callable[[], object] | None  # one inference on the prepared inputs; None = unavailable
    output: np.ndarray | None  # its answer on those inputs, to check every peer computes the same
    size_bytes: int | None
    note: str = ""


def _inputs(model, n_items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A realistic query: a history with a few leading pads, ids over the whole vocabulary."""
    rng = np.random.default_rng(seed)
    L = model.config.max_history
    history = rng.integers(1, n_items + 1, size=(1, L))
    history[0, : L // 5] = 0
    return torch.from_numpy(history), torch.from_numpy(rng.integers(1, n_items + 1, size=(1,)))


def eager_peer(model, example) -> Peer:
    with torch.inference_mode():
        output = model(*example).numpy()

    def call():
        with torch.inference_mode():
            return model(*example)

    return Peer("pytorch-eager", call, output, None, f"torch {torch.__version__}")


def runner_peer(artifact: Path, example, runtime: str) -> Peer:
    from device_runtime.runners import find_weight_map

    runner = open_runner(artifact, weight_map=find_weight_map(artifact), config=RunnerConfig(threads=1))
    feeds = {"history": example[0].numpy(), "target": example[1].numpy()}
    arrays = runner.prepare(feeds)
    wm = find_weight_map(artifact)
    size = sum((artifact.parent / f).stat().st_size for f in wm.files)
    package = PACKAGE_OF_RUNTIME[runtime]
    label = "executorch (mntool target)" if runtime == "executorch" else runtime
    return Peer(
        label, lambda: runner.invoke(arrays), runner.run(feeds)["output"], size, f"{package} {version(package)}"
    )


def executorch_peer(model, example, out: Path) -> Peer:
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime
    except ImportError as err:
        return Peer("executorch-xnnpack", None, None, None, f"not installed ({err.name}): pip install executorch")
    program = to_edge_transform_and_lower(torch.export.export(model, example), partitioner=[XnnpackPartitioner()])
    pte = out / "model.pte"
    pte.write_bytes(program.to_executorch().buffer)
    _unsafe_reset_threadpool(1)  # XNNPACK's pool defaults to every core; the others get one thread
    method = Runtime.get().load_program(pte).load_method("forward")
    inputs = list(example)
    return Peer(
        "executorch-xnnpack",
        lambda: method.execute(inputs),
        method.execute(inputs)[0].numpy(),
        pte.stat().st_size,
        f"executorch {version('executorch')}",
    )


def peers_for(name: str, work: Path) -> tuple[list[Peer], dict]:
    n_items, config = MODELS[name]
    torch.manual_seed(0)
    model = build_model("sasrec", n_items, config).eval()
    example = _inputs(model, n_items)
    out = work / name
    tflite = export(model, example, model.adaptive_names(), "tflite", out)
    onnx = export(model, example, model.adaptive_names(), "onnx", out)
    peers = [
        eager_peer(model, example),
        runner_peer(tflite, example, "litert"),
        runner_peer(onnx, example, "onnxruntime"),
        executorch_peer(model, example, out),
    ]
    if executorch_available():  # the .pte + .ptd mntool exports: XNNPACK backbone, portable adaptive head
        pte = export(model, example, model.adaptive_names(), "executorch", out)
        peers.append(runner_peer(pte, example, "executorch"))
    params = sum(p.numel() for p in model.parameters())
    facts = {"n_items": n_items, "dim": config.dim, "history": config.max_history, "params": params}
    return peers, facts


def measure(peers: list[Peer], runs: int, warmup: int, bar) -> dict[str, list[float]]:
    calls = {p.runtime: p.call for p in peers if p.call is not None}
    for call in calls.values():
        for _ in range(warmup):
            call()
    return time_interleaved({**calls, "timer overhead": empty_call}, runs, rounds=20, progress=bar.update)


def table(name: str, facts: dict, peers: list[Peer], samples: dict[str, list[float]]) -> list[str]:
    reference = next(p.output for p in peers if p.runtime == "pytorch-eager")
    stats = {r: LatencyStats.of(np.asarray(s)) for r, s in samples.items()}
    litert, eager = stats["litert"].p50_ms, stats["pytorch-eager"].p50_ms
    lines = [
        f"### {name}: SASRec, {facts['n_items']:,} items, dim {facts['dim']}, history {facts['history']} "
        f"({facts['params']:,} parameters)",
        "",
        "| runtime | p50 (µs) | p90 (µs) | p99 (µs) | min (µs) | p50 / LiteRT | p50 / eager | size | max abs diff vs eager | version |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in peers:
        if p.call is None:
            lines.append(f"| {p.runtime} | – | – | – | – | – | – | – | – | {p.note} |")
            continue
        s = stats[p.runtime]
        size = f"{p.size_bytes / 1e6:.2f} MB" if p.size_bytes else "–"
        diff = float(np.max(np.abs(np.asarray(p.output, np.float64) - reference)))
        lines.append(
            f"| {p.runtime} | {s.p50_ms * 1e3:.1f} | {s.p90_ms * 1e3:.1f} | {s.p99_ms * 1e3:.1f} | {s.min_ms * 1e3:.1f} "
            f"| {s.p50_ms / litert:.2f} | {s.p50_ms / eager:.3f} | {size} | {diff:.1e} | {p.note} |"
        )
    overhead = stats["timer overhead"].p50_ms * 1e3
    lines += [
        "",
        f"Timer overhead per measured run (empty call, same loop): {overhead:.2f} µs "
        f"({overhead / (litert * 1e3):.1%} of the LiteRT p50); not subtracted.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000, help="timed runs per runtime and model")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M")
    sections, series = [], []
    with tempfile.TemporaryDirectory(prefix="mntool-compare-") as work:
        for name in MODELS:
            peers, facts = peers_for(name, Path(work))
            available = sum(p.call is not None for p in peers)
            with tqdm(total=(available + 1) * args.runs, desc=f"compare {name}", file=sys.stderr, leave=False) as bar:
                samples = measure(peers, args.runs, args.warmup, bar)
            sections += table(name, facts, peers, samples)
            series += [(f"{p.runtime}\n{name}", np.asarray(samples[p.runtime])) for p in peers if p.call is not None]
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "benchmark-compare.png"
    plot_latency(
        series,
        png,
        f"SASRec device models, batch 1, 1 thread, {args.runs} interleaved runs each "
        f"({platform.machine()}, {cpu_name()})",
    )
    header = [
        "# Side-by-side latency: PyTorch eager, LiteRT, ONNX Runtime, ExecuTorch-XNNPACK",
        "",
        f"Made by `{' '.join(['.venv/bin/python', 'benchmarks/compare.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"on {started}: {cpu_name()}, {platform.platform()}, Python {platform.python_version()}. "
        "Batch 1, one thread per runtime, random (untrained) weights, one process; the runtimes are timed in "
        "20 interleaved rounds by the same loop, so a slow spell on the shared host hits all alike. "
        "Artifacts come from `exporters.export` (TFLite with the adaptive head relocated to a swappable tail "
        "region, ONNX with the head in external data), ExecuTorch from `to_edge_transform_and_lower` with the "
        "XNNPACK partitioner. Figure: [benchmark-compare.png](benchmark-compare.png).",
        "",
    ]
    (args.out / "benchmark-compare.md").write_text("\n".join(header + sections))
    print("\n".join(sections))
    print(f"wrote {args.out / 'benchmark-compare.md'} and {png}")
    return 0


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
