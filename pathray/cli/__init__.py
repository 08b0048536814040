"""`pathray` command line: a thin dispatcher over one module per subcommand.

Each subcommand module exposes ``configure(parser: argparse.ArgumentParser) -> None`` and
``run(args: argparse.Namespace) -> int`` (the process exit status). Modules are imported
only when their subcommand runs, so ``pathray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

#: subcommand name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "tile": ("pathray.cli.tile", "tile slides into tile records, QC images and a status table"),
    "embed": ("pathray.cli.embed", "run the Ray Data job: slides -> tile embeddings -> Parquet store"),
    "aggregate": (
        "pathray.cli.aggregate",
        "slide-level embeddings (mean, max, a slide encoder) from a store, as a Ray job",
    ),
    "status": ("pathray.cli.status", "what is in a store: models, tilings, slides committed / failed / to do, runs"),
    "export": ("pathray.cli.export", "write a store's tile features as TRIDENT/CLAM h5 or pt files, one per slide"),
    "import": ("pathray.cli.importing", "write existing TRIDENT/CLAM h5 or pt tile features into a store as a model"),
    "models": ("pathray.cli.models", "list the supported encoders, or write random weights for one"),
    "demo": ("pathray.cli.demo", "make the bundled demo slides and weights, then run the job on them"),
    "mil": ("pathray.cli.mil", "slide-level ABMIL: train|eval on store slides and labels, attention heatmaps"),
    "manifest": ("pathray.cli.manifest", "write a slide manifest from a public index (idc: NCI Imaging Data Commons)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse the command name first, then let its module add its own options.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(known._module)
    sub_parser = argparse.ArgumentParser(prog=f"pathray {known.command}", description=SUBCOMMANDS[known.command][1])
    module.configure(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args))


def entry() -> None:
    """The ``pathray`` command: :func:`main`, then a fast exit with its status.

    Finalising an interpreter that imported torch and timm (~2,700 modules) takes about a
    second and does nothing useful once a command has returned: every file it wrote is
    closed, commits settled and the store lease released. So the process stops a local Ray
    it started (what Ray's own exit hook would do), flushes its output and logs, and ends
    with ``os._exit``. An exception still propagates the normal way."""
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
