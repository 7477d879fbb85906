"""An emulated arm64 device on this x86 host: the same device_runtime runners, run by an arm64
Python under QEMU user mode, with an instruction-count TCG plugin.

`setup()` builds, once and cached (`$MNTOOL_DEVICE_DIR`, else `~/.cache/mntool/devices`, then
`qemu-arm64/`): an arm64 Debian userland with Python 3.11 (mmdebstrap, unpacked only), the
pinned aarch64 wheels of the runtimes (installed by the host's pip for the aarch64 platform), an
ARM /proc/cpuinfo (ONNX Runtime's CPU detection crashes on the host's x86 one), and the plugin
compiled from `device_runtime/qemu_plugin/insn.c`. `device_runtime` itself is copied alone (no
mntool, no exporters, no torch) into the device folder before every guest run, so the guest
always runs the checked-out code. `run_artifact()` and `bench()` run `device_runtime.qemu_guest`
under `qemu-aarch64 -cpu cortex-a76`. See docs/benchmarking.md, "Emulated arm64".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from device_runtime.errors import MntoolError

DEVICE = "qemu-arm64"
DEVICES = (DEVICE,)
DIR_ENV = "MNTOOL_DEVICE_DIR"
CPU = "cortex-a76"  # pinned: `-cpu max` enables SVE/SME and changes which kernels run
SUITE = "bookworm"  # Debian 12: python3.11, the Python the wheels below are built for
PYTHON = "python3.11"
PACKAGES = ("python3.11", "libstdc++6", "libgcc-s1", "libgomp1")
APT_PACKAGES = ("qemu-user", "mmdebstrap")  # the dynamic qemu-aarch64: qemu-user-static has no plugins
APT_COMMAND = "apt-get update && apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
PLATFORMS = (
    "manylinux_2_36_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_27_aarch64",  # ai-edge-litert 2.x; with manylinux2014 alone pip finds only 1.x
    "manylinux_2_17_aarch64",
    "manylinux2014_aarch64",
)
# What device_runtime imports (runners, patch verification, signing) at the host venv's versions;
# these fall-backs when the host lacks one.
PINNED = {
    "ai-edge-litert": "2.3.0",
    "onnxruntime": "1.32.0",
    "numpy": "2.4.6",
    "cryptography": "50.0.2",
    "blake3": "1.0.11",
}
FIXED = ("ai-edge-litert", "onnxruntime")  # the runtime versions of issue 18, whatever the host has
MARK_SYSCALL = 0x4D4E  # must equal MNTOOL_MARK_SYSCALL in qemu_plugin/insn.c
PLUGIN_SOURCE = Path(__file__).parent / "qemu_plugin"
SOURCES_FILE = Path("/etc/apt/sources.list.d/debian.sources")

Log = Callable[[str], None]


class DeviceError(MntoolError):
    """The emulated device is not set up, cannot be set up here, or a guest run failed."""


# ---- where things live ----------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def root(self) -> Path:  # the arm64 userland (qemu -L)
        return self.home / "rootfs"

    @property
    def site(self) -> Path:  # the aarch64 wheels
        return self.home / "site"

    @property
    def app(self) -> Path:  # device_runtime alone
        return self.home / "app"

    @property
    def plugin(self) -> Path:
        return self.home / "libinsn.so"

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / PYTHON

    def stamp(self, step: str) -> Path:
        return self.home / f"{step}.done.json"


def device_home() -> Path:
    """`$MNTOOL_DEVICE_DIR/qemu-arm64`, else `~/.cache/mntool/devices/qemu-arm64`."""
    base = os.environ.get(DIR_ENV) or Path.home() / ".cache" / "mntool" / "devices"
    return Path(base).expanduser() / DEVICE


def layout() -> Layout:
    return Layout(device_home())


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, spec: dict) -> None:
    path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


# ---- set-up steps ---------------------------------------------------------------------------
def requirements() -> dict[str, str]:
    """Wheel name -> version for the guest: the host venv's versions (issue 18's for the runtimes)."""
    pins = {}
    for name, fallback in PINNED.items():
        if name in FIXED:
            pins[name] = fallback
            continue
        try:
            pins[name] = version(name)
        except PackageNotFoundError:
            pins[name] = fallback
    return pins


def debian_mirrors(sources: Path = SOURCES_FILE) -> tuple[str, str]:
    """(main mirror, security mirror) from the host's deb822 sources, else deb.debian.org."""
    main, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    try:
        text = sources.read_text()
    except OSError:
        return main, security
    found_main = found_security = None
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(
            (k.strip(), v.strip())
            for k, v in (ln.split(":", 1) for ln in stanza.splitlines() if ":" in ln and not ln.startswith("#"))
        )
        uri = (fields.get("URIs") or "").split()
        suites = (fields.get("Suites") or "").split()
        if not uri:
            continue
        if any(s.endswith("-security") for s in suites):
            found_security = found_security or uri[0]
        elif suites:
            found_main = found_main or uri[0]
    return found_main or main, found_security or security


def _have_tools() -> list[str]:
    missing = []
    if not shutil.which("qemu-aarch64"):
        missing.append("qemu-user")
    if not shutil.which("mmdebstrap"):
        missing.append("mmdebstrap")
    return missing


def ensure_tools(log: Log, allow_apt: bool = True) -> None:
    missing = _have_tools()
    if not missing:
        return
    can_apt = allow_apt and os.geteuid() == 0 and shutil.which("apt-get")
    if not can_apt:
        raise DeviceError(f"{', '.join(missing)} missing; run as root: {APT_COMMAND}")
    log(f"installing {' '.join(APT_PACKAGES)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            raise DeviceError(f"{' '.join(cmd)} failed ({tail[0]}); run as root: {APT_COMMAND}")
    if _have_tools():
        raise DeviceError(f"apt-get installed {APT_PACKAGES} but {_have_tools()} still missing from PATH")


def ensure_userland(lay: Layout, log: Log) -> None:
    main, security = debian_mirrors()
    spec = {"suite": SUITE, "packages": list(PACKAGES), "mirror": main, "security": security, "arch": "arm64"}
    stamp = _read_stamp(lay.stamp("rootfs"))
    if (
        stamp
        and {k: stamp.get(k) for k in ("suite", "packages", "arch")}
        == {k: spec[k] for k in ("suite", "packages", "arch")}
        and lay.python.exists()
    ):
        return
    if os.geteuid() != 0:
        raise DeviceError(
            f"unpacking the arm64 userland uses mmdebstrap --mode=root: run `mntool device setup {DEVICE}` as root"
        )
    log(f"unpacking an arm64 Debian {SUITE} userland ({', '.join(PACKAGES)}) from {main}")
    tmp = lay.home / "rootfs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        "mmdebstrap", "--mode=root", "--variant=extract", "--arch=arm64", "--quiet",
        f"--include={','.join(PACKAGES)}", SUITE, str(tmp),
        f"deb {main} {SUITE} main", f"deb {security} {SUITE}-security main",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise DeviceError(f"mmdebstrap failed:\n{tail}")
    shutil.rmtree(lay.root, ignore_errors=True)
    tmp.rename(lay.root)
    _write_stamp(lay.stamp("rootfs"), spec)


def cpuinfo_text(cpus: int) -> str:
    """/proc/cpuinfo of `cpus` Cortex-A76 cores, as an arm64 Linux kernel writes it."""
    block = (
        "processor\t: {i}\nBogoMIPS\t: 50.00\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
        "lrcpc dcpop asimddp ssbs\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    )
    return "".join(block.format(i=i) for i in range(cpus))


def ensure_cpuinfo(lay: Layout) -> None:
    """`qemu -L ROOT` resolves /proc/cpuinfo in ROOT first: ONNX Runtime then sees ARM cores."""
    path = lay.root / "proc" / "cpuinfo"
    text = cpuinfo_text(os.cpu_count() or 1)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def ensure_wheels(lay: Layout, log: Log) -> None:
    pins = requirements()
    stamp = _read_stamp(lay.stamp("site"))
    if stamp and stamp.get("requirements") == pins and lay.site.is_dir():
        return
    log(f"installing aarch64 wheels: {', '.join(f'{k}=={v}' for k, v in pins.items())}")
    tmp = lay.home / "site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    cmd += ["--target", str(tmp), "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{k}=={v}" for k, v in pins.items()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise DeviceError(f"pip could not install the aarch64 wheels:\n{tail}")
    shutil.rmtree(lay.site, ignore_errors=True)
    tmp.rename(lay.site)
    _write_stamp(lay.stamp("site"), {"requirements": pins, "platforms": list(PLATFORMS)})


def _sources_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def ensure_plugin(lay: Layout, log: Log) -> None:
    sources = sorted(PLUGIN_SOURCE.glob("*.[ch]"))
    digest = _sources_digest(sources)
    stamp = _read_stamp(lay.stamp("plugin"))
    if stamp and stamp.get("sources") == digest and lay.plugin.is_file():
        return
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise DeviceError("no C compiler to build the instruction-count plugin; run as root: apt-get install -y gcc")
    log(f"compiling the instruction-count plugin ({PLUGIN_SOURCE / 'insn.c'})")
    cmd = [
        gcc,
        "-O2",
        "-shared",
        "-fPIC",
        "-I",
        str(PLUGIN_SOURCE),
        "-o",
        str(lay.plugin),
        str(PLUGIN_SOURCE / "insn.c"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DeviceError(f"gcc failed on the plugin: {done.stderr.strip()}")
    _write_stamp(lay.stamp("plugin"), {"sources": digest, "compiler": gcc})


DISTRIBUTION = Path(__file__).parent.parent / "packaging" / "device"  # the device-side wheel's project


def sync_app(lay: Layout) -> Path:
    """Install device_runtime alone into the device folder when its sources changed: from a
    source checkout, as the `mntool-device-runtime` wheel (packaging/device: device_runtime and
    nothing else of this repository; its dependencies are the aarch64 wheels already there);
    from an installed copy, its .py files. The guest imports exactly what a device ships."""
    package = Path(__file__).parent
    files = sorted(package.glob("*.py"))
    digest = _sources_digest(files)
    target = lay.app / "device_runtime"
    stamp = _read_stamp(lay.stamp("app"))
    if stamp and stamp.get("sources") == digest and target.is_dir():
        return lay.app
    shutil.rmtree(lay.app, ignore_errors=True)
    lay.app.mkdir(parents=True)
    if (DISTRIBUTION / "pyproject.toml").is_file():
        with tempfile.TemporaryDirectory() as wheels:
            pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
            built = subprocess.run(
                [*pip, "wheel", "--no-deps", "-w", wheels, str(DISTRIBUTION)], capture_output=True, text=True
            )
            wheel = next(Path(wheels).glob("*.whl"), None)
            if built.returncode != 0 or wheel is None:
                raise DeviceError(f"building the device_runtime wheel failed: {built.stderr.strip().splitlines()[-1:]}")
            done = subprocess.run(
                [*pip, "install", "--no-deps", "--no-compile", "--target", str(lay.app), str(wheel)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise DeviceError(
                    f"installing the device_runtime wheel failed: {done.stderr.strip().splitlines()[-1:]}"
                )
        how = "wheel"
    else:
        target.mkdir()
        for f in files:
            shutil.copy2(f, target / f.name)
        how = "copy"
    _write_stamp(lay.stamp("app"), {"sources": digest, "installed_as": how})
    return lay.app


def setup(log: Log = print, allow_apt: bool = True) -> Layout:
    """Set up (or check, when already cached) everything the emulated device needs."""
    lay = layout()
    lay.home.mkdir(parents=True, exist_ok=True)
    ensure_tools(log, allow_apt)
    ensure_userland(lay, log)
    ensure_cpuinfo(lay)
    ensure_wheels(lay, log)
    ensure_plugin(lay, log)
    sync_app(lay)
    return lay


# ---- status ---------------------------------------------------------------------------------
def qemu_version() -> str | None:
    exe = shutil.which("qemu-aarch64")
    if not exe:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out.strip()


def wheel_versions(site: Path) -> dict[str, str]:
    versions = {}
    for info in site.glob("*.dist-info"):
        name, _, ver = info.name[: -len(".dist-info")].rpartition("-")
        versions[name.replace("_", "-").lower()] = ver
    return dict(sorted(versions.items()))


def status() -> dict:
    """What is set up and what is missing."""
    lay = layout()
    qemu = qemu_version()
    rootfs = _read_stamp(lay.stamp("rootfs")) if lay.python.exists() else None
    site = _read_stamp(lay.stamp("site")) if lay.site.is_dir() else None
    plugin = _read_stamp(lay.stamp("plugin")) if lay.plugin.is_file() else None
    wheels = wheel_versions(lay.site) if site else {}
    pins = requirements()
    missing = []
    if not qemu:
        missing.append(f"qemu-aarch64 (apt package qemu-user): {APT_COMMAND}")
    if not shutil.which("mmdebstrap") and not rootfs:
        missing.append("mmdebstrap (to unpack the userland)")
    if not rootfs:
        missing.append(f"arm64 userland ({PYTHON})")
    if not (lay.root / "proc" / "cpuinfo").is_file():
        missing.append("ARM /proc/cpuinfo in the userland")
    if not site:
        missing.append("aarch64 wheels")
    elif site.get("requirements") != pins:
        missing.append(f"aarch64 wheels at {pins} (installed: {site.get('requirements')})")
    if not plugin:
        missing.append("instruction-count plugin")
    elif plugin.get("sources") != _sources_digest(sorted(PLUGIN_SOURCE.glob("*.[ch]"))):
        missing.append("instruction-count plugin rebuilt from the current source")
    return {
        "device": DEVICE,
        "home": str(lay.home),
        "ready": not missing,
        "qemu": qemu,
        "cpu": CPU,
        "userland": rootfs and {"suite": rootfs["suite"], "python": PYTHON, "path": str(lay.root)},
        "wheels": wheels,
        "required": pins,
        "plugin": plugin and {"path": str(lay.plugin), "source": str(PLUGIN_SOURCE / "insn.c")},
        "missing": missing,
    }


def ready_layout() -> Layout:
    s = status()
    if not s["ready"]:
        raise DeviceError(f"{DEVICE} is not set up ({'; '.join(s['missing'])}): run `mntool device setup {DEVICE}`")
    lay = layout()
    sync_app(lay)
    return lay


# ---- running the guest ----------------------------------------------------------------------
def guest_command(lay: Layout, job: Path, marks: Path | None) -> list[str]:
    cmd = ["qemu-aarch64", "-cpu", CPU, "-L", str(lay.root)]
    for name, value in {
        "PYTHONPATH": f"{lay.app}:{lay.site}",
        "PYTHONHASHSEED": "0",
        "PYTHONNOUSERSITE": "1",
        "OMP_NUM_THREADS": "1",
    }.items():
        cmd += ["-E", f"{name}={value}"]
    if marks is not None:
        cmd += ["-plugin", f"{lay.plugin},out={marks}"]
    return [*cmd, str(lay.python), "-m", "device_runtime.qemu_guest", str(job)]


def _run_guest(lay: Layout, job: dict, work: Path, count: bool, timeout: float) -> tuple[dict, list[tuple]]:
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    marks = work / "marks.txt" if count else None
    try:
        done = subprocess.run(guest_command(lay, job_path, marks), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"the arm64 guest ran past {timeout:.0f} s") from None
    result_path = work / "result.json"
    if done.returncode != 0 or not result_path.is_file():
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise DeviceError(f"the arm64 guest failed (exit {done.returncode}): {' | '.join(lines[-3:]) or 'no output'}")
    result = json.loads(result_path.read_text())
    if result.get("error"):
        raise DeviceError(result["error"])
    rows = []
    if marks is not None:
        for line in marks.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] != "exit":
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return result, rows


def _save_feeds(path: Path, feeds: Mapping[str, np.ndarray]) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in feeds.items()})


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def run_artifact(
    artifact: Path, feeds: Mapping[str, np.ndarray], runner: Mapping | None = None, timeout: float = 600
) -> dict[str, np.ndarray]:
    """One inference of `artifact` by the arm64 runners under QEMU: `mntool run --device qemu-arm64`."""
    lay = ready_layout()
    with tempfile.TemporaryDirectory(prefix="mntool-qemu-") as tmp:
        work = Path(tmp)
        _save_feeds(work / "inputs.npz", feeds)
        job = {"mode": "run", "artifact": str(Path(artifact).resolve()), "inputs": str(work / "inputs.npz")}
        job |= {"outputs": str(work / "outputs.npz"), "result": str(work / "result.json"), "runner": dict(runner or {})}
        _run_guest(lay, job, work, count=False, timeout=timeout)
        return _load_npz(work / "outputs.npz")


# ---- the instruction-count benchmark --------------------------------------------------------
@dataclass(frozen=True)
class QemuBenchConfig:
    runs: int = 20  # inferences per counted round
    rounds: int = 3  # counted rounds per variant: their spread is the repeatability
    warmup: int = 3
    seed: int = 0
    device_id: str | None = None
    runner: Mapping | None = None  # RunnerConfig fields
    timeout_s: float = 900


def _regions(rows: list[tuple], names: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """region name -> (instructions, SIMD/FP instructions) between its start mark (tag 2k) and end (2k+1)."""
    at = {tag: (n, s) for tag, n, s in rows}
    out = {}
    for name, k in names.items():
        if 2 * k in at and 2 * k + 1 in at:
            (n0, s0), (n1, s1) = at[2 * k], at[2 * k + 1]
            out[name] = (n1 - n0, s1 - s0)
    return out


def bench(
    artifact: Path,
    patches: list[Path] = (),
    inputs: Path | None = None,
    config: QemuBenchConfig = QemuBenchConfig(),
) -> dict:
    """Instruction counts of `artifact` (and of each patch) on the emulated Cortex-A76, with the
    outputs checked against this host's run of the same runner on the same inputs."""
    from device_runtime.bench import generate_inputs, vocab_size
    from device_runtime.patch import TrustPolicy, apply_patch_bytes
    from device_runtime.runners import RunnerConfig, find_weight_map, load_inputs, open_runner, runtime_for
    from device_runtime.weight_map import read_artifact_files

    artifact = Path(artifact).resolve()
    lay = ready_layout()
    runner_config = RunnerConfig(**dict(config.runner or {}))
    weight_map = find_weight_map(artifact)
    if patches and weight_map is None:
        raise DeviceError(f"patches need the artifact's weight map; none beside {artifact}")
    runtime = runtime_for(artifact, weight_map)
    with open_runner(artifact, weight_map=weight_map, config=runner_config) as host_runner:
        vocab = vocab_size(weight_map)
        feeds = load_inputs(inputs) if inputs else generate_inputs(host_runner.free_inputs, vocab, config.seed)
        host = {"unpatched": host_runner.run(feeds)}
    files = read_artifact_files(artifact, weight_map.files if weight_map else [artifact.name])
    for p in patches:
        patched = apply_patch_bytes(
            files,
            Path(p).read_bytes(),
            weight_map,
            policy=TrustPolicy(device_id=config.device_id),
            check_artifact=False,
        )
        with open_runner(artifact, files=patched, weight_map=weight_map, config=runner_config) as r:
            host[str(p)] = r.run(feeds)

    with tempfile.TemporaryDirectory(prefix="mntool-qemu-") as tmp:
        work = Path(tmp)
        _save_feeds(work / "inputs.npz", feeds)
        job = {
            "mode": "bench",
            "artifact": str(artifact),
            "patches": [str(Path(p).resolve()) for p in patches],
            "inputs": str(work / "inputs.npz"),
            "outputs_dir": str(work),
            "result": str(work / "result.json"),
            "runner": {
                "threads": runner_config.threads,
                "xnnpack": runner_config.xnnpack,
                "graph_optimization": runner_config.graph_optimization,
            },
            "runs": config.runs,
            "rounds": config.rounds,
            "warmup": config.warmup,
            "device_id": config.device_id,
            "mark_syscall": MARK_SYSCALL,
        }
        t0 = time.perf_counter()
        result, rows = _run_guest(lay, job, work, count=True, timeout=config.timeout_s)
        guest_wall_s = time.perf_counter() - t0
        regions = _regions(rows, result["regions"])
        guest_outputs = {key: _load_npz(work / f"{i}.npz") for i, key in enumerate(result["variants"])}

    def count(name: str) -> int:
        if name not in regions:
            raise DeviceError(f"the plugin saw no marks for region {name!r}: is it loaded? (marks: {len(rows)})")
        return regions[name][0]

    empty = count("empty")  # the marks themselves: what every region below includes once
    loop = count("loop")  # `runs` iterations of the timing loop calling nothing
    per_call_loop = (loop - empty) / config.runs

    def steady(key: str) -> dict:
        per_round, simd = [], []
        for r in range(config.rounds):
            n, s = regions[f"{key}/round{r}"]
            per_round.append((n - loop) / config.runs)
            simd.append(s / n if n else 0.0)
        mean = float(np.mean(per_round))
        diff = {n: float(np.max(np.abs(guest_outputs[key][n].astype(np.float64) - host[key][n]))) for n in host[key]}
        return {
            "instructions_per_inference": mean,
            "per_round": per_round,
            "spread": (max(per_round) - min(per_round)) / mean if mean else 0.0,
            "simd_fp_share": float(np.mean(simd)),
            "max_abs_error_vs_host": max(diff.values()) if diff else 0.0,
            "max_abs_error_by_output": diff,
            "emulated_ms_per_inference": result["wall_ms"][key] / config.runs,
        }

    variants = {key: steady(key) for key in result["variants"]}
    base = variants["unpatched"]
    patch_reports = []
    for p in patches:
        v = variants[str(Path(p).resolve())]
        changed = any(
            not np.array_equal(guest_outputs[str(Path(p).resolve())][n], guest_outputs["unpatched"][n])
            for n in host["unpatched"]
        )
        patch_reports.append(
            {
                "patch": str(p),
                "apply_instructions": count(f"apply:{Path(p).resolve()}") - empty,
                "swap_instructions": count(f"swap:{Path(p).resolve()}") - empty,
                **v,
                "ratio_to_unpatched": v["instructions_per_inference"] / base["instructions_per_inference"],
                "outputs_changed": changed,
            }
        )
    return {
        "artifact": str(artifact),
        "device": DEVICE,
        "runtime": runtime,
        "runtime_version": result["versions"].get(
            {"litert": "ai-edge-litert", "onnxruntime": "onnxruntime"}.get(runtime, runtime)
        ),
        "emulator": {
            "qemu": qemu_version(),
            "mode": "user (TCG)",
            "cpu": CPU,
            "plugin": "mntool insn (inline count per translated block)",
        },
        "guest": {"python": result["python"], "machine": result["machine"], "wheels": result["versions"]},
        "config": {**job["runner"], "runs": config.runs, "rounds": config.rounds, "warmup": config.warmup},
        "inputs": [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.items()],
        "marker_overhead_instructions": empty,
        "loop_overhead_per_inference": per_call_loop,
        "load": {
            "first_in_process_instructions": count("first_load_in_process") - empty,
            "from_file_instructions": count("load_file") - empty,
            "from_memory_instructions": count("load_memory") - empty,
            "first_inference_instructions": count("first_run") - empty,
        },
        "unpatched": base,
        "patches": patch_reports,
        "emulated_wall_s_total": guest_wall_s,
        "note": "instruction counts of the emulated Cortex-A76 (deterministic, comparable); emulated milliseconds are NOT a latency",
    }


def describe(report: dict) -> str:
    """A human-readable summary of one `bench` report."""
    b = report["unpatched"]
    e = report["emulator"]
    lines = [
        f"{report['artifact']}  [{report['runtime']} {report['runtime_version']} on qemu-aarch64 {e['qemu']} -cpu {e['cpu']}, "
        f"guest Python {report['guest']['python']}, {report['config']['threads']} thread(s)]",
        f"  steady     {b['instructions_per_inference'] / 1e6:.4f} M instructions per inference "
        f"(rounds {', '.join(f'{x / 1e6:.4f}' for x in b['per_round'])} M, spread {b['spread']:.3%}), "
        f"SIMD/FP {b['simd_fp_share']:.1%}",
        f"  parity     max |arm64 - host| {b['max_abs_error_vs_host']:.3g}",
        f"  load       first in process {report['load']['first_in_process_instructions'] / 1e6:.1f} M (runtime start-up), "
        f"from file {report['load']['from_file_instructions'] / 1e6:.3f} M, from memory "
        f"{report['load']['from_memory_instructions'] / 1e6:.3f} M, first inference "
        f"{report['load']['first_inference_instructions'] / 1e6:.3f} M instructions",
        f"  overhead   marks {report['marker_overhead_instructions']} instructions, loop "
        f"{report['loop_overhead_per_inference']:.0f} per inference (both subtracted)",
    ]
    for p in report["patches"]:
        lines.append(
            f"  patch      {Path(p['patch']).name}: {p['instructions_per_inference'] / 1e6:.4f} M per inference "
            f"({p['ratio_to_unpatched']:.5f}x unpatched), swap {p['swap_instructions'] / 1e6:.3f} M, apply "
            f"{p['apply_instructions'] / 1e6:.3f} M instructions, max |arm64 - host| {p['max_abs_error_vs_host']:.3g}, "
            f"outputs {'changed' if p['outputs_changed'] else 'UNCHANGED'}"
        )
    lines.append(
        f"  emulated   {b['emulated_ms_per_inference']:.2f} ms per inference under QEMU (not a latency); whole run "
        f"{report['emulated_wall_s_total']:.1f} s"
    )
    return "\n".join(lines)
