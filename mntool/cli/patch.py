"""`mntool keygen | make-patch | generate | patch-weights | inspect`: thin click commands over
`mntool.patches` (cloud) and `device_runtime.patch` (device). Format: docs/patch-format.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from device_runtime import patch as device_patch
from device_runtime import weight_map as wmap

PATH = click.Path(path_type=Path)


def _echo_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2))


def _summary(patch: device_patch.Patch, path: Path) -> dict:
    return {"patch": str(path), **patch.to_dict()}


def _write_patch(data: bytes, out: Path, as_json: bool, source: str) -> None:
    device_patch.write_atomic(out, data)
    patch = device_patch.parse_patch(data)
    if as_json:
        _echo_json(_summary(patch, out))
    else:
        signed = "signed" if patch.signed else "unsigned"
        click.echo(f"wrote {out} ({len(data)} B, {len(patch.tensors)} tensors, {signed}) from {source}")


@click.command()
@click.option("-o", "--out", "keybase", type=PATH, required=True, help="Key base name: writes KEYBASE.key and KEYBASE.pub.")
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
def keygen(keybase: Path, as_json: bool) -> None:
    """Make an Ed25519 key pair for signing patches.

    \b
    KEYBASE.key is the private key (PKCS#8 PEM, mode 0600): keep it on the server, pass it to
    make-patch/generate --sign. KEYBASE.pub is the public key (PEM): ship it with the app and
    pass it to patch-weights --verify-key. Existing files are never overwritten.

    \b
    Example:
      mntool keygen -o keys/cloud
    """
    from mntool.patches import keygen as make_keys

    pair = make_keys(keybase)
    if as_json:
        _echo_json({"private": str(pair.private), "public": str(pair.public)})
    else:
        click.echo(f"wrote {pair.private} (private, keep secret) and {pair.public} (public)")


@click.command("make-patch")
@click.argument("artifact", type=PATH)
@click.option("--params", "params_path", type=PATH, required=True,
              help="An .npz: one float array per adaptive parameter, keyed by its PyTorch name, in PyTorch shape.")
@click.option("--sign", "sign_key", type=PATH, help="Sign with this Ed25519 private key (from mntool keygen).")
@click.option("-o", "--out", type=PATH, required=True, help="Where to write the patch (.mnpatch).")
@click.option("--json", "as_json", is_flag=True, help="Print the patch header as JSON.")
def make_patch(artifact: Path, params_path: Path, sign_key: Path | None, out: Path, as_json: bool) -> None:
    """Build a patch for ARTIFACT from explicit parameters.

    The parameters are cast and transposed here to exactly the bytes the artifact stores; the
    device only verifies and copies them.

    \b
    Example:
      mntool make-patch artifacts/model.tflite --params params.npz --sign keys/cloud.key -o p.mnpatch
    """
    from mntool.patches import build_patch, load_params, load_signing_key

    key = load_signing_key(sign_key) if sign_key else None
    data = build_patch(artifact, load_params(params_path), key)
    _write_patch(data, out, as_json, str(params_path))


@click.command()
@click.argument("checkpoint", type=PATH)
@click.argument("artifact", type=PATH)
@click.option("--samples", "samples_path", type=PATH, required=True,
              help='The device\'s recent items: JSON {"items": [ids, most recent last]} or an .npz with key "items".')
@click.option("--sign", "sign_key", type=PATH, help="Sign with this Ed25519 private key (from mntool keygen).")
@click.option("-o", "--out", type=PATH, required=True, help="Where to write the patch (.mnpatch).")
@click.option("--json", "as_json", is_flag=True, help="Print the patch header as JSON.")
def generate(checkpoint: Path, artifact: Path, samples_path: Path, sign_key: Path | None, out: Path, as_json: bool) -> None:
    """Build a patch for ARTIFACT from a device's recent samples (MetaNetwork).

    The generator in CHECKPOINT maps the recent item ids (in the checkpoint's item space) to the
    parameters of the adaptive layers, which are laid out as ARTIFACT stores them.

    \b
    Example:
      mntool generate runs/sasrec artifacts/model.tflite --samples recent.json -o p.mnpatch
    """
    from mntool.patches import generate_patch, load_recent, load_signing_key

    key = load_signing_key(sign_key) if sign_key else None
    recent = load_recent(samples_path)
    data = generate_patch(checkpoint, artifact, recent, key)
    _write_patch(data, out, as_json, f"{len(recent)} recent items")


@click.command("patch-weights")
@click.argument("artifact", type=PATH)
@click.argument("patch", type=PATH)
@click.option("-o", "--out", type=PATH, help="Write a patched copy here (same kind as ARTIFACT, plus its weight map).")
@click.option("--in-place", is_flag=True, help="Patch ARTIFACT itself (crash-safe: temporary file, fsync, atomic rename).")
@click.option("--verify-key", type=PATH, help="Check the patch's signature with this Ed25519 public key.")
@click.option("--require-signature", is_flag=True, help="Reject patches that are unsigned (needs --verify-key).")
@click.option("--json", "as_json", is_flag=True, help="Print what was applied as JSON.")
def patch_weights(
    artifact: Path, patch: Path, out: Path | None, in_place: bool, verify_key: Path | None,
    require_signature: bool, as_json: bool,
) -> None:
    """Verify PATCH and write it into the compiled model ARTIFACT.

    Every check (format, hashes, signature, fingerprint of ARTIFACT, destinations, finite
    values) passes before any byte is written; on error ARTIFACT is unchanged.

    \b
    Examples:
      mntool patch-weights artifacts/model.tflite p.mnpatch -o patched.tflite
      mntool patch-weights artifacts/model.onnx p.mnpatch --in-place --verify-key keys/cloud.pub --require-signature
    """
    if (out is None) == (not in_place):
        raise click.UsageError("give exactly one of -o OUT and --in-place")
    key = None
    if verify_key is not None:
        from device_runtime.signing import load_public_key

        key = load_public_key(verify_key)
    applied = device_patch.apply_patch_file(
        artifact, patch, out=out, verify_key=key, require_signature=require_signature
    )
    target = artifact if out is None else out
    signature = "signature verified" if applied.signed and key else "signed, not verified" if applied.signed else "unsigned"
    if as_json:
        _echo_json({"artifact": str(target), "in_place": out is None, "signature_verified": bool(applied.signed and key),
                    **_summary(applied, patch)})
    else:
        where = "in place" if out is None else f"to {out}"
        click.echo(f"patched {artifact} {where}: {len(applied.tensors)} tensors, {len(applied.payload)} B ({signature})")


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
        rows = [(t["name"], t["dtype"], t["stored_shape"], t["layout"], t["file"], t["offset"], t["nbytes"]) for t in info["tensors"]]
        head = [f"patch {path}: v{info['version']} for a {info['target']} artifact, "
                f"{'signed' if info['signed'] else 'unsigned'}, {info['total_bytes']} B",
                f"  base fingerprint {info['fingerprint']}", f"  payload {info['payload_bytes']} B, sha256 {info['payload_sha256']}"]
    else:
        wm = wmap.load(path)
        info = wm.to_dict()
        rows = [(t.name, t.dtype, list(t.stored_shape), t.layout, t.file, t.offset, t.nbytes) for t in wm.tensors]
        head = [f"artifact {path}: {wm.target}, {len(wm.files)} files, {len(wm.tensors)} adaptive tensors",
                f"  fingerprint {wm.fingerprint} (matches the files)"]
    if as_json:
        _echo_json(info)
        return
    click.echo("\n".join(head))
    table = [("tensor", "dtype", "stored shape", "layout", "file", "offset", "bytes")] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())

