"""Load test of `mntool serve` on loopback: throughput and latency by concurrency, batched vs
unbatched generation against the HTTP stack alone, and a burst with 10% malformed requests.

Real `mntool serve` processes (port 0, signed patches, --workers) are started once per
configuration and warmed up; closed-loop async clients (one keep-alive connection each, raw
asyncio HTTP/1.1 so the load generator stays light; it shares the cores with the server) run
each scenario for a bounded number of requests and seconds, repeated in interleaved order so
load from other processes falls on every scenario alike (median reported). GET /healthz through
the same server is the same-run reference: the HTTP stack with no generation. Uploads are 30 item
ids drawn uniformly from the vocabulary (generation cost does not depend on which ids).

    .venv/bin/python benchmarks/load_test.py --ckpt runs/sasrec-mn
    .venv/bin/python benchmarks/load_test.py --ckpt runs/sasrec-mn --artifact artifacts/model.onnx --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mntool.serve import ServerProcess, metrics, routes

ROOT = Path(__file__).resolve().parents[1]
MNTOOL = [sys.executable, "-m", "mntool.cli.main"]


# ---- a minimal HTTP/1.1 keep-alive client ---------------------------------------------------
class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict | None = None
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        payload = await self.reader.readexactly(int(fields.get("content-length", 0)))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1]), payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ---- the server under test ------------------------------------------------------------------
def start_server(args, key: Path, max_batch: int, token: str | None = None) -> ServerProcess:
    env = {**os.environ, "MNTOOL_SERVE_TOKEN": token} if token else None
    return ServerProcess.start(
        args.ckpt,
        [args.artifact],
        "--max-batch",
        str(max_batch),
        "--signing-key",
        str(key),
        "--key-list",
        str(key.with_suffix(".mnkeys")),
        "--torch-threads",
        str(args.torch_threads),
        workers=args.workers,
        env=env,
    )


def address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def batch_stats(server: ServerProcess) -> tuple[float, float]:
    """(batches, requests batched) so far, from one /metrics scrape (it covers every worker)."""
    conn = Connection(*address(server))
    _, text = await conn.request("GET", routes.METRICS, headers={"Connection": "close"})
    await conn.close()
    text = text.decode()
    count = float(re.search(rf"^{metrics.BATCH_SIZE}_count (\S+)$", text, re.M).group(1))
    total = float(re.search(rf"^{metrics.BATCH_SIZE}_sum (\S+)$", text, re.M).group(1))
    return count, total


# ---- scenarios ------------------------------------------------------------------------------
@dataclass
class Result:
    scenario: str
    workers: int
    max_batch: int
    clients: int
    requests: int
    seconds: float
    patches_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float
    extra: dict = field(default_factory=dict)


def patch_body(rng: np.random.Generator, fingerprint: str, n_items: int, recent_len: int, device: int) -> bytes:
    items = rng.integers(1, n_items + 1, size=recent_len).tolist()
    return json.dumps({"device_id": f"dev-{device}", "fingerprint": fingerprint, "samples": {"items": items}}).encode()


Request = tuple[str, str, bytes, dict]  # method, path, body, headers


async def closed_loop(
    server: ServerProcess, requests: list[Request], clients: int, max_requests: int, max_seconds: float
) -> tuple[list[float], list[int], float]:
    """`clients` connections each sending the next request as soon as its last answer arrives."""
    latencies, statuses, next_index = [], [], [0]
    deadline = time.perf_counter() + max_seconds

    async def client() -> None:
        conn = Connection(*address(server))
        while next_index[0] < max_requests and time.perf_counter() < deadline:
            method, path, body, headers = requests[next_index[0] % len(requests)]
            next_index[0] += 1
            t0 = time.perf_counter()
            status, _ = await conn.request(method, path, body, headers)
            latencies.append(time.perf_counter() - t0)
            statuses.append(status)
        await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, statuses, time.perf_counter() - started


async def measure(
    args, server: ServerProcess, requests: list[Request], clients: int, scenario: str, max_batch: int
) -> Result:
    before = await batch_stats(server)
    latencies, statuses, seconds = await closed_loop(server, requests, clients, args.requests, args.seconds)
    after = await batch_stats(server)
    batches, batched = after[0] - before[0], after[1] - before[1]
    lat = np.asarray(latencies) * 1e3
    return Result(
        scenario,
        args.workers,
        max_batch,
        clients,
        len(lat),
        seconds,
        len(lat) / seconds,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
        sum(s != 200 for s in statuses),
        batched / batches if batches else float("nan"),
    )


def median_result(runs: list[Result]) -> Result:
    """The run with the median throughput, reporting how many repeats it is the median of."""
    chosen = sorted(runs, key=lambda r: r.patches_per_s)[len(runs) // 2]
    chosen.extra["repeats"] = [round(r.patches_per_s, 1) for r in runs]
    return chosen


async def throughput(args, fingerprint: str, n_items: int, recent_len: int, key: Path) -> list[Result]:
    """Batched (max batch 64) at each client count, unbatched (max batch 1) at the most clients,
    and GET /healthz (the HTTP stack alone) as the same-run reference; repeats interleaved so
    that load from other processes falls on every scenario alike."""
    rng = np.random.default_rng(0)
    headers = {"Content-Type": "application/json"}
    patches = [
        ("POST", routes.PATCHES, patch_body(rng, fingerprint, n_items, recent_len, i), headers) for i in range(512)
    ]
    health = [("GET", routes.HEALTHZ, b"", {})]
    most = max(args.clients)
    batched, unbatched = start_server(args, key, 64), start_server(args, key, 1)
    runs: dict[tuple[str, int], list[Result]] = {}
    try:
        for server in (batched, unbatched):
            await closed_loop(server, patches, most, args.warmup, 30.0)
        for _ in range(args.repeats):
            plan = [(batched, patches, c, "batched", 64) for c in args.clients]
            plan += [(unbatched, patches, most, "unbatched", 1), (batched, health, most, "GET /healthz", 64)]
            for server, requests, clients, scenario, max_batch in plan:
                result = await measure(args, server, requests, clients, scenario, max_batch)
                runs.setdefault((scenario, clients), []).append(result)
                print(table([result]).splitlines()[-1], file=sys.stderr)
    finally:
        batched.stop()
        unbatched.stop()
    return [median_result(r) for r in runs.values()]


def malformed_bodies(
    rng: np.random.Generator, fingerprint: str, n_items: int, recent_len: int, token: str
) -> list[tuple[str, bytes, dict]]:
    """One of each kind of bad request the service must answer with a 4xx."""
    ok = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    good = json.loads(patch_body(rng, fingerprint, n_items, recent_len, 0))
    bad = lambda **kw: json.dumps({**good, **kw}).encode()  # noqa: E731
    return [
        ("malformed_json", b'{"device_id": "x", "fingerprint": ', ok),
        ("wrong_content_type", bad(), {**ok, "Content-Type": "text/plain"}),
        ("oversized_body", b"{" + b" " * 20000 + b"}", ok),
        ("too_many_samples", bad(samples={"items": [1] * (recent_len + 1)}), ok),
        ("unknown_fingerprint", bad(fingerprint="0" * 64), ok),
        ("outside_vocabulary", bad(samples={"items": [1, n_items + 1]}), ok),
        ("missing_token", bad(), {"Content-Type": "application/json"}),
        ("invalid_token", bad(), {**ok, "Authorization": "Bearer wrong"}),
    ]


async def malformed_mix(args, fingerprint: str, n_items: int, recent_len: int, key: Path) -> Result:
    """args.mix_requests requests, every tenth malformed, over 64 connections, auth on."""
    token = "load-test-token"
    rng = np.random.default_rng(7)
    bad = malformed_bodies(rng, fingerprint, n_items, recent_len, token)
    good_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    plan = []
    for i in range(args.mix_requests):
        if i % 10 == 9:
            plan.append(bad[(i // 10) % len(bad)])
        else:
            plan.append(("valid", patch_body(rng, fingerprint, n_items, recent_len, i), good_headers))
    server = start_server(args, key, 64, token=token)
    outcomes: dict[str, list[int]] = {}
    latencies, next_index = [], [0]

    async def client() -> None:
        conn = Connection(*address(server))
        while next_index[0] < len(plan):
            kind, body, headers = plan[next_index[0]]
            next_index[0] += 1
            t0 = time.perf_counter()
            status, _ = await conn.request("POST", routes.PATCHES, body, headers)
            latencies.append(time.perf_counter() - t0)
            outcomes.setdefault(kind, []).append(status)
        await conn.close()

    try:
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(64)))
        seconds = time.perf_counter() - started
        alive = server.proc.poll() is None
    finally:
        server.stop()
    valid = outcomes.pop("valid")
    by_kind = {
        k: {"sent": len(v), "4xx": sum(400 <= s < 500 for s in v), "statuses": sorted(set(v))}
        for k, v in outcomes.items()
    }
    n_bad = sum(len(v) for v in outcomes.values())
    n_bad_4xx = sum(d["4xx"] for d in by_kind.values())
    lat = np.asarray(latencies) * 1e3
    return Result(
        "10% malformed",
        args.workers,
        64,
        64,
        len(plan),
        seconds,
        len(plan) / seconds,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
        sum(s != 200 for s in valid),
        float("nan"),
        extra={
            "valid": len(valid),
            "valid_errors": sum(s != 200 for s in valid),
            "malformed": n_bad,
            "malformed_4xx": n_bad_4xx,
            "malformed_4xx_share": n_bad_4xx / n_bad,
            "by_kind": by_kind,
            "server_alive": alive,
        },
    )


# ---- setup and report -----------------------------------------------------------------------
def prepare(args, tmp: Path) -> tuple[Path, str, int, int]:
    """Online signing key with its key list (as deployed: patches carry the list), artifact (ONNX
    export of the checkpoint unless given), fingerprint, vocabulary."""
    key = tmp / "cloud"
    for name in ("root", "cloud"):
        subprocess.run([*MNTOOL, "keygen", "-o", str(tmp / name)], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(
        [*MNTOOL, "certify", "--root", str(tmp / "root.key"), "--key", str(tmp / "cloud.pub"), "--serial", "1"]
        + ["-o", str(tmp / "cloud.mnkeys")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    if args.artifact is None:
        subprocess.run(
            [*MNTOOL, "export", str(args.ckpt), "--target", "onnx", "--out", str(tmp / "artifacts"), "--quiet"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        args.artifact = tmp / "artifacts" / "model.onnx"
    weight_map = json.loads(Path(f"{args.artifact}.weightmap.json").read_text())
    config = json.loads((args.ckpt / "config.json").read_text())
    return Path(f"{key}.key"), weight_map["fingerprint"], config["n_items"], config["protocol"]["recent_len"]


def table(results: list[Result]) -> str:
    head = (
        f"{'scenario':16s} {'workers':>7s} {'batch':>5s} {'clients':>7s} {'requests':>8s} {'patches/s':>10s} "
        f"{'p50 ms':>7s} {'p99 ms':>7s} {'errors':>6s} {'mean batch':>10s}"
    )
    rows = [head] + [
        f"{r.scenario:16s} {r.workers:7d} {r.max_batch:5d} {r.clients:7d} {r.requests:8d} {r.patches_per_s:10.0f} "
        f"{r.p50_ms:7.1f} {r.p99_ms:7.1f} {r.errors:6d} {r.mean_batch:10.1f}"
        for r in results
    ]
    return "\n".join(rows)


async def main_async(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mntool-load-") as tmp:
        key, fingerprint, n_items, recent_len = prepare(args, Path(tmp))
        results = await throughput(args, fingerprint, n_items, recent_len, key)
        mix = await malformed_mix(args, fingerprint, n_items, recent_len, key)
    most = max(args.clients)
    pick = {(r.scenario, r.clients): r for r in results}
    batched, unbatched, health = pick[("batched", most)], pick[("unbatched", most)], pick[("GET /healthz", most)]
    return {
        "workers": args.workers,
        "torch_threads": args.torch_threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": [asdict(r) for r in results + [mix]],
        "batched_over_unbatched": batched.patches_per_s / unbatched.patches_per_s,
        "batched_over_healthz": batched.patches_per_s / health.patches_per_s,
        "malformed": mix.extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (mntool train --out)")
    parser.add_argument("--artifact", type=Path, help="artifact to serve [default: ONNX export of --ckpt]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=5000, help="measured requests per scenario run (upper bound)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario run (upper bound)")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per scenario (median reported)")
    parser.add_argument("--mix-requests", type=int, default=10000, help="requests in the malformed-mix run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(table([Result(**r) for r in report["results"]]))
    print(
        f"batched / unbatched throughput at {max(args.clients)} clients: {report['batched_over_unbatched']:.1f}x; "
        f"batched patches/s as a share of GET /healthz/s (HTTP stack alone): {report['batched_over_healthz']:.0%}"
    )
    print(f"load average during the run (other processes included): {report['load_average'][0]:.1f}")
    m = report["malformed"]
    print(
        f"10% malformed: {m['valid_errors']} errors on {m['valid']} valid requests; "
        f"{m['malformed_4xx']}/{m['malformed']} malformed answered 4xx; server alive: {m['server_alive']}"
    )


if __name__ == "__main__":
    main()
