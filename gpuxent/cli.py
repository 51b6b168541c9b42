"""The ``gpuxent`` console script: ``info``, ``bench`` and ``train``."""

from __future__ import annotations

import argparse
import json
import platform
import sys


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
        "numpy": np.__version__,
        "numba": numba.__version__,
        "device": device,
        "backends": {name: {"available": ok, "why": why} for name, (ok, why) in backends.status().items()},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("gpuxent", "python", "torch", "numpy", "numba", "device"):
        print(f"{key:8s} {info[key]}")
    print("backends:")
    for name, row in info["backends"].items():
        print(f"  {name:11s} {'yes' if row['available'] else 'no ':3s}  {row['why']}")
    return 0


def _bench(args) -> int:
    from gpuxent import bench

    return bench.main(args)


def _train(args) -> int:
    from gpuxent import train

    return train.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuxent", description="Fused softmax cross-entropy: info, benchmarks, a tiny MLP trainer."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, device, backends and why the others are not available")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="throughput table on this device against PyTorch")
    from gpuxent import bench

    bench.add_arguments(p)
    p.set_defaults(func=_bench)
    p = sub.add_parser("train", help="train the tiny MLP on a bundled dataset or a CSV")
    try:
        from gpuxent import train
    except ImportError:  # the trainer is optional until it lands
        train = None
    if train is not None:
        train.add_arguments(p)
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
