"""Device profiles: emulate a phone's CPU budget on the host for a benchmark worker process.

A profile is host emulation, not a prediction of a phone's latency: it caps the threads a
runtime may use, pins the worker to some of the host's CPUs (sched_setaffinity) and, where the
kernel lets us, limits its CPU bandwidth with a cgroup (v2 `cpu.max`, else v1 CFS quota). The
limits are applied to a child process only (`ProfileSandbox`), so nothing leaks into the caller.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from device_runtime.errors import MntoolError

CFS_MIN_US = 1000  # the kernel refuses CFS quotas and periods below 1 ms
CGROUP_PREFIX = "mntool-bench-"


class ProfileError(MntoolError):
    """An unknown profile name, or a profile this host cannot emulate at all."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    threads: int  # runtime intra-op threads
    cores: int  # host CPUs the worker may run on
    cpu_bandwidth: float | None = None  # share of one core's time per period (0 < b <= cores); None = no limit


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("flagship", "flagship phone, app allowed two big cores (e.g. Cortex-X4 + A720)", 2, 2),
        DeviceProfile("flagship-big-core", "one big core at full speed, one thread (typical on-device default)", 1, 1),
        DeviceProfile("mid-range", "mid-range phone: one mid core, about 70% of a host core's throughput", 1, 1, 0.7),
        DeviceProfile(
            "little-core", "scheduled on an efficiency core (e.g. Cortex-A55): 40% of a host core", 1, 1, 0.4
        ),
        DeviceProfile("low-end", "entry-level phone, efficiency cores only, shared with the app: 25%", 1, 1, 0.25),
    )
}


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(f"unknown device profile {name!r} (known: {', '.join(PROFILES)})") from None


@dataclass
class AppliedProfile:
    """What a sandbox actually enforced; `notes` says why a part was not applied."""

    profile: str
    threads: int
    cpus: list[int]
    cpu_bandwidth: float | None
    bandwidth_applied: bool
    cgroup: str | None = None  # "v2:<path>" or "v1:<path>"
    cfs_quota_us: int | None = None
    cfs_period_us: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_cgroup_dirs() -> list[tuple[str, Path]]:
    """Writable-looking cgroup directories with a CPU bandwidth controller: ("v2"|"v1", dir)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, fstype, opts, *_ = line.split()
        controllers = Path(mount) / "cgroup.controllers"
        if fstype == "cgroup2" and controllers.is_file() and "cpu" in controllers.read_text().split():
            found.append(("v2", Path(mount)))
        elif fstype == "cgroup" and "cpu" in opts.split(","):
            found.append(("v1", Path(mount)))
    return found


class ProfileSandbox:
    """Owns the cgroup of one worker process: `prepare()` before spawning, `enter_child()` in the
    child before exec (subprocess `preexec_fn`), `close()` after the child exited."""

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile
        allowed = sorted(os.sched_getaffinity(0))
        self.applied = AppliedProfile(
            profile=profile.name,
            threads=profile.threads,
            cpus=allowed[: profile.cores],
            cpu_bandwidth=profile.cpu_bandwidth,
            bandwidth_applied=False,
        )
        if profile.cores > len(allowed):
            self.applied.notes.append(f"profile wants {profile.cores} cores, this host allows {len(allowed)}")
        self._cgroup: Path | None = None

    def prepare(self) -> AppliedProfile:
        """Create the bandwidth-limited cgroup if the profile has a limit and the kernel allows it."""
        bandwidth = self.profile.cpu_bandwidth
        if bandwidth is None:
            return self.applied
        # The shortest period the kernel accepts keeps throttling fine-grained, so a sub-millisecond
        # inference sees many short pauses rather than rare 100 ms stalls.
        period = max(CFS_MIN_US, round(CFS_MIN_US / bandwidth))
        quota = round(bandwidth * period)
        candidates = _cpu_cgroup_dirs()
        if not candidates:
            self.applied.notes.append(
                "bandwidth limit not applied: no cgroup hierarchy with the cpu controller is mounted"
            )
        for version, root in candidates:
            group = root / f"{CGROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                group.mkdir()
            except OSError as err:
                self.applied.notes.append(
                    f"bandwidth limit not applied via cgroup {version} at {root}: cannot create a child cgroup ({err.strerror})"
                )
                continue
            try:
                if version == "v2":
                    (group / "cpu.max").write_text(f"{quota} {period}\n")
                else:
                    (group / "cpu.cfs_period_us").write_text(f"{period}\n")
                    (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
            except OSError as err:
                group.rmdir()
                self.applied.notes.append(
                    f"bandwidth limit not applied via cgroup {version}: writing the quota failed ({err.strerror})"
                )
                continue
            self._cgroup = group
            self.applied.bandwidth_applied = True
            self.applied.cgroup = f"{version}:{group}"
            self.applied.cfs_quota_us, self.applied.cfs_period_us = quota, period
            break
        return self.applied

    def enter_child(self) -> None:
        """Runs in the forked child before exec: affinity and cgroup are inherited by every thread."""
        os.sched_setaffinity(0, self.applied.cpus)
        if self._cgroup is not None:
            (self._cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def close(self) -> None:
        """Remove the cgroup (its only member, the worker, has exited)."""
        if self._cgroup is not None:
            self._cgroup.rmdir()
            self._cgroup = None

    def __enter__(self) -> ProfileSandbox:
        self.prepare()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
