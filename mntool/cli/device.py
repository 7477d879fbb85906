"""`mntool device setup | status`: the emulated devices this host can run models on
(`device_runtime.qemu`: arm64 under QEMU user mode, with an instruction-count plugin)."""

from __future__ import annotations

import json
import time

import click

from device_runtime.qemu import DEVICES


@click.group()
def device() -> None:
    """Set up and inspect emulated devices (qemu-arm64: LiteRT/ONNX Runtime on arm64 under QEMU).

    \b
    Examples:
      mntool device setup qemu-arm64
      mntool device status --json
      mntool bench artifacts/model.tflite --device qemu-arm64
    """


@device.command()
@click.argument("name", type=click.Choice(list(DEVICES)))
@click.option("--no-apt", is_flag=True, help="Never run apt-get; fail with the command to run instead.")
def setup(name: str, no_apt: bool) -> None:
    """Set up device NAME, cached (idempotent: a second run only checks).

    Installs qemu-user and mmdebstrap with apt-get when missing (as root), unpacks an arm64
    Debian userland with Python 3.11, installs the pinned aarch64 wheels with this Python's pip,
    writes an ARM /proc/cpuinfo and compiles the instruction-count plugin. Cache:
    $MNTOOL_DEVICE_DIR, else ~/.cache/mntool/devices.
    """
    from device_runtime import qemu

    t0 = time.perf_counter()
    lay = qemu.setup(log=lambda s: click.echo(s, err=True), allow_apt=not no_apt)
    click.echo(f"{name} ready in {lay.home} ({time.perf_counter() - t0:.1f} s)")


@device.command()
@click.argument("name", type=click.Choice(list(DEVICES)), default=DEVICES[0])
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(name: str, as_json: bool) -> None:
    """What device NAME has set up and what is missing."""
    from device_runtime import qemu

    s = qemu.status()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"{name}: {'ready' if s['ready'] else 'NOT ready'} ({s['home']})")
    click.echo(f"  qemu-aarch64  {s['qemu'] or 'missing'} (-cpu {s['cpu']})")
    u = s["userland"]
    userland = f"Debian {u['suite']}, {u['python']} ({u['path']})" if u else "missing"
    click.echo(f"  userland      {userland}")
    wheels = ", ".join(f"{k} {v}" for k, v in s["wheels"].items() if k in s["required"])
    click.echo(f"  wheels        {wheels or 'missing'}")
    click.echo(f"  plugin        {s['plugin']['path'] if s['plugin'] else 'missing'}")
    for m in s["missing"]:
        click.echo(f"  missing       {m}")
