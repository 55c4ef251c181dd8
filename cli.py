"""The `treeopt` command: one thin sub-command per verb (each verb lives in treeopt/<verb>.py).

Exit codes: 0 success, 2 bad input, 1 runtime failure. Errors are one line on stderr;
`--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

VERBS = {
    "run": "treeopt.run",
    "bench": "treeopt.bench",
    "train": "treeopt.train",
    "profile": "treeopt.profile",
    "search": "treeopt.search",
    "accept": "treeopt.accept",
    "report": "treeopt.report",
    "demo": "treeopt.demo",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, the other verbs' modules (and torch) are not imported."""
    parser = _Parser(prog="treeopt", description="Hardware-aware tree search for Parallel "
                     "Prompt Decoding: profile, accept, search, run, bench.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb, module in VERBS.items():
        if only and verb != only:
            sub.add_parser(verb)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(verb, help=mod.HELP, description=mod.__doc__)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(verb if verb in VERBS else None).parse_args(argv)
    from treeopt.errors import BadInput

    try:
        result = args._main(args)
    except BadInput as e:
        if args.debug:
            raise
        print(f"treeopt {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"treeopt {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, no traceback, unless --debug
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"treeopt {args.verb}: failed: {e.__class__.__name__}: {msg}", file=sys.stderr)
        return 1
    if args.json and result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
