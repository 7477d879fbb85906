"""Staged (early-exit) artifacts: `exporters.export_staged` writes one proven artifact per stage of
an `EarlyExitCNN` plus a manifest; `device_runtime.staged` loads and validates it, runs it with
early exit (stopping at the first confident exit, never running the later stages), and applies
one patch per stage, verifying every one first.

Every exit's logits on LiteRT and ONNX Runtime must equal PyTorch's `net(x)[:, k]` within
1e-5 + 1e-6 x max|logit| (the export proof's tolerance), before and after a staged patch of fresh
values. Core ML (no prediction off macOS): the patched constants must read back exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_no_torch_on_device import _run_blocked
from test_patch_cli import mntool, one_line_error
from test_patch_format import raw_public, tree_hashes

from device_runtime import weight_map as wmap
from device_runtime.exit_policy import confidence as max_softmax
from device_runtime.layout import stored_tensors
from device_runtime.patch import Freshness, PatchError, TrustPolicy, pack_patch
from device_runtime.staged import (
    MANIFEST,
    StagedError,
    StagedRunner,
    apply_staged_patches,
    load_staged,
    split_params,
)
from exporters import export_staged
from exporters.errors import ExportError
from exporters.options import PROOF_ATOL, PROOF_RTOL
from mntool.patches import build_staged_patches, signer_for
from mntool.vision.exits import EarlyExitCNN
from mntool.vision.models import build_cnn

pytestmark = pytest.mark.slow
KEY = Ed25519PrivateKey.generate()
POLICY = TrustPolicy(verify_key=raw_public(KEY))
N_IMAGES = 6
CASES = [("lenet", "tflite"), ("lenet", "onnx"), ("mobilenet", "onnx")]


def perturbed_net(cnn: str, seed: int = 0) -> EarlyExitCNN:
    """An untrained early-exit CNN whose adaptive tensors are moved off their init (an affine at
    exactly 1/0 and near-zero heads would make the export proof refuse them: no effect)."""
    torch.manual_seed(seed)
    net = EarlyExitCNN(build_cnn(cnn)).eval()
    with torch.no_grad():
        params = dict(net.named_parameters())
        for name in net.adaptive_names():
            params[name].add_(torch.randn_like(params[name]) * 0.3)
    return net


def fresh_params(net: EarlyExitCNN, seed: int) -> dict[str, np.ndarray]:
    """New values for every adaptive tensor, on the scale of the current ones."""
    rng = np.random.default_rng(seed)
    params = dict(net.named_parameters())
    out = {}
    for name in net.adaptive_names():
        p = params[name].detach().numpy()
        out[name] = (p + rng.normal(0, 0.3, p.shape)).astype(np.float32)
    return out


def with_params(net: EarlyExitCNN, values: dict[str, np.ndarray]) -> EarlyExitCNN:
    from exporters.prepare import with_values

    return with_values(net, values)


def images(n: int = N_IMAGES, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def pytorch_exits(net: EarlyExitCNN, x: np.ndarray) -> np.ndarray:
    """(N, E, 10): every exit's logits."""
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def pytorch_embeddings(net: EarlyExitCNN, x: np.ndarray) -> list[np.ndarray]:
    out, h = [], torch.from_numpy(x)
    with torch.no_grad():
        for k in range(net.n_exits):
            result = net.run_stage(k, h)
            out.append(result[-2].numpy())
            h = result[0]
    return out


def assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    tolerance = PROOF_ATOL + PROOF_RTOL * float(np.abs(expected).max())
    err = float(np.abs(got - expected).max())
    assert err <= tolerance, f"{what}: max abs error {err:.3g} > {tolerance:.3g}"


def copy_staged(path: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(path, dest / path.name, symlinks=True))


@pytest.fixture(scope="module")
def nets() -> dict[str, EarlyExitCNN]:
    return {cnn: perturbed_net(cnn) for cnn in ("lenet", "mobilenet")}


@pytest.fixture(scope="module")
def exported(nets, tmp_path_factory):
    """(cnn, target) -> the .stages directory, exported once per module."""
    root = tmp_path_factory.mktemp("staged")
    cache: dict[tuple[str, str], Path] = {}

    def get(cnn: str, target: str) -> Path:
        if (cnn, target) not in cache:
            example = torch.from_numpy(images(1, seed=0))
            cache[cnn, target] = export_staged(nets[cnn], (example,), target, root, name=cnn)
        return cache[cnn, target]

    return get


# ---- the artifact and its manifest -------------------------------------------------------------
def test_staged_export_writes_one_proven_artifact_per_stage_and_a_manifest(nets, exported):
    net, path = nets["lenet"], exported("lenet", "tflite")
    assert path.name == "lenet.tflite.stages" and path.is_dir()
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == "mntool-staged" and manifest["version"] == 1 and manifest["target"] == "tflite"
    assert manifest["n_classes"] == 10 and len(manifest["stages"]) == net.n_exits == 3
    for k, stage in enumerate(manifest["stages"]):
        assert stage["artifact"] == f"stage{k}.tflite"
        assert stage["adaptive"] == net.stage_adaptive(k) and stage["outputs"] == list(net.stage_outputs(k))
        wm = wmap.load(path / stage["artifact"])
        assert wm.fingerprint == stage["fingerprint"] and wm.extra["proof"]["proven"]
        assert manifest["exits"][k] == {"stage": k, "weight": net.exit_names(k)[0], "bias": net.exit_names(k)[1]}
    assert sorted(n for s in manifest["stages"] for n in s["adaptive"]) == sorted(net.adaptive_names())
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "staging directory left behind"


@pytest.mark.parametrize("cnn,target", CASES)
def test_every_exit_matches_pytorch(cnn, target, nets, exported):
    net, x = nets[cnn], images()
    expected, embeddings = pytorch_exits(net, x), pytorch_embeddings(net, x)
    with StagedRunner(exported(cnn, target)) as runner:
        got = runner.run_all(x)
        single = runner.run_all(x[0])  # one unbatched image
    assert len(got) == net.n_exits
    for k, out in enumerate(got):
        assert out["logits"].shape == (N_IMAGES, 10)
        assert_close(out["logits"], expected[:, k], f"{cnn} {target} exit {k} logits")
        assert_close(out["embedding"], embeddings[k], f"{cnn} {target} exit {k} embedding")
        assert_close(single[k]["logits"], expected[:1, k], f"{cnn} {target} exit {k}, one image")


@pytest.mark.parametrize("cnn,target", CASES)
def test_staged_patch_of_fresh_values_matches_pytorch(cnn, target, nets, exported, tmp_path):
    net, x = nets[cnn], images()
    path = copy_staged(exported(cnn, target), tmp_path)
    values = fresh_params(net, seed=7)
    patches = build_staged_patches(path, values, KEY)
    assert sorted(patches) == [0, 1, 2]
    applied = apply_staged_patches(path, patches, policy=POLICY)
    assert sorted(applied) == [0, 1, 2]
    expected, before = pytorch_exits(with_params(net, values), x), pytorch_exits(net, x)
    with StagedRunner(path) as runner:
        got = runner.run_all(x)
    for k, out in enumerate(got):
        assert_close(out["logits"], expected[:, k], f"{cnn} {target} patched exit {k}")
        assert np.abs(out["logits"] - before[:, k]).max() > 1e-2, "the patch changed nothing"
    load_staged(path)  # still matches its manifest: patching changes no fingerprint


def test_classify_stops_at_the_forced_exit_and_skips_later_stages(nets, exported):
    net, x = nets["lenet"], images(4, seed=3)
    expected = pytorch_exits(net, x)
    confidence = max_softmax(expected)  # (N, E)
    eps = 1e-3
    with StagedRunner(exported("lenet", "tflite")) as runner:
        for i in range(len(x)):
            p0, p1 = confidence[i, 0], confidence[i, 1]
            for want, thresholds in (
                (0, (p0 - eps, 2.0)),
                (1, (p0 + eps, p1 - eps)),
                (2, (p0 + eps, p1 + eps)),
            ):
                logits, k = runner.classify(x[i], thresholds)
                assert k == want, f"image {i}: thresholds {thresholds} (p = {p0:.4f}, {p1:.4f}) exited at {k}"
                assert logits.shape == (10,)
                assert_close(logits, expected[i, want], f"image {i} exit {want}")
        assert runner.classify(x[0], 0.0)[1] == 0 and runner.classify(x[0], [1.01])[1] == 2
        # an early answer runs no later stage: stage 2 would fail if called
        stage2 = runner._stages[2].runner
        original, stage2.invoke = stage2.invoke, None
        try:
            assert runner.classify(x[0], 0.0)[1] == 0
            assert runner.classify(x[0], (1.01, 0.0))[1] == 1
        finally:
            stage2.invoke = original
        with pytest.raises(StagedError, match="one threshold or 2"):
            runner.classify(x[0], (0.5, 0.5, 0.5))
        with pytest.raises(StagedError, match="one image"):
            runner.classify(x[:2], 0.5)


def test_max_softmax():
    logits = np.array([[0.0, 0.0], [1000.0, 0.0]], np.float32)
    np.testing.assert_allclose(max_softmax(logits), [0.5, 1.0])
    assert max_softmax(np.log(np.array([0.2, 0.7, 0.1]))) == pytest.approx(0.7)


# ---- validation ----------------------------------------------------------------------------------
def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _one_line(err: pytest.ExceptionInfo, match: str) -> None:
    message = str(err.value)
    assert "\n" not in message and match in message, message


def test_manifest_validation_errors_are_one_line(exported, tmp_path):
    source = exported("lenet", "onnx")

    def broken(name: str) -> Path:
        return copy_staged(source, tmp_path / name)

    path = broken("missing")
    (path / "stage1.onnx").unlink()
    with pytest.raises(StagedError) as err:
        load_staged(path)
    _one_line(err, "stage 1 (stage1.onnx) does not exist")

    path = broken("fingerprint")
    _edit_manifest(path, lambda m: m["stages"][0].update(fingerprint="0" * 64))
    with pytest.raises(StagedError) as err:
        load_staged(path)
    _one_line(err, "fingerprint")

    path = broken("version")
    _edit_manifest(path, lambda m: m.update(version=2))
    with pytest.raises(StagedError) as err:
        load_staged(path)
    _one_line(err, "version 2 is not supported")

    path = broken("escape")
    _edit_manifest(path, lambda m: m["stages"][2].update(artifact="../stage2.onnx"))
    with pytest.raises(StagedError) as err:
        load_staged(path)
    _one_line(err, "not a plain file name")

    path = broken("overlap")
    _edit_manifest(path, lambda m: m["stages"][1]["adaptive"].append(m["stages"][0]["adaptive"][0]))
    with pytest.raises(StagedError) as err:
        load_staged(path)
    _one_line(err, "listed by stages 0 and 1")

    path = broken("changed")  # a stage's file changed outside its adaptive tensors
    data = bytearray((path / "stage0.onnx").read_bytes())
    data[-1] ^= 1
    (path / "stage0.onnx").write_bytes(bytes(data))
    with pytest.raises(StagedError) as err:
        load_staged(path)
    _one_line(err, "does not match its weight map")

    with pytest.raises(StagedError, match="has no stages.json"):
        load_staged(tmp_path)
    # the CLI says the same in one line
    one_line_error(mntool("run", tmp_path / "version" / source.name, "--inputs", tmp_path / "x.npz"), "version 2")


# ---- patching ------------------------------------------------------------------------------------
def test_a_bad_stage_patch_leaves_every_stage_byte_identical(nets, exported, tmp_path):
    net = nets["lenet"]
    path = copy_staged(exported("lenet", "tflite"), tmp_path)
    staged = load_staged(path)
    values = fresh_params(net, seed=11)
    good = build_staged_patches(path, values, KEY, sequence=5)
    before = tree_hashes(path)

    corrupt = bytearray(good[1])
    corrupt[-1] ^= 0xFF  # the payload's last byte: the hash no longer matches
    with pytest.raises(PatchError) as err:
        apply_staged_patches(path, {**good, 1: bytes(corrupt)}, policy=POLICY)
    _one_line(err, "stage 1")
    assert "corrupt" in str(err.value) and "no stage was changed" in str(err.value)
    assert tree_hashes(path) == before

    # a well-formed, signed patch holding NaN for the last stage
    wm = staged.weight_maps[2]
    stored = stored_tensors(wm, split_params(staged, values)[2])
    stored[wm.tensors[0].name] = stored[wm.tensors[0].name].copy()
    stored[wm.tensors[0].name].reshape(-1)[0] = np.nan
    freshness = Freshness(sequence=5, issued_at=0, expires_at=2**40)
    nan_patch = pack_patch(wm, stored, freshness, signer_for(KEY))
    with pytest.raises(PatchError, match="NaN or Inf"):
        apply_staged_patches(path, {**good, 2: nan_patch}, policy=POLICY)
    assert tree_hashes(path) == before

    with pytest.raises(PatchError, match="no stage"):
        apply_staged_patches(path, {3: good[0]}, policy=POLICY)
    with pytest.raises(PatchError, match="another model"):  # stage 0's patch offered to stage 1
        apply_staged_patches(path, {0: good[0], 1: good[0]}, policy=POLICY)
    assert tree_hashes(path) == before

    apply_staged_patches(path, good, policy=POLICY)
    after = tree_hashes(path)
    assert after != before
    with pytest.raises(PatchError, match="not newer"):  # a replay of the set, once applied
        apply_staged_patches(path, good, policy=POLICY)
    assert tree_hashes(path) == after


def test_split_params_needs_whole_stages(nets, exported):
    staged = load_staged(exported("lenet", "onnx"))
    values = fresh_params(nets["lenet"], seed=0)
    assert [sorted(v) for v in split_params(staged, values).values()] == [sorted(s.adaptive) for s in staged.stages]
    head = {n: values[n] for n in staged.stages[2].adaptive}
    assert list(split_params(staged, head, partial=True)) == [2]
    with pytest.raises(StagedError, match="stage 0 needs all"):
        split_params(staged, head)
    with pytest.raises(StagedError, match="not adaptive tensors"):
        split_params(staged, {**values, "backbone.blocks.0.conv.weight": values[staged.stages[0].adaptive[0]]})


def test_coreml_staged_patch_reads_back_exactly(nets, exported, tmp_path):
    """Core ML off macOS: after a staged patch, coremltools' own reader returns exactly the
    new values of every stage's adaptive constants."""
    from exporters.coreml import read_back

    path = copy_staged(exported("lenet", "coreml"), tmp_path)
    values = fresh_params(nets["lenet"], seed=5)
    apply_staged_patches(path, build_staged_patches(path, values, KEY), policy=POLICY)
    staged = load_staged(path)
    for k, wm in enumerate(staged.weight_maps):
        assert staged.artifact(k).name == f"stage{k}.mlpackage"
        read = read_back(wm, wmap.read_artifact_files(staged.artifact(k), wm.files), tmp_path)
        assert sorted(read) == sorted(staged.stages[k].adaptive)
        for name in staged.stages[k].adaptive:
            np.testing.assert_array_equal(read[name], values[name], err_msg=f"stage {k} {name}")


# ---- export refusals -----------------------------------------------------------------------------
class Overlapping(EarlyExitCNN):
    def stage_adaptive(self, k):
        names = super().stage_adaptive(k)
        return names + (super().stage_adaptive(0)[:1] if k == 1 else [])


class Uncovered(EarlyExitCNN):
    def stage_adaptive(self, k):
        return super().stage_adaptive(k)[1:] if k == 0 else super().stage_adaptive(k)


@pytest.mark.parametrize("cls,match", [(Overlapping, "is held by stages 0 and 1"), (Uncovered, "belong to no stage")])
def test_export_refuses_stages_that_do_not_partition_the_adaptive_tensors(cls, match, tmp_path):
    net = cls(build_cnn("lenet")).eval()
    with pytest.raises(ExportError) as err:
        export_staged(net, (torch.rand(1, 1, 28, 28),), "onnx", tmp_path / "out")
    _one_line(err, match)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_model_without_stages(tmp_path):
    with pytest.raises(ExportError, match="not a staged"):
        export_staged(build_cnn("lenet").eval(), (torch.rand(1, 1, 28, 28),), "onnx", tmp_path)


def test_a_failed_stage_export_leaves_an_earlier_staged_artifact(nets, exported, tmp_path):
    path = copy_staged(exported("lenet", "onnx"), tmp_path)
    assert path.name == "lenet.onnx.stages"  # what the failed export below would replace
    before = tree_hashes(tmp_path)
    net = perturbed_net("lenet")
    net.train()  # refused by the first stage's export
    with pytest.raises(ExportError, match="stage 0: model is in training mode"):
        export_staged(net, (torch.rand(1, 1, 28, 28),), "onnx", tmp_path, name="lenet")
    assert tree_hashes(tmp_path) == before


# ---- device side without torch, and the CLI ------------------------------------------------------
def test_staged_artifact_runs_without_torch(exported):
    path = exported("lenet", "tflite")
    out = _run_blocked(f"""
import json
import numpy as np
from device_runtime.staged import StagedRunner
with StagedRunner({str(path)!r}) as runner:
    x = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
    logits, k = runner.classify(x, 0.0)
    print(json.dumps([k, len(runner.run_all(x))]))
""")
    assert json.loads(out) == [0, 3]


def test_cli_run_and_bench_on_a_staged_artifact(nets, exported, tmp_path):
    net, path = nets["lenet"], exported("lenet", "onnx")
    pixels = (images(3, seed=4) * 255).round().astype(np.uint8)[:, 0]  # (3, 28, 28) 0..255
    np.savez(tmp_path / "in.npz", images=pixels)
    expected = pytorch_exits(net, pixels[:, None].astype(np.float32) / 255)

    result = mntool("run", path, "--inputs", tmp_path / "in.npz", "--threshold", "2", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["exit"] == [2, 2, 2]
    assert_close(np.array(out["logits"], np.float32), expected[:, 2], "mntool run, last exit")

    result = mntool("run", path, "--inputs", tmp_path / "in.npz", "--threshold", "0", "--threshold", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("exit 0 of 2 (early") == 3

    result = mntool("run", path, "--inputs", tmp_path / "in.npz", "--all-exits", "-o", tmp_path / "out.npz")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as saved:
        for k in range(3):
            assert_close(saved[f"logits_{k}"], expected[:, k], f"mntool run --all-exits, exit {k}")

    one_line_error(
        mntool("run", path, "--inputs", tmp_path / "in.npz", "--threshold", "0.5", "--all-exits"), "no --threshold"
    )
    one_line_error(
        mntool(
            "run", path, "--inputs", tmp_path / "in.npz", "--threshold", "1", "--threshold", "1", "--threshold", "1"
        ),
        "one threshold or 2",
    )

    result = mntool(
        "bench", path, "--threshold", "0.5", "--inputs", tmp_path / "in.npz", "--runs", "20", "--warmup", "2", "--json"
    )
    assert result.returncode == 0, result.stderr
    [report] = json.loads(result.stdout)
    assert len(report["stages"]) == len(report["paths"]) == 3
    assert all(s["p50_ms"] > 0 and s["p99_ms"] >= s["p50_ms"] for s in report["stages"] + report["paths"])
    stream = report["stream"]
    assert stream["inputs"] == 3 and stream["thresholds"] == [0.5, 0.5]
    assert sum(stream["exit_counts"]) == 3 and stream["ratio"] > 0
    confidence = max_softmax(expected)
    answered = [next((k for k in range(2) if confidence[i, k] >= 0.5), 2) for i in range(3)]
    assert stream["exit_counts"] == [answered.count(k) for k in range(3)]

    result = mntool("bench", path, "--runs", "10", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    assert "stage 2" in result.stdout and "exit 2      stages 0..2" in result.stdout
    one_line_error(mntool("bench", path, "--patch", tmp_path / "in.npz"), "not supported for staged")


def test_cli_export_of_an_early_exit_checkpoint_writes_a_staged_artifact(nets, tmp_path):
    """`mntool export` on an early-exit checkpoint (written here by hand, as `mntool train
    --method exits` does) exports the staged form and says so."""
    from mntool.data.images import IMAGE_PROTOCOL_VERSION
    from mntool.vision.train import VisionTrainConfig

    if "exits" not in VisionTrainConfig.__dataclass_fields__:
        pytest.skip("this mntool's image checkpoints have no early-exit models")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(nets["lenet"].state_dict(), ckpt / "weights.pt")
    config = {
        "format": 1,
        "task": "mnist",
        "protocol_version": IMAGE_PROTOCOL_VERSION,
        "protocol": {"upload_len": 16},
        "train": VisionTrainConfig(model="lenet", method="exits", exits=True).to_dict(),
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    result = mntool("export", ckpt, "--target", "onnx", "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "staged early-exit artifact: 3 stages" in result.stdout and result.stdout.count("proof max abs error") == 3
    staged = load_staged(tmp_path / "out" / "model.onnx.stages")
    assert staged.target == "onnx" and staged.n_exits == 3
