"""`mntool serve`: thin click layer over `mntool.serve` (the HTTP patch service)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mntool.cli.patch import days, parse_duration
from mntool.serve.config import ServeConfig

DEFAULTS = ServeConfig(checkpoint="", artifacts=[])  # one home for every default: the config


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--artifact",
    "artifacts",
    type=click.Path(exists=True, path_type=Path),
    multiple=True,
    required=True,
    help="A compiled artifact (with its weight map) to serve CHECKPOINT's patches for; repeat for several targets.",
)
@click.option(
    "--also",
    "also",
    type=(
        click.Path(exists=True, file_okay=False, path_type=Path),
        click.Path(exists=True, path_type=Path),
    ),
    multiple=True,
    metavar="CKPT ARTIFACT",
    help="Also serve ARTIFACT with patches from checkpoint CKPT (another model version, e.g. the new cloud model "
    "while devices move over to it); repeatable. Each artifact gets the patches of the checkpoint it is paired "
    "with; requests are routed by fingerprint.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port; 0 picks a free one (printed)."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes; each loads the checkpoint and batches its own requests.",
)
@click.option(
    "--signing-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ed25519 private key (mntool keygen): the online key that signs every patch.",
)
@click.option(
    "--key-list",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Key list (mntool certify) by which the root key certifies --signing-key; devices then need only the root .pub.",
)
@click.option(
    "--patch-ttl",
    "patch_ttl",
    default=days(DEFAULTS.patch_ttl_s),
    show_default=True,
    help="How long each patch stays valid (s/m/h/d).",
)
@click.option("--token", envvar="MNTOOL_SERVE_TOKEN", help="Bearer token devices must send [env: MNTOOL_SERVE_TOKEN].")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=DEFAULTS.max_batch,
    show_default=True,
    help="Requests per generator call (1 = no batching).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(min=0),
    default=DEFAULTS.max_wait_ms,
    show_default=True,
    help="How long a request may wait for others to join its batch.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    help="Item ids (or images) per upload [default: what the checkpoint reads].",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=64),
    help="Largest request body accepted [default: 16384 for item ids; for images 4096 per --max-samples + 1024].",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULTS.request_timeout_s,
    show_default=True,
    help="Seconds a request may wait for its patch before a 503.",
)
@click.option(
    "--torch-threads",
    type=click.IntRange(min=1),
    default=DEFAULTS.torch_threads,
    show_default=True,
    help="Torch threads per worker.",
)
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn access log).")
@click.option("--json", "as_json", is_flag=True, help="Print the listening address as one JSON line.")
def serve(
    checkpoint,
    artifacts,
    also,
    host,
    port,
    workers,
    signing_key,
    key_list,
    patch_ttl,
    token,
    max_batch,
    max_wait_ms,
    max_samples,
    max_body_bytes,
    timeout_s,
    torch_threads,
    access_log,
    as_json,
):
    """Serve fresh parameters (patches) to devices over HTTP.

    A device POSTs its recent samples (item ids, or images for an image checkpoint) with its
    artifact's fingerprint to /v1/patches and gets a patch (application/octet-stream) generated
    by CHECKPOINT's MetaNetwork; requests arriving together share one generator call. Also: GET /v1/artifacts, /v1/status (token like
    /v1/patches), /healthz (liveness only), /metrics (Prometheus, every worker in one scrape),
    /openapi.json. See docs/serving.md.

    One server can serve several model versions at once: `--also CKPT ARTIFACT` pairs a further
    artifact with the checkpoint whose patches it gets (all checkpoints must read the same
    uploads). A request goes to the checkpoint of its artifact's fingerprint; requests of
    different checkpoints never share a generator call.

    \b
    Example:
      mntool serve runs/sasrec --artifact artifacts/model.tflite --artifact artifacts/model.onnx \\
          --signing-key keys/online.key --key-list keys/online.mnkeys --workers 2 --port 8080
      curl -s localhost:8080/v1/artifacts

    \b
    Two versions while devices move from v1 to v2:
      mntool serve runs/v1 --artifact artifacts/v1/model.onnx --also runs/v2 artifacts/v2/model.onnx \\
          --signing-key keys/online.key --key-list keys/online.mnkeys
    """
    from mntool.serve import serve as run_serve

    config = ServeConfig(
        checkpoint=str(checkpoint),
        artifacts=[str(a) for a in artifacts],
        signing_key=str(signing_key) if signing_key else None,
        key_list=str(key_list) if key_list else None,
        patch_ttl_s=parse_duration(patch_ttl),
        token=token or None,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_body_bytes=max_body_bytes,
        max_samples=max_samples,
        request_timeout_s=timeout_s,
        torch_threads=torch_threads,
        also=[[str(c), str(a)] for c, a in also],
    )
    pairs = config.also

    def announce(url: str) -> None:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "url": url,
                        "workers": workers,
                        "artifacts": config.artifacts,
                        "also": pairs,
                        "signed": bool(signing_key),
                        "auth": bool(token),
                    }
                )
            )
        else:
            signed = "signed" if signing_key else "UNSIGNED"
            auth = "bearer token required" if token else "no auth"
            checkpoints = len(dict.fromkeys([config.checkpoint, *(c for c, _ in pairs)]))
            versions = f" of {checkpoints} checkpoints" if checkpoints > 1 else ""
            click.echo(
                f"serving {signed} patches for {len(artifacts) + len(pairs)} artifact(s){versions} on {url} "
                f"with {workers} worker(s), {auth} (Ctrl+C to stop)"
            )

    run_serve(config, host, port, workers=workers, access_log=access_log, on_listening=announce)
