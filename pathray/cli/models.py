"""`pathray models`: list the supported encoders, or write random weights for one.

pathray models                                  # the table
pathray models --json                           # the same, machine-readable
pathray models write-random NAME DIR [--depth N] [--seed S]
"""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", choices=["list", "write-random"], default="list", help="list (default) or write-random"
    )
    parser.add_argument("name", nargs="?", help="model name (write-random)")
    parser.add_argument("out_dir", nargs="?", help="output directory (write-random)")
    parser.add_argument("--depth", type=int, default=None, help="shrink the network to N blocks (CPU tests/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="list as JSON")
    parser.add_argument("--markdown", action="store_true", help="list as a Markdown table (README, docs/models.md)")


def _rows() -> list[dict[str, str]]:
    from pathray.encoders import get_spec, list_models

    rows = []
    for name in list_models():
        s = get_spec(name)
        rows.append(
            {
                "name": name,
                "architecture": s.family,
                "builder": s.builder,
                s.builder: s.architecture,
                "dim": str(s.embed_dim),
                "mpp": f"{s.native_mpp:g}",
                "tile_px": str(s.tile_px),
                "tile_source": s.tile_source,
                "preprocess": s.preprocess.describe(),
                "pooling": s.pooling,
                "weights": s.hf_hub_id or s.weights_url or "-",
                "gated": "gated" if s.gated else "open",
                "license": s.license,
                "licence": s.license.split(" (")[0].split(":")[0],
                "source": s.source,
            }
        )
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    """The models table of README.md and docs/models.md, from the registry."""
    from pathray.encoders.builders import TILE_POOLINGS

    lines = [
        "| name | architecture | builder | dim | native tile | embedding | weights | access, licence |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['name']}` | {r['architecture']} | {r['builder']} | {r['dim']} | {r['tile_px']} px @ "
            f"{r['mpp']} µm/px | {TILE_POOLINGS.get(r['pooling'], r['pooling'])} | `{r['weights']}` | "
            f"{r['gated']}, {r['licence']} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.action == "write-random":
        if not args.name or not args.out_dir:
            print("usage: pathray models write-random NAME DIR [--depth N] [--seed S]")
            return 2
        from pathray.encoders import write_random_weights
        from pathray.errors import PathrayError

        overrides = {"depth": args.depth} if args.depth else {}
        try:
            out = write_random_weights(args.name, args.out_dir, seed=args.seed, **overrides)
        except PathrayError as exc:
            print(f"error: {exc}")
            return 2
        print(f"wrote random {args.name} weights to {out}")
        return 0
    rows = _rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.markdown:
        print(markdown_table(rows))
        return 0
    cols = ["name", "builder", "architecture", "dim", "tile_px", "mpp", "pooling", "gated", "licence", "weights"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols))
    print("\nplus timm:<architecture> for any timm backbone; preprocessing and licences: docs/models.md")
    return 0
