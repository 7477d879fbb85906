"""On-device personalisation of early exits (PersEPhonEE, Leontiadis et al., HotMobile 2021): fit
an exit's linear classifier on the embeddings the compiled stages output, then write it into the
stage artifact as a locally built, locally signed patch. Numpy only (plus `cryptography`, imported
when a head is written, to sign); never torch.

Exit k's classifier is `logits = embedding @ W.T + b`, with `W` (C, D) and `b` (C,) adaptive tensors
of the stage artifact that computes exit k (`mntool.vision.exits`). The device trains only those
heads, semi-supervised: cross-entropy on the few rows the user labelled, plus rows the final exit
labels itself with a maximum softmax probability above a threshold (pseudo-labels, down-weighted),
and an L2 pull toward the head the cloud shipped, so a handful of labels moves the head a little
and no data moves it not at all.

    labels, mask = pseudo_labels(final_logits, threshold=0.9)
    W, b, stats = train_exit_head(W0, b0, embeddings, labels_or_minus_1, final_logits, ExitTrainConfig())
    write_exit_head(stage0, "exits.0.linear.weight", "exits.0.linear.bias", W, b, key=device_key(path))

Writing goes through the same verify-then-write, A/B-slot path as a cloud patch
(`device_runtime.install.apply_patch_file`); `write_exit_head` says how the device's own key and
the device's sequence state are used.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_runtime import weight_map as wmap
from device_runtime.errors import MntoolError
from device_runtime.exit_policy import confidence
from device_runtime.layout import NUMPY_DTYPES, stored_tensors, stored_values

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_runtime.patch import Patch

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LOCAL_TTL_S = 300  # a local patch is applied the moment it is built; it need not outlive a clock hiccup
ADAM_MACS_PER_PARAM = 8  # the elementwise work of one Adam update per parameter, counted as MACs


class ExitTrainError(MntoolError):
    """Bad training inputs or config, or an exit head that cannot be written into its artifact."""


@dataclass(frozen=True)
class ExitTrainConfig:
    """How an exit head is trained on the device (full batch, Adam, deterministic).

    Defaults suit embeddings of a few hundred to a few thousand non-negative pooled activations
    (the LeNet / MobileNet exits' 256-1568 dims) and tens to hundreds of rows: 100 Adam steps of
    1e-3 move each weight by at most ~0.1, enough to re-rank classes, not to forget the cloud's
    head; the L2 pull keeps what the few rows do not speak to where the cloud put it.
    """

    steps: int = 100  # full-batch Adam steps (0: return the initial head)
    lr: float = 1e-3  # Adam step size
    l2: float = 1e-2  # coefficient of 0.5 * ||(W, b) - (W0, b0)||^2, added to the mean cross-entropy
    threshold: float = 0.9  # a row is pseudo-labelled when the final exit's max softmax is ABOVE this (1.0: never)
    pseudo_weight: float = 0.5  # weight of a pseudo-labelled row in the cross-entropy (a labelled row weighs 1)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 0:
            raise ExitTrainError(f"steps must be an integer >= 0, got {self.steps!r}")
        for name, low, high, low_open in (
            ("lr", 0.0, math.inf, True),
            ("l2", 0.0, math.inf, False),
            ("threshold", 0.0, 1.0, False),
            ("pseudo_weight", 0.0, math.inf, False),
        ):
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)
            if not ok or value < low or value > high or (low_open and value == low):
                bounds = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
                raise ExitTrainError(f"{name} must be a finite number in {bounds}, got {value!r}")


@dataclass(frozen=True)
class ExitTrainStats:
    """What one `train_exit_head` call used and spent."""

    labelled: int  # rows with a user label
    pseudo: int  # unlabelled rows given the final exit's label (above the threshold)
    steps: int  # Adam steps taken (0 when no row was used)
    initial_loss: float  # objective at (W0, b0): weighted mean cross-entropy (+ the L2 term, 0 there)
    final_loss: float  # objective at the returned head; 0.0 for both when no row was used
    wall_ms: float  # wall-clock time of the call
    macs: int  # multiply-accumulates spent (matmuls + Adam's elementwise work): a device-independent cost

    def to_dict(self) -> dict:
        return asdict(self)


def _matrix(name: str, value, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.ndim != ndim:
        raise ExitTrainError(f"{name} must be a {ndim}-D real array, got {arr.dtype} {arr.shape}")
    if not np.isfinite(arr).all():
        raise ExitTrainError(f"{name} holds NaN or Inf")
    return arr


def pseudo_labels(final_logits, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int64, mask (N,) bool) from the final exit's logits (N, C): each row's argmax,
    and whether its maximum softmax probability is strictly above `threshold` (so 1.0 marks none)."""
    logits = _matrix("final_logits", final_logits, 2)
    if not (isinstance(threshold, (int, float, np.floating)) and 0.0 <= threshold <= 1.0):
        raise ExitTrainError(f"threshold must be in [0, 1], got {threshold!r}")
    if logits.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return logits.argmax(axis=1).astype(np.int64), confidence(logits) > threshold


def train_exit_head(
    W0,
    b0,
    embeddings,
    labels,
    final_logits=None,
    config: ExitTrainConfig = ExitTrainConfig(),
) -> tuple[np.ndarray, np.ndarray, ExitTrainStats]:
    """Fit exit head (W, b) on `embeddings` (N, D) by multinomial logistic regression from (W0, b0).

    Rows used: those with `labels[i] >= 0` (weight 1; `labels` (N,) ints, -1 = unlabelled, or None:
    all unlabelled) and unlabelled rows whose `final_logits` (N, C) max softmax is above
    `config.threshold`, labelled with the final exit's argmax (weight `config.pseudo_weight`).
    Objective: the weighted mean cross-entropy over those rows + 0.5 * l2 * ||(W, b) - (W0, b0)||^2,
    minimised by `config.steps` full-batch Adam steps (betas 0.9/0.999, eps 1e-8, step `config.lr`,
    bias-corrected), float32 arithmetic: deterministic for the same inputs on the same machine. With
    no row used (no labels, nothing confident) it returns copies of (W0, b0) unchanged without a
    step. Returns float32 (W (C, D), b (C,), ExitTrainStats).
    """
    t0 = time.perf_counter()
    if not isinstance(config, ExitTrainConfig):
        raise ExitTrainError(f"config must be an ExitTrainConfig, got {type(config).__name__}")
    W0 = _matrix("W0", W0, 2).astype(np.float32)
    b0 = _matrix("b0", b0, 1).astype(np.float32)
    x = _matrix("embeddings", embeddings, 2).astype(np.float32)
    n_classes, dim = W0.shape
    n = x.shape[0]
    if b0.shape != (n_classes,) or x.shape[1] != dim:
        raise ExitTrainError(
            f"shapes disagree: W0 {W0.shape} (classes, dims), b0 {b0.shape}, embeddings {x.shape} (rows, dims)"
        )
    if labels is None:
        y = np.full(n, -1, np.int64)
    else:
        y = np.asarray(labels)
        if y.dtype.kind not in "iu" or y.shape != (n,):
            raise ExitTrainError(f"labels must be ({n},) integers (-1 = unlabelled), got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
        if ((y < -1) | (y >= n_classes)).any():
            raise ExitTrainError(f"labels must lie in [-1, {n_classes}), got {y.min()}..{y.max()}")
    weights = (y >= 0).astype(np.float32)
    n_labelled = int(weights.sum())
    n_pseudo = 0
    if final_logits is not None:
        fl = _matrix("final_logits", final_logits, 2)
        if fl.shape != (n, n_classes):
            raise ExitTrainError(f"final_logits must be ({n}, {n_classes}), got {fl.shape}")
        guess, confident = pseudo_labels(fl, config.threshold)
        take = confident & (y < 0) & (config.pseudo_weight > 0)
        y = np.where(take, guess, y)
        weights[take] = config.pseudo_weight
        n_pseudo = int(take.sum())

    rows = np.flatnonzero(weights > 0)
    if rows.size == 0:
        return W0.copy(), b0.copy(), ExitTrainStats(n_labelled, n_pseudo, 0, 0.0, 0.0, _ms(t0), 0)
    x, y, w = x[rows], y[rows], weights[rows] / weights[rows].sum()  # weighted mean: w sums to 1
    m = rows.size
    forward_macs = m * dim * n_classes
    initial = _objective(W0, b0, W0, b0, x, y, w, config.l2)
    if config.steps == 0:
        return W0.copy(), b0.copy(), ExitTrainStats(n_labelled, n_pseudo, 0, initial, initial, _ms(t0), forward_macs)

    # the bias as a last weight column over a constant-1 feature: one matmul, one Adam update per step
    xa = np.ones((m, dim + 1), np.float32)
    xa[:, :dim] = x
    theta0 = np.concatenate([W0, b0[:, None]], axis=1)
    theta = theta0.copy()
    target = np.zeros((m, n_classes), np.float32)
    target[np.arange(m), y] = 1.0
    wcol = w[:, None].astype(np.float32)
    grad, mom, vel, tmp = (np.zeros_like(theta) for _ in range(4))
    beta1, beta2 = ADAM_BETAS
    l2 = np.float32(config.l2)
    for step in range(1, config.steps + 1):
        z = xa @ theta.T  # (m, C) logits
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        z -= target
        z *= wcol  # d(weighted mean cross-entropy) / d logits
        np.matmul(z.T, xa, out=grad)
        np.subtract(theta, theta0, out=tmp)
        tmp *= l2
        grad += tmp
        mom *= beta1
        np.multiply(grad, np.float32(1 - beta1), out=tmp)
        mom += tmp
        vel *= beta2
        np.multiply(grad, grad, out=tmp)
        tmp *= np.float32(1 - beta2)
        vel += tmp
        np.sqrt(vel, out=tmp)
        tmp += np.float32(ADAM_EPS)
        np.divide(mom, tmp, out=tmp)
        tmp *= np.float32(config.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step))
        theta -= tmp
    W, b = np.ascontiguousarray(theta[:, :dim]), theta[:, dim].copy()
    final = _objective(W, b, W0, b0, x, y, w, config.l2)
    # per step: the forward matmul and the weight gradient's (m x D x C each), then Adam's update;
    # plus the two objective evaluations reported
    macs = config.steps * (2 * forward_macs + ADAM_MACS_PER_PARAM * (W.size + b.size)) + 2 * forward_macs
    return W, b, ExitTrainStats(n_labelled, n_pseudo, config.steps, initial, final, _ms(t0), int(macs))


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _objective(W, b, W0, b0, x, y, w, l2: float) -> float:
    """Weighted mean cross-entropy (w sums to 1) + 0.5 * l2 * ||(W, b) - (W0, b0)||^2, in float64."""
    z = (x @ W.T + b).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_p = z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))
    pull = float(((W - W0).astype(np.float64) ** 2).sum() + ((b - b0).astype(np.float64) ** 2).sum())
    return float(-(w.astype(np.float64) * log_p).sum() + 0.5 * l2 * pull)


# ---- writing a trained head into a compiled stage -------------------------------------------------
def device_key(path: Path | str) -> Ed25519PrivateKey:
    """The device's own Ed25519 signing key at `path`, created on first use (a raw 32-byte seed,
    mode 0600, created exclusively, so two processes cannot both create one); it never leaves
    the device and signs only the patches the device builds for its own artifacts."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return _private_key(path)
    except OSError as err:
        raise ExitTrainError(f"cannot create device key {path}: {err.strerror}") from None
    seed = os.urandom(32)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(seed)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise ExitTrainError(f"cannot write device key {path}: {err.strerror}") from None
    return Ed25519PrivateKey.from_private_bytes(seed)


def _private_key(key) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, a raw 32-byte seed, or a file holding a seed or
    an unencrypted PKCS#8 PEM (what `mntool keygen` writes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, (bytes, bytearray)):
        if len(key) != 32:
            raise ExitTrainError(f"a raw device key is a 32-byte Ed25519 seed, got {len(key)} bytes")
        return Ed25519PrivateKey.from_private_bytes(bytes(key))
    if isinstance(key, (str, Path)):
        from device_runtime.signing import SigningKeyError, load_private_key

        try:
            return load_private_key(Path(key))
        except SigningKeyError as err:
            raise ExitTrainError(str(err)) from None
    raise ExitTrainError(f"key must be an Ed25519 private key, a 32-byte seed or a key file, got {type(key).__name__}")


def _check_head(entry: wmap.TensorEntry, value, what: str) -> np.ndarray:
    """`value` as float array of `entry`'s PyTorch shape, finite and representable in its dtype."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise ExitTrainError(f"{what} {entry.name}: dtype {arr.dtype} is not a real number type")
    if arr.shape != tuple(entry.shape):
        raise ExitTrainError(f"{what} {entry.name}: shape {arr.shape}, the artifact stores {tuple(entry.shape)}")
    if not np.isfinite(arr).all():
        raise ExitTrainError(f"{what} {entry.name}: holds NaN or Inf")
    limit = float(np.finfo(NUMPY_DTYPES[entry.dtype]).max)
    big = float(np.abs(arr).max()) if arr.size else 0.0
    with np.errstate(over="ignore"):
        if not np.isfinite(arr.astype(NUMPY_DTYPES[entry.dtype])).all():
            raise ExitTrainError(
                f"{what} {entry.name}: |value| up to {big:.4g} overflows the artifact's {entry.dtype} (max {limit:.4g})"
            )
    return arr.astype(np.float64)


def write_exit_head(
    artifact: Path | str,
    weight_name: str,
    bias_name: str,
    W,
    b,
    *,
    key: Ed25519PrivateKey | bytes | Path | str,
    device_id: str | None = None,
    ttl_s: int = LOCAL_TTL_S,
    check_artifact: bool = True,
) -> Patch:
    """Write exit head (W (C, D), b (C,)) into ONE compiled stage `artifact` (its path: a .tflite,
    .onnx or .mlpackage with its weight-map sidecar) in place, as a patch built and signed on the
    device and applied exactly as a cloud patch is; returns the verified, applied patch.

    1. Checks first, nothing written on failure (the artifact stays byte-identical): both names
       are adaptive tensors of this artifact's weight map; W and b have their PyTorch shapes, are
       finite, and fit the stored dtype (a float16 artifact refuses |values| > 65504).
    2. The patch carries every adaptive tensor (the format requires it): W and b, and every other
       adaptive tensor's current value read back from the artifact (`layout.stored_values`,
       exact: float32 and float16 both survive the round trip), laid out by `layout.stored_tensors`.
    3. It is packed (`patch.pack_patch`), signed with the device's own Ed25519 `key` (see
       `device_key`), and applied by `install.apply_patch_file` in place: the same verification
       (signature, payload hash, fingerprint, destinations, finite values, expiry, device,
       sequence) and the same crash-safe A/B-slot switch as `mntool patch-weights --in-place`.

    Trust: the local patch is verified with a policy that trusts the device key directly
    (`TrustPolicy(verify_key=<device public key>)`), used for this call only. The device's policy
    for cloud patches (root key / server key) is untouched and never learns the device key, so a
    leaked device key cannot forge cloud patches, and a cloud key list need not certify it. The
    patch is bound to this artifact (fingerprint), to `device_id` if given (else to any device:
    it is never sent anywhere), and expires `ttl_s` seconds after it is built.

    Sequence: the install path records per artifact the last applied sequence in the active slot's
    name (`install.read_state`); the local patch takes exactly that + 1. Cloud sequences are
    microseconds since the epoch (`mntool.patches.next_sequence`), so a local write consumes one
    microsecond of their space: any cloud patch built after the last one applied (more than a few
    microseconds later) is still newer and is accepted, including one built before this write but
    delivered after it (a cloud patch carries every adaptive tensor, so it then replaces the
    trained head with the cloud's: retrain from the new head). A cloud that numbers patches with
    explicit consecutive integers (`make-patch --sequence`) must leave gaps for local writes. The
    state read and the apply are not under one lock; if another patch lands in between, the apply
    refuses this one as a replay (it would have rewritten that patch's other tensors with stale
    values) and ExitTrainError says so: train again from the new head.
    """
    from device_runtime.install import apply_patch_file, read_state
    from device_runtime.patch import ANY_DEVICE, Freshness, PatchError, Signer, TrustPolicy, device_hash, pack_patch

    artifact = Path(artifact)
    if weight_name == bias_name:
        raise ExitTrainError(f"weight and bias must be two tensors, both named {weight_name!r}")
    if not isinstance(ttl_s, (int, np.integer)) or ttl_s < 1:
        raise ExitTrainError(f"ttl_s must be a whole number of seconds >= 1, got {ttl_s!r}")
    wm = wmap.load(artifact, check_fingerprint=False)
    entries = {t.name: t for t in wm.tensors}
    for name in (weight_name, bias_name):
        if name not in entries:
            raise ExitTrainError(f"{artifact.name} has no adaptive tensor {name!r} (it has {wm.adaptive_names})")
    new = {
        weight_name: _check_head(entries[weight_name], W, "weight"),
        bias_name: _check_head(entries[bias_name], b, "bias"),
    }
    signing_key = _private_key(key)
    from cryptography.hazmat.primitives import serialization

    public = signing_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    state = read_state(artifact)
    current = stored_values(wm, wmap.read_artifact_files(artifact, sorted({t.file for t in wm.tensors})))
    stored = stored_tensors(wm, {**current, **new})  # checks every tensor again (shape, finite, overflow)
    now = int(time.time())
    freshness = Freshness(
        sequence=state.sequence + 1,
        issued_at=now,
        expires_at=now + int(ttl_s),
        device=ANY_DEVICE if device_id is None else device_hash(device_id),
    )
    data = pack_patch(wm, stored, freshness, Signer(sign=signing_key.sign, public=public))
    policy = TrustPolicy(verify_key=public, device_id=device_id)
    try:
        return apply_patch_file(artifact, data, policy=policy, weight_map=wm, check_artifact=check_artifact)
    except PatchError as err:
        latest = read_state(artifact)
        if latest.sequence != state.sequence:
            raise ExitTrainError(
                f"{artifact.name} was patched while the exit head was written (sequence {state.sequence} -> "
                f"{latest.sequence}); nothing was written: train again from its new head"
            ) from None
        raise ExitTrainError(f"cannot write the exit head into {artifact.name}: {err}") from None
