"""`mntool serve` as a real process on a free loopback port: the endpoints, patches that verify
and equal the generator's parameters (also when requests are batched together), every kind of
bad input answered 4xx with a JSON error (never 5xx, never a crash), and replicas/workers that
serve byte-identical patches. Fixtures `served` and `patch_server` live in conftest.py."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from device_runtime import weight_map as wmap
from device_runtime.patch import verify_patch
from device_runtime.signing import load_public_key
from mntool.serve_process import ServerProcess

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
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


# ---- endpoints ------------------------------------------------------------------------------
def test_help_has_an_example():
    shown = subprocess.run([MNTOOL, "serve", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "Example:" in shown.stdout and "--workers" in shown.stdout


def test_healthz_artifacts_openapi(patch_server, served):
    health = httpx.get(f"{patch_server.url}/healthz").json()
    assert health["status"] == "ok" and health["method"] == "metanetwork" and health["signed"] and health["auth"]

    assert httpx.get(f"{patch_server.url}/v1/artifacts").status_code == 401
    listed = httpx.get(f"{patch_server.url}/v1/artifacts", headers=auth(patch_server)).json()
    assert [a["fingerprint"] for a in listed] == [served.fingerprint]
    assert listed[0]["target"] == "onnx"
    assert listed[0]["weight_map"] == json.loads(wmap.sidecar_path(served.artifact).read_text())

    schema = httpx.get(f"{patch_server.url}/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    post = schema["paths"]["/v1/patches"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert request["required"] == ["device_id", "fingerprint", "samples"]
    assert request["properties"]["samples"]["properties"]["items"]["maxItems"] == 30  # the checkpoint's recent_len
    assert "application/octet-stream" in post["responses"]["200"]["content"]
    assert {"400", "401", "404", "413", "415", "422", "503"} <= set(post["responses"])
    assert post["security"] == [{"bearer": []}]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_patch_verifies_and_carries_the_generated_parameters(patch_server, served):
    items = [5, 17, 3, 42, 8]
    answer = httpx.post(f"{patch_server.url}/v1/patches", json=body(served, items), headers=auth(patch_server))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    wm = wmap.load(served.artifact)
    sizes = {f: (served.artifact.parent / f).stat().st_size for f in wm.files}
    patch = verify_patch(answer.content, wm, sizes, verify_key=load_public_key(served.pub), require_signature=True)
    expected = generated(served, items)
    for t in patch.tensors:  # ONNX stores every adaptive tensor as is (identity layout, float32)
        np.testing.assert_allclose(patch.array(t), expected[t.name], rtol=0, atol=1e-6)


def test_concurrent_requests_share_batches_and_each_gets_its_own_parameters(patch_server, served):
    rng = np.random.default_rng(0)
    uploads = [rng.integers(1, 200, size=int(rng.integers(0, 31))).tolist() for _ in range(48)]
    before = httpx.get(f"{patch_server.url}/metrics").text

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{patch_server.url}/v1/patches", json=body(served, u), headers=auth(patch_server))
                                          for u in uploads))

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * len(uploads)
    after = httpx.get(f"{patch_server.url}/metrics").text
    batches = metric(after, "mntool_batch_size_count") - metric(before, "mntool_batch_size_count")
    batched = metric(after, "mntool_batch_size_sum") - metric(before, "mntool_batch_size_sum")
    assert batched == len(uploads) and batches < len(uploads), "no two requests shared a generator call"

    from device_runtime.patch import parse_patch
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
        assert metric(after.text, "mntool_requests_total", endpoint="/v1/patches", status=status) == \
            metric(before, "mntool_requests_total", endpoint="/v1/patches", status=status) + 1
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
        "missing_samples": (400, dict(content=json.dumps({"device_id": "d", "fingerprint": served.fingerprint}), headers=ok)),
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
        "invalid_token": (401, dict(content=good, headers={"Content-Type": "application/json", "Authorization": "Bearer nope"})),
    }


BAD = ["malformed_json", "not_an_object", "deeply_nested", "missing_samples", "short_fingerprint", "wrong_content_type", "oversized_body",
       "too_many_samples", "unknown_fingerprint", "outside_vocabulary", "negative_id", "huge_id", "float_id", "bool_id",
       "missing_token", "invalid_token"]


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
    head = (f"POST /v1/patches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {patch_server.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    before = httpx.get(f"{patch_server.url}/metrics").text
    for _ in range(5):
        _raw(patch_server.url, head + payload[:10], read=False)  # gone mid-body
        _raw(patch_server.url, head + payload, read=False)  # gone while its patch is generated
        _raw(patch_server.url, head[:20], read=False)  # gone mid-headers
    time.sleep(0.5)  # let the server notice the closed connections
    valid = httpx.post(f"{patch_server.url}/v1/patches", json=body(served, [4, 5]), headers=auth(patch_server))
    assert valid.status_code == 200
    after = httpx.get(f"{patch_server.url}/metrics").text
    assert metric(after, "mntool_requests_total", endpoint="/v1/patches", status=499) >= \
        metric(before, "mntool_requests_total", endpoint="/v1/patches", status=499) + 5
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


# ---- startup errors, replicas and workers ---------------------------------------------------
def test_bad_artifact_or_busy_port_is_one_line_error(served, tmp_path):
    stray = tmp_path / "stray.onnx"
    stray.write_bytes(served.artifact.read_bytes())
    done = subprocess.run([MNTOOL, "serve", str(served.checkpoint), "--artifact", str(stray), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().startswith("error: no weight map beside")
    assert len(done.stderr.strip().splitlines()) == 1

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([MNTOOL, "serve", str(served.checkpoint), "--artifact", str(served.artifact), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_replicas_and_workers_serve_identical_patches(patch_server, served, tmp_path):
    """The service is stateless: a second replica (here with two worker processes) answers the
    same upload with byte-identical signed patches, from every worker."""
    replica = ServerProcess.start(served.checkpoint, [served.artifact], "--signing-key", served.key,
                                  "--token", patch_server.token, workers=2)
    try:
        assert len(replica.wait_ready(60)) == 2  # two worker processes, each answering
        request = dict(json=body(served, [9, 8, 7, 6]), headers=auth(patch_server))
        patches = {httpx.post(f"{url}/v1/patches", **request).content for url in [patch_server.url] + [replica.url] * 6}
        assert len(patches) == 1 and len(next(iter(patches))) > 0
    finally:
        replica.stop()
