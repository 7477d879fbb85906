"""The image task's models, baselines and training (mntool.vision, mntool.tasks.mnist), on the real
MNIST under the img-v1 protocol with 12 devices: each check compares against an independent
computation (a per-device loop, BatchNorm in training mode, a reloaded checkpoint)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.func import functional_call

from device_runtime.errors import MntoolError
from mntool.cli.main import cli
from mntool.meta import MetaConfig, MetaNetwork, per_sample_call
from mntool.vision import adapt
from mntool.vision.encoder import ImageSetEncoder
from mntool.vision.models import ChannelAffine, build_cnn
from mntool.vision.train import VisionTrainConfig, evaluate_split, train


def trained_bn(model):
    """Non-trivial BatchNorm statistics and affines, as a trained model has."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 1, 28, 28))
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", ["lenet", "mobilenet"])
def test_every_batchnorm_affine_and_the_head_are_adaptive(name):
    model = build_cnn(name)
    names = model.adaptive_names()
    assert names[-2:] == ["head.weight", "head.bias"]
    affines = [n for n in names if ".affine." in n]
    assert len(affines) == 2 * len(model.bn_affines()) >= 4
    assert all(isinstance(model.get_submodule(n.rpartition(".")[0]), ChannelAffine) for n in affines)
    assert all(not bn.affine for bn, _ in model.bn_affines())  # the affine is the adaptive module, not BN's own


@pytest.mark.parametrize("name", ["lenet", "mobilenet"])
def test_per_sample_call_runs_channel_affines_like_a_loop_over_devices(name):
    model = trained_bn(build_cnn(name))
    g = torch.Generator().manual_seed(0)
    params = {
        n: p.detach() + 0.2 * torch.randn((3, *p.shape), generator=g)
        for n, p in model.named_parameters()
        if n in model.adaptive_names()
    }
    x = torch.rand(6, 1, 28, 28, generator=g)
    index = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        got = per_sample_call(model, params, (x,), index)
        grouped = per_sample_call(model, params, (x[[1, 4, 2, 3, 0, 5]],))  # 3 contiguous groups of 2
        want = torch.stack(
            [
                functional_call(model, {n: p[u] for n, p in params.items()}, (x[i : i + 1],))[0]
                for i, u in enumerate(index.tolist())
            ]
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, want[[1, 4, 2, 3, 0, 5]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["lenet", "mobilenet"])
def test_bn_adaptation_patch_equals_batchnorm_on_the_upload_statistics(name):
    """Prior 0: the patched affines reproduce BatchNorm normalising with the upload's own batch
    statistics layer by layer, which is what BatchNorm in training mode does on that batch."""
    model = trained_bn(build_cnn(name))
    uploads = np.random.default_rng(0).integers(0, 256, size=(3, 16, 28, 28), dtype=np.uint8)
    params = adapt.bn_stats_params(model, uploads, prior=0.0)
    for u in range(3):
        x = adapt.images_tensor(uploads[u])
        ref = copy.deepcopy(model).train()
        with torch.no_grad():
            want = ref(x)
            got = per_sample_call(model, {n: p[u : u + 1] for n, p in params.items()}, (x,))
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # a huge prior keeps the training statistics: the static model
    static = adapt.bn_stats_params(model, uploads, prior=1e12)
    for n, p in model.named_parameters():
        if n in static:
            torch.testing.assert_close(static[n], p.detach().expand_as(static[n]), atol=1e-5, rtol=1e-5)


def test_finetune_fits_each_device_alone_and_tent_lowers_entropy():
    model = trained_bn(build_cnn("lenet"))
    rng = np.random.default_rng(1)
    uploads = rng.integers(0, 256, size=(3, 8, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(3, 8))
    together = adapt.finetune_params(model, uploads, labels, steps=5, lr=1e-2)
    alone = adapt.finetune_params(model, uploads[1:2], labels[1:2], steps=5, lr=1e-2)
    for n in together:  # devices never share gradients
        torch.testing.assert_close(together[n][1:2], alone[n], atol=1e-6, rtol=1e-5)
    static = dict(model.named_parameters())
    assert all(not torch.equal(together[n][0], static[n].detach()) for n in together)  # every adaptive tensor moved

    def entropy(params):
        with torch.no_grad():
            logp = torch.log_softmax(per_sample_call(model, params, (adapt.images_tensor(uploads),)), -1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    start = adapt.bn_stats_params(model, uploads, prior=16.0)
    tent = adapt.tent_params(model, uploads, prior=16.0, steps=10, lr=1e-2)
    assert entropy(tent) < entropy(start)
    for n in ("head.weight", "head.bias"):  # TENT updates the BatchNorm affines only
        torch.testing.assert_close(tent[n], start[n])


def test_a_zero_gate_generator_starts_from_the_static_model():
    model = trained_bn(build_cnn("mobilenet"))
    meta = MetaNetwork(model, model.adaptive_names(), ImageSetEncoder(16), MetaConfig(cond_dim=16))
    uploads = torch.randint(0, 256, (2, 4, 28, 28), dtype=torch.uint8)
    params = meta.adaptive_params(uploads)
    for n, p in model.named_parameters():
        if n in params:
            torch.testing.assert_close(params[n], p.detach().expand_as(params[n]))


@pytest.fixture(scope="module")
def tiny_runs(mnist_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("vision-runs")
    metrics = {
        "static": train(mnist_dataset, VisionTrainConfig(method="static", epochs=2), out / "static", progress=False)
    }
    for method in ("bn-adapt", "finetune", "metanetwork"):
        metrics[method] = train(
            mnist_dataset, VisionTrainConfig(method=method, epochs=1), out / method, init=out / "static", progress=False
        )
    return out, metrics


def test_training_selects_on_validation_and_checkpoints_reload(tiny_runs, mnist_dataset):
    from mntool.train import load_checkpoint

    out, metrics = tiny_runs
    static = metrics["static"]
    assert static["task"] == "mnist" and set(static["test"]) >= {
        "device_mean_accuracy",
        "accuracy",
        "macro_f1",
        "nll",
        "ece",
    }
    assert static["test"]["device_mean_accuracy"] > 0.5  # it learned digits
    chosen = metrics["bn-adapt"]["train"]["selection"]["bn_prior"]
    ck = load_checkpoint(out / "bn-adapt")
    assert ck.task == "mnist" and ck.config.adapt.bn_prior == float(max(chosen, key=chosen.get))
    for method in ("static", "metanetwork"):
        ck = load_checkpoint(out / method)
        params = None
        if method == "metanetwork":
            devices, uploads = mnist_dataset.device_upload("test")
            from mntool.vision.train import generate_params

            params = generate_params(ck.meta, uploads)
        again = evaluate_split(ck.model, mnist_dataset, "test", params)
        assert again["device_mean_accuracy"] == pytest.approx(metrics[method]["test"]["device_mean_accuracy"], abs=1e-9)


def test_generation_from_an_image_upload_matches_the_method(tiny_runs, mnist_dataset):
    from mntool.generate import Generator
    from mntool.tasks import SamplesError

    out, _ = tiny_runs
    _, uploads = mnist_dataset.device_upload("test")
    gen = Generator.load(out / "bn-adapt")
    got = gen.generate(uploads[3])
    want = adapt.bn_stats_params(gen.checkpoint.model, uploads[3:4], gen.checkpoint.config.adapt.bn_prior)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n][0].numpy())
    for bad in (
        uploads[0][:, :27],
        np.zeros((0, 28, 28)),
        uploads[0].astype(np.float32) + 0.5,
        np.full((2, 28, 28), 256),
    ):
        with pytest.raises(SamplesError):
            gen.generate(bad)
    with pytest.raises(MntoolError, match="labels"):  # fine-tuning needs the labels that stay on the phone
        Generator.load(out / "finetune")


def test_cli_trains_and_evaluates_the_image_task(mnist_dir, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(cli, ["train", "--task", "mnist", "--model", "sasrec", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "lenet" in bad.output
    out = tmp_path / "run"
    res = runner.invoke(
        cli,
        ["train", "--task", "mnist", "--epochs", "1", "--data", str(mnist_dir), "--out", str(out), "--quiet", "--json"],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    res = runner.invoke(cli, ["evaluate", str(out), "--data", str(mnist_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["test"] == metrics["test"]
