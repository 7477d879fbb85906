"""Running one export: the target's passes, then the passes every target shares (seal, write
base values, prove, write the weight map), over an `ExportJob` in a staging directory.

Each target module contributes its passes (convert, locate, relocate, embed) through its
declaration (`exporters.target.Target`, looked up in `exporters.targets`); nothing here names a
target. The artifact is built in a hidden staging directory inside `out_dir` and moved into place
only after the last pass, so a failed export leaves nothing behind and an earlier artifact of the
same name untouched.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from device_runtime import weight_map as weight_maps
from device_runtime.weight_map import WeightMap
from exporters import prepare, proof, targets
from exporters.errors import ExportError
from exporters.job import ExportJob, Pass
from exporters.options import ExportOptions


# ---- passes every target shares -------------------------------------------------------------
def seal(job: ExportJob) -> None:
    """Fingerprint the final files and fix the weight map."""
    wm = job.draft_weight_map()
    wm.validate()
    fingerprint = weight_maps.compute_fingerprint(
        weight_maps.read_artifact_files(job.artifact, wm.files), wm.tensors, wm.artifact
    )
    job.weight_map = WeightMap(**{**wm.__dict__, "fingerprint": fingerprint})


def write_base(job: ExportJob) -> None:
    """Write the static values as the artifact's first patch, through the production patch path."""
    for name, data in proof.patched_files(job.artifact, job.weight_map, job.base).items():
        (job.root / name).write_bytes(data)


def prove(job: ExportJob) -> None:
    job.extra["proof"] = proof.prove(job)
    job.weight_map = WeightMap(**{**job.weight_map.__dict__, "extra": job.extra})


def write_weight_map(job: ExportJob) -> None:
    weight_maps.save(job.weight_map, job.artifact)


COMMON_PASSES = [
    Pass("seal", seal),
    Pass("write base values", write_base),
    Pass("prove", prove),
    Pass("write weight map", write_weight_map),
]


# ---- running an export ----------------------------------------------------------------------
def run_export(model, example_inputs, adaptive, target: str, out_dir: Path, options: ExportOptions) -> Path:
    declared = targets.get(target)
    if options.precision not in declared.precisions:
        supported = [t.name for t in targets.declarations() if options.precision in t.precisions]
        raise ExportError(
            f"precision {options.precision!r} is supported for {', '.join(supported) or 'no target'} only "
            f"({target} exports {', '.join(declared.precisions)})"
        )
    adaptive = list(adaptive) if not isinstance(adaptive, str) else adaptive
    prepare.check_arguments(model, example_inputs, adaptive)
    names = prepare.input_names(model, len(example_inputs))
    outputs = prepare.run_model(model, example_inputs)
    target_passes = declared.passes(options)
    passes = target_passes + [p for p in COMMON_PASSES if options.verify or p.name != "prove"]
    with staging(Path(out_dir)) as stage:
        job = ExportJob(
            target=declared,
            model=model,
            example_inputs=example_inputs,
            adaptive=adaptive,
            options=options,
            stage=stage,
            input_names=names,
            output_names=prepare.output_names(len(outputs), options.output_names),
            base=prepare.static_values(model, adaptive),
            fingerprints={}
            if options.adaptive_as_inputs
            else prepare.fingerprint_values(model, adaptive, options.seed),
        )
        bar = tqdm(passes, desc=f"export {target}", unit="pass", disable=not options.progress, leave=False)
        for p in bar:
            bar.set_postfix_str(p.name)
            p.run(job)
        publish(job, Path(out_dir))
    return Path(out_dir) / job.artifact_name


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden directory inside `out_dir` (same file system, so moving into place is a rename),
    removed afterwards whatever happens; `out_dir` itself is removed too if this export made it."""
    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create output directory {out_dir}: {err.strerror}") from None
    stage = Path(tempfile.mkdtemp(prefix=".mntool-export-", dir=out_dir))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def publish(job: ExportJob, out_dir: Path) -> None:
    """Move the artifact, the files beside it, then its weight map from the stage into `out_dir`."""
    sidecar = weight_maps.sidecar_path(job.artifact).name
    top_level = {job.artifact_name} if job.target.directory else {Path(f).parts[0] for f in job.files}
    for name in sorted(top_level) + [sidecar]:
        src, dst = job.stage / name, out_dir / name
        if dst.is_dir() and not dst.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=".mntool-old-", dir=out_dir))
            dst.rename(old / name)
            src.rename(dst)
            shutil.rmtree(old)
        else:
            src.replace(dst)
