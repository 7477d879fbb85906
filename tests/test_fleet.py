"""examples/fleet.py end to end on the small synthetic data set: devices refresh their compiled
models from a real `mntool serve`, and the online metrics of the patched ONNX models equal
PyTorch's offline evaluation of the same devices (the whole path, HTTP to runtime, is exact)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
FLEET = Path(__file__).resolve().parents[1] / "examples" / "fleet.py"


def write_inter(interactions, path: Path) -> None:
    """The interactions as a RecBole .inter file, rows in their original order (same-second ties
    keep it), raw tokens as ids."""
    rows = zip(
        interactions.user_ids[interactions.user], interactions.item_ids[interactions.item], interactions.timestamp
    )
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))


def test_fleet_runs_and_compiled_metrics_equal_pytorch(tiny_checkpoints, synthetic_dataset, tmp_path):
    from mntool.data import ProtocolConfig, SyntheticConfig, build_dataset, load_interactions, synthetic_interactions

    data = tmp_path / "data"
    data.mkdir()
    write_inter(
        synthetic_interactions(SyntheticConfig(n_users=60, n_items=200, per_user=40, drift=0.5, seed=3)),
        data / "synthetic.inter",
    )
    rebuilt = build_dataset(load_interactions(data), ProtocolConfig(history_len=30, recent_len=30))
    assert np.array_equal(rebuilt.test.target, synthetic_dataset.test.target), (
        "the file must rebuild the fixture's data"
    )

    spec = importlib.util.spec_from_file_location("fleet", FLEET)
    fleet = importlib.util.module_from_spec(spec)
    sys.modules["fleet"] = fleet  # its dataclasses look their module up there
    spec.loader.exec_module(fleet)
    cfg = fleet.FleetConfig(
        ckpt=tiny_checkpoints["metanetwork"],
        static_ckpt=None,
        data=data,
        out=tmp_path / "out",
        devices=20,
        refresh_every=4,
        workers=1,
        concurrency=4,
    )
    result = fleet.run(cfg)

    assert result["devices"] == 20
    online = result["online"]
    assert list(online) == ["static", "unpatched", "refreshed_once", "refreshed_every_4"]
    for metric in ("auc", "uauc", "ndcg@10", "hr@10"):
        assert online["refreshed_once"][metric] == pytest.approx(result["pytorch_refreshed_once"][metric], abs=1e-4)
    once, often = result["refresh_timings"]["refreshed_once"], result["refresh_timings"]["refreshed_every_4"]
    assert once["refreshes"] == 20 and often["refreshes"] > 20
    assert result["server"]["patches"] == once["refreshes"] + often["refreshes"]
    assert "refreshed every 4" in fleet.report(result)
    assert not any((tmp_path / "out").glob("fleet-*")), "device copies are cleaned up"
