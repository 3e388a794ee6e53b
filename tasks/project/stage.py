"""A stage's entry point: ``python -m tasks.stages.<stage>`` parses arguments, loads params, runs and reports errors."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tasks.project.config import Params, ParamsError, load_params


class StageError(RuntimeError):
    """A stage (or a CLI command) cannot go on; the message says why and what to do. Printed without a traceback."""


def say(msg: str, *, err: bool = False, prefix: str = "") -> None:
    """Print a progress line now (to stderr with ``err``, e.g. when stdout is a result that a program parses)."""
    print(prefix + msg, file=sys.stderr if err else sys.stdout, flush=True)


def stage_main(
    fn: Callable[[Params], Any], argv: list[str] | None = None, load: Callable[[str, list[str]], Params] = load_params
) -> None:
    """Thin ``main()`` for ``python -m tasks.stages.<stage>``: parse args, load params, run, print errors plainly.

    ``load(path, overrides)`` reads the params (default: all of them, validated); a stage that must start
    fast may pass a loader that validates only what it reads."""
    import argparse

    ap = argparse.ArgumentParser(description=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    ap.add_argument("--verbose", action="store_true", help="show everything Ray prints (also: TL_VERBOSE=1)")
    args = ap.parse_args(argv)
    from tasks.project.console import set_verbose

    set_verbose(args.verbose)
    try:
        fn(load(args.params, args.overrides))
    except (ParamsError, ValueError, FileNotFoundError, StageError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
