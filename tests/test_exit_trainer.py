"""On-device early-exit personalisation (PersEPhonEE): the numpy exit-head trainer, the exit
policy (thresholds, simulation), and writing a trained head into a REAL compiled stage artifact
(LeNet early-exit stage 0, exported to TFLite and ONNX, and to float16 Core ML for the overflow
case) through a locally signed patch on the install path."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime import weight_map as wmap
from device_runtime.exit_policy import (
    NEVER,
    ExitPolicyError,
    choose_thresholds,
    exit_index,
    max_softmax,
    simulate,
)
from device_runtime.exit_trainer import (
    ExitTrainConfig,
    ExitTrainError,
    device_key,
    pseudo_labels,
    train_exit_head,
    write_exit_head,
)
from device_runtime.install import apply_patch_file, read_state
from device_runtime.layout import stored_tensors, stored_values
from device_runtime.patch import Freshness, PatchError, Signer, TrustPolicy, pack_patch

ROOT = Path(__file__).resolve().parents[1]
WEIGHT, BIAS = "exits.0.linear.weight", "exits.0.linear.bias"
BATCH = 4


# ---- the trainer --------------------------------------------------------------------------------
def separable(n: int, dim: int = 64, classes: int = 10, seed: int = 0):
    """Non-negative embeddings (like pooled ReLU activations) of `classes` well-separated clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.random((classes, dim)).astype(np.float32) * 2
    y = np.arange(n) % classes
    x = np.maximum(centers[y] + 0.3 * rng.standard_normal((n, dim)), 0).astype(np.float32)
    return x, y.astype(np.int64)


def accuracy(W, b, x, y) -> float:
    return float(((x @ W.T + b).argmax(axis=1) == y).mean())


def bad_head(dim: int, classes: int = 10, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((classes, dim)) * 0.05).astype(np.float32), np.zeros(classes, np.float32)


def test_trainer_improves_accuracy_from_bad_init():
    x, y = separable(400)
    W0, b0 = bad_head(x.shape[1])
    train, test = slice(0, 60), slice(60, None)
    assert accuracy(W0, b0, x[test], y[test]) < 0.4
    W, b, stats = train_exit_head(W0, b0, x[train], y[train], None, ExitTrainConfig(steps=100, lr=1e-2))
    assert accuracy(W, b, x[test], y[test]) > 0.95
    assert W.dtype == b.dtype == np.float32 and W.shape == W0.shape and b.shape == b0.shape
    assert (stats.labelled, stats.pseudo, stats.steps) == (60, 0, 100)
    assert stats.final_loss < stats.initial_loss
    n, d, c = 60, x.shape[1], 10
    assert stats.macs >= 100 * 2 * n * d * c  # at least the two matmuls per step
    assert stats.wall_ms > 0


def test_zero_labels_and_threshold_one_return_the_initial_head():
    x, _ = separable(50)
    W0, b0 = bad_head(x.shape[1])
    final = np.zeros((50, 10))
    final[:, 3] = 1000.0  # max softmax exactly 1.0 in float64: still not ABOVE 1.0
    W, b, stats = train_exit_head(W0, b0, x, np.full(50, -1), final, ExitTrainConfig(threshold=1.0))
    np.testing.assert_allclose(W, W0, atol=1e-6)
    np.testing.assert_allclose(b, b0, atol=1e-6)
    assert (stats.labelled, stats.pseudo, stats.steps, stats.macs) == (0, 0, 0, 0)
    W, b, _ = train_exit_head(W0, b0, x, None, None)  # no labels, no final exit
    np.testing.assert_allclose(W, W0, atol=1e-6)
    W, b, stats = train_exit_head(W0, b0, x, np.arange(50) % 10, None, ExitTrainConfig(steps=0))
    np.testing.assert_allclose(W, W0, atol=1e-6)
    assert stats.steps == 0 and stats.labelled == 50


def test_pseudo_labels_are_the_argmax_above_the_threshold_only():
    logits = np.array([[4.0, 0.0, 0.0], [1.0, 1.2, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 0.0]])
    p = max_softmax(logits)
    labels, mask = pseudo_labels(logits, 0.8)
    assert labels.tolist() == [0, 1, 2, 0]
    assert mask.tolist() == [True, False, True, False]
    _, mask = pseudo_labels(logits, float(p[0]))  # strictly above: a row AT the threshold is out
    assert mask.tolist() == [False, False, True, False]
    assert not pseudo_labels(np.array([[0.0, 1000.0]]), 1.0)[1].any()
    with pytest.raises(ExitTrainError, match="threshold"):
        pseudo_labels(logits, 1.5)


def test_pseudo_labels_used_only_above_the_threshold():
    """Training with the final exit's logits equals training on exactly the confident unlabelled
    rows labelled with its argmax (weighted by pseudo_weight); unconfident rows do not count, and
    a user label is never replaced by a pseudo-label."""
    x, y = separable(120, seed=2)
    W0, b0 = bad_head(x.shape[1], seed=3)
    rng = np.random.default_rng(4)
    confident = rng.random(120) < 0.5
    final = np.zeros((120, 10))
    guess = (y + 1) % 10  # deliberately not the truth: where pseudo-labels are used shows in the head
    final[np.arange(120), guess] = np.where(confident, 8.0, 0.5)  # max softmax ~0.997 vs ~0.15
    labels = np.full(120, -1)
    labels[:10] = y[:10]  # ten user labels, some of them on confident rows
    config = ExitTrainConfig(steps=60, lr=1e-2, threshold=0.9, pseudo_weight=0.5)
    W, b, stats = train_exit_head(W0, b0, x, labels, final, config)
    take = confident & (labels < 0)
    assert (stats.labelled, stats.pseudo) == (10, int(take.sum()))

    rows = np.flatnonzero((labels >= 0) | take)
    explicit = np.where(labels >= 0, labels, guess)[rows]
    # the same rows with explicit labels; pseudo rows at weight 0.5 == duplicate the labelled ones
    dup = np.concatenate([rows, rows[labels[rows] >= 0]])
    y_dup = np.concatenate([explicit, explicit[labels[rows] >= 0]])
    W2, b2, _ = train_exit_head(W0, b0, x[dup], y_dup, None, config)
    np.testing.assert_allclose(W, W2, atol=1e-5)
    np.testing.assert_allclose(b, b2, atol=1e-5)
    # with a threshold above every row's confidence, only the user labels count
    W3, b3, stats3 = train_exit_head(W0, b0, x, labels, final, ExitTrainConfig(steps=60, lr=1e-2, threshold=0.999))
    W4, b4, _ = train_exit_head(W0, b0, x[:10], y[:10], None, ExitTrainConfig(steps=60, lr=1e-2))
    assert stats3.pseudo == 0
    np.testing.assert_allclose(W3, W4, atol=1e-6)
    np.testing.assert_allclose(b3, b4, atol=1e-6)


def test_trainer_is_deterministic_and_pulled_toward_the_initial_head():
    x, y = separable(80, seed=5)
    W0, b0 = bad_head(x.shape[1])
    a = train_exit_head(W0, b0, x, y, None)
    c = train_exit_head(W0, b0, x, y, None)
    assert np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])
    loose = train_exit_head(W0, b0, x, y, None, ExitTrainConfig(l2=0.0, lr=1e-2))
    tight = train_exit_head(W0, b0, x, y, None, ExitTrainConfig(l2=100.0, lr=1e-2))
    assert np.linalg.norm(tight[0] - W0) < 0.2 * np.linalg.norm(loose[0] - W0)


def test_trainer_is_fast():
    """The size the brief names: 100 rows x 800 dims x 10 classes x 100 steps (measured: ~5-12 ms
    on the shared 2-core VM, most of it the two small matmuls per step)."""
    rng = np.random.default_rng(0)
    x = rng.random((100, 800), dtype=np.float32)
    y = rng.integers(0, 10, 100)
    W0, b0 = bad_head(800)
    train_exit_head(W0, b0, x, y, None)  # warm up BLAS
    best = min(train_exit_head(W0, b0, x, y, None)[2].wall_ms for _ in range(5))
    print(f"train_exit_head 100x800x10, 100 steps: {best:.2f} ms")
    assert best < 100
    assert train_exit_head(W0, b0, x, y, None)[2].macs == 100 * (2 * 100 * 800 * 10 + 8 * 8010) + 2 * 100 * 800 * 10


@pytest.mark.parametrize(
    "kwargs",
    [dict(steps=-1), dict(steps=1.5), dict(lr=0.0), dict(lr=math.nan), dict(l2=-1.0), dict(threshold=1.01)]
    + [dict(threshold=-0.1), dict(pseudo_weight=-0.5), dict(pseudo_weight=math.inf)],
)
def test_config_is_validated(kwargs):
    with pytest.raises(ExitTrainError, match=next(iter(kwargs))):
        ExitTrainConfig(**kwargs)


def test_trainer_refuses_inconsistent_inputs():
    x, y = separable(20)
    W0, b0 = bad_head(x.shape[1])
    with pytest.raises(ExitTrainError, match="shapes disagree"):
        train_exit_head(W0, b0, x[:, :-1], y, None)
    with pytest.raises(ExitTrainError, match="labels must lie"):
        train_exit_head(W0, b0, x, np.full(20, 10), None)
    with pytest.raises(ExitTrainError, match="labels must be"):
        train_exit_head(W0, b0, x, y[:5], None)
    with pytest.raises(ExitTrainError, match="final_logits must be"):
        train_exit_head(W0, b0, x, y, np.zeros((20, 3)))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ExitTrainError, match="NaN"):
        train_exit_head(W0, b0, bad, y, None)


def test_device_modules_import_no_torch():
    code = (
        "import sys\nimport device_runtime.exit_trainer, device_runtime.exit_policy\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mntool', 'exporters'))\n"
        "assert not bad, bad\nprint('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---- the exit policy ------------------------------------------------------------------------------
def confident(classes: list[int], confidence: list[float], n_classes: int = 4) -> np.ndarray:
    """Logits whose argmax is `classes[i]` with max softmax `confidence[i]` (up to rounding)."""
    out = np.zeros((len(classes), n_classes))
    for i, (c, p) in enumerate(zip(classes, confidence, strict=True)):
        out[i, c] = math.log(p * (n_classes - 1) / (1 - p))  # p = e^a / (e^a + n - 1)
    return out


# five rows, three exits (classes 0-2 predicted, 4 logits); no confidence sits on a grid value
LABELS = np.array([0, 1, 2, 0, 1])
EXIT0 = confident([0, 0, 2, 1, 0], [0.95, 0.62, 0.68, 0.45, 0.50])  # right on rows 0, 2
EXIT1 = confident([0, 1, 1, 0, 2], [0.99, 0.92, 0.65, 0.80, 0.75])  # right on rows 0, 1, 3
FINAL = confident([0, 1, 2, 0, 1], [0.9] * 5)  # right everywhere
PER_EXIT = [EXIT0, EXIT1, FINAL]
COSTS = [1.0, 2.0, 4.0]  # leaving at exit 0 costs 1, at exit 1 costs 3, at the final exit 7
GRID = [0.3, 0.55, 0.65, 0.7, 0.78, 0.85, 0.9, 0.96, 0.995]
# shared threshold -> (accuracy, mean cost), by hand:
#   0.3 (0.4, 1.0)  0.55 (0.6, 1.8)  0.65 (0.8, 2.2)  0.7 (0.8, 3.4)  0.78 (1.0, 4.2)  0.85/0.9 (1.0, 5.0)
#   0.96 (1.0, 6.2)  0.995/never (1.0, 7.0)
# per exit: (0.65, 0.78) reaches 1.0 at 3.0 (row 4's wrong exit-1 answer at 0.75 needs t1 > 0.75
# while row 2 leaves exit 0 at 0.68 only if t0 <= 0.68): cheaper than any shared threshold


def test_max_softmax_and_exit_index():
    np.testing.assert_allclose(max_softmax(EXIT0), [0.95, 0.62, 0.68, 0.45, 0.5], atol=1e-12)
    np.testing.assert_allclose(max_softmax(np.zeros((2, 4))), [0.25, 0.25])
    assert exit_index(PER_EXIT, 0.9).tolist() == [0, 1, 2, 2, 2]
    at_row2 = float(max_softmax(EXIT0)[2])  # >=: a row whose confidence equals the threshold leaves
    assert exit_index(PER_EXIT, [at_row2, 0.85]).tolist() == [0, 1, 0, 2, 2]
    assert exit_index(PER_EXIT, [NEVER, 0.0]).tolist() == [1] * 5
    assert exit_index(PER_EXIT, 0.0).tolist() == [0] * 5
    assert exit_index([FINAL], []).tolist() == [0] * 5
    with pytest.raises(ExitPolicyError, match="one threshold per early exit"):
        exit_index(PER_EXIT, [0.5, 0.5, 0.5])
    with pytest.raises(ExitPolicyError, match="one shape"):
        exit_index([EXIT0, FINAL[:3]], 0.5)


def test_simulate():
    r = simulate(PER_EXIT, LABELS, 0.9, COSTS)  # exits 0 1 2 2 2: all right
    assert r == {"accuracy": 1.0, "exit_rates": [0.2, 0.2, 0.6], "mean_cost": 5.0}
    r = simulate(PER_EXIT, LABELS, 0.0, COSTS)  # all at exit 0: rows 0 and 2 right
    assert r == {"accuracy": 0.4, "exit_rates": [1.0, 0.0, 0.0], "mean_cost": 1.0}
    r = simulate(PER_EXIT, LABELS, [NEVER, 0.85], COSTS)  # exits 1 1 2 2 2: all right
    assert r == {"accuracy": 1.0, "exit_rates": [0.0, 0.4, 0.6], "mean_cost": 5.4}
    r = simulate(PER_EXIT, LABELS, [0.65, 0.78], COSTS)
    assert r == {"accuracy": 1.0, "exit_rates": [0.4, 0.4, 0.2], "mean_cost": 3.0}
    r = simulate(PER_EXIT, np.array([0, -1, -1, 0, -1]), 0.0, COSTS)  # accuracy over labelled rows only
    assert r["accuracy"] == 0.5 and r["mean_cost"] == 1.0
    assert math.isnan(simulate(PER_EXIT, np.full(5, -1), 0.0, COSTS)["accuracy"])
    with pytest.raises(ExitPolicyError, match="stage_costs"):
        simulate(PER_EXIT, LABELS, 0.5, [1.0, 2.0])
    with pytest.raises(ExitPolicyError, match="labels must lie"):
        simulate(PER_EXIT, np.full(5, 4), 0.5, COSTS)


def test_choose_thresholds_for_a_target_accuracy():
    def choose(target, **kw):
        return choose_thresholds(PER_EXIT, LABELS, COSTS, target_accuracy=target, grid=GRID, **kw)

    assert choose(1.0) == (0.78, 0.78)
    assert choose(0.8) == (0.65, 0.65)
    assert choose(0.6) == (0.55, 0.55)
    assert choose(0.4) == (0.3, 0.3)
    assert choose(1.0, per_exit=True) == (0.65, 0.78)
    r = simulate(PER_EXIT, LABELS, choose(1.0, per_exit=True), COSTS)
    assert r["accuracy"] == 1.0 and r["mean_cost"] == 3.0 < simulate(PER_EXIT, LABELS, choose(1.0), COSTS)["mean_cost"]
    # unreachable (no exit is ever right): the most accurate candidate, then the cheapest
    wrong = np.full(5, 3)
    assert choose_thresholds(PER_EXIT, wrong, COSTS, target_accuracy=0.9, grid=GRID) == (0.3, 0.3)
    # a final-exit-only target (1.0 here) is always reachable with NEVER, the always-added candidate
    assert choose_thresholds(PER_EXIT, LABELS, COSTS, target_accuracy=1.0, grid=[0.3]) == (NEVER, NEVER)


def test_choose_thresholds_for_a_latency_budget():
    def choose(budget, **kw):
        return choose_thresholds(PER_EXIT, LABELS, COSTS, latency_budget=budget, grid=GRID, **kw)

    assert choose(100.0) == (0.78, 0.78)  # accuracy 1.0 at its cheapest
    assert choose(4.0) == (0.65, 0.65)  # 0.8 at 2.2 beats 0.8 at 3.4
    assert choose(1.9) == (0.55, 0.55)
    assert choose(1.0) == (0.3, 0.3)
    assert choose(0.5) == (0.3, 0.3)  # nothing fits: the cheapest
    assert choose(3.0, per_exit=True) == (0.65, 0.78)
    assert choose(2.9, per_exit=True) != (0.65, 0.78)
    with pytest.raises(ExitPolicyError, match="exactly one"):
        choose_thresholds(PER_EXIT, LABELS, COSTS)
    with pytest.raises(ExitPolicyError, match="exactly one"):
        choose_thresholds(PER_EXIT, LABELS, COSTS, target_accuracy=0.9, latency_budget=3.0)
    with pytest.raises(ExitPolicyError, match="labelled"):
        choose_thresholds(PER_EXIT, np.full(5, -1), COSTS, target_accuracy=0.9)
    with pytest.raises(ExitPolicyError, match="grid"):
        choose_thresholds(PER_EXIT, LABELS, COSTS, target_accuracy=0.9, grid=[1.5])
    with pytest.raises(ExitPolicyError, match="combinations"):
        choose_thresholds([EXIT0] * 6 + [FINAL], LABELS, [1.0] * 7, target_accuracy=0.9, grid=GRID, per_exit=True)


def test_default_grid_on_pseudo_labelled_rows():
    """With the final exit's own argmax as labels, the final exit is always right: a target of
    1.0 is reached only by thresholds that keep every early mistake from leaving."""
    rng = np.random.default_rng(0)
    per_exit = [rng.standard_normal((200, 10)) * s for s in (1.0, 2.0, 4.0)]
    labels = per_exit[-1].argmax(axis=1)
    t = choose_thresholds(per_exit, labels, [1.0, 1.0, 1.0], target_accuracy=1.0)
    assert simulate(per_exit, labels, t, [1.0, 1.0, 1.0])["accuracy"] == 1.0
    t90 = choose_thresholds(per_exit, labels, [1.0, 1.0, 1.0], target_accuracy=0.9)
    assert (
        simulate(per_exit, labels, t90, [1, 1, 1])["mean_cost"] <= simulate(per_exit, labels, t, [1, 1, 1])["mean_cost"]
    )


# ---- writing a head into a real compiled stage ---------------------------------------------------
@pytest.fixture(scope="module")
def stage_net():
    """LeNet with early exits and non-trivial parameters (the export-time proof refuses near-zero
    biases), and a fixed batch of images."""
    torch = pytest.importorskip("torch")
    from mntool.vision.exits import EarlyExitCNN
    from mntool.vision.models import build_cnn

    torch.manual_seed(0)
    net = EarlyExitCNN(build_cnn("lenet")).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("exits."):
                p.copy_(torch.randn_like(p) * 0.1)
            elif "affine.weight" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    images = torch.rand(BATCH, 1, 28, 28)
    return net, images


@pytest.fixture(scope="module")
def stage_artifacts(stage_net, tmp_path_factory):
    """{target: exported stage-0 artifact}: tflite and onnx (float32), and coreml at float16 when
    coremltools is installed (it is not run: Core ML cannot predict on Linux)."""
    import exporters

    net, images = stage_net
    root = tmp_path_factory.mktemp("exit-stage")
    example = (net.stage_example(0, images),)
    out = {}
    for target, options in (("tflite", {}), ("onnx", {}), ("coreml", {"precision": "float16"})):
        if target == "coreml":
            try:
                import coremltools  # noqa: F401
            except ImportError:
                continue
        out[target] = exporters.export(
            net.stages()[0],
            example,
            net.stage_adaptive(0),
            target,
            root / target,
            name="stage0",
            output_names=net.stage_outputs(0),
            **options,
        )
    return out


def artifact_copy(stage_artifacts, target: str, tmp_path: Path) -> Path:
    if target not in stage_artifacts:
        pytest.skip(f"no {target} export here")
    src = stage_artifacts[target]
    shutil.copytree(src.parent, tmp_path / target)
    return tmp_path / target / src.name


def tree_state(directory: Path) -> dict[str, str]:
    """Every entry under `directory`: a file's SHA-256, a symlink's target; equal before and after
    means nothing was written, added, removed or re-linked."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = os.lstat(path)
        key = str(path.relative_to(directory))
        if stat.S_ISLNK(st.st_mode):
            out[key] = "-> " + os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def stored(artifact: Path) -> dict[str, np.ndarray]:
    """Every adaptive tensor as the artifact holds it on disk now (through the slot symlink)."""
    wm = wmap.load(artifact)
    files = wmap.read_artifact_files(artifact, sorted({t.file for t in wm.tensors}))
    return {t.name: np.array(wmap.read_tensor(t, files[t.file])) for t in wm.tensors}


def new_head(seed: int, dim: int = 784):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((10, dim)) * 0.05).astype(np.float32), (rng.standard_normal(10) * 0.2).astype(
        np.float32
    )


def run_stage(artifact: Path, images) -> dict[str, np.ndarray]:
    from device_runtime.runners import open_runner

    with open_runner(artifact, weight_map=wmap.load(artifact)) as runner:
        return runner.run({"images": images})


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tflite", "onnx"])
def test_write_exit_head_into_a_compiled_stage(target, stage_net, stage_artifacts, tmp_path):
    """(a) the head is written: the bytes read back through the weight map are W and b, and the
    runtime's logits are the stage's own embedding @ W.T + b; (c) every other adaptive tensor is
    unchanged; the install path's state moves by one; a second local write and then a cloud patch
    (sequence = microseconds) are still accepted."""
    net, images = stage_net
    x = net.stage_example(0, images).numpy()
    artifact = artifact_copy(stage_artifacts, target, tmp_path)
    key = device_key(tmp_path / "device.key")
    before = stored(artifact)
    out0 = run_stage(artifact, x)
    emb = out0["embedding"].astype(np.float64)
    W0, b0 = before[WEIGHT], before[BIAS]
    np.testing.assert_allclose(out0["logits"], emb @ W0.T.astype(np.float64) + b0, atol=1e-5)

    W, b = new_head(1)
    patch = write_exit_head(artifact, WEIGHT, BIAS, W, b, key=key, device_id="phone-1")
    assert patch.freshness.sequence == 1 and read_state(artifact).sequence == 1
    after = stored(artifact)
    assert np.array_equal(after[WEIGHT], W) and np.array_equal(after[BIAS], b)
    for name in before.keys() - {WEIGHT, BIAS}:
        assert after[name].tobytes() == before[name].tobytes(), name
    out1 = run_stage(artifact, x)
    np.testing.assert_array_equal(out1["embedding"], out0["embedding"])  # only the exit head moved
    expected = emb @ W.T.astype(np.float64) + b
    np.testing.assert_allclose(out1["logits"], expected, atol=1e-5)
    assert np.abs(out1["logits"] - out0["logits"]).max() > 0.1
    wmap.load(artifact)  # the fingerprint still matches: only adaptive bytes changed

    # a head trained on the stage's own embeddings, written again: sequence 2
    W2, b2, stats = train_exit_head(W, b, out1["embedding"], np.array([0, 1, 2, 3]), None)
    assert stats.steps == 100
    write_exit_head(artifact, WEIGHT, BIAS, W2, b2, key=key, device_id="phone-1")
    assert read_state(artifact).sequence == 2
    np.testing.assert_allclose(
        run_stage(artifact, x)["logits"], out1["embedding"].astype(np.float64) @ W2.T + b2, atol=1e-5
    )

    # a later cloud patch (its own key, microsecond sequence) still applies, and overwrites the head
    cloud = Ed25519PrivateKey.generate()
    cloud_pub = cloud.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    wm = wmap.load(artifact)
    now = int(time.time())
    params = {name: value.astype(np.float32) for name, value in before.items()}
    data = pack_patch(
        wm,
        stored_tensors(wm, params),
        Freshness(time.time_ns() // 1000, now, now + 600),
        Signer(sign=cloud.sign, public=cloud_pub),
    )
    with pytest.raises(PatchError, match="not by the given verify key"):
        apply_patch_file(artifact, data, policy=TrustPolicy(verify_key=device_public(key)))  # keys do not mix
    apply_patch_file(artifact, data, policy=TrustPolicy(verify_key=cloud_pub))
    assert np.array_equal(stored(artifact)[WEIGHT], W0)
    # ... and a local write after it takes the cloud's sequence + 1
    write_exit_head(artifact, WEIGHT, BIAS, W, b, key=key)
    assert read_state(artifact).sequence == time_sequence(data) + 1


def device_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def time_sequence(data: bytes) -> int:
    from device_runtime.patch import parse_patch

    return parse_patch(data).freshness.sequence


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tflite", "onnx", "coreml"])
def test_bad_heads_are_refused_before_anything_is_written(target, stage_artifacts, tmp_path):
    """(b) NaN, Inf, wrong shapes, unknown names, values overflowing the stored dtype (float16 on
    Core ML; float32 elsewhere): one-line errors, every file of the artifact byte-identical; both
    on a fresh artifact and on one already written once (A/B slots present)."""
    artifact = artifact_copy(stage_artifacts, target, tmp_path)
    key = Ed25519PrivateKey.generate()
    dtype = wmap.load(artifact).tensor(WEIGHT).dtype
    W, b = new_head(2)
    for written in (False, True):
        if written:
            write_exit_head(artifact, WEIGHT, BIAS, W, b, key=key)
        before = tree_state(artifact.parent)
        state = read_state(artifact)
        nan_W = W.copy()
        nan_W[3, 7] = np.nan
        inf_b = b.copy()
        inf_b[0] = -np.inf
        big = W.astype(np.float64)  # finite in float64, too large for the stored dtype
        big[0, 0] = 1e5 if dtype == "float16" else 1e39
        cases = [
            ((nan_W, b), "NaN or Inf"),
            ((W, inf_b), "NaN or Inf"),
            ((W.T, b), r"shape \(784, 10\)"),
            ((W[:, :-1], b), "shape"),
            ((W, b[:5]), "shape"),
            ((big, b), f"overflows the artifact's {dtype}"),
        ]
        for (w_, b_), message in cases:
            with pytest.raises(ExitTrainError, match=message) as err:
                write_exit_head(artifact, WEIGHT, BIAS, w_, b_, key=key)
            assert "\n" not in str(err.value)
            assert tree_state(artifact.parent) == before, message
        with pytest.raises(ExitTrainError, match="no adaptive tensor 'exits.1.linear.weight'"):
            write_exit_head(artifact, "exits.1.linear.weight", BIAS, W, b, key=key)
        with pytest.raises(ExitTrainError, match="two tensors"):
            write_exit_head(artifact, WEIGHT, WEIGHT, W, b, key=key)
        assert tree_state(artifact.parent) == before and read_state(artifact) == state
    if dtype == "float16":  # the head that fits is stored at float16 rounding
        np.testing.assert_array_equal(stored(artifact)[WEIGHT], W.astype(np.float16))


@pytest.mark.slow
def test_a_stale_write_is_refused_as_a_race(stage_artifacts, tmp_path, monkeypatch):
    """If another patch lands between reading the state and applying, the local patch (built on
    stale values of the other tensors) is refused and nothing of it is written."""
    import device_runtime.install as install

    artifact = artifact_copy(stage_artifacts, "tflite", tmp_path)
    key = Ed25519PrivateKey.generate()
    W, b = new_head(3)
    real = install.apply_patch_file

    def racing(*args, **kwargs):
        monkeypatch.setattr(install, "apply_patch_file", real)
        write_exit_head(artifact, WEIGHT, BIAS, W, b, key=key)  # someone else wins: sequence 1
        return real(*args, **kwargs)

    monkeypatch.setattr(install, "apply_patch_file", racing)
    W2, b2 = new_head(4)
    with pytest.raises(ExitTrainError, match="was patched while"):
        write_exit_head(artifact, WEIGHT, BIAS, W2, b2, key=key)
    assert read_state(artifact).sequence == 1 and np.array_equal(stored(artifact)[WEIGHT], W)


def test_device_key_is_created_once_private_and_reused(tmp_path):
    path = tmp_path / "keys" / "device.key"
    path.parent.mkdir()
    key = device_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(path.read_bytes()) == 32
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert device_key(path).public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)
    pem = tmp_path / "pem.key"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    assert device_key(pem).public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)


def test_stored_values_roundtrip_is_exact_for_float16():
    """write_exit_head re-lays out the other tensors from float32 read-backs: exact for fp16 too."""
    from device_runtime.weight_map import TensorEntry, WeightMap

    t = TensorEntry("w", (3, 2), "m.bin", 0, 12, "float16", "transpose", (2, 3), 64)
    wm = WeightMap("onnx", "m.onnx", ("m.onnx", "m.bin"), "0" * 64, (), (), (t,))
    raw = np.array([[1.0001, -65504.0, 3e-8], [0.1, 2.5, -0.3]], np.float16)
    values = stored_values(wm, {"m.bin": raw.tobytes()})
    assert stored_tensors(wm, values)["w"].tobytes() == raw.tobytes()
