"""The `treeopt` command: one thin sub-command per verb (each in treeopt/verbs/<verb>.py).

Exit codes: 0 success, 2 bad input, 1 runtime failure, 130 interrupted (Ctrl-C), 143
terminated (SIGTERM). Errors are one line on stderr; `--debug` shows the traceback (the
exit code stays the same).
"""
from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import traceback

from . import __version__
from .artefact import forget_inputs
from .errors import BadInput, cut, is_oom

VERBS = ["run", "bench", "train", "profile", "search", "accept", "corpus", "report", "demo"]


class Terminated(BaseException):
    """SIGTERM, raised where the program is so that cleanup (finally blocks) runs."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only` (a verb, or "" for none), the other verbs' modules
    (and torch) are not imported."""
    parser = _Parser(prog="treeopt", description="Hardware-aware tree search for Parallel "
                     "Prompt Decoding: profile, accept, search, run, bench.")
    parser.add_argument("--version", action="version", version=f"treeopt {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        if only is not None and verb != only:
            sub.add_parser(verb)
            continue
        mod = importlib.import_module(f"treeopt.verbs.{verb}")
        p = sub.add_parser(verb, help=mod.HELP, description=mod.__doc__)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


# the signal that stopped this run: a library's clean-up may replace our exception with
# its own on the way out (optuna's trial bookkeeping does), so main reports the signal
_stopped_by: list[int] = []


def _on_signal(signum, frame):
    _stopped_by.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup run
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    only = verb if verb in VERBS else ("" if "--version" in argv else None)
    args = build_parser(only).parse_args(argv)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    _stopped_by.clear()
    forget_inputs()
    code, result, trace = 0, None, ""
    try:
        result = args._main(args)
    except BadInput as e:
        code, line = 2, f"error: {cut(str(e).splitlines()[0] if str(e) else '', 400)}"
        trace = traceback.format_exc()
    except KeyboardInterrupt:
        code, line, trace = 130, "interrupted", traceback.format_exc()
    except Terminated:
        code, line, trace = 143, "terminated", traceback.format_exc()
    except Exception as e:  # noqa: BLE001 - one line, no traceback, unless --debug
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        code, line = 1, (f"failed: out of memory ({msg[:120]}); try a smaller --batch, "
                         "fewer prompts or a shorter input" if is_oom(e) else
                         f"failed: {e.__class__.__name__}: {msg[:200]}")
        trace = traceback.format_exc()  # here: outside the except it is gone
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if _stopped_by:
        code, line = (130, "interrupted") if _stopped_by[0] == signal.SIGINT else \
            (143, "terminated")
    if code:
        if args.debug and trace:
            sys.stderr.write(trace)
        print(f"treeopt {args.verb}: {line}", file=sys.stderr)
        return code
    if args.json and result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
