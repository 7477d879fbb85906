"""`mntool serve` on an image checkpoint (task mnist): a real server process answers an image upload
(nested lists or base64) with a signed patch that applies to the exported TFLite artifact and
carries exactly the generator's parameters; uploads of different sizes share a batch only with
their own size; every malformed image request is a 4xx JSON error with one line, and nothing of
it reaches the generator (counted on the real server's /metrics, and by a recording generator in
process); the device client sends images and runs the patched model."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from test_serve import metric

from device_runtime import weight_map as wmap
from device_runtime.client import ClientConfig, ClientError, fetch_patch, refresh, samples_json
from device_runtime.install import apply_patch_file
from device_runtime.patch import TrustPolicy, parse_patch
from device_runtime.signing import load_public_key
from mntool.serve import ServerProcess, routes
from mntool.tasks import SamplesError
from mntool.tasks import mnist as mnist_task
from mntool.tasks import movielens as movielens_task

pytestmark = pytest.mark.slow
TOKEN = "image-device-token"
FAST = ClientConfig(timeout_s=30.0, retries=1, backoff_s=0.01)


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def image_served(mnist_dataset, tmp_path_factory):
    """Tiny LeNet checkpoints (static, then MetaNetwork on it) trained one epoch on the 12-device
    image protocol, the MetaNetwork one exported to TFLite, and an online signing key pair."""
    from exporters import export
    from mntool.patches import keygen
    from mntool.train import load_checkpoint
    from mntool.vision.train import VisionTrainConfig, train

    root = tmp_path_factory.mktemp("serve-images")
    quiet = dict(progress=False, log=lambda s: None)
    train(mnist_dataset, VisionTrainConfig(model="lenet", method="static", epochs=1), root / "static", **quiet)
    train(
        mnist_dataset,
        VisionTrainConfig(model="lenet", method="metanetwork", epochs=1),
        root / "mn",
        init=root / "static",
        **quiet,
    )
    ck = load_checkpoint(root / "mn")
    artifact = export(ck.model, ck.example_inputs(), ck.adaptive, "tflite", root / "artifact", progress=False)
    pair = keygen(root / "online")
    return SimpleNamespace(
        checkpoint=root / "mn",
        artifact=artifact,
        key=pair.private,
        pub=pair.public,
        fingerprint=wmap.load(artifact).fingerprint,
        limit=ck.upload_len,
        body_limit=mnist_task.upload_body_bytes(ck.upload_len),
    )


@pytest.fixture(scope="session")
def image_server(image_served, tmp_path_factory):
    """The real `mntool serve` on the image checkpoint: signed patches, a bearer token, the
    default body limit (sized by the task for full uploads), one worker. `.log` is its stderr."""
    log = tmp_path_factory.mktemp("serve-images-log") / "server.log"
    with log.open("w") as stderr:
        process = ServerProcess.start(
            image_served.checkpoint,
            [image_served.artifact],
            "--signing-key",
            image_served.key,
            "--token",
            TOKEN,
            "--max-wait-ms",
            20,
            stderr=stderr,
        )
    yield SimpleNamespace(url=process.url, process=process, log=log)
    process.stop()


@pytest.fixture(scope="session")
def generator(image_served):
    from mntool.generate import Generator

    return Generator.load(image_served.checkpoint)


def images(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (k, 28, 28), dtype=np.uint8)


def b64(pixels: np.ndarray | bytes) -> str:
    return base64.b64encode(pixels if isinstance(pixels, bytes) else pixels.tobytes()).decode("ascii")


def body(served, samples, **fields) -> dict:
    return {"device_id": "phone-1", "fingerprint": served.fingerprint, "samples": samples, **fields}


def auth(**headers) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", **headers}


def read_back(artifact: Path) -> dict[str, np.ndarray]:
    """The adaptive tensors the artifact on disk holds now, in PyTorch shapes."""
    wm = wmap.load(artifact)
    root = wmap.artifact_root(artifact)
    return {t.name: np.array(wmap.read_tensor(t, (root / t.file).read_bytes())) for t in wm.tensors}


# ---- the contract -------------------------------------------------------------------------
def test_openapi_and_status_describe_image_uploads(image_server, image_served):
    schema = httpx.get(f"{image_server.url}{routes.OPENAPI}").json()
    samples = schema["components"]["schemas"]["PatchRequest"]["properties"]["samples"]
    assert samples["oneOf"] == [{"required": ["images"]}, {"required": ["images_b64"]}]
    assert samples["additionalProperties"] is False and "items" not in samples["properties"]
    listed = samples["properties"]["images"]
    assert (listed["minItems"], listed["maxItems"]) == (1, image_served.limit)
    assert listed["items"]["maxItems"] == 28 and listed["items"]["items"]["maxItems"] == 28
    assert listed["items"]["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 255}
    assert samples["properties"]["images_b64"]["maxLength"] == len(b64(images(image_served.limit)))
    assert samples["properties"]["images_b64"]["minLength"] == len(b64(images(1)))
    status = httpx.get(f"{image_server.url}{routes.STATUS}", headers=auth()).json()
    assert status["task"] == "mnist" and status["method"] == "metanetwork" and status["signed"]


def test_an_image_patch_applies_and_carries_exactly_the_generated_parameters(
    image_server, image_served, generator, tmp_path
):
    upload = images(7, seed=1)
    expected = generator.generate(upload)
    answers = [
        httpx.post(f"{image_server.url}{routes.PATCHES}", json=body(image_served, samples), headers=auth(), timeout=30)
        for samples in ({"images": upload.tolist()}, {"images_b64": b64(upload)})
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert answers[0].headers["content-type"] == "application/octet-stream"
    lists, packed = (parse_patch(a.content) for a in answers)
    assert bytes(lists.payload) == bytes(packed.payload)  # both encodings: the same upload
    device = tmp_path / "device"
    shutil.copytree(image_served.artifact.parent, device)
    artifact = device / image_served.artifact.name
    policy = TrustPolicy(verify_key=load_public_key(image_served.pub), device_id="phone-1")
    patch = apply_patch_file(artifact, answers[1].content, policy=policy)
    assert patch.signed and {t.name for t in patch.tensors} == set(expected)
    held = read_back(artifact)
    for name, value in expected.items():
        np.testing.assert_array_equal(held[name], value)  # exactly: float32 stored as is


def test_uploads_of_different_sizes_each_get_their_own_parameters(image_server, image_served, generator):
    uploads = [images(k, seed=10 + i) for i, k in enumerate([1, 7, 32, 7, 1, 32, 3, 7, 1, 32, 3, 3])]
    before = httpx.get(f"{image_server.url}{routes.METRICS}").text

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{image_server.url}{routes.PATCHES}",
                        json=body(image_served, {"images_b64": b64(u)}),
                        headers=auth(),
                    )
                    for u in uploads
                )
            )

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * len(uploads)
    after = httpx.get(f"{image_server.url}{routes.METRICS}").text
    assert metric(after, "mntool_batch_size_sum") - metric(before, "mntool_batch_size_sum") == len(uploads)
    for upload, answer in zip(uploads, answers):
        expected = generator.generate(upload)
        for t in parse_patch(answer.content).tensors:
            got = parse_patch(answer.content).array(t).reshape(expected[t.name].shape)
            np.testing.assert_allclose(got, expected[t.name], rtol=0, atol=1e-6)


# ---- bad input ------------------------------------------------------------------------------
def _bad(served) -> dict[str, tuple[int, str, str, dict]]:
    """name -> (status, error slug, a word the message names, httpx.post keyword arguments, less
    the auth header)."""
    one, json_type = images(1), {"Content-Type": "application/json"}

    def sent(samples, **fields) -> dict:
        return dict(content=json.dumps(body(served, samples, **fields)), headers=json_type)

    def pixel(value) -> dict:
        image = one[0].tolist()
        image[3][5] = value
        return sent({"images": [image]})

    zeros = np.zeros((served.limit + 1, 28, 28), np.uint8)
    return {
        "one_image_without_the_list": (422, "bad_image_shape", "image 0", sent({"images": one[0].tolist()})),
        "29x28": (422, "bad_image_shape", "29 rows", sent({"images": one.tolist() + [[[0] * 28] * 29]})),
        "28x29": (422, "bad_image_shape", "29 pixels", sent({"images": [[[0] * 29] + [[0] * 28] * 27]})),
        "flat_pixels": (422, "bad_image_shape", "image 0", sent({"images": [[0] * 784]})),
        "no_images": (422, "too_few_samples", "no images", sent({"images": []})),
        "no_images_b64": (422, "too_few_samples", "no images", sent({"images_b64": ""})),
        "too_many_images": (422, "too_many_samples", f"at most {served.limit}", sent({"images": zeros.tolist()})),
        "too_many_images_b64": (422, "too_many_samples", f"at most {served.limit}", sent({"images_b64": b64(zeros)})),
        "pixel_256": (422, "bad_pixel", "256", pixel(256)),
        "pixel_minus_1": (422, "bad_pixel", "-1", pixel(-1)),
        "pixel_huge": (422, "bad_pixel", str(2**70), pixel(2**70)),
        "pixel_half": (422, "bad_pixel", "0.5", pixel(0.5)),
        "pixel_integral_float": (422, "bad_pixel", "7.0", pixel(7.0)),
        "pixel_nan": (422, "bad_pixel", "nan", pixel(float("nan"))),
        "pixel_string": (422, "bad_pixel", "'7'", pixel("7")),
        "pixel_bool": (422, "bad_pixel", "True", pixel(True)),
        "pixel_null": (422, "bad_pixel", "None", pixel(None)),
        "pixel_list": (422, "bad_pixel", "[1]", pixel([1])),
        "images_a_string": (400, "malformed_request", "samples.images", sent({"images": "abc"})),
        "b64_not_a_string": (400, "malformed_request", "images_b64", sent({"images_b64": 784})),
        "b64_invalid": (422, "bad_base64", "base64", sent({"images_b64": "!!!!" + b64(one)[4:]})),
        "b64_with_a_newline": (422, "bad_base64", "base64", sent({"images_b64": b64(one)[:76] + "\n" + b64(one)[76:]})),
        "b64_783_bytes": (422, "bad_image_shape", "783 bytes", sent({"images_b64": b64(one.tobytes()[:-1])})),
        "b64_785_bytes": (422, "bad_image_shape", "785 bytes", sent({"images_b64": b64(one.tobytes() + b"\0")})),
        "both_encodings": (400, "malformed_request", "one of", sent({"images": one.tolist(), "images_b64": b64(one)})),
        "unknown_field": (400, "malformed_request", "labels", sent({"images_b64": b64(one), "labels": [3]})),
        "item_ids": (400, "malformed_request", "not item ids", sent({"items": [1, 2, 3]})),
        "samples_a_list": (400, "malformed_request", "samples must be", sent([one[0].tolist()])),
        "missing_samples": (
            400,
            "malformed_request",
            "samples must be",
            dict(content=json.dumps({"device_id": "d", "fingerprint": served.fingerprint}), headers=json_type),
        ),
        "unknown_fingerprint": (
            404,
            "unknown_fingerprint",
            "fingerprint",
            sent({"images_b64": b64(one)}, fingerprint="ab" * 32),
        ),
        "body_too_large": (
            413,
            "body_too_large",
            str(served.body_limit),
            dict(content="{" + " " * served.body_limit + "}", headers=json_type),
        ),
        "wrong_content_type": (
            415,
            "unsupported_media_type",
            "application/json",
            dict(content=json.dumps(body(served, {"images_b64": b64(one)})), headers={"Content-Type": "text/plain"}),
        ),
    }


BAD = [
    "one_image_without_the_list",
    "29x28",
    "28x29",
    "flat_pixels",
    "no_images",
    "no_images_b64",
    "too_many_images",
    "too_many_images_b64",
    "pixel_256",
    "pixel_minus_1",
    "pixel_huge",
    "pixel_half",
    "pixel_integral_float",
    "pixel_nan",
    "pixel_string",
    "pixel_bool",
    "pixel_null",
    "pixel_list",
    "images_a_string",
    "b64_not_a_string",
    "b64_invalid",
    "b64_with_a_newline",
    "b64_783_bytes",
    "b64_785_bytes",
    "both_encodings",
    "unknown_field",
    "item_ids",
    "samples_a_list",
    "missing_samples",
    "unknown_fingerprint",
    "body_too_large",
    "wrong_content_type",
]


def _check_error(answer: httpx.Response, status: int, code: str, word: str, case: str = "") -> None:
    assert answer.status_code == status, f"{case}: {answer.text}"
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()
    assert set(error) == {"error", "message"} and error["error"] == code, error
    assert error["message"] and "\n" not in error["message"] and word in error["message"], error["message"]


def test_every_bad_case_is_listed(image_served):
    assert sorted(BAD) == sorted(_bad(image_served))


@pytest.mark.parametrize("case", BAD)
def test_bad_image_request_is_a_4xx_json_error_and_reaches_no_generator(image_server, image_served, case):
    status, code, word, kwargs = _bad(image_served)[case]
    before = httpx.get(f"{image_server.url}{routes.METRICS}").text
    answer = httpx.post(
        f"{image_server.url}{routes.PATCHES}", **{**kwargs, "headers": auth(**kwargs["headers"])}, timeout=30
    )
    _check_error(answer, status, code, word)
    after = httpx.get(f"{image_server.url}{routes.METRICS}").text
    assert metric(after, "mntool_batch_size_count") == metric(before, "mntool_batch_size_count")


def test_no_bad_request_calls_the_generator_in_process(image_served):
    """The same requests against the app in this process, its generator replaced by a recorder:
    not one call, until a good request makes exactly one."""
    from starlette.testclient import TestClient

    from mntool.serve import PatchService, ServeConfig, create_app

    service = PatchService.load(ServeConfig(str(image_served.checkpoint), [str(image_served.artifact)]))
    real, calls = service.generator.generate_batch, []

    def generate_batch(batch):
        calls.append(np.shape(batch))
        return real(batch)

    service.generator.generate_batch = generate_batch
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        for case, (status, code, word, kwargs) in _bad(image_served).items():
            _check_error(client.post(routes.PATCHES, **kwargs), status, code, word, case)
        assert calls == []
        good = client.post(routes.PATCHES, json=body(image_served, {"images": images(2).tolist()}))
        assert good.status_code == 200 and calls == [(1, 2, 28, 28)]


def test_a_batch_stacks_only_uploads_of_one_size(image_served, generator):
    from starlette.testclient import TestClient

    from mntool.serve import PatchService, ServeConfig, create_app

    service = PatchService.load(
        ServeConfig(str(image_served.checkpoint), [str(image_served.artifact)], max_batch=16, max_wait_ms=500)
    )
    real, calls = service.generator.generate_batch, []

    def generate_batch(batch):
        calls.append(np.shape(batch))
        return real(batch)

    service.generator.generate_batch = generate_batch
    uploads = [images(k, seed=20 + i) for i, k in enumerate([3, 5, 3, 1, 5, 3])]
    with TestClient(create_app(service)) as client:
        with ThreadPoolExecutor(len(uploads)) as pool:  # they arrive within max_wait_ms: one batch
            answers = list(
                pool.map(
                    lambda u: client.post(routes.PATCHES, json=body(image_served, {"images_b64": b64(u)})), uploads
                )
            )
    assert [a.status_code for a in answers] == [200] * len(uploads)
    assert sorted(calls) == [(1, 1, 28, 28), (2, 5, 28, 28), (3, 3, 28, 28)], calls
    for upload, answer in zip(uploads, answers):
        patch, expected = parse_patch(answer.content), generator.generate(upload)
        for t in patch.tensors:
            np.testing.assert_allclose(
                patch.array(t).reshape(expected[t.name].shape), expected[t.name], rtol=0, atol=1e-6
            )


def test_the_task_parses_both_encodings_alike_and_the_recommender_refuses_images():
    upload = images(4, seed=5)
    for samples in ({"images": upload.tolist()}, {"images_b64": b64(upload)}):
        parsed = mnist_task.parse_upload(None, samples, 32)
        assert parsed.dtype == np.uint8 and parsed.shape == (4, 28, 28) and (parsed == upload).all()
    for samples in ({"images": upload.tolist()}, {"images_b64": b64(upload)}):
        with pytest.raises(SamplesError, match=r'samples must be \{"items"') as refused:
            movielens_task.parse_upload(None, samples, 30)
        assert refused.value.code == "malformed_request"


def test_server_logged_no_traceback(image_server):
    """Runs after the bad-input tests above (file order): nothing they sent crashed a handler."""
    assert image_server.process.proc.poll() is None
    assert "Traceback" not in image_server.log.read_text()


# ---- the device client ----------------------------------------------------------------------
def test_the_client_sends_images_and_runs_the_patched_model(image_server, image_served, generator, tmp_path):
    import torch

    from mntool.train import load_checkpoint

    upload = images(9, seed=3)
    params = generator.generate(upload)
    ck = load_checkpoint(image_served.checkpoint)
    ck.model.load_state_dict({**ck.model.state_dict(), **{n: torch.as_tensor(v) for n, v in params.items()}})
    (x,) = ck.example_inputs(seed=4)
    with torch.no_grad():
        expected = ck.model(x).numpy()
    for i, sent in enumerate([upload, upload.tolist()]):  # an array, or nested lists
        device = tmp_path / f"device-{i}"
        shutil.copytree(image_served.artifact.parent, device)
        artifact = device / image_served.artifact.name
        done = refresh(
            image_server.url,
            artifact,
            sent,
            verify_key=image_served.pub,
            token=TOKEN,
            device_id="phone-7",
            config=FAST,
        )
        with done.runner as runner:
            got = runner.run({"images": x.numpy()})["output"]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        for name, value in read_back(artifact).items():
            np.testing.assert_array_equal(value, params[name])


def test_the_client_refuses_images_it_cannot_send(image_server, image_served):
    assert samples_json([4, 5]) == {"items": [4, 5]}
    assert samples_json(np.array([4, 5])) == {"items": [4, 5]}
    assert samples_json(images(2)) == {"images_b64": b64(images(2))}
    assert samples_json(images(2).astype(np.int64).tolist()) == {"images_b64": b64(images(2))}
    for bad, match in [
        (np.zeros((2, 29, 28), np.uint8), r"\(K, 28, 28\).*\(2, 29, 28\)"),
        (np.zeros((28, 28), np.uint8), r"\(K, 28, 28\).*\(28, 28\)"),
        (np.full((1, 28, 28), 0.5), "integers 0..255.*float64"),
        (np.full((1, 28, 28), 256), "0..255, got 256..256"),
        (np.full((1, 28, 28), -1), "0..255, got -1..-1"),
        (np.zeros((1, 28, 28), bool), "integers 0..255.*bool"),
        ([[[0] * 28] * 28, [[0] * 28] * 27], "images must be"),
    ]:
        with pytest.raises(ClientError, match=match):
            samples_json(bad)
    with pytest.raises(
        ClientError, match=rf"\(422\): {image_served.limit + 1} images; this service takes at most {image_served.limit}"
    ):
        fetch_patch(
            image_server.url,
            image_served.fingerprint,
            np.zeros((33, 28, 28), np.uint8),
            device_id="d",
            token=TOKEN,
            config=FAST,
        )
