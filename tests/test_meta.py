"""MetaNetwork core: shapes, gradients, exact static start, per-sample calls, task-agnosticism."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from mntool.meta import MetaConfig, MetaNetwork, RecentItemsEncoder, per_sample_call
from mntool.models import BACKBONES, build_model


def _meta(name, config=MetaConfig(), n_items=60):
    torch.manual_seed(0)
    m = build_model(name, n_items)
    return MetaNetwork(m, m.adaptive_names(), RecentItemsEncoder(m.item_embedding, 30, config.cond_dim), config)


def _batch(B=6, U=3, n_items=60):
    g = torch.Generator().manual_seed(1)
    h = torch.randint(0, n_items + 1, (B, 30), generator=g)
    t = torch.randint(1, n_items + 1, (B,), generator=g)
    r = torch.randint(1, n_items + 1, (U, 30), generator=g)
    return h, t, r, torch.arange(B) % U


@pytest.mark.parametrize("name", list(BACKBONES))
def test_generated_tensors_have_adaptive_shapes(name):
    mn = _meta(name)
    _, _, r, _ = _batch()
    params = dict(mn.backbone.named_parameters())
    out = mn.adaptive_params(r)
    assert list(out) == mn.adaptive
    for n, p in out.items():
        assert p.shape == (3, *params[n].shape)


@pytest.mark.parametrize("config", [MetaConfig(), MetaConfig(gate=False, ema=False)], ids=["stabilized", "plain"])
def test_every_generator_parameter_gets_a_gradient(config):
    mn = _meta("sasrec", config).train()
    if mn.stabilizer.gates is not None:
        with torch.no_grad():
            mn.stabilizer.gates.fill_(0.5)  # a zero gate blocks the generator's gradient by design
    h, t, r, idx = _batch()
    mn((h, t), (r,), idx).sum().backward()
    gen = mn.generator_parameters()
    assert len(gen) > 0 and all(isinstance(p, nn.Parameter) for p in gen)
    registered = {id(p) for p in mn.parameters()}
    for p in gen:
        assert id(p) in registered, "generator weights must be registered with the module (DUET's plain lists are not)"
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(BACKBONES))
def test_stabilizer_starts_exactly_at_the_static_model(name):
    mn = _meta(name).eval()
    h, t, r, idx = _batch()
    # bit-for-bit the static parameters for every device...
    for n, p in mn.adaptive_params(r).items():
        assert torch.equal(p, dict(mn.backbone.named_parameters())[n].expand_as(p))
    # ...so outputs differ from the static model's only by matmul-kernel rounding (bmm vs addmm)
    torch.testing.assert_close(mn((h, t), (r,), idx), mn.backbone(h, t), atol=1e-6, rtol=0)


def test_without_stabilizer_the_start_is_not_static():
    mn = _meta("sasrec", MetaConfig(gate=False, ema=False)).eval()
    h, t, r, idx = _batch()
    assert not torch.allclose(mn((h, t), (r,), idx), mn.backbone(h, t))


def test_stabilizer_bounds_the_residual():
    cfg = MetaConfig(bound=0.5)
    mn = _meta("din", cfg).eval()
    with torch.no_grad():
        mn.stabilizer.gates.fill_(100.0)  # saturated gate
        for p in mn.generator.heads.parameters():
            p.mul_(1000.0)  # a wildly large generator
    _, _, r, _ = _batch()
    static = dict(mn.backbone.named_parameters())
    for n, p in mn.adaptive_params(r).items():
        rms = static[n].pow(2).mean().sqrt()
        per_device = (p - static[n]).flatten(1).pow(2).mean(1).sqrt()
        assert (per_device <= 0.5 * rms * (1 + 1e-5)).all()
        assert (per_device >= 0.4 * rms).all()  # a saturated gate and a huge residual reach the bound


@pytest.mark.parametrize("name", list(BACKBONES))
def test_per_sample_call_equals_loading_weights_into_a_plain_copy(name):
    mn = _meta(name).eval()
    with torch.no_grad():
        mn.stabilizer.gates.fill_(0.8)
    h, t, r, idx = _batch()
    with torch.no_grad():
        fast = mn((h, t), (r,), idx)
        params = mn.adaptive_params(r)
        for b in range(len(h)):
            plain = copy.deepcopy(mn.backbone)
            plain.load_state_dict({**plain.state_dict(), **{n: p[idx[b]] for n, p in params.items()}})
            ref = plain(h[b : b + 1], t[b : b + 1])
            torch.testing.assert_close(fast[b : b + 1], ref, atol=1e-5, rtol=1e-5)
            via_fc = functional_call(
                mn.backbone, {n: p[idx[b]] for n, p in params.items()}, (h[b : b + 1], t[b : b + 1])
            )
            torch.testing.assert_close(fast[b : b + 1], via_fc, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_grouped_rows_equal_gathered_rows(name):
    # rows in U contiguous groups (no index: the training layout) == the same rows with an index
    mn = _meta(name).eval()
    with torch.no_grad():
        mn.stabilizer.gates.fill_(0.8)
    h, t, r, _ = _batch(B=6, U=3)
    grouped = mn((h, t), (r,))
    gathered = mn((h, t), (r,), torch.tensor([0, 0, 1, 1, 2, 2]))
    torch.testing.assert_close(grouped, gathered, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", [MetaConfig(), MetaConfig(gate=False, ema=False)], ids=["stabilized", "plain"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_factored_training_path_equals_materialised_weights_with_gradients(name, config):
    """Training keeps head matrices factored (static + A B, applied as x W^T + (x B^T) A^T, the
    stabilizer's norm from r x r Grams); outputs and every gradient (generator, gates, backbone)
    equal running the backbone on the fully built per-device weights."""
    grads = []
    for factored in (True, False):
        mn = _meta(name, config).eval()
        if mn.stabilizer.gates is not None:
            with torch.no_grad():
                mn.stabilizer.gates.fill_(0.7)
        h, t, r, _ = _batch(B=6, U=3)
        if factored:
            out = mn((h, t), (r,))
        else:
            out = per_sample_call(mn.backbone, mn.adaptive_params(r), (h, t))
        (out * torch.linspace(-1, 1, len(out))).sum().backward()
        grads.append((out.detach(), {n: p.grad for n, p in mn.named_parameters() if p.grad is not None}))
    (out_f, g_f), (out_m, g_m) = grads
    torch.testing.assert_close(out_f, out_m, atol=1e-6, rtol=1e-5)
    assert g_f.keys() == g_m.keys() and any(n.startswith("generator.") for n in g_f)
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_m[n], atol=1e-6, rtol=1e-4, msg=n)


def test_core_is_task_agnostic_conv_bn_model_with_non_linear_adaptive():
    # An image classifier, adaptive tensors include a BatchNorm scale: the vmap path runs it.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))

    class PixelEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 16)

        def forward(self, images):  # (U, K, 3, H, W) a few recent images per device
            return self.proj(images.mean((1, 3, 4)))

    torch.manual_seed(0)
    net = Net().eval()
    cfg = MetaConfig(cond_dim=16)
    mn = MetaNetwork(net, ["bn.weight", "fc.weight", "fc.bias"], PixelEncoder(), cfg).eval()
    with torch.no_grad():
        mn.stabilizer.gates.fill_(0.7)
    x = torch.randn(4, 3, 8, 8)
    recent = torch.randn(2, 5, 3, 8, 8)
    idx = torch.tensor([0, 1, 1, 0])
    out = mn((x,), (recent,), idx)
    assert out.shape == (4, 4)
    params = mn.adaptive_params(recent)
    for b in range(4):
        ref = functional_call(net, {n: p[idx[b]] for n, p in params.items()}, (x[b : b + 1],))
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-5, rtol=1e-5)


def test_generator_is_smaller_than_a_linear_hypernetwork():
    mn = _meta("sasrec")
    linear = sum(mn.config.cond_dim * p.numel() for p in mn.static_params().values())
    heads = sum(p.numel() for p in mn.generator.heads.parameters())
    assert heads < linear


def test_ema_tracks_the_live_generator():
    mn = _meta("gru4rec")
    with torch.no_grad():
        for p in mn.generator.parameters():
            p.add_(1.0)
    before = [p.clone() for p in mn.ema_generator.parameters()]
    mn.update_ema()
    moved = [not torch.equal(a, b) for a, b in zip(before, mn.ema_generator.parameters())]
    assert all(moved)
