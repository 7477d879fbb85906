"""Training, evaluation and checkpoints, on the synthetic data (fast) and real ML-100k (slow path)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from device_runtime.errors import MntoolError
from mntool.models import BackboneConfig, build_model
from mntool.train import (
    Curve,
    TrainConfig,
    finetune_device_params,
    generate_device_params,
    group_batches,
    group_inputs,
    load_checkpoint,
    recent_training_rows,
    train,
)


def test_checkpoints_hold_metrics_and_reload(tiny_checkpoints, synthetic_dataset):
    for method, path in tiny_checkpoints.items():
        metrics = json.loads((path / "metrics.json").read_text())
        assert metrics["method"] == method
        for split in ("valid", "test"):
            assert set(metrics[split]) >= {"auc", "uauc", "ndcg@10", "hr@10"}
            assert 0.0 <= metrics[split]["auc"] <= 1.0
        ck = load_checkpoint(path)
        assert ck.config.method == method and ck.n_items == synthetic_dataset.n_items
        assert (ck.meta is not None) == (method == "metanetwork")


def test_static_training_lowers_the_loss(tiny_checkpoints):
    epochs = json.loads((tiny_checkpoints["static"] / "metrics.json").read_text())["train"]["epochs"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], epochs


def test_metanetwork_init_is_the_static_checkpoint(tiny_checkpoints):
    metrics = json.loads((tiny_checkpoints["metanetwork"] / "metrics.json").read_text())
    assert metrics["init"] == str(tiny_checkpoints["static"])
    assert metrics["train"]["curve"]["step"][0] == 0


def test_frozen_metanetwork_leaves_the_static_backbone_exactly(tiny_checkpoints):
    """With --init the generator learns on the static backbone, frozen: the unpatched model of the
    MetaNetwork checkpoint is the static model, tensor for tensor."""
    static = load_checkpoint(tiny_checkpoints["static"]).model.state_dict()
    ck = load_checkpoint(tiny_checkpoints["metanetwork"])
    assert ck.config.meta_train_backbone is False
    backbone = ck.model.state_dict()
    assert backbone.keys() == static.keys()
    for name, tensor in static.items():
        assert torch.equal(backbone[name], tensor), name


def test_metanetwork_without_init_trains_backbone_and_generator_together(synthetic_dataset, tmp_path):
    """No --init: no static model is trained first; the backbone and the generator learn together
    from the initial weights a static model of the same seed starts from."""
    from mntool.train import _seed_everything

    cfg = TrainConfig(model="gru4rec", method="metanetwork", epochs=2, batch_size=200, probe_every=20)
    metrics = train(synthetic_dataset, cfg, tmp_path / "joint", progress=False, log=lambda s: None)
    assert metrics["init"] is None and not (tmp_path / "joint" / "static").exists()
    ck = load_checkpoint(tmp_path / "joint")
    assert ck.config.meta_train_backbone is True and ck.meta is not None
    _seed_everything(cfg.seed)
    start = build_model("gru4rec", synthetic_dataset.n_items, cfg.backbone).state_dict()
    trained = ck.model.state_dict()
    moved = [n for n in start if not torch.equal(start[n], trained[n])]
    assert "item_embedding.weight" in moved and "head.layers.0.weight" in moved, moved
    gates = ck.meta.stabilizer.gates.detach()
    assert torch.all(gates != 0), gates  # the generator's residual was switched on from its zero start


def test_shuffled_uploads_keep_everything_but_whose_upload_it_is(synthetic_dataset):
    ds = synthetic_dataset
    sh = ds.with_shuffled_uploads(seed=0)
    g = ds.config.n_negatives + 1
    for split in ("train", "valid", "test"):
        a, b = ds.split(split), sh.split(split)
        for field in ("user", "target", "history", "label", "timestamp"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (split, field)
    # training: whole uploads permuted between sample groups, each group still sharing one
    up = sh.train.recent.reshape(-1, g, ds.config.recent_len)
    assert np.all(up == up[:, :1])
    before = {r.tobytes() for r in ds.train.recent[::g]}
    assert {r.tobytes() for r in sh.train.recent[::g]} <= before
    # (a user's first block uploads nothing yet: about 1 group in 9 here, so some swaps trade two empty uploads)
    assert np.mean(np.any(sh.train.recent != ds.train.recent, axis=1)) > 0.75
    # device periods: a permutation of the devices' uploads, and every row carries its device's
    for name in ("valid_request", "test_request"):
        a, b = getattr(ds, name), getattr(sh, name)
        assert sorted(map(bytes, a)) == sorted(map(bytes, b))
        assert np.mean(np.any(a != b, axis=1)) > 0.9
    where = {int(u): i for i, u in enumerate(sh.device_users)}
    for split, request in (("valid", sh.valid_request), ("test", sh.test_request)):
        rows = sh.split(split)
        assert np.array_equal(rows.recent, request[[where[int(u)] for u in rows.user]])
    assert np.array_equal(sh.test_rank.recent, sh.test_request[[where[int(u)] for u in sh.test_rank.user]])
    assert np.array_equal(ds.with_shuffled_uploads(seed=0).valid_request, sh.valid_request)  # seeded


def test_group_batches_keep_each_positive_with_its_negatives(synthetic_dataset):
    rows = synthetic_dataset.train
    seen = []
    for idx in group_batches(rows, 50, 5, np.random.default_rng(0)):
        assert len(idx) % 5 == 0
        groups = idx.reshape(-1, 5)
        assert np.all(rows.label[groups[:, 0]] == 1) and np.all(rows.label[groups[:, 1:]] == 0)
        assert np.all(rows.recent[groups] == rows.recent[groups[:, :1]])
        seen.append(idx)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(len(rows)))


def test_grouped_candidate_form_equals_scoring_each_row(synthetic_dataset):
    """Training and evaluation encode a group's shared history once and score its targets as
    candidates; in eval mode that gives the same logits as scoring every row on its own."""
    rows, group = synthetic_dataset.train, synthetic_dataset.config.n_negatives + 1
    idx = next(group_batches(rows, 100, group, np.random.default_rng(1)))
    history, target, label = group_inputs(rows, idx, group)
    assert history.shape == (len(idx) // group, rows.history.shape[1]) and target.shape == label.shape == (
        len(idx) // group,
        group,
    )
    for name in ("gru4rec", "sasrec", "din"):
        torch.manual_seed(0)
        model = build_model(name, synthetic_dataset.n_items, BackboneConfig()).eval()
        with torch.no_grad():
            flat = model(torch.from_numpy(rows.history[idx]), torch.from_numpy(rows.target[idx]))
            grouped = model(history, target).reshape(-1)
        torch.testing.assert_close(grouped, flat, rtol=1e-5, atol=1e-6)
    broken = idx.copy()
    broken[1] = broken[group]  # a row of another group (another history) inside the first group
    with pytest.raises(AssertionError, match="share one history"):
        group_inputs(rows, broken, group)


def test_recent_training_rows_use_only_the_upload():
    recent = np.array([[0, 0, 3, 4, 5]])
    hist, target, label = recent_training_rows(recent, history_len=4, n_items=20, n_negatives=2, seed=0)
    assert hist.shape == (1, 15, 4) and target.shape == (1, 15)
    # positives: the uploaded items, each with the items before it as history
    assert list(target[0, [6, 9, 12]]) == [3, 4, 5]
    assert list(hist[0, 12]) == [0, 0, 3, 4]
    assert set(label[0, :6]) == {-1.0}  # padding positions are ignored
    negs = target[0, [7, 8, 10, 11, 13, 14]]
    assert not np.isin(negs, [3, 4, 5]).any()


def test_finetune_moves_only_the_adaptive_layers_and_fits_the_upload(tiny_checkpoints, synthetic_dataset):
    ck = load_checkpoint(tiny_checkpoints["static"])
    before = {n: p.detach().clone() for n, p in ck.model.named_parameters()}
    users, recent = synthetic_dataset.device_recent("valid")
    cfg = TrainConfig().finetune
    dp = finetune_device_params(ck.model, users[:4], recent[:4], cfg, seed=0)
    for n, p in ck.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed: fine-tuning must not touch the shared model"
    for n in ck.adaptive:
        assert dp.params[n].shape == (4, *before[n].shape)
        assert not torch.allclose(dp.params[n][0], before[n])


def test_curve_figures():
    c = Curve(
        step=[0, 10, 20, 30, 40, 50], loss=[1.0, 0.8, 0.7, 0.72, 0.70, 0.72], uauc=[0.80, 0.85, 0.89, 0.90, 0.90, 0.90]
    )
    assert c.steps_to_fraction(0.95) == 30
    assert c.steps_to_fraction(0.4) == 10
    assert c.oscillation() == pytest.approx(np.std([-0.02, 0.02]))  # last half: 0.72, 0.70, 0.72


def test_unknown_method_and_bad_init_are_clear_errors(tiny_checkpoints, synthetic_dataset, tmp_path):
    with pytest.raises(MntoolError, match="unknown method"):
        TrainConfig(method="maml")
    with pytest.raises(MntoolError, match="must be a static"):
        train(
            synthetic_dataset,
            TrainConfig(method="metanetwork"),
            tmp_path / "x",
            init=tiny_checkpoints["metanetwork"],
            progress=False,
            log=lambda s: None,
        )


def test_metanetwork_may_read_a_longer_upload_than_its_static_init(tiny_checkpoints, synthetic_dataset_with, tmp_path):
    """A static model never reads uploads, so --init may come from another upload length; any other
    protocol difference (here the device window) is refused."""
    quiet = dict(progress=False, log=lambda s: None)
    longer = synthetic_dataset_with(history_len=30, recent_len=45)
    cfg = TrainConfig(model="sasrec", method="metanetwork", epochs=1, batch_size=200, probe_every=20)
    metrics = train(longer, cfg, tmp_path / "r45", init=tiny_checkpoints["static"], **quiet)
    assert metrics["method"] == "metanetwork"
    assert load_checkpoint(tmp_path / "r45").config.meta_train_backbone is False  # the init's backbone stayed frozen...
    assert cfg.meta_train_backbone is True  # ...and the caller's config was not rewritten
    assert load_checkpoint(tmp_path / "r45").protocol["recent_len"] == 45
    shorter_window = synthetic_dataset_with(history_len=12, recent_len=30)
    with pytest.raises(MntoolError, match="another protocol configuration"):
        train(shorter_window, cfg, tmp_path / "l12", init=tiny_checkpoints["static"], **quiet)


def test_metanetwork_keeps_the_static_start_when_no_epoch_validates_better(tiny_checkpoints, synthetic_dataset):
    """The gated MetaNetwork starts exactly at the static model, and that start competes in model
    selection: a generator that only hurts on validation (here trained by gradient *ascent*) ships
    the static parameters."""
    import torch.nn.functional as F

    from mntool.train import _fit_loop, _Prober, build_metanetwork

    cfg = TrainConfig(model="sasrec", method="metanetwork", batch_size=200, probe_every=20)
    static = load_checkpoint(tiny_checkpoints["static"]).model
    meta = build_metanetwork(
        load_checkpoint(tiny_checkpoints["static"]).model, cfg, synthetic_dataset.config.recent_len
    )
    meta.backbone.requires_grad_(False)
    opt = torch.optim.Adam(meta.generator_parameters(), lr=1e-2)
    rows, group = synthetic_dataset.train, synthetic_dataset.config.n_negatives + 1
    users, valid_recent = synthetic_dataset.device_recent("valid")

    def ascent(idx):
        history, target, label = group_inputs(rows, idx, group)
        loss = -F.binary_cross_entropy_with_logits(
            meta((history, target), (torch.from_numpy(rows.recent[idx[::group]]),)), label
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        meta.update_ema()
        return -loss.item()

    log = _fit_loop(
        synthetic_dataset,
        cfg,
        meta,
        ascent,
        lambda: generate_device_params(meta, users, valid_recent),
        _Prober(synthetic_dataset, cfg.probe_users, cfg.seed),
        2,
        False,
        "metanetwork",
        backbone=meta.backbone,
        start_is_candidate=True,
    )
    assert log["best_epoch"] == 0
    assert all(e["valid_uauc"] < log["start_valid_uauc"] for e in log["epochs"])
    params = generate_device_params(meta, users[:5], valid_recent[:5]).params
    for name, value in params.items():
        assert torch.equal(value, dict(static.named_parameters())[name].detach().expand_as(value)), name


def test_checkpoint_of_another_protocol_version_is_refused(tiny_checkpoints, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(tiny_checkpoints["static"], copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["protocol_version"] = "ts-v0"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MntoolError, match="data protocol 'ts-v0'"):
        load_checkpoint(copy)
    proc = subprocess.run(
        [sys.executable, "-m", "mntool.cli.main", "evaluate", str(copy)], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "ts-v0" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_train_rejects_unknown_names_and_misplaced_flags():
    for args in (
        ["--model", "bert"],
        ["--method", "maml"],
        ["--method", "static", "--shuffled-uploads"],
        ["--method", "finetune", "--frozen-backbone"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "mntool.cli.main", "train", *args, "--out", "/tmp/never"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_static_backbones_learn_movielens(ml100k_interactions, tmp_path):
    """One epoch of each backbone on the real data, in the 10-click window the result tables use
    (DIN's target attention makes its scoring cost grow with the window): test AUC clearly above chance."""
    from mntool.data import ProtocolConfig, build_dataset

    ds = build_dataset(ml100k_interactions, ProtocolConfig(history_len=10))
    for name in ("gru4rec", "sasrec", "din"):
        m = train(
            ds,
            TrainConfig(model=name, method="static", epochs=1, probe_every=10_000),
            tmp_path / name,
            progress=False,
            log=lambda s: None,
        )
        assert m["test"]["auc"] > 0.75, (name, m["test"])
        assert m["test"]["uauc"] > 0.75
