"""Patch figures, each a ratio against a reference measured in the same run (medians).

1. Apply in memory (bytes -> bytes, hot swap) / a raw numpy copy of the payload into the same
   buffer, and / the payload hash alone (BLAKE3, format v2), for 4 KB, 256 KB and 4 MB payloads,
   with the fixed and per-byte checks broken down; unsigned and signed (Ed25519 + key list).
2. Apply in place on disk, crash-safe (A/B slots) / os.pwrite of the same bytes at the same
   offsets + fsync, for the same payloads on a 1 MB artifact and a 256 KB payload on a 64 MB one.
3. On the default SASRec exported to each target: patch size / artifact size, cloud build time
   per device, and re-export time / (patch build + apply).

    .venv/bin/python benchmarks/patch_apply.py [--json] [--repeats 50] [--skip-export] [--checkpoint runs/sasrec]
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import blake3
import click
import numpy as np
from tqdm import tqdm

from device_runtime import weight_map as wmap
from device_runtime.install import apply_patch_file
from device_runtime.patch import TrustPolicy, apply_patch_bytes, parse_patch
from device_runtime.weight_map import TensorEntry, WeightMap
from mntool.patches import Ed25519PrivateKey, build_patch, certify_keys, raw_public_key, signer_for

PAYLOAD_DIMS = {"4 KB": 32, "256 KB": 256, "4 MB": 1024}  # head (d, d) weight + (d,) bias, float32
STATIC_BYTES = 1 << 20  # non-adaptive bytes before the adaptive region of the synthetic artifact
LARGE_STATIC_BYTES = 64 << 20  # the "large model" file case: a 256 KB patch into a 64 MB artifact


def median_s(fn, repeats: int) -> float:
    fn()  # warm caches and lazy imports
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return statistics.median(times)


def synthetic_artifact(
    root: Path, d: int, static_bytes: int = STATIC_BYTES
) -> tuple[Path, WeightMap, dict[str, np.ndarray]]:
    """A tflite-shaped artifact: `static_bytes` of random bytes, then a (d, d) weight and a (d,)
    bias, 64-aligned; plus random parameters for it."""
    rng = np.random.default_rng(d)
    shapes = {"head.weight": (d, d), "head.bias": (d,)}
    data, tensors = bytearray(rng.bytes(static_bytes)), []
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        offset = -(-len(data) // 64) * 64
        data.extend(bytes(offset - len(data) + nbytes))
        tensors.append(TensorEntry(name, shape, "model.tflite", offset, nbytes, "float32", "identity", shape, 64))
    artifact = root / "model.tflite"
    artifact.write_bytes(data)
    fingerprint = wmap.compute_fingerprint({"model.tflite": bytes(data)}, tensors, "model.tflite")
    wm = WeightMap("tflite", "model.tflite", ("model.tflite",), fingerprint, (), (), tuple(tensors))
    wmap.save(wm, artifact)
    params = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    return artifact, wm, params


def bench_memory(d: int, repeats: int, root: Path) -> dict:
    artifact, wm, params = synthetic_artifact(root, d)
    patch = build_patch(wm, params)
    root_key, online = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = build_patch(wm, params, signer_for(online, certify_keys(root_key, [raw_public_key(online)], serial=1)))
    trust = TrustPolicy(root_key=raw_public_key(root_key))
    p = parse_patch(patch)
    buf = bytearray(artifact.read_bytes())
    start = wm.tensors[0].offset
    region = np.frombuffer(buf, np.uint8)[start : start + len(p.payload)]
    payload = np.frombuffer(p.payload, np.uint8)
    memcpy = median_s(lambda: np.copyto(region, payload), repeats)
    hash_alone = median_s(lambda: blake3.blake3(p.payload).digest(), repeats)
    hot = median_s(lambda: apply_patch_bytes(buf, patch, wm, check_artifact=False), repeats)
    hot_signed = median_s(lambda: apply_patch_bytes(buf, signed, wm, policy=trust, check_artifact=False), repeats)
    full = median_s(lambda: apply_patch_bytes(buf, patch, wm), repeats)
    parts = {
        "parse_s": median_s(lambda: parse_patch(patch), repeats),
        "isfinite_s": median_s(lambda: [np.isfinite(p.array(t)).all() for t in p.tensors], repeats),
    }
    return {
        "payload_bytes": len(p.payload),
        "artifact_bytes": len(buf),
        "memcpy_s": memcpy,
        "blake3_s": hash_alone,
        "blake3_ratio": hash_alone / memcpy,
        "apply_s": hot,
        "ratio": hot / memcpy,
        "over_hash": hot / hash_alone,
        "apply_signed_s": hot_signed,
        "ratio_signed": hot_signed / memcpy,
        "signed_over_hash": hot_signed / hash_alone,
        "apply_checked_artifact_s": full,
        "ratio_checked_artifact": full / memcpy,
        **parts,
        **{k.replace("_s", "_ratio"): v / memcpy for k, v in parts.items()},
    }


def bench_file(d: int, repeats: int, root: Path, static_bytes: int = STATIC_BYTES) -> dict:
    """In-place apply (A/B slots, a new sequence each time, as a device receives them, with the
    weight map held as a device holds it) vs the bare pwrite + fsync of the same bytes, and vs the
    floor of any design that switches by a rename: the same bytes written with pwrite +
    fdatasync into one of two scratch files, then a symlink renamed over the name (no Python
    checks). That floor pays the journal commit of the previous switch inside its sync."""
    artifact, wm, params = synthetic_artifact(root, d, static_bytes)
    sequence = itertools.count(1)
    p = parse_patch(build_patch(wm, params, sequence=0))

    def pwrite_fsync() -> None:
        fd = os.open(artifact, os.O_WRONLY)
        try:
            for t in p.tensors:
                os.pwrite(fd, p.tensor_bytes(t), t.offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    reference = median_s(pwrite_fsync, repeats)
    floor_dir = root / "floor"
    floor_dir.mkdir()
    for slot in "ab":
        (floor_dir / slot).write_bytes(artifact.read_bytes())
    flip = itertools.cycle("ab")

    def switch_floor() -> None:
        slot = next(flip)
        fd = os.open(floor_dir / slot, os.O_WRONLY)
        try:
            for t in p.tensors:
                os.pwrite(fd, p.tensor_bytes(t), t.offset)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.symlink(slot, floor_dir / "link.tmp")
        os.replace(floor_dir / "link.tmp", floor_dir / "link")

    floor = median_s(switch_floor, repeats)

    def timed_apply(check_artifact: bool) -> float:
        patches = [build_patch(wm, params, sequence=next(sequence)) for _ in range(repeats + 3)]
        apply_patch_file(artifact, patches.pop(0), check_artifact=check_artifact)  # first apply makes the slots
        return median_s(
            lambda: apply_patch_file(artifact, patches.pop(0), check_artifact=check_artifact, weight_map=wm), repeats
        )

    fast = timed_apply(False)
    full = timed_apply(True)
    return {
        "payload_bytes": len(p.payload),
        "artifact_bytes": os.stat(artifact).st_size,
        "pwrite_fsync_s": reference,
        "switch_floor_s": floor,
        "floor_ratio": floor / reference,
        "apply_s": fast,
        "ratio": fast / reference,
        "over_floor": fast / floor,
        "apply_checked_artifact_s": full,
        "ratio_checked_artifact": full / reference,
    }


def bench_export(repeats: int, root: Path, checkpoint: Path | None) -> dict:
    """Default SASRec (ML-100k item count) exported per target: sizes, cloud build time per device
    (signed; with `checkpoint`, MetaNetwork generation included), in-place apply time, and the
    re-export a patch replaces (conversion + export-time proof, as `mntool export` runs it)."""
    import torch

    from device_runtime.errors import MntoolError
    from exporters import TARGETS, export
    from mntool.generate import Generator
    from mntool.models import build_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    generator = Generator.load(checkpoint) if checkpoint else None
    model = generator.checkpoint.model if generator else build_model("sasrec", n_items=1682).eval()
    L = model.config.max_history
    example = (torch.randint(1, model.n_items + 1, (1, L)), torch.randint(1, model.n_items + 1, (1,)))
    adaptive = model.adaptive_names()
    rng = np.random.default_rng(0)
    recent = rng.integers(1, model.n_items + 1, generator.recent_len) if generator else None
    params = {
        n: rng.standard_normal(tuple(p.shape)).astype(np.float32) for n, p in model.named_parameters() if n in adaptive
    }
    key = Ed25519PrivateKey.generate()
    results = {}
    for target in tqdm(TARGETS, desc="export", leave=False):
        start = time.perf_counter()
        try:
            artifact = export(model, example, adaptive, target, root / target)
        except MntoolError as err:
            results[target] = {"error": str(err)}
            continue
        export_s = time.perf_counter() - start
        wm = wmap.load(artifact)
        size = sum((wmap.artifact_root(artifact) / f).stat().st_size for f in wm.files)
        if generator:
            build = median_s(lambda: build_patch(wm, generator.generate(recent), key), repeats)
        else:
            build = median_s(lambda: build_patch(wm, params, key), repeats)
        patch = build_patch(wm, params, key)
        patches = [build_patch(wm, params, key) for _ in range(repeats + 1)]
        apply = median_s(lambda: apply_patch_file(artifact, patches.pop(0)), repeats)
        files = {f: bytearray(b) for f, b in wmap.read_artifact_files(artifact, wm.files).items()}
        apply_memory = median_s(lambda: apply_patch_bytes(files, patch, wm, check_artifact=False), repeats)
        results[target] = {
            "artifact_bytes": size,
            "patch_bytes": len(patch),
            "patch_over_artifact": len(patch) / size,
            "export_s": export_s,
            "build_signed_s": build,
            "build_includes_generation": bool(generator),
            "apply_in_place_s": apply,
            "reexport_over_patch": export_s / (build + apply),
            "apply_memory_s": apply_memory,
            "reexport_over_patch_memory": export_s / (build + apply_memory),
        }
    return results


def fmt_s(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def print_tables(report: dict) -> None:
    print(
        "in-memory apply (bytes -> bytes, artifact check skipped as in hot swap) vs numpy copy of the payload / BLAKE3 alone"
    )
    print(
        f"{'payload':>8} {'memcpy':>10} {'blake3':>8} {'apply':>10} {'/memcpy':>8} {'/hash':>6} {'signed /memcpy':>15} "
        f"{'/hash':>6} {'parse':>7} {'isfinite':>8} {'+artifact check':>16}"
    )
    for label, r in report["memory"].items():
        print(
            f"{label:>8} {fmt_s(r['memcpy_s']):>10} {r['blake3_ratio']:>7.1f}x {fmt_s(r['apply_s']):>10} {r['ratio']:>7.1f}x "
            f"{r['over_hash']:>5.2f}x {r['ratio_signed']:>14.1f}x {r['signed_over_hash']:>5.2f}x {r['parse_ratio']:>6.1f}x "
            f"{r['isfinite_ratio']:>7.1f}x {r['ratio_checked_artifact']:>15.1f}x"
        )
    print(
        "\nin-place file apply (A/B slots: pwrite into the inactive slot + fdatasync + symlink switch) vs pwrite + fsync"
        " of the same bytes, and vs the switch floor (the same syscalls, no checks)"
    )
    print(
        f"{'payload':>24} {'pwrite+fsync':>13} {'floor':>7} {'apply':>10} {'ratio':>7} {'/floor':>7} {'+artifact check':>16}"
    )
    for label, r in report["file"].items():
        print(
            f"{label:>24} {fmt_s(r['pwrite_fsync_s']):>13} {r['floor_ratio']:>6.2f}x {fmt_s(r['apply_s']):>10} "
            f"{r['ratio']:>6.2f}x {r['over_floor']:>6.2f}x {r['ratio_checked_artifact']:>15.1f}x"
        )
    if report.get("export"):
        print(
            "\ndefault SASRec: patch vs artifact, cloud build per device (signed), in-place apply, re-export vs patch"
        )
        print(
            f"{'target':>7} {'artifact':>10} {'patch':>8} {'patch/art':>9} {'build':>9} {'apply file':>10} "
            f"{'apply mem':>9} {'export':>8} {'export/(build+apply file | mem)':>32}"
        )
        for target, r in report["export"].items():
            if "error" in r:
                print(f"{target:>7} export failed: {r['error']}")
                continue
            print(
                f"{target:>7} {r['artifact_bytes']:>10} {r['patch_bytes']:>8} {r['patch_over_artifact']:>9.4f} "
                f"{fmt_s(r['build_signed_s']):>9} {fmt_s(r['apply_in_place_s']):>10} {fmt_s(r['apply_memory_s']):>9} "
                f"{fmt_s(r['export_s']):>8} {r['reexport_over_patch']:>20.0f}x | {r['reexport_over_patch_memory']:.0f}x"
            )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of tables.")
@click.option("--repeats", default=50, show_default=True, help="Timed repetitions per figure (median).")
@click.option("--skip-export", is_flag=True, help="Skip the real SASRec exports (section 3).")
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, path_type=Path),
    help="A SASRec MetaNetwork checkpoint: section 3 exports its model and times generation + build.",
)
def main(as_json: bool, repeats: int, skip_export: bool, checkpoint: Path | None) -> None:
    """Measure patch apply/build figures. Example: .venv/bin/python benchmarks/patch_apply.py --json"""
    report: dict = {"memory": {}, "file": {}, "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label, d in tqdm(PAYLOAD_DIMS.items(), desc="synthetic", leave=False):
            (root / f"m{d}").mkdir()
            (root / f"f{d}").mkdir()
            report["memory"][label] = bench_memory(d, repeats, root / f"m{d}")
            report["file"][label] = bench_file(d, max(5, repeats // 5), root / f"f{d}")
        (root / "large").mkdir()
        report["file"]["256 KB, 64 MB artifact"] = bench_file(
            256, max(5, repeats // 5), root / "large", LARGE_STATIC_BYTES
        )
        if not skip_export:
            report["export"] = bench_export(max(5, repeats // 5), root / "export", checkpoint)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_tables(report)


if __name__ == "__main__":
    main()
