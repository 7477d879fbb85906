"""examples/dccl_fleet.py end to end on the small synthetic data set: the example trains v1
(MetaPatch), distils it (MoMoDistill) and personalises the distilled model (v2, MetaPatch), one
real `mntool serve` serves both fingerprints while the fleet moves over in waves, and the
compiled, patched models reproduce PyTorch's scores of the same versions and uploads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_fleet import write_inter

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dccl_fleet.py"
METRICS = ("auc", "uauc", "ndcg@10", "hr@10")


def load_example():
    spec = importlib.util.spec_from_file_location("dccl_fleet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dccl_fleet"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    from mntool.data import SyntheticConfig, synthetic_interactions

    root = tmp_path_factory.mktemp("dccl-fleet")
    data = root / "data"
    data.mkdir()
    write_inter(
        synthetic_interactions(SyntheticConfig(n_users=60, n_items=200, per_user=40, drift=0.5, seed=3)),
        data / "synthetic.inter",
    )
    example = load_example()
    cfg = example.DcclFleetConfig(
        old=None,
        new=None,
        data=data,
        out=root / "out",
        devices=16,
        rounds=3,
        wave=0.5,
        workers=1,
        concurrency=2,
        epochs=1,
    )
    return example, cfg, example.run(cfg)


def test_the_example_trains_v1_distils_it_and_personalises_the_distilled_model(loop):
    _, cfg, result = loop
    v1, distilled, v2 = cfg.out / "v1", cfg.out / "v2-distilled", cfg.out / "v2"
    assert (result["old"], result["new"], result["new_init"]) == (str(v1), str(v2), str(distilled))
    assert result["methods"] == {"v1": "metapatch", "v2": "metapatch"}
    distillation = json.loads((distilled / "metrics.json").read_text())
    assert distillation["method"] == "momodistill" and distillation["teacher"] == str(v1)
    assert json.loads((v2 / "metrics.json").read_text())["init"] == str(distilled)
    assert json.loads((v1 / "config.json").read_text())["protocol"]["history_len"] == 10
    fingerprints = {v["fingerprint"] for v in result["artifacts"].values()}
    assert len(fingerprints) == 2, "two versions, two fingerprints"


def test_the_fleet_moves_over_in_waves_and_one_server_serves_both(loop):
    _, _, result = loop
    assert result["on_v2_by_round"] == [0.0, 0.5, 1.0]
    moving = result["requests"]["moving"]
    assert moving["v1"] > 0 and moving["v2"] > 0
    assert result["requests"]["all_v1"]["v2"] == 0 and result["requests"]["all_v2"]["v1"] == 0
    refreshes = sum(n for fleet in result["requests"].values() for n in fleet.values())
    assert result["server"]["patches"] == refreshes + result["server"]["warmup_patches"] == refreshes + 2, (
        "every refresh is a patch the one server made"
    )
    per_version = {v: sum(fleet[v] for fleet in result["requests"].values()) + result["workers"] for v in ("v1", "v2")}
    assert result["server"]["patches_by_version"] == per_version, "the server counts each version's patches"
    assert result["server"]["mean_batch"] == 1.0  # --max-batch 1 by default
    for fleet in result["timings"].values():
        assert (
            fleet["all"]["retries"] == 0
            and fleet["all"]["refreshes"] == fleet["v1"]["refreshes"] + fleet["v2"]["refreshes"]
        )
    moved, b = result["moved_devices"], result["bytes"]
    assert 0 < moved <= result["devices"]
    assert b["downloads"] == moved * b["download_per_device"] > 0
    assert b["total"] == b["downloads"] + b["patches"]["v1"] + b["patches"]["v2"]
    assert b["patches"]["v1"] > 0 and b["patches"]["v2"] > 0


def test_compiled_scores_equal_pytorch_and_each_versions_rows_equal_its_reference(loop):
    example, _, result = loop
    for metric in METRICS:
        assert result["online"]["moving"][metric] == pytest.approx(result["pytorch_moving"][metric], abs=1e-4)
    # Deterministic patches (one upload per generator call): a row the moving fleet scored on v1
    # scores as in the fleet that stays on v1, a row on v2 as in the fleet on v2 from the start.
    for version, reference in (("v1", "all_v1"), ("v2", "all_v2")):
        rows = result["by_version"][version]
        assert rows["positives"] > 0
        for metric in METRICS:
            assert rows["moving"][metric] == pytest.approx(rows[reference][metric], abs=1e-5)
    assert result["online"]["all_v1"] != result["online"]["all_v2"]
    assert set(result["buckets"]) == {"head", "tail"} and all(b["users"] > 0 for b in result["buckets"].values())
    text = example.report(result)
    assert "rows the moving fleet scored on v2" in text and "PyTorch offline" in text
    columns = "  ".join(
        f"{result['online'][f]['uauc']:.4f} {result['online'][f]['ndcg@10']:.4f}" for f in example.PASSES
    )
    assert f"{result['positives']:9d}  {columns}" in text and example.PASSES == ("moving", "all_v1", "all_v2")
    assert not any(Path(result["new"]).parent.glob("dccl-fleet-*")), "device copies and keys are cleaned up"


def test_help_has_examples():
    shown = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--also" in shown.stdout and "--old" in shown.stdout
