"""One `mntool serve` for two model versions at once (`--also CKPT ARTIFACT`): each artifact gets
the patches of the checkpoint it is paired with, requests are routed by fingerprint, a mixed burst
shares micro-batches but never a generator call, GET /v1/artifacts and /v1/status name the
checkpoints, and bad pairings are refused at start in one line.

v1 is conftest's tiny MetaNetwork (`served`); v2 a second tiny MetaNetwork on another static
model (seed 1): the same adaptive tensors and shapes and the same uploads, another fingerprint,
other parameters for the same upload. Only the explicit pairing can tell them apart."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from test_serve import metric

from device_runtime import weight_map as wmap
from device_runtime.patch import TrustPolicy, parse_patch, verify_patch
from device_runtime.signing import load_public_key
from mntool.serve import ServerProcess, routes
from mntool.serve.metrics import PATCHES

pytestmark = pytest.mark.slow
MNTOOL = str(Path(sys.executable).with_name("mntool"))
TOKEN = "versions-token"
QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def versions(served, synthetic_dataset, tmp_path_factory):
    """v1 (conftest `served`) and v2: a MetaNetwork on a static model trained with seed 1, exported
    to ONNX. `generate1` / `generate2`: each version's generator, in process."""
    from exporters import export
    from mntool.generate import Generator
    from mntool.train import TrainConfig, load_checkpoint, train

    root = tmp_path_factory.mktemp("versions")
    train(
        synthetic_dataset,
        TrainConfig(model="sasrec", method="static", epochs=1, batch_size=200, lr=5e-3, probe_every=20, seed=1),
        root / "static1",
        **QUIET,
    )
    train(
        synthetic_dataset,
        TrainConfig(
            model="sasrec", method="metanetwork", epochs=1, batch_size=200, meta_lr=2e-2, probe_every=20, seed=1
        ),
        root / "v2",
        init=root / "static1",
        **QUIET,
    )
    ck = load_checkpoint(root / "v2")
    artifact = export(ck.model, ck.example_inputs(), ck.adaptive, "onnx", root / "artifact-v2")
    return SimpleNamespace(
        v1=served.checkpoint,
        a1=served.artifact,
        fp1=served.fingerprint,
        v2=root / "v2",
        a2=artifact,
        fp2=wmap.load(artifact).fingerprint,
        static1=root / "static1",
        generate1=Generator.load(served.checkpoint).generate,
        generate2=Generator.load(root / "v2").generate,
        root=root,
    )


@pytest.fixture(scope="module")
def two_versions(versions, served, tmp_path_factory):
    """The real server: v1's artifact with `--artifact`, v2's with `--also`, signed patches, a
    token, two worker processes (each loads both checkpoints from the config it is handed)."""
    log = tmp_path_factory.mktemp("versions-log") / "server.log"
    with log.open("w") as stderr:
        server = ServerProcess.start(
            versions.v1,
            [versions.a1],
            "--signing-key",
            served.key,
            "--key-list",
            served.key_list,
            "--token",
            TOKEN,
            "--max-wait-ms",
            20,
            also=[(versions.v2, versions.a2)],
            workers=2,
            stderr=stderr,
        )
    yield SimpleNamespace(url=server.url, process=server, log=log)
    server.stop()


def request(fingerprint: str, items, device_id: str = "dev-1") -> dict:
    return dict(
        json={"device_id": device_id, "fingerprint": fingerprint, "samples": {"items": list(items)}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


def assert_carries(patch_bytes: bytes, expected: dict[str, np.ndarray]) -> None:
    patch = parse_patch(patch_bytes)
    assert {t.name for t in patch.tensors} == set(expected)
    for t in patch.tensors:  # ONNX: identity layout, float32
        np.testing.assert_allclose(patch.array(t), expected[t.name], rtol=0, atol=1e-6)


# ---- two versions on one server ---------------------------------------------------------------
def test_the_versions_differ_only_where_pairing_can_tell(versions):
    """The premise: same adaptive tensors and shapes, other fingerprints, other parameters."""
    shapes = [{t.name: t.shape for t in wmap.load(a).tensors} for a in (versions.a1, versions.a2)]
    assert shapes[0] == shapes[1] and versions.fp1 != versions.fp2
    items = [5, 17, 3, 42, 8]
    one, two = versions.generate1(items), versions.generate2(items)
    assert any(not np.allclose(one[n], two[n], atol=1e-3) for n in one)


def test_artifacts_and_status_name_the_checkpoint_of_each_artifact(two_versions, versions):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    listed = httpx.get(f"{two_versions.url}{routes.ARTIFACTS}", headers=auth).json()
    assert [(a["fingerprint"], a["checkpoint"]) for a in listed] == [
        (versions.fp1, str(versions.v1)),
        (versions.fp2, str(versions.v2)),
    ]
    status = httpx.get(f"{two_versions.url}{routes.STATUS}", headers=auth).json()
    assert status["checkpoint"] == str(versions.v1) and status["artifacts"] == 2
    assert status["checkpoints"] == [
        {"checkpoint": str(versions.v1), "method": "metanetwork", "artifacts": 1},
        {"checkpoint": str(versions.v2), "method": "metanetwork", "artifacts": 1},
    ]
    schema = httpx.get(f"{two_versions.url}{routes.OPENAPI}").json()["components"]["schemas"]["Artifact"]
    assert "checkpoint" in schema["required"]


def test_each_fingerprint_gets_its_own_checkpoints_patch(two_versions, versions, served):
    items = [5, 17, 3, 42, 8]
    root = TrustPolicy(root_key=load_public_key(served.root_pub), device_id="dev-1")
    for artifact, fingerprint, generate in (
        (versions.a1, versions.fp1, versions.generate1),
        (versions.a2, versions.fp2, versions.generate2),
    ):
        answer = httpx.post(f"{two_versions.url}{routes.PATCHES}", **request(fingerprint, items))
        assert answer.status_code == 200, answer.text
        wm = wmap.load(artifact)
        sizes = {f: (artifact.parent / f).stat().st_size for f in wm.files}
        patch = verify_patch(answer.content, wm, sizes, root)  # laid out and bound for this artifact
        assert patch.fingerprint == fingerprint
        assert_carries(answer.content, generate(items))
    unknown = httpx.post(f"{two_versions.url}{routes.PATCHES}", **request("ab" * 32, items))
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_fingerprint"


def test_a_mixed_burst_shares_micro_batches_and_each_gets_its_versions_parameters(two_versions, versions):
    rng = np.random.default_rng(0)
    plan = [
        (versions.fp1 if i % 3 == 0 else versions.fp2, rng.integers(1, 200, size=int(rng.integers(1, 31))).tolist())
        for i in range(48)
    ]
    before = httpx.get(f"{two_versions.url}{routes.METRICS}").text

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{two_versions.url}{routes.PATCHES}", **request(fp, items)) for fp, items in plan)
            )

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * len(plan)
    after = httpx.get(f"{two_versions.url}{routes.METRICS}").text
    batches = metric(after, "mntool_batch_size_count") - metric(before, "mntool_batch_size_count")
    batched = metric(after, "mntool_batch_size_sum") - metric(before, "mntool_batch_size_sum")
    assert batched == len(plan) and batches < len(plan), "no two requests shared a micro-batch"
    for fingerprint, expected in ((versions.fp1, 16), (versions.fp2, 32)):  # both workers' patches, by version
        assert f'fingerprint="{fingerprint}"' in before, "a served fingerprint is listed before its first patch"
        served = metric(after, PATCHES, fingerprint=fingerprint) - metric(before, PATCHES, fingerprint=fingerprint)
        assert served == expected
    assert f'fingerprint="{"ab" * 32}"' not in after
    for (fingerprint, items), answer in zip(plan, answers):
        assert parse_patch(answer.content).fingerprint == fingerprint
        assert_carries(
            answer.content, (versions.generate1 if fingerprint == versions.fp1 else versions.generate2)(items)
        )


def test_one_micro_batch_of_both_versions_makes_one_call_per_generator(versions, served):
    """In process: eight requests, v1 and v2 interleaved, arrive within one batching window; each
    generator is called once, with exactly its own four uploads."""
    from starlette.testclient import TestClient

    from mntool.serve import PatchService, ServeConfig, create_app

    service = PatchService.load(
        ServeConfig(
            str(versions.v1),
            [str(versions.a1)],
            signing_key=str(served.key),
            max_wait_ms=500,
            also=[[str(versions.v2), str(versions.a2)]],
        )
    )
    assert service.artifacts[versions.fp1].generator is service.generators[str(versions.v1)] is service.generator
    assert service.artifacts[versions.fp2].generator is service.generators[str(versions.v2)]
    calls: dict[str, list] = {"v1": [], "v2": []}
    for name, generator in (("v1", service.generator), ("v2", service.generators[str(versions.v2)])):
        real = generator.generate_batch

        def recording(recent, real=real, name=name):
            calls[name].append(sorted(tuple(int(i) for i in row if i) for row in np.asarray(recent)))
            return real(recent)

        generator.generate_batch = recording
    uploads = [[i, i + 1, i + 2] for i in range(1, 9)]
    fingerprints = [versions.fp1 if i % 2 == 0 else versions.fp2 for i in range(8)]
    with TestClient(create_app(service)) as client, ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda job: client.post(routes.PATCHES, json=request(job[0], job[1])["json"]),
                zip(fingerprints, uploads),
            )
        )
    assert [a.status_code for a in answers] == [200] * 8
    assert calls["v1"] == [sorted(tuple(u) for u, fp in zip(uploads, fingerprints) if fp == versions.fp1)]
    assert calls["v2"] == [sorted(tuple(u) for u, fp in zip(uploads, fingerprints) if fp == versions.fp2)]
    for fingerprint, items, answer in zip(fingerprints, uploads, answers):
        assert_carries(
            answer.content, (versions.generate1 if fingerprint == versions.fp1 else versions.generate2)(items)
        )


# ---- bad pairings -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def misfits(tiny_checkpoints, metapatch_ckpts, synthetic_dataset_with, tmp_path_factory):
    """Checkpoints and artifacts that must not be served beside v1: the static model v1 was
    trained on, exported (its frozen backbone makes v1's artifact byte for byte: one fingerprint);
    a metapatch model (another adaptive tensor: z; conftest's); a static model reading 20-item uploads."""
    from exporters import export
    from mntool.train import TrainConfig, load_checkpoint, train

    root = tmp_path_factory.mktemp("misfits")
    static = load_checkpoint(tiny_checkpoints["static"])
    static_artifact = export(static.model, static.example_inputs(), static.adaptive, "onnx", root / "static")
    train(
        synthetic_dataset_with(history_len=30, recent_len=20),
        TrainConfig(model="sasrec", method="static", epochs=1, batch_size=200, probe_every=20),
        root / "recent20",
        **QUIET,
    )
    return SimpleNamespace(
        static=tiny_checkpoints["static"],
        static_artifact=static_artifact,
        metapatch=metapatch_ckpts["metapatch"],
        recent20=root / "recent20",
    )


@pytest.mark.parametrize(
    "case, match",
    [
        ("one artifact, two checkpoints", r"are the same artifact .*one fingerprint gets its patches from one"),
        ("another model with v1's fingerprint", r"are the same artifact .*one fingerprint gets its patches from one"),
        ("metapatch checkpoint, head artifact", r"holds adaptive tensors .* generates \{'metapatch.z'"),
        ("other upload length", r"reads uploads of 20 samples and .* of 30"),
    ],
)
def test_bad_pairings_are_refused_at_start(versions, misfits, case, match):
    from mntool.serve import PatchService, ServeConfig, ServeError

    also = {
        "one artifact, two checkpoints": [(versions.v2, versions.a1)],
        "another model with v1's fingerprint": [(misfits.static, misfits.static_artifact)],
        "metapatch checkpoint, head artifact": [(misfits.metapatch, versions.a2)],
        "other upload length": [(misfits.recent20, versions.a2)],
    }[case]
    with pytest.raises(ServeError, match=match) as refused:
        PatchService.load(ServeConfig(str(versions.v1), [str(versions.a1)], also=[[str(c), str(a)] for c, a in also]))
    assert "\n" not in str(refused.value)


def test_a_task_mismatch_is_refused(versions, mnist_dataset, tmp_path):
    from mntool.serve import PatchService, ServeConfig, ServeError
    from mntool.vision.train import VisionTrainConfig, train

    train(mnist_dataset, VisionTrainConfig(model="lenet", method="static", epochs=1), tmp_path / "lenet", **QUIET)
    with pytest.raises(ServeError, match=r"is a mnist checkpoint and .* a movielens one: one server serves one task"):
        PatchService.load(
            ServeConfig(str(versions.v1), [str(versions.a1)], also=[[str(tmp_path / "lenet"), str(versions.a2)]])
        )


def test_the_cli_refuses_a_bad_pairing_in_one_line_and_documents_also(versions):
    done = subprocess.run(
        [
            MNTOOL,
            "serve",
            str(versions.v1),
            "--artifact",
            str(versions.a1),
            "--also",
            str(versions.v2),
            str(versions.a1),
        ]
        + ["--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "are the same artifact" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    shown = subprocess.run([MNTOOL, "serve", "--help"], capture_output=True, text=True)
    assert "--also CKPT ARTIFACT" in shown.stdout and "Two versions" in shown.stdout


def test_the_server_logged_no_traceback(two_versions):
    assert two_versions.process.proc.poll() is None
    assert "Traceback" not in two_versions.log.read_text()
