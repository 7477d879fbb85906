"""The registry of targets: the one place that lists the target modules.

Each module declares itself with a module-level `TARGET` (`exporters.target.Target`); `TARGETS`
(the names, in this order: `--target all` exports them so) and every lookup by name derive from
`MODULES`. Adding a target is one module and one entry here. The declaration is read from its
module at each lookup, so replacing `module.TARGET` (as a test may) takes effect.
"""

from __future__ import annotations

from exporters import coreml, executorch, onnx, tflite
from exporters.errors import UnknownTarget
from exporters.target import Target

MODULES = (tflite, onnx, coreml, executorch)

TARGETS: tuple[str, ...] = tuple(m.TARGET.name for m in MODULES)


def declarations() -> tuple[Target, ...]:
    return tuple(m.TARGET for m in MODULES)


def get(name: str) -> Target:
    """The declaration of the target called `name`; `UnknownTarget` if there is none."""
    for target in declarations():
        if target.name == name:
            return target
    raise UnknownTarget(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
