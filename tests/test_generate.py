"""The generation API: shapes, determinism, finiteness, input checks."""

import numpy as np
import pytest

from mntool.generate import Generator, SamplesError, generate


@pytest.fixture(scope="module")
def gen(tiny_checkpoints):
    return Generator.load(tiny_checkpoints["metanetwork"])


def test_shapes_and_dtype(gen):
    out = gen.generate([1, 2, 3])
    assert list(out) == gen.adaptive
    for n, a in out.items():
        assert a.shape == gen.shapes[n] and a.dtype == np.float32 and np.isfinite(a).all()


def test_deterministic_for_fixed_checkpoint_and_input(gen, tiny_checkpoints):
    a = gen.generate([5, 6, 7, 8])
    b = Generator.load(tiny_checkpoints["metanetwork"]).generate([5, 6, 7, 8])
    for n in a:
        assert np.array_equal(a[n], b[n])


def test_batch_equals_single(gen):
    batch = gen.generate_batch(np.array([[0, 1, 2], [3, 4, 5]]))
    single = gen.generate([3, 4, 5])
    for n in single:
        np.testing.assert_allclose(batch[n][1], single[n], atol=1e-6)


def test_different_uploads_give_different_parameters(gen):
    # train a little so the gate is open: one epoch leaves it small but non-zero
    a, b = gen.generate([1, 2, 3]), gen.generate([40, 50, 60])
    assert any(not np.array_equal(a[n], b[n]) for n in a)


def test_static_checkpoint_generates_its_static_parameters(tiny_checkpoints):
    g = Generator.load(tiny_checkpoints["static"])
    params = dict(g.checkpoint.model.named_parameters())
    out = generate(g, [1, 2])
    for n, a in out.items():
        assert np.array_equal(a, params[n].detach().numpy())


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([1, 2, 10_000], "outside the vocabulary"),
        ([-1], "outside the vocabulary"),
        (list(range(1, 40)), "at most 30"),
        ([[1, 2], [3, 4]], "1-D list"),
        (["a", "b"], "integer item ids"),
        ([1.5], "integer item ids"),
    ],
)
def test_bad_uploads_are_rejected(gen, bad, msg):
    with pytest.raises(SamplesError, match=msg):
        gen.generate(bad)
