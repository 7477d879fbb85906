"""Entry point of the `mntool` command: a lazy click group plus the one-line error policy.

Each verb lives in its own module under `mntool.cli` and is imported only when used, so
`mntool --help` stays fast and a verb's heavy dependencies (torch, converters) load on demand.
"""

from __future__ import annotations

import importlib
import sys

import click

from device_runtime.errors import MntoolError

# verb -> ("module:attribute" of its click command, one-line summary for `mntool --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("mntool.cli.data:data", "Fetch and inspect data sets (MovieLens-100k, MNIST)."),
    "train": ("mntool.cli.train:train", "Train a device model (recommender, or --task mnist image classifier)."),
    "evaluate": ("mntool.cli.train:evaluate", "Re-compute a checkpoint's metrics on the device period."),
    "export": ("mntool.cli.export:export", "Compile a checkpoint to TFLite/ONNX/Core ML with swappable weights."),
    "keygen": ("mntool.cli.patch:keygen", "Make an Ed25519 key pair for signing patches."),
    "certify": ("mntool.cli.patch:certify", "Sign a key list: the online keys a root key lets sign patches."),
    "make-patch": ("mntool.cli.patch:make_patch", "Build a patch from explicit parameters (.npz)."),
    "generate": ("mntool.cli.patch:generate", "Build a patch from a device's recent samples (MetaNetwork)."),
    "patch-weights": ("mntool.cli.patch:patch_weights", "Verify a patch and write it into a compiled model."),
    "inspect": ("mntool.cli.patch:inspect", "Show an artifact's weight map or a patch's header."),
    "run": ("mntool.cli.bench:run", "Run one inference of a compiled model on a mobile runtime."),
    "bench": ("mntool.cli.bench:bench", "Benchmark load, latency and weight-swap time of a compiled model."),
    "device": ("mntool.cli.device:device", "Set up and inspect emulated devices (arm64 under QEMU)."),
    "serve": ("mntool.cli.serve:serve", "Serve fresh parameters (patches) to devices over HTTP."),
    "demo": (
        "mntool.cli.demo:demo",
        "Run the whole cloud -> device loop (MovieLens-100k, or --task mnist) and write a report.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module_name, attr = entry[0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Summaries come from COMMANDS so listing verbs never imports torch or a converter.
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mntool")
def cli() -> None:
    """mntool: personalise on-device models without on-device training.

    \b
    The cloud learns (MetaNetwork) to turn a device's recent samples into the parameters of
    the device model's adaptive layers; the device writes them into its compiled model.

    \b
    Examples:
      mntool data fetch movielens-100k
      mntool train --model sasrec --method metanetwork --out runs/sasrec
      mntool export runs/sasrec --target all --out artifacts/
      mntool generate runs/sasrec artifacts/model.tflite --samples recent.json -o p.mnpatch
      mntool patch-weights artifacts/model.tflite p.mnpatch -o patched.tflite
      mntool bench patched.tflite --runs 1000
      mntool serve runs/sasrec --artifact artifacts/model.tflite
    """


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and a non-zero exit."""
    try:
        cli.main(args=argv, prog_name="mntool", standalone_mode=False)
    except MntoolError as err:
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
