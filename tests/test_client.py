"""The device client against a real `mntool serve` process: a refresh writes a verified patch
into the local artifact and reloads a runner that computes what PyTorch computes with the
generated parameters. Forged, altered and unsigned patches (from a rogue HTTP server) are
refused with the artifact byte-identical; 5xx and timeouts are retried, 4xx are final."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from loopback import LoopbackServer

from device_runtime import weight_map as wmap
from device_runtime.client import ClientConfig, ClientError, fetch_patch, refresh
from device_runtime.errors import MntoolError

pytestmark = pytest.mark.slow
FAST = ClientConfig(timeout_s=5.0, retries=2, backoff_s=0.01)


def device_copy(served, tmp_path: Path) -> Path:
    """The device's own copy of the shipped artifact (its directory: model, weights, weight map)."""
    shutil.copytree(served.artifact.parent, tmp_path / "device")
    return tmp_path / "device" / served.artifact.name


def tree_hash(artifact: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(artifact.parent.iterdir())}


class Rogue(LoopbackServer):
    """A stand-in server on loopback answering POSTs from a script of (status, body, delay_s);
    the last entry repeats."""

    def __init__(self, script: list[tuple[int, bytes, float]]):
        self.script, self.hits = script, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                status, payload, delay = outer.script[min(outer.hits, len(outer.script) - 1)]
                outer.hits += 1
                time.sleep(delay)
                kind = "application/octet-stream" if status == 200 else "application/json"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)


def error(status: int, message: str) -> tuple[int, bytes, float]:
    return status, json.dumps({"error": "x", "message": message}).encode(), 0.0


def real_patch(server, served, items=(3, 1, 4), device_id: str = "device") -> bytes:
    """A genuine patch from the real server, for `device_id` (refresh's default id)."""
    data, _ = fetch_patch(server.url, served.fingerprint, items, device_id=device_id, token=server.token, config=FAST)
    return data


# ---- the happy path -------------------------------------------------------------------------
def test_refresh_applies_the_patch_and_reloads_a_runner(patch_server, served, tmp_path):
    import torch

    from mntool.generate import Generator
    from mntool.train import load_checkpoint

    artifact = device_copy(served, tmp_path)
    items = [11, 3, 27, 8, 19]
    reloaded = []
    done = refresh(
        patch_server.url,
        artifact,
        items,
        verify_key=served.pub,
        token=patch_server.token,
        device_id="phone-1",
        config=FAST,
        on_reload=reloaded.append,
    )
    assert done.attempts == 1 and reloaded == [done.runner] and done.patch.signed
    wmap.load(artifact)  # still matches its weight map: only adaptive bytes changed

    ckpt = load_checkpoint(served.checkpoint)
    params = Generator.load(served.checkpoint).generate(items)
    ckpt.model.load_state_dict({**ckpt.model.state_dict(), **{n: torch.as_tensor(v) for n, v in params.items()}})
    history, target = ckpt.example_inputs(seed=3)
    with torch.no_grad():
        expected = ckpt.model(history, target).numpy()
    got = done.runner.run({"history": history.numpy(), "target": target.numpy()})["output"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    done.runner.close()


# ---- patches that must never be applied -----------------------------------------------------
def test_patch_signed_by_another_key_is_refused(patch_server, served, tmp_path):
    from mntool.patches import keygen

    other = keygen(tmp_path / "other")
    artifact = device_copy(served, tmp_path)
    before = tree_hash(artifact)
    with pytest.raises(MntoolError, match="not by the given verify key"):
        refresh(patch_server.url, artifact, [1, 2, 3], verify_key=other.public, token=patch_server.token, config=FAST)
    assert tree_hash(artifact) == before


def _forgeries(server, served, tmp_path) -> dict[str, bytes]:
    from mntool.patches import build_patch, keygen, load_signing_key

    genuine = real_patch(server, served)
    flipped = bytearray(genuine)
    flipped[-1] ^= 0x01  # one payload bit
    attacker = load_signing_key(keygen(tmp_path / "attacker").private)
    params = {t.name: np.full(t.shape, 9.0, np.float32) for t in wmap.load(served.artifact).tensors}
    return {
        "altered": bytes(flipped),
        "forged": build_patch(served.artifact, params, attacker),
        "unsigned": build_patch(served.artifact, params),
        "truncated": genuine[:-100],
        "another device's": real_patch(server, served, device_id="someone-else"),
    }


@pytest.mark.parametrize(
    "kind, match",
    [
        ("altered", "payload is corrupt"),
        ("forged", "not by the given verify key"),
        ("unsigned", "not signed"),
        ("truncated", "truncated"),
        ("another device's", "for another device"),
    ],
)
def test_tampered_patch_is_refused_and_the_model_stays_byte_identical(patch_server, served, tmp_path, kind, match):
    data = _forgeries(patch_server, served, tmp_path)[kind]
    artifact = device_copy(served, tmp_path)
    before = tree_hash(artifact)
    with Rogue([(200, data, 0.0)]) as rogue:
        with pytest.raises(MntoolError, match=match):
            refresh(rogue.url, artifact, [1, 2], verify_key=served.pub, config=FAST)
    assert tree_hash(artifact) == before


def test_with_the_root_key_a_replayed_patch_is_refused(patch_server, served, tmp_path):
    """The device trusts only the root key (the server's key list certifies its online key); a
    man in the middle who replays an earlier genuine patch after a newer one gets nothing in."""
    artifact = device_copy(served, tmp_path)
    old, new = real_patch(patch_server, served, (1, 2)), real_patch(patch_server, served, (5, 6))
    with Rogue([(200, new, 0.0)]) as rogue:
        done = refresh(rogue.url, artifact, [5, 6], root_key=served.root_pub, config=FAST)
    done.runner.close()
    before = tree_hash(artifact)
    for replayed in (old, new):
        with Rogue([(200, replayed, 0.0)]) as rogue:
            with pytest.raises(MntoolError, match="replay or rollback refused"):
                refresh(rogue.url, artifact, [1, 2], root_key=served.root_pub, config=FAST)
    assert tree_hash(artifact) == before


# ---- retries --------------------------------------------------------------------------------
def test_5xx_is_retried_then_the_patch_applies(patch_server, served, tmp_path):
    artifact = device_copy(served, tmp_path)
    script = [error(503, "busy"), error(500, "oops"), (200, real_patch(patch_server, served), 0.0)]
    with Rogue(script) as rogue:
        done = refresh(rogue.url, artifact, [3, 1, 4], verify_key=served.pub, config=FAST)
        assert done.attempts == 3 and rogue.hits == 3
    done.runner.close()


def test_a_timeout_is_retried(patch_server, served, tmp_path):
    artifact = device_copy(served, tmp_path)
    patch = real_patch(patch_server, served)
    with Rogue([(200, patch, 2.0), (200, patch, 0.0)]) as rogue:
        done = refresh(
            rogue.url,
            artifact,
            [3, 1, 4],
            verify_key=served.pub,
            config=ClientConfig(timeout_s=0.5, retries=2, backoff_s=0.01),
        )
        assert done.attempts == 2
    done.runner.close()


def test_4xx_is_final(patch_server, served, tmp_path):
    artifact = device_copy(served, tmp_path)
    before = tree_hash(artifact)
    with pytest.raises(ClientError, match=r"\(401\): invalid bearer token") as refused:
        refresh(patch_server.url, artifact, [1], verify_key=served.pub, token="wrong", config=FAST)
    assert refused.value.status == 401
    with Rogue([error(404, "unknown fingerprint")]) as rogue:
        with pytest.raises(ClientError, match="unknown fingerprint"):
            refresh(rogue.url, artifact, [1], verify_key=served.pub, config=FAST)
        assert rogue.hits == 1
    assert tree_hash(artifact) == before


def test_unreachable_server_fails_after_the_retries(served, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ClientError, match="failed 3 times") as failed:
        fetch_patch(f"http://127.0.0.1:{port}", served.fingerprint, [1], device_id="d", config=FAST)
    assert "\n" not in str(failed.value)
