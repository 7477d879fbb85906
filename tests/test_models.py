"""Device backbones: shapes, padding, the candidate form, and the adaptive head's names."""

import pytest
import torch

from device_runtime.errors import MntoolError
from mntool.models import BACKBONES, build_model

torch.manual_seed(0)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_forward_shapes_and_adaptive_names(name):
    m = build_model(name, 50).eval()
    h = torch.randint(0, 51, (4, 30))
    t = torch.randint(1, 51, (4,))
    assert m(h, t).shape == (4,)
    names = m.adaptive_names()
    assert names == ["head.layers.0.weight", "head.layers.0.bias", "head.layers.1.weight"]
    params = dict(m.named_parameters())
    # every adaptive tensor has >= 10 elements: Core ML stores smaller constants inline (unpatchable)
    assert all(params[n].numel() >= 10 for n in names)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_candidate_form_equals_pointwise(name):
    m = build_model(name, 50).eval()
    h = torch.randint(0, 51, (3, 30))
    cands = torch.randint(1, 51, (3, 7))
    grid = m(h, cands)
    flat = m(h.repeat_interleave(7, 0), cands.reshape(-1)).view(3, 7)
    assert grid.shape == (3, 7)
    torch.testing.assert_close(grid, flat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_fully_padded_history_is_finite(name):
    m = build_model(name, 50).eval()
    out = m(torch.zeros(2, 30, dtype=torch.long), torch.tensor([1, 2]))
    assert torch.isfinite(out).all()


def test_padding_is_ignored_by_sasrec_and_din():
    # the same clicks with more left padding must score the same (padding keys are masked)
    for name in ("sasrec", "din"):
        m = build_model(name, 50).eval()
        h = torch.zeros(1, 30, dtype=torch.long)
        h[0, -3:] = torch.tensor([5, 6, 7])
        h2 = h.clone()
        h2[0, 0] = 9  # a click far in the past changes the output...
        t = torch.tensor([3])
        assert not torch.allclose(m(h, t), m(h2, t))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(MntoolError, match="unknown model 'bert'"):
        build_model("bert", 10)
