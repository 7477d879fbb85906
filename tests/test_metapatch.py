"""MetaPatch (DCCL): the patched backbones, the cloud and device phases, the generator on z, and
export with z as the only adaptive tensor. Synthetic data, tiny models, few epochs and device steps."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from device_runtime.errors import MntoolError
from mntool.meta import per_sample_call
from mntool.metapatch import ADAPTIVE, MetaPatchConfig, MetaPatchDimTooSmall, attach
from mntool.models import BACKBONES, BackboneConfig, build_model
from mntool.train import FinetuneConfig, TrainConfig, finetune_device_params, load_checkpoint, train

QUIET = dict(progress=False, log=lambda s: None)
DEVICE_STEPS = 2  # the device phase's Adam steps of conftest's metapatch_ckpts (20 by default)


def _rows(dataset, n=12):
    rows = dataset.valid
    history, target = torch.from_numpy(rows.history[:n]), torch.from_numpy(rows.target[:n])
    candidates = torch.from_numpy(rows.target[: n * 5].reshape(n, 5))
    return history, target, candidates


def _with_z(model, z):
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.metapatch.z.copy_(torch.as_tensor(z))
    return clone


@pytest.mark.parametrize("name", list(BACKBONES))
def test_zero_z_is_the_base_model_exactly(name, synthetic_dataset):
    """Patches attached with z = 0 compute exactly what the base computes, in the plain forward
    (the exported form) and with one z per device (per_sample_call), row and candidate forms."""
    torch.manual_seed(0)
    base = build_model(name, synthetic_dataset.n_items, BackboneConfig()).eval()
    model = attach(base, MetaPatchConfig(), seed=1)
    assert model.adaptive_names() == [ADAPTIVE] and model.metapatch.z.shape == (32,)
    history, target, candidates = _rows(synthetic_dataset)
    zeros = torch.zeros(3, 32)
    with torch.no_grad():
        for t in (target, candidates):
            assert torch.equal(model(history, t), base(history, t))
            assert torch.equal(per_sample_call(model, {ADAPTIVE: zeros}, (history, t)), base(history, t))
        assert not torch.equal(_with_z(model, torch.ones(32))(history, target), base(history, target))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_per_device_z_equals_loading_each_devices_z(name, synthetic_dataset):
    torch.manual_seed(0)
    model = attach(build_model(name, synthetic_dataset.n_items, BackboneConfig()).eval(), MetaPatchConfig(), seed=1)
    history, target, candidates = _rows(synthetic_dataset)
    z = torch.randn(4, 32)
    index = torch.arange(len(history)) % 4
    with torch.no_grad():
        for t in (target, candidates):
            expected = torch.cat([_with_z(model, z[i])(history[j : j + 1], t[j : j + 1]) for j, i in enumerate(index)])
            got = per_sample_call(model, {ADAPTIVE: z}, (history, t), index)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            grouped = per_sample_call(model, {ADAPTIVE: z}, (history, t))  # 4 contiguous groups of 3 rows
            expected = torch.cat([_with_z(model, z[j // 3])(history[j : j + 1], t[j : j + 1]) for j in range(12)])
            torch.testing.assert_close(grouped, expected, rtol=0, atol=1e-6)


def test_metapatch_trains_and_scores(metapatch_ckpts):
    metrics = json.loads((metapatch_ckpts["metapatch"] / "metrics.json").read_text())
    assert metrics["method"] == "metapatch" and metrics["init"] == str(metapatch_ckpts["static"])
    assert metrics["adaptive_values"] == 32
    for split in ("valid", "test"):
        assert set(metrics[split]) >= {"auc", "uauc", "ndcg@10", "hr@10", "personalise_seconds_per_device"}
        assert metrics[split]["personalise_steps"] == DEVICE_STEPS and 0 <= metrics[split]["uauc"] <= 1
    log = metrics["train"]
    assert log["start_valid_uauc"] is not None and log["curve"]["step"][0] == 0
    assert log["cloud_z"]["users"] == 60 and log["cloud_z"]["spread_rms"] > 0
    epochs = log["epochs"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] or log["best_epoch"] == 0, epochs

    ck = load_checkpoint(metapatch_ckpts["metapatch"])
    assert ck.adaptive == [ADAPTIVE] and ck.meta is None
    assert ck.config.backbone.metapatch_dim == 32 and ck.config.metapatch.dim == 32
    static = load_checkpoint(metapatch_ckpts["static"]).model.state_dict()
    patched = ck.model.state_dict()
    assert set(patched) - set(static) == {k for k in patched if k.startswith("metapatch.")}
    for name, tensor in static.items():  # the cloud phase leaves the base backbone bit-identical
        assert torch.equal(patched[name], tensor), name
    assert (ck.model.metapatch.z != 0).any()  # the mean cloud z, where devices start


def test_trained_metapatch_with_zero_z_is_its_static_init(metapatch_ckpts, synthetic_dataset):
    ck = load_checkpoint(metapatch_ckpts["metapatch"])
    static = load_checkpoint(metapatch_ckpts["static"]).model
    history, target, candidates = _rows(synthetic_dataset)
    with torch.no_grad():
        for t in (target, candidates):
            assert torch.equal(_with_z(ck.model, torch.zeros(32))(history, t), static(history, t))
            assert not torch.equal(ck.model(history, t), static(history, t))


def test_device_phase_changes_only_z(metapatch_ckpts, synthetic_dataset):
    ck = load_checkpoint(metapatch_ckpts["metapatch"])
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    users, recent = synthetic_dataset.device_recent("valid")
    dp = finetune_device_params(
        ck.model, users[:4], recent[:4], FinetuneConfig(steps=3), seed=0, history_len=ck.protocol["history_len"]
    )
    after = ck.model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed: the device phase may only learn z"
    assert list(dp.params) == [ADAPTIVE] and dp.params[ADAPTIVE].shape == (4, 32)
    start = before[ADAPTIVE]
    for z in dp.params[ADAPTIVE]:  # every device moved its own z away from the mean cloud z
        assert not torch.allclose(z, start)
    assert not torch.allclose(dp.params[ADAPTIVE][0], dp.params[ADAPTIVE][1])


def test_a_served_device_phase_patch_is_a_function_of_its_upload_alone(metapatch_ckpts, synthetic_dataset):
    """`mntool serve` batches uploads into one generator call; the device phase draws its negatives
    per call, so each upload gets a call of its own and its z does not depend on its batch."""
    from mntool.generate import Generator

    generator = Generator.load(metapatch_ckpts["metapatch"])
    _, recent = synthetic_dataset.device_recent("valid")
    batch = generator.generate_batch(recent[:3])[ADAPTIVE]
    for i in range(3):
        assert np.array_equal(generator.generate_batch(recent[i : i + 1])[ADAPTIVE][0], batch[i])
        assert np.array_equal(generator.generate_batch(recent[[i, (i + 1) % 3]])[ADAPTIVE][0], batch[i])
    assert not np.array_equal(batch[0], batch[1])


def test_generator_outputs_z_on_the_frozen_metapatch_model(metapatch_ckpts, synthetic_dataset):
    from mntool.generate import Generator
    from mntool.train import generate_device_params

    metrics = json.loads((metapatch_ckpts["metanetwork"] / "metrics.json").read_text())
    assert metrics["method"] == "metanetwork" and metrics["init_method"] == "metapatch"
    assert metrics["adaptive_values"] == 32 and metrics["test"]["personalise_steps"] == 0
    assert len(metrics["train"]["epochs"]) >= 1
    ck = load_checkpoint(metapatch_ckpts["metanetwork"])
    mp = load_checkpoint(metapatch_ckpts["metapatch"])
    assert ck.adaptive == [ADAPTIVE] and ck.meta.adaptive == [ADAPTIVE]
    assert ck.meta.config.scale_floor == pytest.approx(float(mp.model.metapatch.spread))
    frozen = mp.model.state_dict()
    for name, tensor in ck.model.state_dict().items():  # the metapatch model (shared P included) stayed frozen
        assert torch.equal(tensor, frozen[name]), name
    users, recent = synthetic_dataset.device_recent("test")
    with torch.no_grad():
        ck.meta.ema_stabilizer.gates.fill_(0.5)  # whatever training chose, an open gate must personalise z
    z = generate_device_params(ck.meta, users[:5], recent[:5]).params[ADAPTIVE]
    assert z.shape == (5, 32) and torch.isfinite(z).all()
    assert not torch.allclose(z[0], z[1])
    one = Generator.load(metapatch_ckpts["metanetwork"]).generate(recent[0][recent[0] != 0].tolist())
    assert set(one) == {ADAPTIVE} and one[ADAPTIVE].shape == (32,)


def _runtime_output(artifact, files, inputs):
    from device_runtime import weight_map as wmap
    from device_runtime.runners import open_runner

    with open_runner(artifact, weight_map=wmap.load(artifact), files=files) as runner:
        return runner.run({"history": inputs[0].numpy(), "target": inputs[1].numpy()})["output"]


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_export_carries_z_alone_and_a_patch_of_it_round_trips(target, metapatch_ckpts, tmp_path):
    from device_runtime import weight_map as wmap
    from device_runtime.patch import apply_patch_bytes
    from exporters import export
    from mntool.patches import build_patch

    ck = load_checkpoint(metapatch_ckpts["metapatch"])
    inputs, form = ck.export_inputs()
    artifact = export(ck.model, inputs, ck.model.adaptive_names(), target, tmp_path / "mp", form=form)
    wm = wmap.load(artifact)
    assert [(t.name, t.shape, t.nbytes) for t in wm.tensors] == [(ADAPTIVE, (32,), 128)]
    z = np.random.default_rng(0).normal(0, 0.5, 32).astype(np.float32)
    patch = build_patch(artifact, {ADAPTIVE: z})
    files = apply_patch_bytes(wmap.read_artifact_files(artifact, wm.files), patch, wm)
    with torch.no_grad():
        expected = _with_z(ck.model, z)(*inputs).numpy()
        unpatched = ck.model(*inputs).numpy()
    np.testing.assert_allclose(_runtime_output(artifact, files, inputs), expected, rtol=0, atol=1e-5)
    assert np.abs(expected - unpatched).max() > 1e-4, "patching z must change the compiled model's output"
    if target == "onnx":  # the head patch of the static model it was built on, on the same target
        static = load_checkpoint(metapatch_ckpts["static"])
        head_artifact = export(static.model, inputs, static.adaptive, target, tmp_path / "static", form=form)
        params = {n: p.detach().numpy() for n, p in static.model.named_parameters() if n in static.adaptive}
        assert len(patch) * 10 <= len(build_patch(head_artifact, params)), "a metapatch is <= 1/10 of a head patch"


def test_coreml_export_reads_z_back_exactly(metapatch_ckpts, tmp_path):
    from device_runtime import weight_map as wmap
    from device_runtime.patch import apply_patch_bytes
    from exporters import export
    from exporters.coreml import read_back
    from mntool.patches import build_patch

    ck = load_checkpoint(metapatch_ckpts["metapatch"])
    inputs, form = ck.export_inputs()
    artifact = export(ck.model, inputs, ck.model.adaptive_names(), "coreml", tmp_path / "mp", form=form)
    wm = wmap.load(artifact)
    assert [(t.name, t.shape, t.nbytes) for t in wm.tensors] == [(ADAPTIVE, (32,), 128)]
    assert wm.tensors[0].file.endswith("weight.bin")  # a blob, not an inline constant
    z = np.random.default_rng(1).normal(0, 0.5, 32).astype(np.float32)
    files = apply_patch_bytes(wmap.read_artifact_files(artifact, wm.files), build_patch(artifact, {ADAPTIVE: z}), wm)
    np.testing.assert_array_equal(read_back(wm, files, tmp_path)[ADAPTIVE], z)


def test_a_metapatch_under_10_values_is_refused_by_name(synthetic_dataset, tiny_checkpoints, tmp_path):
    from mntool.cli.main import cli

    for make in (
        lambda: MetaPatchConfig(dim=8),
        lambda: TrainConfig.from_dict({"method": "metapatch", "metapatch": {"dim": 9}}),
        lambda: build_model("sasrec", 20, BackboneConfig(metapatch_dim=4)),
    ):
        with pytest.raises(MetaPatchDimTooSmall, match="Core ML stores constants under 10 elements inline"):
            make()
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--method", "metapatch", "--metapatch-dim", "8", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "--metapatch-dim >= 10" in res.output and res.output.strip().count("\n") == 0
    res = runner.invoke(cli, ["train", "--method", "static", "--metapatch-dim", "40", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "only applies to --method metapatch" in res.output
    MetaPatchConfig(dim=10)  # the smallest allowed


def test_metapatch_and_finetune_start_only_from_static(metapatch_ckpts, synthetic_dataset, tmp_path):
    for method in ("metapatch", "finetune"):
        with pytest.raises(MntoolError, match="must be a static or momodistill sasrec checkpoint"):
            train(
                synthetic_dataset,
                TrainConfig(model="sasrec", method=method, epochs=1),
                tmp_path / method,
                init=metapatch_ckpts["metapatch"],
                **QUIET,
            )
