"""Device profiles: the catalogue, and that a sandbox really pins, limits and cleans up a child
process on this host (or says why it could not) while the caller stays unconstrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_runtime.profiles import PROFILES, ProfileError, ProfileSandbox, get_profile

CHILD = "import json, os; print(json.dumps({'cpus': sorted(os.sched_getaffinity(0)), 'cgroup': open('/proc/self/cgroup').read()}))"


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="little-core"):
        get_profile("pixel-9000")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_are_sane(name):
    p = get_profile(name)
    assert p.threads >= 1 and p.cores >= 1 and p.description
    assert p.cpu_bandwidth is None or 0 < p.cpu_bandwidth <= p.cores


def test_profiles_get_slower_down_the_list():
    """The catalogue is ordered from most to least CPU; each step removes threads, cores or bandwidth."""
    budget = [p.cores * (p.cpu_bandwidth or 1.0) for p in PROFILES.values()]
    assert budget == sorted(budget, reverse=True)


def _run_child(sandbox: ProfileSandbox) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, preexec_fn=sandbox.enter_child
    ).stdout
    return json.loads(out)


@pytest.mark.parametrize("name", ["flagship-big-core", "little-core"])
def test_sandbox_constrains_only_the_child(name):
    before = os.sched_getaffinity(0)
    profile = get_profile(name)
    with ProfileSandbox(profile) as sandbox:
        applied = sandbox.applied
        child = _run_child(sandbox)
        assert child["cpus"] == applied.cpus and len(applied.cpus) == min(profile.cores, len(before))
        if profile.cpu_bandwidth is None:
            assert not applied.bandwidth_applied and applied.cgroup is None
        elif applied.bandwidth_applied:
            group = Path(applied.cgroup.split(":", 1)[1])
            assert group.name in child["cgroup"], "the child did not land in the limited cgroup"
            assert applied.cfs_quota_us / applied.cfs_period_us == pytest.approx(profile.cpu_bandwidth, rel=0.01)
            limit = (
                (group / "cpu.max").read_text().split()
                if applied.cgroup.startswith("v2")
                else [
                    (group / "cpu.cfs_quota_us").read_text().strip(),
                    (group / "cpu.cfs_period_us").read_text().strip(),
                ]
            )
            assert [int(x) for x in limit] == [applied.cfs_quota_us, applied.cfs_period_us]
        else:
            assert applied.notes and "not applied" in applied.notes[-1]
    assert os.sched_getaffinity(0) == before
    if applied.bandwidth_applied:
        assert not group.exists(), "the cgroup outlived its sandbox"
