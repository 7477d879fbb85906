"""`mntool keygen | certify | make-patch | generate | patch-weights | inspect`: thin click commands
over `mntool.patches` (cloud) and `device_runtime.patch` / `device_runtime.install` (device).
Format: docs/patch-format.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from device_runtime import patch as device_patch
from device_runtime import weight_map as wmap
from mntool.patches import DEFAULT_KEYLIST_TTL_S, DEFAULT_TTL_S

PATH = click.Path(path_type=Path)
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _echo_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2))


def _summary(patch: device_patch.Patch, path: Path) -> dict:
    return {"patch": str(path), **patch.to_dict()}


def days(seconds: float) -> str:
    """A default duration as the options show and take it ('7d')."""
    return f"{seconds / 86400:g}d"


def parse_duration(value: str) -> float:
    """'90' (seconds), '30m', '12h', '7d' -> seconds."""
    unit = value[-1:] if value[-1:] in DURATION_UNITS else "s"
    number = value[:-1] if value[-1:] in DURATION_UNITS else value
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration like 3600, 30m, 12h or 7d") from None
    if seconds <= 0:
        raise click.BadParameter(f"{value!r} must be positive")
    return seconds


def freshness_options(f):
    """The v2 options every patch-building verb takes."""
    f = click.option(
        "--ttl", default=days(DEFAULT_TTL_S), show_default=True, help="How long the patch stays valid (s/m/h/d)."
    )(f)
    f = click.option(
        "--sequence",
        type=click.IntRange(0),
        help="Sequence number (default: microseconds since the epoch, always increasing).",
    )(f)
    f = click.option("--device-id", help="Bind the patch to this device (default: any device).")(f)
    f = click.option(
        "--key-list",
        type=PATH,
        help="Key list (from mntool certify) that certifies the --sign key; ships inside the patch.",
    )(f)
    f = click.option("--sign", "sign_key", type=PATH, help="Sign with this Ed25519 private key (from mntool keygen).")(
        f
    )
    return f


def _signer(sign_key: Path | None, key_list: Path | None):
    if key_list is not None and sign_key is None:
        raise click.UsageError("--key-list certifies a signing key: give --sign too")
    if sign_key is None:
        return None
    from mntool.patches import load_signer

    return load_signer(sign_key, key_list)


def _write_patch(data: bytes, out: Path, as_json: bool, source: str) -> None:
    from device_runtime.install import write_atomic

    write_atomic(out, data)
    patch = device_patch.parse_patch(data)
    if as_json:
        _echo_json(_summary(patch, out))
    else:
        signed = "signed" if patch.signed else "unsigned"
        click.echo(
            f"wrote {out} ({len(data)} B, {len(patch.tensors)} tensors, {signed}, sequence "
            f"{patch.freshness.sequence}) from {source}"
        )


@click.command()
@click.option(
    "-o", "--out", "keybase", type=PATH, required=True, help="Key base name: writes KEYBASE.key and KEYBASE.pub."
)
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
def keygen(keybase: Path, as_json: bool) -> None:
    """Make an Ed25519 key pair for signing patches (an online key) or key lists (a root key).

    \b
    KEYBASE.key is the private key (PKCS#8 PEM, mode 0600). KEYBASE.pub is the public key (PEM).
    A root key stays offline: its .pub ships with the app (patch-weights --root-key) and its
    .key signs key lists (mntool certify). An online key signs patches on the server.
    Existing files are never overwritten.

    \b
    Examples:
      mntool keygen -o keys/root
      mntool keygen -o keys/online
    """
    from mntool.patches import keygen as make_keys

    pair = make_keys(keybase)
    if as_json:
        _echo_json({"private": str(pair.private), "public": str(pair.public)})
    else:
        click.echo(f"wrote {pair.private} (private, keep secret) and {pair.public} (public)")


@click.command()
@click.option(
    "--root", "root_key", type=PATH, required=True, help="The root private key (from mntool keygen) that devices trust."
)
@click.option(
    "--key",
    "keys",
    type=PATH,
    multiple=True,
    required=True,
    help="An online public key (.pub) allowed to sign patches; repeatable.",
)
@click.option("--revoke", type=PATH, multiple=True, help="A public key (.pub) to list as revoked; repeatable.")
@click.option(
    "--serial", type=click.IntRange(1), required=True, help="This list's serial: larger than every earlier list's."
)
@click.option(
    "--ttl", default=days(DEFAULT_KEYLIST_TTL_S), show_default=True, help="How long the list is valid (s/m/h/d)."
)
@click.option("--key-ttl", help="How long the listed keys may sign (default: the list's ttl).")
@click.option("-o", "--out", type=PATH, required=True, help="Where to write the key list (.mnkeys).")
@click.option("--json", "as_json", is_flag=True, help="Print the key list as JSON.")
def certify(
    root_key: Path,
    keys: tuple[Path, ...],
    revoke: tuple[Path, ...],
    serial: int,
    ttl: str,
    key_ttl: str | None,
    out: Path,
    as_json: bool,
) -> None:
    """Sign a key list: the online keys that ROOT lets sign patches.

    Devices ship only the root public key. Each patch carries the key list that certifies its
    signing key, so a leaked online key is replaced (a new list without it) or revoked (--revoke)
    with no app update; a device refuses a list whose serial is older than one it has seen.

    \b
    Example:
      mntool certify --root keys/root.key --key keys/online.pub --serial 1 -o keys/online.mnkeys
      mntool certify --root keys/root.key --key keys/online2.pub --revoke keys/online.pub --serial 2 -o keys/online2.mnkeys
    """
    from device_runtime.install import write_atomic
    from device_runtime.keys import parse_keylist
    from device_runtime.signing import load_public_key
    from mntool.patches import certify_keys, load_signing_key

    data = certify_keys(
        load_signing_key(root_key),
        [load_public_key(k) for k in keys],
        serial=serial,
        revoked=[load_public_key(k) for k in revoke],
        ttl_s=parse_duration(ttl),
        key_ttl_s=parse_duration(key_ttl) if key_ttl else None,
    )
    write_atomic(out, data)
    if as_json:
        _echo_json({"key_list": str(out), **parse_keylist(data).to_dict()})
    else:
        click.echo(f"wrote {out}: serial {serial}, {len(keys)} key(s) certified, {len(revoke)} revoked")


@click.command("make-patch")
@click.argument("artifact", type=PATH)
@click.option(
    "--params",
    "params_path",
    type=PATH,
    required=True,
    help="An .npz: one float array per adaptive parameter, keyed by its PyTorch name, in PyTorch shape.",
)
@freshness_options
@click.option("-o", "--out", type=PATH, required=True, help="Where to write the patch (.mnpatch).")
@click.option("--json", "as_json", is_flag=True, help="Print the patch header as JSON.")
def make_patch(
    artifact: Path,
    params_path: Path,
    sign_key: Path | None,
    key_list: Path | None,
    device_id: str | None,
    sequence: int | None,
    ttl: str,
    out: Path,
    as_json: bool,
) -> None:
    """Build a patch for ARTIFACT from explicit parameters.

    The parameters are cast and transposed here to exactly the bytes the artifact stores; the
    device only verifies and copies them.

    \b
    Example:
      mntool make-patch artifacts/model.tflite --params params.npz --sign keys/online.key \\
          --key-list keys/online.mnkeys --device-id phone-17 -o p.mnpatch
    """
    from mntool.patches import build_patch, load_params

    signer = _signer(sign_key, key_list)
    data = build_patch(
        artifact, load_params(params_path), signer, device_id=device_id, sequence=sequence, ttl_s=parse_duration(ttl)
    )
    _write_patch(data, out, as_json, str(params_path))


@click.command()
@click.argument("checkpoint", type=PATH)
@click.argument("artifact", type=PATH)
@click.option(
    "--samples",
    "samples_path",
    type=PATH,
    required=True,
    help='The device\'s upload: JSON {"items": [ids, most recent last]} or, for an image model, '
    '{"images": [K images of 28 rows of 28 pixels 0..255]}; or an .npz with key "items" or "images".',
)
@freshness_options
@click.option("-o", "--out", type=PATH, required=True, help="Where to write the patch (.mnpatch).")
@click.option("--json", "as_json", is_flag=True, help="Print the patch header as JSON.")
def generate(
    checkpoint: Path,
    artifact: Path,
    samples_path: Path,
    sign_key: Path | None,
    key_list: Path | None,
    device_id: str | None,
    sequence: int | None,
    ttl: str,
    out: Path,
    as_json: bool,
) -> None:
    """Build a patch for ARTIFACT from a device's recent samples (MetaNetwork, or another method
    that personalises from an unlabelled upload).

    CHECKPOINT maps the upload (recent item ids in the checkpoint's item space, or an image
    model's unlabelled images) to the parameters of the adaptive layers, which are laid out as
    ARTIFACT stores them.

    \b
    Examples:
      mntool generate runs/sasrec artifacts/model.tflite --samples recent.json -o p.mnpatch
      mntool generate runs/lenet-mn artifacts/lenet/model.tflite --samples upload.npz -o p.mnpatch
      mntool generate runs/lenet-exits-mn artifacts/model.tflite.stages --samples upload.npz -o p.mnpatch
          # a staged (early-exit) artifact: p.stage0.mnpatch, p.stage1.mnpatch, ... (patch-weights each stage)
    """
    from device_runtime.staged import is_staged
    from mntool.patches import generate_patch, generate_staged_patches, load_recent

    signer = _signer(sign_key, key_list)
    recent = load_recent(samples_path)
    source = f"{len(recent)} recent {'images' if recent.ndim == 3 else 'items'}"
    freshness = dict(device_id=device_id, sequence=sequence, ttl_s=parse_duration(ttl))
    if is_staged(artifact):  # an early-exit artifact: one patch per stage, OUT.stage<k><suffix>
        patches = generate_staged_patches(checkpoint, artifact, recent, signer, **freshness)
        for k, data in patches.items():
            _write_patch(data, out.with_name(f"{out.stem}.stage{k}{out.suffix}"), as_json, f"{source}, stage {k}")
        return
    _write_patch(generate_patch(checkpoint, artifact, recent, signer, **freshness), out, as_json, source)


@click.command("patch-weights")
@click.argument("artifact", type=PATH)
@click.argument("patch", type=PATH)
@click.option("-o", "--out", type=PATH, help="Write a patched copy here (same kind as ARTIFACT, plus its weight map).")
@click.option(
    "--in-place", is_flag=True, help="Patch ARTIFACT itself (crash-safe A/B slots; records the patch's sequence)."
)
@click.option("--root-key", type=PATH, help="Trust online keys that this root public key certifies (patch format v2).")
@click.option("--verify-key", type=PATH, help="Trust this Ed25519 public key directly.")
@click.option("--device-id", help="This device's id (needed for patches bound to a device).")
@click.option("--allow-unsigned", is_flag=True, help="With a key, still accept unsigned patches.")
@click.option("--allow-v1", is_flag=True, help="Accept format-v1 patches (no expiry, sequence or device binding).")
@click.option("--json", "as_json", is_flag=True, help="Print what was applied as JSON.")
def patch_weights(
    artifact: Path,
    patch: Path,
    out: Path | None,
    in_place: bool,
    root_key: Path | None,
    verify_key: Path | None,
    device_id: str | None,
    allow_unsigned: bool,
    allow_v1: bool,
    as_json: bool,
) -> None:
    """Verify PATCH and write it into the compiled model ARTIFACT.

    Every check (format, hashes, signature and key list, expiry, device, sequence, fingerprint
    of ARTIFACT, destinations, finite values) passes before any byte is written; on error
    ARTIFACT is unchanged. Giving a key means a signature is required.

    \b
    Examples:
      mntool patch-weights artifacts/model.tflite p.mnpatch -o patched.tflite
      mntool patch-weights artifacts/model.onnx p.mnpatch --in-place --root-key keys/root.pub --device-id phone-17
    """
    from device_runtime.install import apply_patch_file
    from device_runtime.signing import load_public_key

    if (out is None) == (not in_place):
        raise click.UsageError("give exactly one of -o OUT and --in-place")
    policy = device_patch.TrustPolicy(
        verify_key=load_public_key(verify_key) if verify_key else None,
        root_key=load_public_key(root_key) if root_key else None,
        device_id=device_id,
        allow_unsigned=allow_unsigned,
        allow_v1=allow_v1,
    )
    applied = apply_patch_file(artifact, patch, out=out, policy=policy)
    target = artifact if out is None else out
    verified = applied.signed and policy.keyed
    signature = "signature verified" if verified else "signed, not verified" if applied.signed else "unsigned"
    if as_json:
        _echo_json(
            {
                "artifact": str(target),
                "in_place": out is None,
                "signature_verified": verified,
                **_summary(applied, patch),
            }
        )
    else:
        where = "in place" if out is None else f"to {out}"
        click.echo(
            f"patched {artifact} {where}: {len(applied.tensors)} tensors, {len(applied.payload)} B ({signature})"
        )


@click.command()
@click.argument("path", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Show an artifact's weight map or a patch's header.

    \b
    Examples:
      mntool inspect artifacts/model.tflite
      mntool inspect p.mnpatch --json
    """
    data = path.read_bytes() if path.is_file() else b""
    if data.startswith(device_patch.MAGIC):
        info = device_patch.parse_patch(data).to_dict()
        rows = [
            (t["name"], t["dtype"], t["stored_shape"], t["layout"], t["file"], t["offset"], t["nbytes"])
            for t in info["tensors"]
        ]
        head = [
            f"patch {path}: v{info['version']} for a {info['target']} artifact, "
            f"{'signed' if info['signed'] else 'unsigned'}, {info['total_bytes']} B",
            f"  base fingerprint {info['fingerprint']}",
            f"  payload {info['payload_bytes']} B, {info['payload_hash']}",
        ]
        if info["version"] >= 2:
            head.append(
                f"  sequence {info['sequence']}, issued {info['issued_at']}, expires {info['expires_at']}, "
                f"device {info['device'] or 'any'}"
            )
            if info["signing_key"]:
                serial = f"key list serial {info['keylist']['serial']}" if info["keylist"] else "no key list"
                head.append(f"  signing key {info['signing_key']} ({serial})")
    else:
        wm = wmap.load(path)
        info = wm.to_dict()
        rows = [(t.name, t.dtype, list(t.stored_shape), t.layout, t.file, t.offset, t.nbytes) for t in wm.tensors]
        head = [
            f"artifact {path}: {wm.target}, {len(wm.files)} files, {len(wm.tensors)} adaptive tensors",
            f"  fingerprint {wm.fingerprint} (matches the files)",
        ]
    if as_json:
        _echo_json(info)
        return
    click.echo("\n".join(head))
    table = [("tensor", "dtype", "stored shape", "layout", "file", "offset", "bytes")] + [
        tuple(map(str, r)) for r in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
