"""Quantised artifacts that stay patchable (docs/quantization.md): `precision="float16"` or
`"int8"` quantises the frozen weights with each target's own tool while the adaptive tensors stay
float, so the weight map, the patch format and the device's applier are those of float artifacts.

Per (target, precision), on a small SASRec (and int8 on a small GRU4Rec): the export is proven
within the precision's tolerance (`exporters.options.PROOF_TOLERANCES`; Core ML read back exactly
off macOS); a patch built in the cloud and applied by the device's applier makes the compiled
model compute what PyTorch computes with the same values, within that tolerance; the artifact is
smaller than float32; a patch whose values overflow an adaptive tensor's dtype is refused with
every file byte-identical; a misplaced tensor still fails the proof; unsupported combinations are
one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from small_artifacts import copy_artifact

from device_runtime import weight_map as wmap
from device_runtime.install import apply_patch_file
from device_runtime.layout import stored_tensors
from device_runtime.patch import Freshness, PatchError, pack_patch
from device_runtime.runners import open_runner
from exporters import export, proof
from exporters.errors import AdaptiveTensorMissing, ExportError, ProofMismatch
from exporters.options import PRECISIONS, PROOF_TOLERANCES, ExportOptions
from exporters.quiet import quiet
from mntool.patches import ParamsError, build_patch

pytestmark = pytest.mark.slow
N_ITEMS, HISTORY = 300, 6  # a 301 x 16 item table: over coremltools' 2048-element quantisation threshold
QUANTIZED = ["float16", "int8"]
VARIANTS = [
    ("sasrec", "tflite", "float16"),
    ("sasrec", "tflite", "int8"),
    ("sasrec", "onnx", "float16"),
    ("sasrec", "onnx", "int8"),
    ("sasrec", "coreml", "float16"),
    ("sasrec", "coreml", "int8"),
    ("gru4rec", "tflite", "int8"),
    ("gru4rec", "onnx", "int8"),
    ("gru4rec", "coreml", "int8"),
]
IDS = ["-".join(v) for v in VARIANTS]
MNTOOL = str(Path(sys.executable).with_name("mntool"))


@pytest.fixture(scope="module")
def models():
    from mntool.models import BackboneConfig, build_model

    out = {}
    for name in ("sasrec", "gru4rec"):
        torch.manual_seed(0)
        model = build_model(name, N_ITEMS, BackboneConfig(dim=16, max_history=HISTORY, head_hidden=16)).eval()
        example = (torch.randint(1, N_ITEMS + 1, (1, HISTORY)), torch.randint(1, N_ITEMS + 1, (1,)))
        out[name] = model, example
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, models):
    """(model, target, precision) -> the artifact, exported once per module (float32 unproven:
    only its size is compared)."""
    cache: dict[tuple, Path] = {}

    def get(model_name: str, target: str, precision: str) -> Path:
        key = (model_name, target, precision)
        if key not in cache:
            model, example = models[model_name]
            out = tmp_path_factory.mktemp("-".join(key))
            cache[key] = export(
                model, example, model.adaptive_names(), target, out, precision=precision, verify=precision != "float32"
            )
        return cache[key]

    return get


def input_sets(example: tuple, n: int = 4, seed: int = 5) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [example] + [
        (torch.randint(0, N_ITEMS + 1, example[0].shape, generator=g), torch.randint(1, N_ITEMS + 1, (1,), generator=g))
        for _ in range(n - 1)
    ]


def compiled_outputs(artifact: Path, sets: list[tuple]) -> np.ndarray:
    with quiet(), open_runner(artifact, weight_map=wmap.load(artifact)) as runner:
        return np.array(
            [runner.run({"history": h.numpy(), "target": t.numpy()})["output"] for h, t in sets], dtype=np.float64
        )


def torch_outputs(model, sets: list[tuple], params: dict[str, np.ndarray]) -> np.ndarray:
    from exporters.prepare import run_model

    return np.array([run_model(model, s, params)[0].double().numpy() for s in sets])


def tree_state(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(directory.rglob("*"))
    }


def fresh_params(model, artifact: Path, seed: int) -> dict[str, np.ndarray]:
    """New values for every adaptive tensor, on the scale of the static ones (the proof's rule)."""
    from exporters.prepare import static_values

    return proof.fresh_values(static_values(model, [t.name for t in wmap.load(artifact).tensors]), seed)


def tolerance(precision: str, *outputs: np.ndarray) -> float:
    atol, rtol = PROOF_TOLERANCES[precision]
    return atol + rtol * max(float(np.abs(o).max()) for o in outputs)


# ---- the export and its proof --------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_export_is_proven_within_its_tolerance(variant, exported):
    model_name, target, precision = variant
    wm = wmap.load(exported(*variant))
    figures, atol_rtol = wm.extra["proof"], PROOF_TOLERANCES[precision]
    assert (figures["atol"], figures.get("rtol", atol_rtol[1])) == atol_rtol
    # adaptive tensors stay what a float artifact has: float32, or fp16 where Core ML computes in fp16
    dtype = "float16" if target == "coreml" else "float32"
    assert {t.dtype for t in wm.tensors} == {dtype} and set(wmap.DTYPES) == {"float32", "float16"}
    if (target, precision) != ("coreml", "float16"):  # Core ML float16 is the converter's, no quantise pass
        q = wm.extra["quantization"]
        assert q["precision"] == precision and q["quantized_tensors"] > 0 and q["excluded_ops"], q
    if figures["method"] == "read-back":  # Core ML off macOS: the patched fp16 blobs read back exactly
        # (the proof raises otherwise); the error left is the fp16 rounding of the float32 values
        assert not figures["proven"] and "read-back" in figures["note"] and figures["max_abs_error"] < 1e-3
        return
    assert figures["proven"] and figures["max_abs_error"] <= figures["tolerance"]
    assert figures["base_max_abs_error"] <= figures["tolerance"] < figures["min_effect"]
    assert figures["max_abs_error"] > 1e-6, "a quantised artifact cannot match float PyTorch this closely"


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_patch_round_trip(variant, exported, models, tmp_path):
    """Cloud builds a patch from fresh values, the device's applier writes it in place; the
    compiled model then computes what PyTorch does with those values, within the tolerance."""
    model_name, target, precision = variant
    model, example = models[model_name]
    artifact = copy_artifact(exported(*variant), tmp_path / "in-place")
    params = fresh_params(model, artifact, seed=11)
    apply_patch_file(artifact, build_patch(artifact, params))
    wm = wmap.load(artifact)
    if target == "coreml" and sys.platform != "darwin":  # no Core ML runtime: coremltools reads the blobs back
        from exporters.coreml import read_back

        read = read_back(wm, wmap.read_artifact_files(artifact, wm.files), tmp_path)
        for t in wm.tensors:
            np.testing.assert_array_equal(read[t.name], params[t.name].astype(t.dtype).astype(np.float32))
        return
    sets = input_sets(example)
    before = compiled_outputs(exported(*variant), sets)
    got, want = compiled_outputs(artifact, sets), torch_outputs(model, sets, params)
    tol = tolerance(precision, want, torch_outputs(model, sets, None))
    assert np.abs(got - want).max() <= tol, (np.abs(got - want).max(), tol)
    assert np.abs(got - before).max() > tol, "the patch did not move the compiled output"


@pytest.mark.parametrize("target", ["tflite", "onnx", "coreml"])
@pytest.mark.parametrize("precision", QUANTIZED)
def test_smaller_than_float32(target, precision, exported):
    def size(artifact: Path) -> int:
        wm = wmap.load(artifact)
        return sum(len(b) for b in wmap.read_artifact_files(artifact, wm.files).values())

    assert size(exported("sasrec", target, precision)) < size(exported("sasrec", target, "float32"))


# ---- overflow: refused, nothing written ------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS[:6], ids=IDS[:6])
def test_an_overflowing_patch_is_refused_byte_identical(variant, exported, models, tmp_path):
    """Values too large for an adaptive tensor's dtype (float16: > 65504; float32: > 3.4e38): the
    cloud refuses to build the patch, and a patch whose cast overflowed to Inf anyway (a cloud
    that skipped the check) is refused by the device's applier, in place or to a copy; every file
    of the artifact stays byte-identical."""
    model, _ = models[variant[0]]
    artifact = copy_artifact(exported(*variant), tmp_path / "a")
    wm = wmap.load(artifact)
    entry = wm.tensors[0]
    params = fresh_params(model, artifact, seed=3)
    big = {k: v.astype(np.float64) for k, v in params.items()}
    big[entry.name].flat[0] = 1e5 if entry.dtype == "float16" else 1e39
    before = tree_state(tmp_path / "a")
    with pytest.raises(ParamsError, match=f"overflow the artifact's {entry.dtype}"):
        build_patch(artifact, big)
    stored = {k: v.copy() for k, v in stored_tensors(wm, params).items()}
    with np.errstate(over="ignore"):
        stored[entry.name].flat[0] = np.asarray(big[entry.name].flat[0]).astype(entry.dtype)
    assert np.isinf(stored[entry.name].flat[0])
    now = int(time.time())
    patch = pack_patch(wm, stored, Freshness(sequence=1, issued_at=now, expires_at=now + 3600))
    for out in (None, tmp_path / "copy" / artifact.name):
        with pytest.raises(PatchError, match="NaN or Inf") as err:
            apply_patch_file(artifact, patch, out=out)
        assert "\n" not in str(err.value)
    assert tree_state(tmp_path / "a") == before and not (tmp_path / "copy" / artifact.name).exists()


# ---- the proof still catches a misplaced tensor; the quantiser may not touch one -------------------
def test_a_misplaced_tensor_fails_the_quantized_proof(models, tmp_path, monkeypatch):
    """Two adaptive tensors of equal size swapped in the weight map: the int8 proof, with its
    wider tolerance, still fails naming one of them."""
    import exporters.tflite as tflite

    model, example = models["sasrec"]
    real = tflite.find

    def swapped(job):
        real(job)
        by_name = {p.name: p for p in job.placements}
        a, b = by_name["head.layers.0.bias"], by_name["head.layers.1.weight"]  # 16 elements each
        job.placements = [
            p.__class__(p.name, {a.name: b.key, b.name: a.key}.get(p.name, p.key), p.layout, p.dtype, p.stored_shape)
            for p in job.placements
        ]

    monkeypatch.setattr(tflite, "find", swapped)
    with pytest.raises(ProofMismatch, match=r"head\.layers\.(0\.bias|1\.weight)"):
        export(model, example, model.adaptive_names(), "tflite", tmp_path / "out", precision="int8")
    assert not (tmp_path / "out").exists()


def test_a_quantised_adaptive_tensor_is_a_named_error(models, tmp_path, monkeypatch):
    """Without the exclusion the quantiser would quantise the head: the export fails naming the
    tensor instead of shipping an artifact whose patch would land in quantised bytes."""
    import exporters.quantize as quantization

    model, example = models["sasrec"]
    monkeypatch.setattr(quantization, "excluded", lambda job, constants: [])
    with pytest.raises(AdaptiveTensorMissing, match=r"after ai-edge-quantizer \(int8\): head\.layers\.0\.weight"):
        export(model, example, model.adaptive_names(), "tflite", tmp_path / "out", precision="int8")
    assert not (tmp_path / "out").exists()


# ---- options and bad input -----------------------------------------------------------------------
def test_each_precision_has_a_proof_tolerance():
    assert set(PROOF_TOLERANCES) == set(PRECISIONS) and "int8" in PRECISIONS
    for precision, (atol, rtol) in PROOF_TOLERANCES.items():
        options = ExportOptions(precision=precision)
        assert (options.atol, options.rtol) == (atol, rtol)
    assert ExportOptions(precision="int8", atol=0.5).atol == 0.5  # an explicit tolerance wins
    with pytest.raises(ExportError, match="precision 'int4' is not one of"):
        ExportOptions(precision="int4")


def test_unsupported_combination_is_refused_before_converting(models, tmp_path):
    model, example = models["sasrec"]
    with pytest.raises(ExportError, match=r"precision 'int8' is supported for tflite, onnx, coreml only"):
        export(model, example, model.adaptive_names(), "executorch", tmp_path / "out", precision="int8")
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_combination_is_one_line(models, tmp_path):
    """`mntool export CKPT --target executorch --precision int8`: one `error:` line, exit 1."""
    from mntool.data import PROTOCOL_VERSION, ProtocolConfig
    from mntool.models import BackboneConfig
    from mntool.train import CHECKPOINT_FORMAT, TrainConfig

    model, _ = models["sasrec"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    train = TrainConfig(model="sasrec", backbone=BackboneConfig(dim=16, max_history=HISTORY, head_hidden=16))
    protocol = asdict(ProtocolConfig(history_len=HISTORY))
    config = {
        "format": CHECKPOINT_FORMAT,
        "protocol_version": PROTOCOL_VERSION,
        "protocol": protocol,
        "n_items": N_ITEMS,
        "train": train.to_dict(),
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), ckpt / "weights.pt")
    result = subprocess.run(
        [MNTOOL, "export", ckpt, "--target", "executorch", "--precision", "int8", "--out", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "supported for tflite, onnx, coreml only" in lines[0]
    assert not (tmp_path / "out").exists()
