"""`mntool generate`: a MetaNetwork checkpoint + a device's recent items -> a patch whose
parameters, applied to the exported model, make ONNX Runtime compute what PyTorch computes
with the generator's parameters for that device."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_patch_cli import mntool, one_line_error

from device_runtime.runners import open_runner
from mntool.generate import Generator
from mntool.train import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory):
    from exporters import export

    ckpt = load_checkpoint(tiny_checkpoints["metanetwork"])
    out = tmp_path_factory.mktemp("generate-export")
    return export(ckpt.model, ckpt.example_inputs(), ckpt.adaptive, "onnx", out)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_generate_patch_apply_run(tiny_checkpoints, exported, tmp_path, suffix):
    ckpt_dir = tiny_checkpoints["metanetwork"]
    items = [5, 17, 3, 42, 8]
    samples = tmp_path / f"recent{suffix}"
    if suffix == ".json":
        samples.write_text(json.dumps({"items": items}))
    else:
        np.savez(samples, items=np.array(items))
    made = mntool("generate", ckpt_dir, exported, "--samples", samples, "-o", tmp_path / "p.mnpatch", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["tensors"][0]["name"] == load_checkpoint(ckpt_dir).adaptive[0]
    out = tmp_path / "patched" / "model.onnx"
    assert mntool("patch-weights", exported, tmp_path / "p.mnpatch", "-o", out).returncode == 0

    ckpt = load_checkpoint(ckpt_dir)
    params = Generator.load(ckpt_dir).generate(items)
    model = copy.deepcopy(ckpt.model)
    model.load_state_dict({**model.state_dict(), **{n: torch.as_tensor(v) for n, v in params.items()}})
    history, target = ckpt.example_inputs()
    with torch.no_grad():
        expected = model(history, target).numpy()
    with open_runner(out) as runner:
        got = runner.run({"history": history.numpy(), "target": target.numpy()})["output"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert np.abs(ckpt.model(history, target).numpy() - expected).max() > 0, "generated = static parameters"


def test_generate_rejects_bad_samples_in_one_line(tiny_checkpoints, exported, tmp_path):
    samples = tmp_path / "recent.json"
    samples.write_text(json.dumps({"items": [1, 10**6]}))
    one_line_error(
        mntool(
            "generate", tiny_checkpoints["metanetwork"], exported, "--samples", samples, "-o", tmp_path / "p.mnpatch"
        ),
        "outside the vocabulary",
    )
    samples.write_text(json.dumps({"recent": [1]}))
    one_line_error(
        mntool(
            "generate", tiny_checkpoints["metanetwork"], exported, "--samples", samples, "-o", tmp_path / "p.mnpatch"
        ),
        "no 'items'",
    )
    assert not (tmp_path / "p.mnpatch").exists()
