"""MoMoDistill (DCCL): the teacher's per-device predictions, the distillation loss and weights, the
new cloud model as an --init for every personalisation, and the refusals. Synthetic data, tiny
models, few epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from device_runtime.errors import MntoolError
from mntool.momodistill import DistillConfig, device_weights, distill_loss, load_teacher, teacher_logits
from mntool.train import FinetuneConfig, TrainConfig, load_checkpoint, score_rows, train

QUIET = dict(progress=False, log=lambda s: None)
FAST = dict(epochs=3, batch_size=200, lr=5e-3, probe_every=20, finetune=FinetuneConfig(steps=2))


def _distill(dataset, out, teacher, **distill):
    return train(
        dataset,
        TrainConfig(
            model="sasrec", method="momodistill", distill=DistillConfig(teacher=str(teacher), **distill), **FAST
        ),
        out,
        **QUIET,
    )


@pytest.fixture(scope="module")
def distilled(tiny_checkpoints, synthetic_dataset, tmp_path_factory):
    """A MoMoDistill SASRec distilled from the tiny MetaNetwork's device models."""
    out = tmp_path_factory.mktemp("md") / "md"
    metrics = _distill(synthetic_dataset, out, tiny_checkpoints["metanetwork"])
    return out, metrics


def test_device_weights_give_every_device_the_same_total():
    users = np.array([0, 0, 0, 0, 1, 2, 2, 2])
    w = device_weights(users, "devices")
    assert w.mean() == pytest.approx(1.0)
    totals = [w[users == u].sum() for u in (0, 1, 2)]
    assert np.allclose(totals, totals[0])  # a device with 1 row counts as much as one with 4
    assert np.array_equal(device_weights(users, "rows"), np.ones(8, np.float32))


def test_distill_loss_is_the_label_loss_at_alpha_0_and_the_teacher_loss_at_1():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = (torch.rand(6, 5) > 0.8).float()
    w = torch.rand(6, 5) + 0.5
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(distill_loss(s, y, t, w, 0.0), bce(s, y))
    assert torch.allclose(distill_loss(s, y, t, w, 1.0), (w * bce(s, torch.sigmoid(t), reduction="none")).mean())
    # the student that matches the teacher minimises the distillation term
    assert distill_loss(t, y, t, w, 1.0) < distill_loss(s, y, t, w, 1.0)


def test_teacher_logits_are_each_devices_personalised_model(tiny_checkpoints, synthetic_dataset):
    """Every cloud row is scored by its own device's generated parameters (from its end-of-cloud
    upload), which differ from the unpatched model's scores and from another device's."""
    teacher = load_teacher(tiny_checkpoints["metanetwork"], synthetic_dataset)
    logits, info = teacher_logits(teacher, synthetic_dataset)
    rows = synthetic_dataset.train
    assert logits.shape == (len(rows),) and np.all(np.isfinite(logits))
    assert info["teacher_method"] == "metanetwork" and info["devices"] == len(np.unique(rows.user))
    from mntool.train import generate_device_params

    users, recent = synthetic_dataset.device_recent("valid")
    u = users[3]
    mine = rows.user == u
    params = generate_device_params(teacher.meta, users[3:4], recent[3:4])
    own = score_rows(teacher.model, rows.history[mine], rows.target[mine], rows.user[mine], params)
    assert np.allclose(logits[mine], own, atol=1e-5)
    plain = score_rows(teacher.model, rows.history[mine], rows.target[mine], rows.user[mine], None)
    assert not np.allclose(logits[mine], plain, atol=1e-4)


def test_alpha_0_is_the_static_model_exactly(tiny_checkpoints, synthetic_dataset, tmp_path):
    """With no distillation term the student is the static model of the same seed, bit for bit: the
    same initial weights and batch order, so a paired difference isolates the distillation term."""
    static = tmp_path / "static"
    train(synthetic_dataset, TrainConfig(model="sasrec", method="static", **FAST), static, **QUIET)
    _distill(synthetic_dataset, tmp_path / "md0", tiny_checkpoints["metanetwork"], alpha=0.0)
    a, b = load_checkpoint(static).model.state_dict(), load_checkpoint(tmp_path / "md0").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_momodistill_trains_a_cloud_model_with_bucket_metrics(distilled, tiny_checkpoints, synthetic_dataset):
    out, metrics = distilled
    assert metrics["method"] == "momodistill" and metrics["teacher"] == str(tiny_checkpoints["metanetwork"])
    d = metrics["train"]["distill"]
    assert d["teacher_method"] == "metanetwork" and d["alpha"] == 0.5 and d["weighting"] == "devices"
    assert d["device_weight"]["min"] <= 1.0 <= d["device_weight"]["max"]  # weights average 1 over the rows
    for split in ("valid", "test"):
        assert 0.0 < metrics[split]["uauc"] <= 1.0
        assert "personalise_seconds_per_device" not in metrics[split]  # one model for every device
        assert {"head", "torso", "tail"} <= metrics[split].keys()
    ck = load_checkpoint(out)
    assert ck.config.method == "momodistill" and ck.meta is None
    static = load_checkpoint(tiny_checkpoints["static"]).model.state_dict()
    assert any(not torch.equal(v, static[k]) for k, v in ck.model.state_dict().items())


@pytest.mark.parametrize("method", ["finetune", "metapatch", "metanetwork"])
def test_the_distilled_model_is_re_personalised_by_every_method(method, distilled, synthetic_dataset, tmp_path):
    out, _ = distilled
    metrics = train(
        synthetic_dataset, TrainConfig(model="sasrec", method=method, **FAST), tmp_path / method, init=out, **QUIET
    )
    assert metrics["method"] == method and metrics["init"] == str(out)
    assert 0.0 < metrics["test"]["uauc"] <= 1.0


def test_refusals(tiny_checkpoints, synthetic_dataset, synthetic_dataset_with, tmp_path):
    with pytest.raises(MntoolError, match="needs --teacher"):
        _distill(synthetic_dataset, tmp_path / "a", "")
    with pytest.raises(MntoolError, match="takes --teacher, not --init"):
        train(
            synthetic_dataset,
            TrainConfig(
                model="sasrec", method="momodistill", distill=DistillConfig(teacher=str(tiny_checkpoints["static"]))
            ),
            tmp_path / "b",
            init=tiny_checkpoints["static"],
            **QUIET,
        )
    with pytest.raises(MntoolError, match="another protocol configuration"):
        _distill(synthetic_dataset_with(history_len=10, recent_len=30), tmp_path / "c", tiny_checkpoints["static"])
    with pytest.raises(MntoolError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(MntoolError, match="weighting"):
        DistillConfig(weighting="users")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_cli(tiny_checkpoints, tmp_path):
    """`mntool train --method momodistill` flags: --teacher required, distill flags only with it."""
    from mntool.cli.main import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--method", "momodistill", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "needs --teacher" in res.output
    res = runner.invoke(cli, ["train", "--distill-alpha", "0.3", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "only applies to --method momodistill" in res.output
    res = runner.invoke(
        cli,
        [
            "train",
            "--method",
            "momodistill",
            "--teacher",
            str(tiny_checkpoints["static"]),
            "--distill-alpha",
            "2",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert res.exit_code == 2
    assert not (tmp_path / "x").exists()
    res = runner.invoke(cli, ["train", "--help"])
    assert "--teacher" in res.output and "momodistill" in res.output
