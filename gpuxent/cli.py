"""The ``gpuxent`` console script: ``info``, ``bench`` and ``train``.

Errors a user can fix (a bad argument, an unreadable CSV, an unwritable path, a missing optional
dependency) are one line on stderr and exit status 2, never a traceback; they name the option as it is
typed (``--batch-size``) and suggest the closest option or choice to a misspelt one. ``--json`` output is
strict JSON: a non-finite number is written as ``null``. A reader that goes away (``gpuxent info | head -1``)
ends the output quietly.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import platform
import re
import sys

# help for options that their module adds without one
_DEFAULT_HELP = {
    "--dtype": "dtype of the logits (default: %(default)s)",
}


def _did_you_mean(word: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the candidate closest to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``gpuxent train: error: ...``), exit status 2, and a
    suggestion for a misspelt choice."""

    def error(self, message):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += _did_you_mean(choice[1], [c.strip(" '") for c in choice[2].split(",")])
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the option as typed (``batch_size`` -> ``--batch-size``) for the options of ``parser``."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def flag_message(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` with a leading setting name (``batch_size: ...``, as the library's checks name it)
    replaced by the option a user types (``--batch-size: ...``)."""
    name, sep, rest = message.partition(":")
    flag = _flags(parser).get(name.strip()) if sep else None
    if flag is None:
        return message
    rest = rest.strip()
    return rest if rest.startswith(flag + " ") else f"{flag}: {rest}"


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


def _warmup(args) -> int:
    import torch

    from gpuxent.warmup import warmup

    dtypes = tuple(getattr(torch, d) for d in args.dtype)
    seconds = warmup(dtypes, jobs=args.jobs, log=lambda line: print(line, flush=True))
    print(f"warm: every kernel variant is in numba's cache ({seconds:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``gpuxent`` parser; ``parser.commands`` maps each command to its subparser."""
    import gpuxent
    from gpuxent import bench, train

    parser = _Parser(prog="gpuxent", description="Fused softmax cross-entropy: info, benchmarks, a tiny MLP trainer.")
    parser.add_argument("--version", action="version", version=f"gpuxent {gpuxent.__version__}")
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
    p = sub.add_parser(
        "warmup", help="compile every CPU kernel variant ahead of time into numba's disk cache (for images)"
    )
    p.add_argument("--dtype", nargs="+", choices=["float32", "float64", "bfloat16", "float16"],
                   default=["float32", "float64", "bfloat16", "float16"], help="the dtypes to compile for")  # fmt: skip
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="dtypes compiled at once, one process each")
    p.set_defaults(func=_warmup)
    parser.commands = dict(sub.choices)
    for command in parser.commands.values():
        for action in command._actions:
            if action.help is None and action.option_strings:
                action.help = _DEFAULT_HELP.get(max(action.option_strings, key=len))
    return parser


def _unrecognized(parser: argparse.ArgumentParser, args, extra: list[str]) -> None:
    """argparse's error for arguments no option takes, with the closest option of the command."""
    command = parser.commands[args.command]
    options = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
    hints = "".join(_did_you_mean(word.split("=")[0], options) for word in extra if word.startswith("-"))
    command.error(f"unrecognized arguments: {' '.join(extra)}{hints}")


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: its reader went away (``| head``), and Python's flush at exit must not
    print ``BrokenPipeError`` (the recipe of the ``signal`` module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 with a one-line message on stderr for an error a user can fix.
    A closed stdout (``gpuxent ... | head -1``) ends it quietly with 0."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a reader that left shows here, not at exit
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    return code


def _main(argv: list[str] | None) -> int:
    from gpuxent.data import MissingDependency

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser, args, extra)
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except (ValueError, RuntimeError, OSError, MissingDependency) as exc:
        message = " ".join(str(exc).splitlines())  # one line, whatever raised it
        message = flag_message(message, parser.commands[args.command])
        print(f"gpuxent {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
