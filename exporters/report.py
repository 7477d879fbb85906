"""What an exported artifact amounts to: its size, the share that is adaptive, its proof figures.

Read from the artifact's files and weight map alone, so the CLI, the benchmark and the docs
report the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from device_runtime import weight_map as weight_maps


@dataclass(frozen=True)
class ArtifactSummary:
    target: str
    mode: str
    artifact: str
    weight_map: str
    total_bytes: int  # every file of the artifact (the weight map sidecar excluded)
    adaptive_bytes: int
    adaptive_tensors: int
    proof: dict | None  # extra["proof"]: method, proven, runtime, max_abs_error, base_max_abs_error, atol (+ note)
    form: dict | None = None  # the weight map's `form` (a recommender's ranking form), if declared

    @property
    def adaptive_fraction(self) -> float:
        return self.adaptive_bytes / self.total_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "adaptive_fraction": self.adaptive_fraction}

    def line(self) -> str:
        proof = "not proven (--no-verify)"
        if self.proof and self.proof.get(
            "proven", self.proof["method"] == "run"
        ):  # sidecars before "proven": run = proof
            proof = f"proof max abs error {self.proof['max_abs_error']:.2g} ({self.proof['method']}, {self.proof['runtime']})"
        elif self.proof:
            note = self.proof.get("note", "read-back, not a proof")
            proof = f"NOT PROVEN, {note} (max abs error {self.proof['max_abs_error']:.2g})"
        from device_runtime.ranking import KIND, RankingForm

        form = f"; {RankingForm.from_dict(self.form).describe()}" if self.form and self.form.get("kind") == KIND else ""
        return (
            f"{self.target}: {self.artifact} ({self.total_bytes / 1024:.1f} KiB, {self.adaptive_tensors} adaptive tensors "
            f"= {self.adaptive_bytes / 1024:.1f} KiB, {100 * self.adaptive_fraction:.2f}%), {proof}{form}"
        )


def summarize(artifact: Path) -> ArtifactSummary:
    artifact = Path(artifact)
    wm = weight_maps.load(artifact)
    root = weight_maps.artifact_root(artifact)
    return ArtifactSummary(
        target=wm.target,
        mode=wm.mode,
        artifact=str(artifact),
        weight_map=str(weight_maps.sidecar_path(artifact)),
        total_bytes=sum((root / f).stat().st_size for f in wm.files),
        adaptive_bytes=sum(t.nbytes for t in wm.tensors),
        adaptive_tensors=len(wm.tensors),
        proof=wm.extra.get("proof"),
        form=wm.form or None,
    )
