"""The device side never imports torch or the cloud side: every `device_runtime` module imports,
and real artifacts load and run, in a process where importing torch/mntool/exporters fails;
and no source line of `device_runtime/` imports them, not even lazily inside a function."""
from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import device_runtime

FORBIDDEN = ("torch", "mntool", "exporters")
PACKAGE_DIR = Path(device_runtime.__file__).parent

BLOCKER = f"""
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            raise ImportError(f"device code imported {{name}}")
        return None
sys.meta_path.insert(0, Blocker())
"""


def _run_blocked(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, cwd=PACKAGE_DIR.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_blocker_really_blocks():
    done = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert done.returncode != 0 and "device code imported torch" in done.stderr


def test_every_module_imports_without_torch():
    modules = [f"device_runtime.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE_DIR)])]
    assert "device_runtime.runners" in modules and "device_runtime.bench" in modules
    out = _run_blocked(
        f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})))"
    )
    assert json.loads(out) == []


def test_artifacts_load_run_and_swap_without_torch(tflite_artifact, onnx_artifact, tflite_patch):
    """What a phone does, with torch unimportable: load each artifact, run it, apply a patch in
    memory and run the patched model."""
    out = _run_blocked(f"""
import json
from pathlib import Path
from device_runtime.bench import generate_inputs
from device_runtime.patch import apply_patch_bytes
from device_runtime.runners import find_weight_map, open_runner
from device_runtime.weight_map import read_artifact_files
results = {{}}
for path in [Path({str(tflite_artifact)!r}), Path({str(onnx_artifact)!r})]:
    wm = find_weight_map(path)
    with open_runner(path, weight_map=wm) as runner:
        results[path.suffix] = sorted(runner.run(generate_inputs(runner.free_inputs, None)))
path = Path({str(tflite_artifact)!r})
wm = find_weight_map(path)
files = apply_patch_bytes(read_artifact_files(path, wm.files), Path({str(tflite_patch)!r}).read_bytes(), wm)
with open_runner(path, files=files, weight_map=wm) as runner:
    results["patched"] = sorted(runner.run(generate_inputs(runner.free_inputs, None)))
print(json.dumps(results))
""")
    assert json.loads(out) == {".tflite": ["output"], ".onnx": ["output"], "patched": ["output"]}


def _imported_names(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_no_source_line_imports_torch_or_the_cloud_side():
    offenders = []
    dynamic = re.compile(r"""(__import__|import_module)\(\s*["'](%s)\b""" % "|".join(FORBIDDEN))
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        source = path.read_text()
        offenders += [f"{path.name}: import {n}" for n in _imported_names(source) if n.split(".")[0] in FORBIDDEN]
        offenders += [f"{path.name}: {m.group(0)}" for m in dynamic.finditer(source)]
    assert offenders == []
