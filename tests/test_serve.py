"""`mntool serve` as a real process on a free loopback port: the endpoints, patches that verify
and equal the generator's parameters (also when requests are batched together), every kind of
bad input answered 4xx with a JSON error (never 5xx, never a crash), a failing generator failing
only its own request (in-process app), /healthz telling nothing but liveness, one /metrics scrape
counting every worker, and replicas/workers that serve the same parameters. Fixtures `served`
and `patch_server` live in conftest.py."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from device_runtime import weight_map as wmap
from device_runtime.client import PATCHES_PATH
from device_runtime.patch import PatchError, TrustPolicy, device_hash, parse_patch, verify_patch
from device_runtime.signing import load_public_key
from mntool.serve import ServerProcess, routes
from mntool.serve import metrics as names

pytestmark = pytest.mark.slow
MNTOOL = str(Path(sys.executable).with_name("mntool"))


def auth(server, **headers) -> dict:
    return {"Authorization": f"Bearer {server.token}", **headers}


def body(served, items, **fields) -> dict:
    return {"device_id": "dev-1", "fingerprint": served.fingerprint, "samples": {"items": items}, **fields}


def generated(served, items) -> dict[str, np.ndarray]:
    from mntool.generate import Generator

    return Generator.load(served.checkpoint).generate(items)


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


# ---- endpoints ------------------------------------------------------------------------------
def test_help_has_an_example():
    shown = subprocess.run([MNTOOL, "serve", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "Example:" in shown.stdout and "--workers" in shown.stdout


def test_the_device_client_asks_the_servers_route():
    assert PATCHES_PATH == routes.PATCHES  # the device side keeps its own copy (it never imports mntool)


def test_healthz_is_liveness_only_and_the_details_need_the_token(patch_server, served):
    health = httpx.get(f"{patch_server.url}/healthz", headers={"Authorization": "Bearer wrong"})
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    refused = httpx.get(f"{patch_server.url}/v1/status")
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    status = httpx.get(f"{patch_server.url}/v1/status", headers=auth(patch_server)).json()
    assert status["method"] == "metanetwork" and status["signed"] and status["auth"] and status["artifacts"] == 1
    assert status["checkpoint"] == str(served.checkpoint) and status["pid"] in patch_server.process.wait_ready(10)


def test_healthz_artifacts_openapi(patch_server, served):

    assert httpx.get(f"{patch_server.url}/v1/artifacts").status_code == 401
    listed = httpx.get(f"{patch_server.url}/v1/artifacts", headers=auth(patch_server)).json()
    assert [a["fingerprint"] for a in listed] == [served.fingerprint]
    assert listed[0]["target"] == "onnx"
    assert listed[0]["weight_map"] == json.loads(wmap.sidecar_path(served.artifact).read_text())

    schema = httpx.get(f"{patch_server.url}/openapi.json").json()
    assert schema["openapi"].startswith("3.") and set(schema["paths"]) == set(routes.ALL)
    post = schema["paths"]["/v1/patches"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert request["required"] == ["device_id", "fingerprint", "samples"]
    assert request["properties"]["samples"]["properties"]["items"]["maxItems"] == 30  # the checkpoint's recent_len
    assert "application/octet-stream" in post["responses"]["200"]["content"]
    assert {"400", "401", "404", "413", "415", "422", "500", "503"} <= set(post["responses"])
    assert post["security"] == [{"bearer": []}]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_patch_verifies_and_carries_the_generated_parameters(patch_server, served):
    items = [5, 17, 3, 42, 8]
    answer = httpx.post(f"{patch_server.url}/v1/patches", json=body(served, items), headers=auth(patch_server))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    wm = wmap.load(served.artifact)
    sizes = {f: (served.artifact.parent / f).stat().st_size for f in wm.files}
    root = TrustPolicy(root_key=load_public_key(served.root_pub), device_id="dev-1")
    patch = verify_patch(answer.content, wm, sizes, root)  # the root key alone: the patch carries its key list
    assert patch.freshness.device == device_hash("dev-1") and patch.keylist.serial == 1
    with pytest.raises(PatchError, match="another device"):
        verify_patch(answer.content, wm, sizes, TrustPolicy(root_key=root.root_key, device_id="dev-2"))
    expected = generated(served, items)
    for t in patch.tensors:  # ONNX stores every adaptive tensor as is (identity layout, float32)
        np.testing.assert_allclose(patch.array(t), expected[t.name], rtol=0, atol=1e-6)


def test_concurrent_requests_share_batches_and_each_gets_its_own_parameters(patch_server, served):
    rng = np.random.default_rng(0)
    uploads = [rng.integers(1, 200, size=int(rng.integers(0, 31))).tolist() for _ in range(48)]
    before = httpx.get(f"{patch_server.url}/metrics").text

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{patch_server.url}/v1/patches", json=body(served, u), headers=auth(patch_server))
                    for u in uploads
                )
            )

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * len(uploads)
    after = httpx.get(f"{patch_server.url}/metrics").text
    batches = metric(after, "mntool_batch_size_count") - metric(before, "mntool_batch_size_count")
    batched = metric(after, "mntool_batch_size_sum") - metric(before, "mntool_batch_size_sum")
    assert batched == len(uploads) and batches < len(uploads), "no two requests shared a generator call"

    from mntool.generate import Generator

    generator = Generator.load(served.checkpoint)
    for upload, answer in zip(uploads, answers):
        patch = parse_patch(answer.content)
        expected = generator.generate(upload)
        for t in patch.tensors:
            np.testing.assert_allclose(patch.array(t), expected[t.name], rtol=0, atol=1e-6)


def test_metrics_count_requests_by_status(patch_server, served):
    before = httpx.get(f"{patch_server.url}/metrics").text
    httpx.post(f"{patch_server.url}/v1/patches", json=body(served, [1, 2]), headers=auth(patch_server))
    httpx.post(f"{patch_server.url}/v1/patches", json=body(served, [10**6]), headers=auth(patch_server))
    after = httpx.get(f"{patch_server.url}/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    for status in (200, 422):
        assert (
            metric(after.text, "mntool_requests_total", endpoint="/v1/patches", status=status)
            == metric(before, "mntool_requests_total", endpoint="/v1/patches", status=status) + 1
        )
    assert metric(after.text, "mntool_request_seconds_count", endpoint="/v1/patches") >= 2
    assert "# TYPE mntool_batch_size histogram" in after.text


# ---- bad input ------------------------------------------------------------------------------
def _bad_requests(server, served) -> dict[str, tuple[int, dict]]:
    """name -> (expected status, httpx.post keyword arguments)."""
    ok = auth(server, **{"Content-Type": "application/json"})
    good = json.dumps(body(served, [1, 2, 3]))
    return {
        "malformed_json": (400, dict(content=good[:-5], headers=ok)),
        "not_an_object": (400, dict(content="[1, 2]", headers=ok)),
        "deeply_nested": (400, dict(content="[" * 2000 + "]" * 2000, headers=ok)),
        "missing_samples": (
            400,
            dict(content=json.dumps({"device_id": "d", "fingerprint": served.fingerprint}), headers=ok),
        ),
        "short_fingerprint": (400, dict(content=json.dumps(body(served, [1], fingerprint="abc")), headers=ok)),
        "wrong_content_type": (415, dict(content=good, headers=auth(server, **{"Content-Type": "text/plain"}))),
        "oversized_body": (413, dict(content="{" + " " * server.max_body + "}", headers=ok)),
        "too_many_samples": (422, dict(content=json.dumps(body(served, [1] * 31)), headers=ok)),
        "unknown_fingerprint": (404, dict(content=json.dumps(body(served, [1], fingerprint="ab" * 32)), headers=ok)),
        "outside_vocabulary": (422, dict(content=json.dumps(body(served, [1, 10**6])), headers=ok)),
        "negative_id": (422, dict(content=json.dumps(body(served, [-3])), headers=ok)),
        "huge_id": (422, dict(content=json.dumps(body(served, [2**70])), headers=ok)),
        "float_id": (422, dict(content=json.dumps(body(served, [1.5])), headers=ok)),
        "bool_id": (422, dict(content=json.dumps(body(served, [True])), headers=ok)),
        "missing_token": (401, dict(content=good, headers={"Content-Type": "application/json"})),
        "invalid_token": (
            401,
            dict(content=good, headers={"Content-Type": "application/json", "Authorization": "Bearer nope"}),
        ),
    }


BAD = [
    "malformed_json",
    "not_an_object",
    "deeply_nested",
    "missing_samples",
    "short_fingerprint",
    "wrong_content_type",
    "oversized_body",
    "too_many_samples",
    "unknown_fingerprint",
    "outside_vocabulary",
    "negative_id",
    "huge_id",
    "float_id",
    "bool_id",
    "missing_token",
    "invalid_token",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_request_gets_a_4xx_json_error(patch_server, served, case):
    status, kwargs = _bad_requests(patch_server, served)[case]
    answer = httpx.post(f"{patch_server.url}/v1/patches", **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert set(error) == {"error", "message"} and error["message"] and "\n" not in error["message"]
    if status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"


def test_unknown_path_and_method_are_json_4xx(patch_server):
    assert httpx.get(f"{patch_server.url}/v2/nothing").json()["error"] == "http_error"
    wrong = httpx.get(f"{patch_server.url}/v1/patches", headers=auth(patch_server))
    assert wrong.status_code == 405 and wrong.json()["error"] == "http_error"


def _raw(url: str, data: bytes, read: bool) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        return sock.recv(65536) if read else b""


def test_client_disconnects_do_not_hurt_the_server(patch_server, served):
    payload = json.dumps(body(served, [1, 2, 3])).encode()
    head = (
        f"POST /v1/patches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {patch_server.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    before = httpx.get(f"{patch_server.url}/metrics").text
    for _ in range(5):
        _raw(patch_server.url, head + payload[:10], read=False)  # gone mid-body
        _raw(patch_server.url, head + payload, read=False)  # gone while its patch is generated
        _raw(patch_server.url, head[:20], read=False)  # gone mid-headers
    time.sleep(0.5)  # let the server notice the closed connections
    valid = httpx.post(f"{patch_server.url}/v1/patches", json=body(served, [4, 5]), headers=auth(patch_server))
    assert valid.status_code == 200
    after = httpx.get(f"{patch_server.url}/metrics").text
    assert (
        metric(after, "mntool_requests_total", endpoint="/v1/patches", status=499)
        >= metric(before, "mntool_requests_total", endpoint="/v1/patches", status=499) + 5
    )
    assert patch_server.process.proc.poll() is None


def test_valid_requests_succeed_during_a_burst_of_bad_ones(patch_server, served):
    bad = _bad_requests(patch_server, served)
    good = [dict(json=body(served, [i, i + 1, i + 2]), headers=auth(patch_server)) for i in range(1, 41)]
    plan = [("bad", bad[BAD[i % len(BAD)]][1]) for i in range(160)] + [("good", g) for g in good]
    np.random.default_rng(1).shuffle(plan)

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{patch_server.url}/v1/patches", **kw) for _, kw in plan))

    answers = asyncio.run(burst())
    statuses = [(kind, a.status_code) for (kind, _), a in zip(plan, answers)]
    assert all(s == 200 for kind, s in statuses if kind == "good")
    assert all(400 <= s < 500 for kind, s in statuses if kind == "bad")
    text = httpx.get(f"{patch_server.url}/metrics").text
    assert not re.search(r'mntool_requests_total\{[^}]*status="5\d\d"\}', text)


def test_server_logged_no_traceback(patch_server):
    """Runs after the bad-input tests above (file order): nothing they sent crashed a handler."""
    assert patch_server.process.proc.poll() is None
    assert "Traceback" not in patch_server.log.read_text()


# ---- failures inside the service (in-process app) -------------------------------------------
@pytest.fixture
def in_process(served):
    """f(**ServeConfig options) -> (PatchService, starlette TestClient) with the batcher running."""
    from starlette.testclient import TestClient

    from mntool.serve import PatchService, ServeConfig, create_app

    clients = []

    def start(**options):
        service = PatchService.load(
            ServeConfig(str(served.checkpoint), [str(served.artifact)], signing_key=str(served.key), **options)
        )
        test_client = TestClient(create_app(service), raise_server_exceptions=False)
        clients.append(test_client.__enter__())  # runs the lifespan: the batcher
        return service, test_client

    yield start
    for test_client in clients:
        test_client.__exit__(None, None, None)


def test_a_failing_generator_fails_only_its_own_request(in_process, served):
    service, test_client = in_process(max_batch=8, max_wait_ms=300)
    real, calls = service.generator.generate_batch, []

    def generate_batch(recent):
        calls.append(len(recent))
        if (np.asarray(recent) == 13).any():
            raise RuntimeError("the generator broke on item 13")
        return real(recent)

    service.generator.generate_batch = generate_batch
    uploads = [[1, 2, 3], [4, 13, 5], [6, 7], [8]]
    with ThreadPoolExecutor(len(uploads)) as pool:  # they arrive within max_wait_ms: one batch
        answers = list(pool.map(lambda items: test_client.post(routes.PATCHES, json=body(served, items)), uploads))
    assert calls[0] == len(uploads), f"the uploads were not batched together: {calls}"
    assert [a.status_code for a in answers] == [200, 500, 200, 200]
    failed = answers[1]
    assert failed.headers["content-type"] == "application/json"
    assert failed.json()["error"] == "generation_failed" and set(failed.json()) == {"error", "message"}
    for items, answer in zip(uploads, answers):
        if answer.status_code == 200:
            patch, expected = parse_patch(answer.content), real([items])
            for t in patch.tensors:
                np.testing.assert_allclose(patch.array(t), expected[t.name][0], rtol=0, atol=1e-6)
    assert test_client.post(routes.PATCHES, json=body(served, [9, 10])).status_code == 200  # and the service goes on


def test_an_unexpected_exception_is_a_json_500(in_process, served):
    service, test_client = in_process()

    def bug(*args):
        raise KeyError("a bug")

    service.describe = service.parse = bug  # one route of the Starlette app, and the plain-ASGI patch route
    for answer in (test_client.get(routes.ARTIFACTS), test_client.post(routes.PATCHES, json=body(served, [1]))):
        assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
        assert answer.json()["error"] == "internal_error" and "\n" not in answer.json()["message"]
    scrape = test_client.get(routes.METRICS).text
    assert metric(scrape, names.REQUESTS, endpoint=routes.ARTIFACTS, status=500) == 1
    assert metric(scrape, names.REQUESTS, endpoint=routes.PATCHES, status=500) == 1


# ---- startup errors, replicas and workers ---------------------------------------------------
def test_bad_artifact_or_busy_port_is_one_line_error(served, tmp_path):
    stray = tmp_path / "stray.onnx"
    stray.write_bytes(served.artifact.read_bytes())
    done = subprocess.run(
        [MNTOOL, "serve", str(served.checkpoint), "--artifact", str(stray), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stderr.strip().startswith("error: no weight map beside")
    assert len(done.stderr.strip().splitlines()) == 1

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [MNTOOL, "serve", str(served.checkpoint), "--artifact", str(served.artifact), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1 and done.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def replica(patch_server, served):
    """A second server like `patch_server`, with two worker processes."""
    replica = ServerProcess.start(
        served.checkpoint,
        [served.artifact],
        "--signing-key",
        served.key,
        "--key-list",
        served.key_list,
        "--token",
        patch_server.token,
        workers=2,
    )
    yield replica
    replica.stop()


def test_replicas_and_workers_serve_identical_parameters_in_increasing_sequence(patch_server, replica, served):
    """The service keeps no state: a second replica (here with two worker processes) answers the
    same upload with the same parameters, from every worker, and the sequence numbers it stamps
    (time-based, docs/patch-format.md) still increase across replicas and workers."""
    assert len(replica.wait_ready(60)) == 2  # two worker processes, each answering
    request = dict(json=body(served, [9, 8, 7, 6]), headers=auth(patch_server))
    patches = [
        parse_patch(httpx.post(f"{url}/v1/patches", **request).content)
        for url in [patch_server.url] + [replica.url] * 6
    ]
    assert len({bytes(p.payload) for p in patches}) == 1 and len(patches[0].payload) > 0
    sequences = [p.freshness.sequence for p in patches]
    assert sequences == sorted(set(sequences))


def test_one_metrics_scrape_counts_every_worker(patch_server, replica, served):
    before = httpx.get(f"{replica.url}{routes.METRICS}").text
    pids, asked = [], 0
    while len(set(pids)) < 2 and asked < 200:  # a new connection each: either worker may answer
        pids.append(httpx.get(f"{replica.url}{routes.STATUS}", headers=auth(patch_server)).json()["pid"])
        asked += 1
    assert set(pids) == replica.wait_ready(10), "both workers answered"
    after = httpx.get(f"{replica.url}{routes.METRICS}").text
    counted = metric(after, names.REQUESTS, endpoint=routes.STATUS, status=200) - metric(
        before, names.REQUESTS, endpoint=routes.STATUS, status=200
    )
    assert counted == asked
    assert metric(after, f"{names.REQUEST_SECONDS}_count", endpoint=routes.STATUS) >= asked


def test_the_metrics_directory_lives_as_long_as_the_server(served):
    server = ServerProcess.start(served.checkpoint, [served.artifact], workers=2)
    try:
        worker = min(server.wait_ready(60))
        environ = dict(v.split("=", 1) for v in Path(f"/proc/{worker}/environ").read_text().split("\0") if "=" in v)
        shared = Path(environ[names.MULTIPROC_ENV])
        assert shared.is_dir() and any(shared.glob("*.db"))
    finally:
        server.stop()
    assert not shared.exists()
