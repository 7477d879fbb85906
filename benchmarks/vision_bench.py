"""Device-side figures of the image CNNs for docs/vision.md: each checkpoint's device model exported
to TFLite and ONNX (adaptive tensors as swappable buffers, export-time proof), a patch generated
from one device's unlabelled test-period upload, and `mntool bench`'s measurement
(`device_runtime.bench.benchmark_isolated`, one fresh worker process per artifact) on real test images: load, p50/p99, swap, patched vs unpatched p50.
Trains nothing; every figure it prints comes from this run.

    .venv/bin/python benchmarks/vision_bench.py \\
        --ckpt lenet=runs/vision/lenet/seed0/metanetwork \\
        --ckpt mobilenet=runs/vision/mobilenet/seed0/metanetwork \\
        --out runs/vision-bench --json runs/vision-bench/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TARGETS = ("tflite", "onnx")
LABELS = {"tflite": "LiteRT", "onnx": "ONNX Runtime"}


def parse_ckpt(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--ckpt takes NAME=DIR, got {value!r}")
    return name, Path(path)


def prepare(name: str, ckpt_dir: Path, out: Path, data: Path | None, batch: int, device: int) -> dict:
    """Export the checkpoint's device model, make device `device`'s patch and the inputs (its first
    `batch` test images); returns what to benchmark."""
    import numpy as np

    from exporters import export
    from mntool.data.images import ImageProtocolConfig, load_image_dataset
    from mntool.generate import Generator
    from mntool.patches import build_patch
    from mntool.train import load_checkpoint
    from mntool.vision.adapt import images_tensor

    ck = load_checkpoint(ckpt_dir)
    if getattr(ck, "task", None) != "mnist":
        sys.exit(f"{ckpt_dir} is not a --task mnist checkpoint")
    if ck.config.method in ("static", "finetune"):
        print(f"note: {ckpt_dir} is {ck.config.method}: its patch carries the static tensors", file=sys.stderr)
    dataset = load_image_dataset(data, ImageProtocolConfig(**ck.protocol))
    devices, uploads = dataset.device_upload("test")
    t0 = time.perf_counter()
    params = {n: a[0] for n, a in Generator(ck).generate_batch(uploads[device : device + 1]).items()}
    generate_ms = (time.perf_counter() - t0) * 1e3
    images = dataset.test.images[dataset.test.device == devices[device]][:batch]
    inputs = out / name / "inputs.npz"
    inputs.parent.mkdir(parents=True, exist_ok=True)
    np.savez(inputs, images=images_tensor(images).numpy())
    artifacts, patches = {}, {}
    for target in TARGETS:
        t0 = time.perf_counter()
        artifacts[target] = export(
            ck.model,
            ck.example_inputs(batch),
            ck.adaptive,
            target,
            out / name / target,
            output_names=("logits",),
            progress=False,
        )
        print(f"{name}: exported {artifacts[target]} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        patches[target] = out / name / f"{target}-device{int(devices[device])}.mnpatch"
        patches[target].write_bytes(build_patch(artifacts[target], params))
    return {
        "checkpoint": str(ckpt_dir),
        "model": ck.config.model,
        "method": ck.config.method,
        "adaptive_tensors": len(ck.adaptive),
        "adaptive_values": int(sum(a.size for a in params.values())),
        "device": int(devices[device]),
        "generate_ms_one_device": generate_ms,
        "inputs": str(inputs),
        "artifacts": {t: str(a) for t, a in artifacts.items()},
        "patches": {t: str(p) for t, p in patches.items()},
        "patch_bytes": {t: p.stat().st_size for t, p in patches.items()},
    }


def fmt_ms(value: float) -> str:
    return f"{value * 1e3:.0f} µs" if value < 1 else f"{value:.2f} ms"


def table(results: dict) -> str:
    head = [
        "model",
        "runtime",
        "artifact",
        "patch",
        "load (file)",
        "load (memory)",
        "first inference",
        "p50",
        "p99",
        "swap",
        "patched p50 / unpatched",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in results["models"].items():
        for target, b in r["bench"].items():
            p, lat = b["patches"][0], b["latency"]
            row = [
                f"{name} ({r['method']})",
                f"{LABELS[target]} {b['runtime_version']}",
                f"{b['artifact_bytes'] / 1024:,.1f} KiB",
                f"{r['patch_bytes'][target]:,} B",
                fmt_ms(b["load_file_ms"]),
                fmt_ms(b["load_memory_ms"]),
                fmt_ms(b["first_inference_ms"]),
                fmt_ms(lat["p50_ms"]),
                fmt_ms(lat["p99_ms"]),
                fmt_ms(p["swap_ms"]),
                f"{p['p50_ratio']:.2f}x",
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", type=parse_ckpt, action="append", required=True, help="NAME=CHECKPOINT_DIR (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="directory for the artifacts, patches and inputs")
    ap.add_argument("--data", type=Path, help="MNIST IDX files (default: the fetched cache)")
    ap.add_argument("--batch", type=int, default=1, help="images per inference (the export's fixed batch)")
    ap.add_argument(
        "--device", type=int, default=0, help="the device (slot in the test period) whose patch is swapped in"
    )
    ap.add_argument("--runs", type=int, default=1000, help="timed steady-state runs per variant")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--loads", type=int, default=20, help="timed fresh loads and swaps")
    ap.add_argument("--threads", type=int, default=1, help="runtime intra-op threads")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)

    from device_runtime.bench import BenchConfig, benchmark_isolated
    from device_runtime.runners import RunnerConfig
    from mntool.demo import versions

    config = BenchConfig(
        runs=args.runs, warmup=args.warmup, loads=args.loads, runner=RunnerConfig(threads=args.threads)
    )
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_at_start": os.getloadavg()[0],
        "versions": versions(),
        "config": config.to_dict(),
        "batch": args.batch,
        "models": {},
    }
    for name, ckpt_dir in args.ckpt:
        r = prepare(name, ckpt_dir, args.out, args.data, args.batch, args.device)
        r["bench"] = {}
        for target in TARGETS:
            report = benchmark_isolated(  # what `mntool bench ARTIFACT --patch P --inputs I` runs per artifact
                Path(r["artifacts"][target]), [Path(r["patches"][target])], Path(r["inputs"]), config
            )
            r["bench"][target] = report.to_dict(samples=False)
            print(
                f"{name} {target}: p50 {report.latency.p50_ms:.3f} ms, swap {report.patches[0].swap_ms:.2f} ms",
                file=sys.stderr,
            )
        results["models"][name] = r
    host = next(iter(next(iter(results["models"].values()))["bench"].values()))["host"]
    results["host"] = host
    print(
        f"{host.get('cpu', 'this host')}, {host.get('cpu_count')} CPUs, load average "
        f"{results['load_average_at_start']:.1f} at the start; batch {args.batch}, {args.threads} thread(s), "
        f"{args.runs} runs per variant\n"
    )
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    else:
        print("\n" + json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
