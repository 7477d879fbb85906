"""`mntool serve` as a child process on a free loopback port, for tests, benchmarks and examples.

`ServerProcess.start(checkpoint, artifacts, *options, also=[(ckpt, artifact)])` runs the real CLI
with `--port 0 --json`, reads the address it printed, and returns once every worker process has
loaded the checkpoints (each reports its start time to the server's /metrics).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from device_runtime.errors import MntoolError
from mntool.serve import routes
from mntool.serve.metrics import START_TIME


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    workers: int

    @classmethod
    def start(
        cls,
        checkpoint: Path | str,
        artifacts: Sequence[Path | str],
        *options: str,
        also: Sequence[tuple[Path | str, Path | str]] = (),
        workers: int = 1,
        env: dict | None = None,
        stderr: IO | None = None,
        ready_timeout_s: float = 120.0,
    ) -> ServerProcess:
        """Start `mntool serve CHECKPOINT --artifact ... [--also CKPT ARTIFACT ...] OPTIONS --workers N`
        on 127.0.0.1:0."""
        args = [
            sys.executable,
            "-m",
            "mntool.cli.main",
            "serve",
            str(checkpoint),
            "--port",
            "0",
            "--json",
            "--workers",
            str(workers),
            *[a for path in artifacts for a in ("--artifact", str(path))],
            *[a for ckpt, path in also for a in ("--also", str(ckpt), str(path))],
            *map(str, options),
        ]
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=stderr if stderr is not None else subprocess.PIPE, text=True, env=env
        )
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            why = proc.stderr.read().strip() if proc.stderr else f"exit code {proc.returncode}"
            raise MntoolError(f"mntool serve did not start: {why}")
        server = cls(proc, json.loads(line)["url"], workers)
        server.wait_ready(ready_timeout_s)
        return server

    def wait_ready(self, timeout_s: float) -> set[int]:
        """Until each worker (they load the checkpoint in parallel) has loaded it: one scrape of
        /metrics shows every worker's start time. Returns the workers' pids."""
        pids: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(pids) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise MntoolError(f"mntool serve at {self.url}: {len(pids)} of {self.workers} workers became ready")
            try:
                with urllib.request.urlopen(f"{self.url}{routes.METRICS}", timeout=timeout_s) as answer:
                    pids = {
                        int(pid) for pid in re.findall(rf'^{START_TIME}\{{pid="(\d+)"\}}', answer.read().decode(), re.M)
                    }
            except (urllib.error.URLError, ConnectionError):
                pass
            if len(pids) < self.workers:
                time.sleep(0.05)
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
