"""The ``gpuxent`` console script: ``info``, ``bench`` and ``train``.

Errors a user can fix (a bad argument, an unreadable CSV, an unwritable path, a missing optional
dependency) are one line on stderr and exit status 2, never a traceback. ``--json`` output is strict
JSON: a non-finite number is written as ``null``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``gpuxent train: error: ...``), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_json(obj):
    """``obj`` with every NaN or infinity replaced by None, so that ``json.dumps`` writes valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _print_json(obj, indent=None) -> None:
    print(json.dumps(finite_json(obj), indent=indent, allow_nan=False))


def _info(args) -> int:
    import numba
    import numpy as np
    import torch

    import gpuxent
    from gpuxent import backends

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    info = {
        "gpuxent": gpuxent.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (a CPU build of torch)",
        "numpy": np.__version__,
        "numba": numba.__version__,
        "device": device,
        "backends": {name: {"available": ok, "why": why} for name, (ok, why) in backends.status().items()},
    }
    if args.json:
        _print_json(info, indent=2)
        return 0
    for key in ("gpuxent", "python", "torch", "cuda", "numpy", "numba", "device"):
        print(f"{key:8s} {info[key]}")
    print("backends:")
    for name, row in info["backends"].items():
        print(f"  {name:11s} {'yes' if row['available'] else 'no ':3s}  {row['why']}")
    return 0


def _bench(args) -> int:
    from gpuxent import bench

    result = bench.from_args(args)
    if args.json:
        _print_json(result, indent=2)
    else:
        print(bench.markdown(result))
    return 0


def _train(args) -> int:
    from gpuxent import train

    summary = train.run(train.config_from_args(args))["summary"]
    if summary is None:  # a rank other than 0 of a data-parallel run: rank 0 reports
        return 0
    if args.json:
        _print_json(summary)
        return 0
    print(train.summary_line(summary))
    for what in ("plot", "checkpoint"):
        if summary[what]:
            print(f"{what}: {summary[what]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gpuxent import bench, train

    parser = _Parser(prog="gpuxent", description="Fused softmax cross-entropy: info, benchmarks, a tiny MLP trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, device, backends and why the others are not available")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="throughput table on this device against PyTorch")
    bench.add_arguments(p)
    p.set_defaults(func=_bench)
    p = sub.add_parser("train", help="train the tiny MLP on a bundled dataset or a CSV")
    train.add_arguments(p)
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 with a one-line message on stderr for an error a user can fix."""
    from gpuxent.data import MissingDependency

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError, MissingDependency) as exc:
        message = " ".join(str(exc).splitlines())  # one line, whatever raised it
        print(f"gpuxent {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
