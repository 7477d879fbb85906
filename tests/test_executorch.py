"""The ExecuTorch target (`exporters/executorch.py`): a `.pte` + `.ptd` pair whose adaptive
tensors sit in the `.ptd` under their PyTorch names, proven at export, patched like every other
target (in place through A/B slots, in memory, hot-swapped) with parity against PyTorch, and
stable across re-exports (same names, same byte ranges), unlike XNNPACK's content-hash keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from small_artifacts import fresh_params, small_sasrec

from device_runtime import weight_map as wmap
from device_runtime.hotswap import HotSwap
from device_runtime.install import apply_patch_file
from device_runtime.patch import apply_patch_bytes
from device_runtime.runners import open_runner
from exporters import export
from exporters.executorch import available
from exporters.options import PROOF_ATOL
from mntool.patches import build_patch

pytestmark = pytest.mark.skipif(not available(), reason="executorch is not installed (pip install 'mntool[peers]')")


@pytest.fixture(scope="module")
def model_and_example():
    return small_sasrec()


@pytest.fixture(scope="module")
def pte(model_and_example, tmp_path_factory):
    model, example = model_and_example
    return export(model, example, model.adaptive_names(), "executorch", tmp_path_factory.mktemp("et") / "a")


def torch_output(model, example, params=None) -> np.ndarray:
    state = model.state_dict()
    if params:
        model.load_state_dict({**state, **{n: torch.from_numpy(v) for n, v in params.items()}})
    try:
        with torch.no_grad():
            return model(*example).numpy()
    finally:
        model.load_state_dict(state)


def feeds(example) -> dict[str, np.ndarray]:
    return {"history": example[0].numpy(), "target": example[1].numpy()}


def test_adaptive_tensors_live_in_the_ptd_under_their_names(pte, model_and_example):
    model, _ = model_and_example
    wm = wmap.load(pte)
    assert wm.target == "executorch" and wm.files == ("model.pte", "model.ptd")
    assert [t.name for t in wm.tensors] == model.adaptive_names()
    assert all(t.file == "model.ptd" and t.offset % 64 == 0 for t in wm.tensors)
    assert wm.extra["executorch"]["keys"] == {n: n for n in model.adaptive_names()}  # names, not hashes


def test_runs_like_pytorch(pte, model_and_example):
    model, example = model_and_example
    with open_runner(pte, weight_map=wmap.load(pte)) as runner:
        got = runner.run(feeds(example))["output"]
    np.testing.assert_allclose(got, torch_output(model, example), rtol=0, atol=PROOF_ATOL)


def test_patch_round_trip_in_place_in_memory_and_hot_swapped(pte, model_and_example, tmp_path):
    model, example = model_and_example
    wm = wmap.load(pte)
    for seed in (1, 2):
        params = fresh_params(pte, seed)
        expected = torch_output(model, example, params)
        patch = build_patch(pte, params)
        files = apply_patch_bytes(wmap.read_artifact_files(pte, wm.files), patch, wm)
        with open_runner(pte, weight_map=wm, files=files) as runner:
            np.testing.assert_allclose(runner.run(feeds(example))["output"], expected, rtol=0, atol=PROOF_ATOL)
        apply_patch_file(pte, patch)
        with open_runner(pte, weight_map=wm) as runner:
            np.testing.assert_allclose(runner.run(feeds(example))["output"], expected, rtol=0, atol=PROOF_ATOL)
        wmap.load(pte)  # still matches its weight map
    swapper = HotSwap(pte, weight_map=wm)
    params = fresh_params(pte, 3)
    runner, _ = swapper.swap(build_patch(pte, params))
    np.testing.assert_allclose(
        runner.run(feeds(example))["output"], torch_output(model, example, params), rtol=0, atol=PROOF_ATOL
    )
    swapper.close()


def test_a_re_export_keeps_every_adaptive_name_and_location(pte, model_and_example, tmp_path):
    model, example = model_and_example
    again = export(model, example, model.adaptive_names(), "executorch", tmp_path / "b")
    first, second = wmap.load(pte), wmap.load(again)
    layout = [(t.name, t.file, t.offset, t.nbytes, t.dtype, t.stored_shape) for t in first.tensors]
    assert layout == [(t.name, t.file, t.offset, t.nbytes, t.dtype, t.stored_shape) for t in second.tensors]
