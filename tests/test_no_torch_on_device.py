"""The layering stays as designed. The device side never imports torch or the cloud side: every
`device_runtime` module imports, and real artifacts load and run, in a process where importing
torch/mntool/exporters fails; and no source line of `device_runtime/` imports them, not even
lazily inside a function. From the source, the other directions too: `exporters` imports no
`mntool` module; no library module (nor a benchmark script) imports the CLI (`mntool.cli`); and
the modules of `exporters` import each other without a cycle, and the shared export code
(`pipeline`, `proof`) knows no target by name: it reads each target's declaration."""

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
# The one exception, by name: ExecuTorch's Python runtime needs torch (its docstring says why). It
# may import torch but not the cloud side, and only runners.open_runner imports it, lazily.
TORCH_RUNNERS = ("executorch_runner",)
PACKAGE_DIR = Path(device_runtime.__file__).parent
ROOT = PACKAGE_DIR.parent

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
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, cwd=PACKAGE_DIR.parent
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_blocker_really_blocks():
    done = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert done.returncode != 0 and "device code imported torch" in done.stderr


def test_every_module_imports_without_torch():
    modules = [
        f"device_runtime.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE_DIR)]) if m.name not in TORCH_RUNNERS
    ]
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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at module level or inside a function: `from pkg import name`
    counts as importing `pkg.name` when that is a module, else `pkg`."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                sub = ROOT.joinpath(*base.split("."), a.name)
                out.add(
                    f"{base}.{a.name}" if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file() else base
                )
    return out


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_no_source_line_imports_torch_or_the_cloud_side():
    offenders = []
    dynamic = re.compile(r"""(__import__|import_module)\(\s*["'](""" + "|".join(FORBIDDEN) + r""")\b""")
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        source = path.read_text()
        forbidden = tuple(f for f in FORBIDDEN if not (path.stem in TORCH_RUNNERS and f == "torch"))
        offenders += [f"{path.name}: import {n}" for n in _imported_names(source) if n.split(".")[0] in forbidden]
        offenders += [f"{path.name}: {m.group(0)}" for m in dynamic.finditer(source)]
    assert offenders == []


def test_the_torch_runner_is_imported_only_lazily_by_open_runner():
    importers = {}
    for path in sorted(ROOT.joinpath("device_runtime").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1] in TORCH_RUNNERS:
                importers.setdefault(path.name, []).append(node in tree.body)
    assert importers == {"runners.py": [False]}  # one import, inside a function


def test_exporters_import_no_mntool_module():
    offenders = [
        f"{p.relative_to(ROOT)}: import {m}"
        for p in _sources("exporters")
        for m in sorted(_imports(p))
        if m.split(".")[0] == "mntool"
    ]
    assert offenders == []


def test_no_library_module_imports_the_cli():
    library = [
        p
        for p in _sources("mntool", "exporters", "device_runtime", "benchmarks")
        if not p.relative_to(ROOT).parts[:2] == ("mntool", "cli")
    ]
    assert ROOT / "mntool" / "report.py" in library and ROOT / "benchmarks" / "compare.py" in library
    offenders = [
        f"{p.relative_to(ROOT)}: import {m}"
        for p in library
        for m in sorted(_imports(p))
        if m == "mntool.cli" or m.startswith("mntool.cli.")
    ]
    assert offenders == []


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> modules it imports), as a path; [] if there is none."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]  # "open" modules are exactly those on `path`
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_exporters_modules_import_each_other_without_a_cycle():
    """Function-level imports count; the package `__init__` is left out (every submodule import
    loads it, and it imports the pipeline only inside `export()`)."""
    sources = [p for p in _sources("exporters") if p.name != "__init__.py"]
    graph = {_module_name(p): {m for m in _imports(p) if m.startswith("exporters.")} for p in sources}
    assert "exporters.proof" in graph["exporters.pipeline"] and "exporters.locate" in graph["exporters.coreml"]
    assert _cycle(graph) == []
    dynamic = [p.name for p in sources if re.search(r"\b(import_module|__import__)\(", p.read_text())]
    assert dynamic == [], "dynamic imports would hide edges from this check"


SHARED_EXPORT_CODE = ("pipeline.py", "proof.py")


def _target_words() -> set[str]:
    """Every target's name and artifact suffix (without the dot), from the registry and as of
    writing, so the check below cannot pass vacuously if the registry changes."""
    from exporters.targets import declarations

    return {"tflite", "onnx", "coreml", "mlpackage"} | {w for t in declarations() for w in (t.name, t.suffix[1:])}


def _target_mentions(source: str, words: set[str]) -> list[str]:
    """String constants (docstrings and f-string parts included) and identifiers that contain one
    of `words` (case-insensitively), and imports of target modules."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            text = " ".join([getattr(node, "module", None) or ""] + [a.name for a in node.names])
        else:
            continue
        found += [f"line {node.lineno}: {text!r}" for w in sorted(words) if w in text.lower()][:1]
    return found


def test_target_mention_finder_finds_names_in_strings_identifiers_and_imports():
    source = 'from exporters import coreml\nx = f"{a}.TFLite"\nif t != "onnx":\n    y = m.mlpackage_dir\n'
    assert [m.split(":")[0] for m in _target_mentions(source, _target_words())] == [
        "line 1",
        "line 2",
        "line 3",
        "line 4",
    ]
    assert _target_mentions('"""runs the target\'s passes"""\nx = job.target.suffix\n', _target_words()) == []


def test_shared_export_code_names_no_target():
    """Adding a target is its module and one registry entry: the pipeline and the proof read a
    target's suffix, precisions, passes and read-back from its declaration, never branch on names."""
    words = _target_words()
    offenders = {
        name: found
        for name in SHARED_EXPORT_CODE
        if (found := _target_mentions((ROOT / "exporters" / name).read_text(), words))
    }
    assert offenders == {}


def test_every_declared_target_is_known_to_the_device_side():
    """What a target's module cannot declare for `device_runtime` (which never imports exporters):
    the weight map accepts its name and a runner exists for its name and its suffix."""
    from device_runtime.runners import RUNTIME_OF_SUFFIX, RUNTIME_OF_TARGET
    from device_runtime.weight_map import TARGETS as WEIGHT_MAP_TARGETS
    from exporters.targets import TARGETS, declarations

    assert set(TARGETS) == set(WEIGHT_MAP_TARGETS) and len(TARGETS) == len(declarations())
    for target in declarations():
        assert RUNTIME_OF_SUFFIX[target.suffix] == RUNTIME_OF_TARGET[target.name], target.name
