"""Write one self-contained HTML report (inline SVG, no scripts, no network) from any
subset of profiles, an acceptance file, a tree (and its search report) and a run/bench
result."""
from __future__ import annotations

import pathlib
import webbrowser

from .. import acceptance, latency, paths, report, runs
from ..artefact import check_out, check_schema, read_json, write_atomic
from ..export import load_tree
from .common import say

HELP = "write an HTML report from profiles, acceptance, tree and run artefacts"


def add_arguments(p) -> None:
    p.add_argument("--profile", action="append", default=[], help="profile.json (repeatable)")
    p.add_argument("--acceptance", action="append", default=[],
                   help="acceptance.json (repeatable: one per prompt family; the first gets "
                   "the acceptance section, all join the prompt-families panel)")
    p.add_argument("--tree", help="tree.json (from search; its search report beside it is "
                   "read too)")
    p.add_argument("--run", help="run.json (from run or bench; a `bench --batch` run gives "
                   "the batch panel, a bench of several --prompts sets the families panel)")
    p.add_argument("--compare-tree", action="append", default=[], metavar="TREE",
                   help="another tree whose per-batch table joins the batch panel, e.g. one "
                   "searched on a simulated GPU (repeatable)")
    p.add_argument("--out", help="report path (default: $TREEOPT_HOME/reports/<name>.html)")
    p.add_argument("--title", default="treeopt report")
    p.add_argument("--allow-mixed", action="store_true",
                   help="allow artefacts of different models in one report")
    p.add_argument("--open", action="store_true", help="open the report in the browser")


def tree_and_report(path) -> tuple[dict, dict | None]:
    """A tree file in any format (as treeopt JSON) and the search report beside it."""
    tree = load_tree(path).to_json()
    name = (tree.get("meta") or {}).get("search_report")
    side = pathlib.Path(path).with_name(paths.name_part(name)) if isinstance(name, str) else None
    found = None
    if side is not None and side.is_file():
        found = read_json(side, "search report")
        check_schema(found, "treeopt.search/1", f"search report {side}")
    return tree, found


def main(args) -> dict:
    profiles = [(p, latency.load(p)) for p in args.profile]
    accs = [acceptance.load(a) for a in args.acceptance]
    tree, search_report = tree_and_report(args.tree) if args.tree else (None, None)
    compare = [(p, load_tree(p).to_json()) for p in args.compare_tree]
    run = runs.load(args.run) if args.run else None
    name = pathlib.Path(args.run or args.tree or (args.acceptance or [None])[0] or
                        (args.profile[0] if args.profile else "report")).name
    out = pathlib.Path(args.out or paths.user_reports() /
                       (paths.name_part(name.split(".")[0]) + ".html"))
    check_out(out, [*args.profile, *args.acceptance, args.tree, args.run, *args.compare_tree])
    text = report.build(profiles, accs[0] if accs else None, tree, run, args.title,
                        args.allow_mixed, search_report, compare, accs[1:])
    write_atomic(out, text)
    if args.open:
        webbrowser.open(out.resolve().as_uri())
    sections = [s for s in ("latency", "acceptance", "search", "tree", "batch", "families",
                            "run", "drift")
                if f"<section id='{s}'>" in text]
    if not args.json:
        say(f"wrote {out} ({len(text) // 1024} KB; sections: {', '.join(sections)})")
    return {"out": str(out), "sections": sections, "figures": text.count("<figure")}
