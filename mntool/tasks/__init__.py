"""The tasks mntool personalises device models for, one module each, looked up by name.

A task module owns what differs between tasks and nothing else: its data, models and methods
(`MODELS`, `METHODS`, `DEFAULT_MODEL`), how `mntool train` / `mntool evaluate` run
(`train(options, out, init, data_dir, progress, log)`, `evaluate(ckpt, data_dir)`,
`metrics_table(metrics)`), how its checkpoints load (`load_checkpoint(path, config)`), and what a
device uploads and what the cloud makes of it (`check_upload`, `one_upload`, `parse_upload`,
`upload_schema`, `upload_limit`, `upload_body_bytes`, `check_generates`, `generate`).
MetaNetwork (`mntool.meta`), the exporters and the patch path are shared and never name a task.
A checkpoint records its task in config.json (`"task"`; absent means the recommender, as before).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from device_runtime.errors import MntoolError

TASKS = {"movielens": "mntool.tasks.movielens", "mnist": "mntool.tasks.mnist"}
DEFAULT_TASK = "movielens"


class SamplesError(MntoolError):
    """A device upload of the wrong shape, type, size or vocabulary (a 4xx when served).

    `code` is the stable slug the service answers with: "malformed_request" when the JSON has the
    wrong structure (400), any other when its values break a limit (422)."""

    def __init__(self, message: str, code: str = "bad_samples"):
        super().__init__(message)
        self.code = code


def get(name: str) -> ModuleType:
    """The task module called `name`."""
    if name not in TASKS:
        raise MntoolError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])


def of_config(config: dict) -> str:
    """The task a checkpoint's config.json names."""
    return config.get("task", DEFAULT_TASK)
