"""`treeopt search --export vllm|sglang|trtllm`: the tuned speculative setting for a serving
engine, beside the searched tree (the search verb's export path; library: treeopt.serving
and treeopt.engines)."""
from __future__ import annotations

import pathlib

from .. import engines, serving
from ..acceptance import unpack_records
from ..artefact import check_out, stamp, write_atomic, write_json
from ..errors import BadInput
from .common import say, warn

SUFFIX = {"vllm": "json", "sglang": "yaml", "trtllm": "yaml"}
USAGE = {"vllm": "vllm serve MODEL --speculative-config \"$(cat {file})\"",
         "sglang": "python -m sglang.launch_server --model-path MODEL --config {file}",
         "trtllm": "trtllm-serve MODEL --extra_llm_api_options {file}"}


def outputs(out: pathlib.Path, engine: str) -> dict[str, pathlib.Path]:
    """The files an export writes beside the tree: the engine's own file, what it was
    tuned on (`.about.json`) and the chain as a treeopt tree (`treeopt bench` runs it)."""
    stem = str(out).removesuffix(".json").removesuffix(".tree")
    return {"setting": pathlib.Path(f"{stem}.{engine}.{SUFFIX[engine]}"),
            "about": pathlib.Path(f"{stem}.{engine}.about.json"),
            "chain": pathlib.Path(f"{stem}.{engine}.chain.tree.json")}


def check_args(args) -> tuple[str, str] | None:
    """(release, source) for an engine export; flags that belong to one refused elsewhere."""
    if args.export in engines.ENGINES:
        return (engines.check_version(args.export, args.engine_version),
                serving.check_source(args.export, args.draft_source))
    extra = [f for f, v in (("--engine-version", args.engine_version),
                            ("--draft-source", args.draft_source)) if v]
    if extra:
        raise BadInput(f"{', '.join(extra)} go with --export vllm, sglang or trtllm")
    return None


def _tables(args, inp, engine: str, source: str, quiet: bool):
    """E(K) per knob set: the engine's rule over the model's greedy answers, else the
    nearest of treeopt's own records (said so)."""
    try:
        texts, about = serving.answers(args.model, inp.acceptance,
                                       inp.acceptance.get("dtype", "auto"), quiet=quiet)
    except BadInput as e:
        why = str(e)
    else:
        knobs = {str(i): k for i, k in enumerate(serving.candidates(engine, source))}
        tables = {i: serving.replayed(engine, source, k, texts) for i, k in knobs.items()}
        return tables, knobs, {"method": f"{engine}'s own rule, replayed", **about}
    rec = unpack_records(inp.acceptance)
    field = "match" if source == "lookup" else "cache_match"
    if rec is None or field not in rec:
        raise BadInput(f"the model's answers are not at hand ({why}) and the acceptance file "
                       f"{inp.acceptance_src} has no {source} records to stand in")
    hi = rec["max_ngram"] if source == "lookup" else rec["cache_max_ngram"]
    knobs = {"vllm": [{"prompt_lookup_min": m, "prompt_lookup_max": hi} for m in range(1, hi + 1)]
             if source == "lookup" else [{"suffix_decoding_max_tree_depth": 24}],
             "trtllm": [{"max_matching_ngram_size": hi}],
             "sglang": [{"speculative-ngram-max-bfs-breadth": 1}]}[engine]
    knobs = {str(i): k for i, k in enumerate(knobs)}
    tables = {i: serving.from_records(rec, source, k.get("prompt_lookup_min", 1))
              for i, k in knobs.items()}
    exact = engine == "vllm" and source == "lookup"
    return tables, knobs, {"method": ("treeopt's lookup records: vLLM's ngram rule with "
                                      f"prompt_lookup_max = {hi}" if exact else
                                      f"nearest: treeopt's {source} records stand in for "
                                      f"{engine}'s rule"),
                           "why": why}


def build(args, inp, found: dict, batch_rows: list[dict], out: pathlib.Path,
          release: tuple[str, str], quiet: bool) -> tuple[dict, dict]:
    """(files to write: path → text or JSON object, the result) of an engine export."""
    engine, (version, source) = args.export, release
    prof, meta = inp.profile, found["meta"]
    batches = [r["batch"] for r in batch_rows]
    tables, knobs, texts = _tables(args, inp, engine, source, quiet)
    tuned = serving.tune(engine, version, source, tables, knobs, prof, batches,
                         meta["context"])
    setting = tuned["setting"]
    if setting is not None:
        engines.check(engine, version, setting)  # nothing written that the engine refuses
    tree_by_b = {r["batch"]: r for r in batch_rows}
    rows = [{**r, "tree_tokens_per_second": tree_by_b[r["batch"]]["tokens_per_second"],
             "vs_tree": round(r["tokens_per_second"]
                              / tree_by_b[r["batch"]]["tokens_per_second"], 4)}
            for r in tuned["rows"]]
    paths = outputs(out, engine)
    tuned_on = {"device_id": prof.get("device_id"), "device": prof["device"].get("name"),
                "model": inp.model_id, "dtype": prof["dtype"], "profile": inp.profile_src,
                "simulated": bool(prof.get("simulated")), "acceptance": inp.acceptance_src,
                "answers": texts, "context": meta["context"],
                "timing": f"t(B, L) measured in treeopt's engine, not in {engine}'s: "
                          "re-measure on the engine (docs/serving.md)"}
    header = [f"treeopt {engine} {version} export ({serving.METHOD[(engine, source)]})",
              f"tuned on {tuned_on['device_id']} ({tuned_on['device']}), model "
              f"{inp.model_id} {prof['dtype']}", f"profile {inp.profile_src}",
              f"acceptance {inp.acceptance_src}; {texts['method']}",
              tuned_on["timing"], "per batch size: " + ", ".join(
                  f"B={r['batch']} K={r['draft_tokens']} {r['speedup_vs_plain']:.2f}x plain"
                  for r in rows)]
    files = {paths["setting"]: engines.render(engine, version, setting, header)}
    result = {"engine": engine, "version": version, "source": source,
              "method": serving.METHOD[(engine, source)], "setting": setting,
              "flags": engines.flags(setting) if engine == "sglang" else None,
              "file": str(paths["setting"]),
              "usage": USAGE[engine].format(file=paths["setting"].name),
              "knobs": tuned["knobs"], "per_batch": rows,
              "replayed_tokens_per_step": tuned["replayed"], "tuned_on": tuned_on,
              "cannot_carry": serving.lost(engine, source), "notes": tuned["notes"],
              "rules": engines.SOURCES[engine]}
    chain = serving.chain_trees(engine, source, tuned["knobs"], tuned["draft_tokens"],
                                found["solution"].tree.num_prompt_tokens)
    if chain is not None:
        chain.meta = {"kind": "engine chain", "engine": engine, "version": version,
                      "source": source, "model": inp.model_id, "profile": inp.profile_src,
                      "acceptance": inp.acceptance_src,
                      "note": "the exported chain as treeopt's prompt lookup, per batch size: "
                              "`treeopt bench --tree` measures it on this machine", **stamp()}
        files[paths["chain"]] = chain
        result["chain_tree"] = str(paths["chain"])
    files[paths["about"]] = {"schema": "treeopt.serving/1", **result, **stamp()}
    return files, result


def check_outputs(out: pathlib.Path, engine: str, inputs) -> None:
    for what, p in outputs(out, engine).items():
        check_out(p, inputs, f"{engine} export ({what})")


def write(files: dict) -> None:
    for p, obj in files.items():
        if isinstance(obj, str):
            write_atomic(p, obj)
        elif isinstance(obj, dict):
            write_json(p, obj)
        else:
            obj.save(p)


def show(res: dict) -> None:
    say(f"{res['engine']} {res['version']} ({res['method']}): "
        f"{res['tuned_on']['answers']['method']}")
    say(f"{'B':>4} {'K':>3} {'tok/step':>9} {'tok/s':>9} {'tree tok/s':>11} "
        f"{'plain tok/s':>12} {'vs plain':>9} {'vs tree':>8}")
    for r in res["per_batch"]:
        say(f"{r['batch']:>4} {r['draft_tokens']:>3} {r['tokens_per_step']:>9.3f} "
            f"{r['tokens_per_second']:>9.1f} {r['tree_tokens_per_second']:>11.1f} "
            f"{r['plain_tokens_per_second']:>12.1f} {r['speedup_vs_plain']:>8.3f}x "
            f"{r['vs_tree']:>7.3f}x")
    if res["setting"] is None:
        warn(f"note: no draft length pays at the batch sizes asked: serve {res['engine']} "
             "without speculative decoding")
    else:
        say(f"wrote {res['file']}: {res['usage']}")
        if res["flags"]:
            say("flags: " + " ".join(res["flags"]))
    say("the format cannot carry: " + "; ".join(res["cannot_carry"]))
    for n in res["notes"]:
        say(f"note: {n}")
    say(f"t(B, L) is treeopt's engine's ({res['tuned_on']['profile']}), not "
        f"{res['engine']}'s: re-measure there (docs/serving.md)")
