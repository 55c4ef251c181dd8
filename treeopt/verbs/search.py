"""Find the tree with the most expected tokens per second for a model on a device.

Writes the tree (with how it was chosen and what it predicts) and, beside it, the search
report (`*.search.json`: best value per input-length cap, the greedy curve).
"""
from __future__ import annotations

import argparse
import pathlib

from .. import engines, latency, paths
from ..artefact import check_out, stamp, write_json
from ..export import FORMATS, for_engine, load_tree
from ..errors import BadInput
from ..inputs import resolve_inputs
from ..models import context_of
from ..acceptance import unpack_records
from ..search import Options, add_sources, evaluate_tree, plain_if_faster, search
from ..search.batch import per_batch
from . import serving_export
from .common import add_acceptance_arg, add_batch_arg, bounded_int, positive_int, say, warn

HELP = "find the tree with the most expected tokens per second for a model on a device"
SOURCES = ("ppd", "lookup", "cache")  # candidate sources, in the order a step merges them


def add_arguments(p) -> None:
    p.add_argument("--model", help="a known name (vicuna-7b, vicuna-13b, mobilellama, "
                   "vicuna-68m, ...) for the shipped reference data, or a local HF folder; "
                   "default: the embedded model")
    p.add_argument("--profile", help="profile.json (default: this device's measured profile, "
                   "yours then shipped; for reference models a simulated A100-80GB)")
    add_acceptance_arg(p, "default: yours, else the shipped one")
    p.add_argument("--max-input", type=positive_int, default=512,
                   help="no state's forward input may be longer (default 512)")
    p.add_argument("--context", type=bounded_int("context"),
                   help="context length at which the profile's t(L) is read (default: the "
                   "acceptance measurement's mean context, else 512)")
    p.add_argument("--static", action="store_true", help="one-state tree (every node K tokens)")
    p.add_argument("--product", action="store_true",
                   help="ignore measured conditional path probabilities (product model)")
    p.add_argument("--export", choices=list(FORMATS) + list(engines.ENGINES),
                   help="also write beside --out: medusa, ppd: the chosen tree in that "
                   "format (where it cannot express it, the best tree under its rules, said "
                   "so); vllm, sglang, trtllm: the speculative setting that serving engine "
                   "takes, its draft length per batch size tuned on this profile with the "
                   "engine's own draft rule (docs/serving.md)")
    p.add_argument("--engine-version",
                   help="with --export vllm|sglang|trtllm: the engine release whose rules "
                   "the file follows (default: the newest known: " + ", ".join(
                       f"{e} {v}" for e, v in engines.NEWEST.items()) + "; trtllm also main)")
    p.add_argument("--draft-source", choices=("lookup", "cache"),
                   help="with --export vllm|trtllm: draft from the request's own text "
                   "(lookup: vLLM ngram, a private TensorRT-LLM pool) or also from earlier "
                   "requests (cache: vLLM suffix, the public pool); default vllm lookup, "
                   "trtllm cache (SGLang's one trie is a cache)")
    p.add_argument("--evaluate", metavar="TREE",
                   help="predict a given tree (treeopt, Medusa choices or PPD dynamic tree) "
                   "on this profile and acceptance, beside the best tree of the same input "
                   "length; writes nothing")
    p.add_argument("--sources", default="ppd", type=sources_list,
                   help="candidate sources, comma-separated: ppd (the prompt tokens' guesses, "
                   "always), lookup (prompt lookup's chain), cache (the model's own earlier "
                   "text, `treeopt corpus`); a chain per state and match length, searched "
                   "by replaying the acceptance file's measured positions, kept only where "
                   "it predicts faster (default: ppd)")
    p.add_argument("--lookup-chain", type=bounded_int("lookup_chain"), metavar="C",
                   help="with lookup: the longest chain a step may verify (default: the "
                   "longest the acceptance file measured, `treeopt accept --lookup-chain`)")
    add_batch_arg(p, "also find the best configuration for each batch size (a tree, or plain "
                  "decoding where none is faster), from the profile's batch points; the tree "
                  "file then carries one entry per B")
    p.add_argument("--trials", type=int, default=0,
                   help="optuna trials over K used, width cap and probability model")
    p.add_argument("--storage", help="optuna storage URL (default: SQLite in the user cache)")
    p.add_argument("--out", help="tree path (default: $TREEOPT_HOME/profiles/"
                   "<device>__<model>.tree.json)")


def main(args) -> dict:
    limit = context_of(args.model)
    if limit and args.max_input >= limit:
        raise BadInput(f"--max-input {args.max_input}: the model's context is {limit}")
    opts = Options(args.max_input, args.context, args.static, args.product, args.trials,
                   args.storage)
    if args.evaluate:
        extra = [f for f, v in (("--batch", args.batch), ("--export", args.export),
                                ("--out", args.out), ("--trials", args.trials),
                                ("--lookup-chain", args.lookup_chain)) if v]
        if extra:
            raise BadInput(f"--evaluate predicts one tree and writes nothing: drop "
                           f"{', '.join(extra)}")
    release = serving_export.check_args(args)
    if args.lookup_chain is not None and "lookup" not in args.sources:
        raise BadInput("--lookup-chain needs --sources ppd,lookup")
    given = load_tree(args.evaluate) if args.evaluate else None
    inp = resolve_inputs(args.model, args.profile, args.acceptance,
                         need=("profile", "acceptance"), simulate=True, batch=args.batch)
    if given is not None:
        return _evaluate(given, inp, opts, args)
    prof = inp.profile
    if release and args.static:
        raise BadInput(f"--export {args.export} tunes a draft length per batch size over "
                       "dynamic trees; drop --static")
    if release and not args.batch:  # an engine export is tuned per batch size
        args.batch = latency.batches(prof)
    if args.batch:
        if args.static:
            raise BadInput("--batch searches dynamic trees; drop --static")
        latency.require_batches(prof, args.batch)
    out = pathlib.Path(args.out) if args.out else \
        paths.user_profiles() / paths.tree_name(prof.get("device_id") or "device",
                                                inp.model_id, prof["dtype"])
    check_out(out, inp.paths())
    report_path = paths.search_report_path(out)
    check_out(report_path, inp.paths(), "search report")
    exp_path = pathlib.Path(str(out).removesuffix(".json") + f".{args.export}.json") \
        if args.export and not release else None
    if exp_path is not None:  # every output checked before anything is written
        check_out(exp_path, inp.paths(), "export")
    if release:
        serving_export.check_outputs(out, args.export, inp.paths())
    human = not args.json
    rec = None
    if args.sources != ["ppd"]:
        rec = unpack_records(inp.acceptance, args.lookup_chain)
        if rec is None:
            raise BadInput(f"--sources {','.join(args.sources)}: the acceptance file "
                           f"{inp.acceptance_src} has no per-position records (measure them "
                           "with `treeopt accept`)")
        if "cache" in args.sources and "cache_match" not in rec:
            raise BadInput(f"--sources {','.join(args.sources)}: the acceptance file "
                           f"{inp.acceptance_src} has no cache records (measure them with "
                           "`treeopt accept`, which uses your corpus, `treeopt corpus`)")
    if inp.acceptance_note:
        warn(inp.acceptance_note)
    found = search(inp.acceptance, prof, opts, f"{inp.model_id}-{prof.get('device_id', 'dev')}")
    meta = found["meta"]
    if rec is not None:
        add_sources(found, rec, args.sources, args.max_input)
    plain = None if args.batch else plain_if_faster(found)
    sol = found["solution"]  # with lookup, the PPD part is chosen jointly
    tree = sol.tree
    batch_rows = None
    if args.batch:
        r = meta.get("replayed")
        chains = found["solution"].tree.has_chains
        table, batch_rows = per_batch(found, prof, args.batch, args.max_input,
                                      r["hybrid"] if r and chains else None, rec,
                                      tuple(args.sources))
        tree.by_batch = table
        meta["batch"] = found["report"]["batch"] = batch_rows
    tree.meta = {"model": inp.model_id, "profile": inp.profile_src,
                 "acceptance": inp.acceptance_src, "device": prof["device"].get("name"),
                 "device_id": prof.get("device_id"), "dtype": prof["dtype"],
                 "simulated": bool(prof.get("simulated")), **meta, **stamp(),
                 "search_report": report_path.name}
    report = {"schema": "treeopt.search/1", "tree": out.name, "model": inp.model_id,
              **found["report"]}
    exp = for_engine(args.export, found, args.max_input, batch_rows) if exp_path else None
    served = serving_export.build(args, inp, found, batch_rows, out, release, not human) \
        if release else None
    write_json(report_path, report)
    tree.save(out)
    if exp is not None:
        write_json(exp_path, exp)
    if served is not None:
        serving_export.write(served[0])
    pred = meta["predicted"]
    result = {"out": str(out), "search_report": str(report_path), "model": inp.model_id,
              "profile": inp.profile_src, "acceptance": inp.acceptance_src, **pred,
              "context": meta["context"], "search_seconds": meta["search_seconds"],
              "config": meta["config"], "tree": tree.to_json()["states"],
              "root_prompt_tokens": tree.root_prompt_tokens, **found["report"]}
    if served is not None:
        result["export"] = served[1]
    if exp is not None:
        result["export"] = {"path": str(exp_path), **exp}
        if not exp["exact"]:
            e, c = exp["predicted"], exp["chosen_tree_predicted"]
            warn(f"note: the chosen tree cannot be written as {args.export} ("
                 f"{'; '.join(exp['not_expressible'])}); {exp_path.name} holds the best tree "
                 f"under {args.export}'s rules instead: {e['tokens_per_step']:.3f} "
                 f"tokens/step, {e['tokens_per_second']:.1f} tokens/s vs the chosen "
                 f"{c['tokens_per_step']:.3f}, {c['tokens_per_second']:.1f}")
    if human:
        say(f"model {inp.model_id}; profile: {inp.profile_src}; acceptance: "
            f"{inp.acceptance_src}")
        _print(tree, sol, pred, meta, found["report"].get("per_input_length"), out, report_path)
        if batch_rows:
            _print_batch(batch_rows)
        if served is not None:
            serving_export.show(served[1])
        r = meta.get("replayed")
        if r and "lookup" in meta["sources"]:
            say(f"replayed over the acceptance file's positions: PPD alone "
                f"{r['ppd_only']['tokens_per_step']:.3f} tokens/step, "
                f"{r['ppd_only']['tokens_per_second']:.1f} tokens/s; with prompt lookup "
                f"{r.get('with_lookup', r['hybrid'])['tokens_per_step']:.3f}, "
                f"{r.get('with_lookup', r['hybrid'])['tokens_per_second']:.1f}"
                f" ({'kept' if r['lookup_kept'] else 'not kept: no faster'}); lookup policy "
                + (", ".join(f"(m={m}, n={n}): chain {c}, {q} prompt tokens"
                             + ("" if keep else ", no guess nodes")
                             for (m, n), (c, q, keep) in sorted(tree.lookup.policy.items()))
                   if tree.lookup else "none"))
        if r and "cache" in r:
            c = r["cache"]
            say(f"with the cache (replayed): {r['hybrid']['tokens_per_step']:.3f} tokens/step, "
                f"{r['hybrid']['tokens_per_second']:.1f} tokens/s vs "
                f"{c['without_cache']['tokens_per_step']:.3f}, "
                f"{c['without_cache']['tokens_per_second']:.1f} without it ("
                + (f"kept: {c['policy_entries']} (state, match) entries)"
                   if c["cache_kept"] else "not kept: no faster)"))
    if plain:  # on stderr with --json too: what run and bench will do with this file
        warn(f"note: no tree pays for one sequence on this device "
             f"({plain['tree_tokens_per_second']:.1f} tokens/s predicted vs plain decoding's "
             f"{plain['plain_tokens_per_second']:.1f}): {out.name} says plain decoding at "
             "B = 1, which run and bench follow")
        result["plain_at_1"] = plain
    return result


def sources_list(text: str) -> list[str]:
    """--sources: ppd plus any of lookup, cache (any order) → in canonical order."""
    got = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in got if x not in SOURCES]
    if bad or "ppd" not in got or len(set(got)) != len(got):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give ppd and any of lookup, cache, comma-separated (e.g. "
            "ppd,lookup,cache)")
    return [x for x in SOURCES if x in got]


def _evaluate(tree, inp, opts, args) -> dict:
    res = evaluate_tree(tree, inp.acceptance, inp.profile, opts)
    res = {"tree": args.evaluate, "model": inp.model_id, "profile": inp.profile_src,
           "acceptance": inp.acceptance_src, **res}
    if not args.json:
        g, b = res["given"], res["best_at_same_input_length"]
        say(f"model {inp.model_id}; profile: {inp.profile_src}; acceptance: "
            f"{inp.acceptance_src}; t(L) at context {res['context']}")
        say(f"given tree (input {g['input_length']}): {g['tokens_per_step']:.3f} tokens/step, "
            f"{1000 * g['step_seconds']:.2f} ms/step, {g['tokens_per_second']:.1f} tokens/s"
            + (" (replayed over the acceptance file's positions, with its prompt lookup)"
               if g.get("method") == "replay" else ""))
        if "given_ppd_only" in res:
            p = res["given_ppd_only"]
            say(f"its PPD part alone (replayed): {p['tokens_per_step']:.3f} tokens/step, "
                f"{p['tokens_per_second']:.1f} tokens/s")
        say(f"best tree with input ≤ {g['input_length']} (input {b['input_length']}): "
            f"{b['tokens_per_step']:.3f} tokens/step, {1000 * b['step_seconds']:.2f} ms/step, "
            f"{b['tokens_per_second']:.1f} tokens/s "
            f"({b['tokens_per_second'] / g['tokens_per_second']:.3f}x the given tree)")
    return res


def _print_batch(rows) -> None:
    say("per batch size (tokens/s over all sequences; plain = no tree):")
    say(f"{'B':>4} {'input':>6} {'tok/step':>9} {'ms/step':>8} {'tok/s':>9} {'plain tok/s':>12}"
        f" {'speedup':>8}")
    for r in rows:
        say(f"{r['batch']:>4} {'plain' if r['plain'] else r['input_length']:>6} "
            f"{r['tokens_per_step']:>9.3f} {1000 * r['step_seconds']:>8.2f} "
            f"{r['tokens_per_second']:>9.1f} {r['plain_tokens_per_second']:>12.1f} "
            f"{r['speedup_vs_plain']:>7.3f}x")


def _print(tree, sol, pred, meta, rows, out, report_path) -> None:
    for m, nodes in sorted(tree.states.items()):
        shown = ", ".join(f"{list(n.path)}:{n.prompt_tokens}" for n in nodes[:12])
        say(f"state {m}: {len(nodes)} nodes, input {sol.input_lengths[m]} tokens, "
            f"π={sol.pi.get(m, 0):.3f}  {shown}{' ...' if len(nodes) > 12 else ''}")
    say(f"root prompt tokens {tree.root_prompt_tokens}; predicted {sol.tokens_per_step:.3f} "
        f"tokens/step, {1000 * sol.step_seconds:.2f} ms/step, "
        f"{sol.tokens_per_second:.1f} tokens/s = {pred['speedup_vs_t1']:.2f}x plain decoding "
        f"(t(L) read at context {meta['context']}; searched in {meta['search_seconds']:.2f} s)")
    if rows:
        say("best by input-length cap: " + ", ".join(
            f"L≤{r['input_length']}: {r['tokens_per_step']:.2f} tok/step "
            f"{r['tokens_per_second']:.1f} tok/s" for r in rows
            if r["input_length"] in (4, 8, 16, 32, 64, 128, 256, 512)))
    say(f"wrote {out} and {report_path.name}")
