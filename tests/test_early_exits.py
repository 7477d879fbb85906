"""Early-exit CNNs (mntool.vision.exits) and their training (`--method exits`, a MetaNetwork on an
early-exit model): stages recompose the whole model, every adaptive tensor sits in one stage, the
exit training leaves the backbone untouched, and the generator reaches the exits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from device_runtime.errors import MntoolError
from mntool.cli.main import cli
from mntool.meta import per_sample_call
from mntool.vision.exits import EXIT_PLANS, EarlyExitCNN, ExitPoint
from mntool.vision.models import build_cnn
from mntool.vision.train import VisionTrainConfig, train


def trained_like(net):
    """Non-trivial BatchNorm statistics, affines and exit heads, as a trained model has."""
    torch.manual_seed(3)
    net.train()
    with torch.no_grad():
        net(torch.rand(64, 1, 28, 28))
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("name", sorted(EXIT_PLANS))
def test_stages_run_in_order_recompose_every_exit(name):
    net = trained_like(EarlyExitCNN(build_cnn(name)))
    x = torch.rand(5, 1, 28, 28)
    whole = net(x)
    assert whole.shape == (5, len(EXIT_PLANS[name]) + 1, 10)
    torch.testing.assert_close(whole[:, -1], net.backbone(x))  # the last exit is the backbone itself
    h = x
    for k, stage in enumerate(net.stages()):
        outs = stage(h)
        assert len(outs) == len(net.stage_outputs(k))
        torch.testing.assert_close(outs[-1], whole[:, k])
        # the embedding is what the exit's linear layer reads
        w, b = (dict(net.named_parameters())[n] for n in net.exit_names(k))
        torch.testing.assert_close(outs[-2] @ w.T + b, whole[:, k])
        torch.testing.assert_close(net.stage_example(k, x), h)
        h = outs[0]


@pytest.mark.parametrize("name", sorted(EXIT_PLANS))
def test_each_adaptive_tensor_lives_in_exactly_one_stage_and_moves_it(name):
    net = trained_like(EarlyExitCNN(build_cnn(name)))
    owned = [net.stage_adaptive(k) for k in range(net.n_exits)]
    flat = [n for names in owned for n in names]
    assert sorted(flat) == sorted(net.adaptive_names()) and len(set(flat)) == len(flat)
    x = torch.rand(3, 1, 28, 28)
    params = dict(net.named_parameters())
    for k, names in enumerate(owned):
        inp = net.stage_example(k, x)
        before = [o.detach().clone() for o in net.stages()[k](inp)]
        for n in names:
            with torch.no_grad():
                saved = params[n].detach().clone()
                params[n].add_(0.5)
                after = net.stages()[k](inp)
                params[n].copy_(saved)
            assert (after[-1] - before[-1]).abs().max() > 1e-4, f"{n} does not reach stage {k}'s logits"


def test_per_device_parameters_run_grouped_like_a_loop():
    net = trained_like(EarlyExitCNN(build_cnn("lenet")))
    x = torch.rand(6, 1, 28, 28)
    names = net.adaptive_names()
    torch.manual_seed(0)
    params = {n: p.detach() + 0.1 * torch.randn(2, *p.shape) for n, p in net.named_parameters() if n in names}
    index = torch.tensor([0, 1, 1, 0, 1, 0])
    got = per_sample_call(net, params, (x,), index)
    for i in range(6):
        one = torch.func.functional_call(net, {n: p[index[i]] for n, p in params.items()}, (x[i : i + 1],))
        torch.testing.assert_close(got[i : i + 1], one, atol=1e-5, rtol=1e-5)


def test_bad_exit_plans_are_refused():
    with pytest.raises(MntoolError, match="increase strictly"):
        EarlyExitCNN(build_cnn("lenet"), (ExitPoint(2, 1), ExitPoint(2, 1)))
    with pytest.raises(MntoolError, match="increase strictly"):
        EarlyExitCNN(build_cnn("lenet"), (ExitPoint(9, 1),))


@pytest.fixture(scope="module")
def exit_runs(mnist_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("exit-runs")
    static = train(mnist_dataset, VisionTrainConfig(method="static", epochs=2), out / "static", progress=False)
    exits = train(
        mnist_dataset, VisionTrainConfig(method="exits", epochs=2), out / "exits", init=out / "static", progress=False
    )
    mn = train(
        mnist_dataset, VisionTrainConfig(method="metanetwork", epochs=1), out / "mn", init=out / "exits", progress=False
    )
    return out, {"static": static, "exits": exits, "metanetwork": mn}


def test_exit_training_changes_only_the_exits(exit_runs):
    from mntool.train import load_checkpoint

    out, metrics = exit_runs
    static, exits = load_checkpoint(out / "static"), load_checkpoint(out / "exits")
    assert isinstance(exits.model, EarlyExitCNN) and exits.config.exits and exits.config.method == "exits"
    for n, p in static.model.state_dict().items():
        torch.testing.assert_close(exits.model.state_dict()[f"backbone.{n}"], p, atol=0, rtol=0)
    accs = metrics["exits"]["test"]["exit_device_mean_accuracy"]
    assert len(accs) == 3 and accs[-1] == pytest.approx(metrics["static"]["test"]["device_mean_accuracy"])
    assert min(accs[:-1]) > 0.3  # the heads learned digits from the frozen features


def test_a_generator_on_an_early_exit_model_generates_every_exit(exit_runs, mnist_dataset):
    from mntool.train import load_checkpoint
    from mntool.vision.train import generate_params

    out, metrics = exit_runs
    ck = load_checkpoint(out / "mn")
    assert isinstance(ck.meta.backbone, EarlyExitCNN)
    _, uploads = mnist_dataset.device_upload("test")
    params = generate_params(ck.meta, uploads[:3])
    assert set(params) == set(ck.model.adaptive_names())
    for n in ("exits.0.linear.weight", "exits.1.linear.bias"):
        assert params[n].shape[0] == 3 and np.isfinite(params[n].numpy()).all()
    assert len(metrics["metanetwork"]["test"]["exit_device_mean_accuracy"]) == 3


def test_cli_refuses_exits_on_a_non_static_init(exit_runs, mnist_dir, tmp_path):
    out, _ = exit_runs
    res = CliRunner().invoke(
        cli,
        [
            "train",
            "--task",
            "mnist",
            "--method",
            "exits",
            "--init",
            str(out / "exits"),
            "--data",
            str(mnist_dir),
            "--out",
            str(tmp_path / "x"),
            "--quiet",
        ],
    )
    assert res.exit_code != 0 and "must be a static lenet checkpoint" in res.output


def test_generate_writes_one_patch_per_stage_of_a_staged_artifact(exit_runs, mnist_dataset, tmp_path):
    """`mntool generate` on a .stages directory: one patch per stage carrying the generator's values for
    that stage's tensors, each applicable to its stage with `patch-weights`."""
    from device_runtime.patch import parse_patch
    from device_runtime.staged import load_staged
    from exporters import export_staged
    from mntool.generate import Generator
    from mntool.train import load_checkpoint

    out, _ = exit_runs
    ck = load_checkpoint(out / "mn")
    stages = export_staged(ck.model, ck.example_inputs(), "tflite", tmp_path / "art")
    _, uploads = mnist_dataset.device_upload("test")
    np.savez(tmp_path / "up.npz", images=uploads[1])
    res = CliRunner().invoke(
        cli,
        [
            "generate",
            str(out / "mn"),
            str(stages),
            "--samples",
            str(tmp_path / "up.npz"),
            "-o",
            str(tmp_path / "p.mnpatch"),
        ],
    )
    assert res.exit_code == 0, res.output
    want = Generator(ck).generate(uploads[1])
    staged = load_staged(stages)
    for k, stage in enumerate(staged.stages):
        patch = parse_patch((tmp_path / f"p.stage{k}.mnpatch").read_bytes())
        assert [t.name for t in patch.tensors] == list(stage.adaptive)
        for t in patch.tensors:
            np.testing.assert_array_equal(patch.array(t).reshape(want[t.name].shape), want[t.name])
        applied = CliRunner().invoke(
            cli,
            [
                "patch-weights",
                str(staged.artifact(k)),
                str(tmp_path / f"p.stage{k}.mnpatch"),
                "-o",
                str(tmp_path / f"s{k}.tflite"),
            ],
        )
        assert applied.exit_code == 0, applied.output
