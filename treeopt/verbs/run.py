"""Decode one prompt with PPD (optionally beside plain greedy and HF generate)."""
from __future__ import annotations

import sys

from .. import prompts
from ..artefact import check_out, input_file, write_json
from ..batch import BatchDecoder, schedule_of
from ..bounds import BOUNDS
from ..device import peak_memory
from ..errors import BadInput
from ..drift import assess, lines
from ..evaluation import (adapt_line, decode_phase, predicted_vs_measured, speed_by_length,
                          speed_vs_profile)
from ..inputs import resolve_inputs
from ..records import of_run
from ..runtime import full_steps, open_decoder
from .calibration import (add_calibrate_arg, keep_correction, keep_text, maybe_calibrate,
                          on_recent_text, recent_line)
from .common import (add_adapt_arg, add_cache_args, add_model_args, decode_notes,
                     finite_float, model_flag, positive_int, say, seed_int, warn)

HELP = "decode one prompt with the PPD runtime"
SAMPLE_PROMPT = "Explain in a few sentences why the sky is blue."


def add_arguments(p) -> None:
    add_model_args(p)
    add_cache_args(p)
    add_calibrate_arg(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help=f"prompt text (default: {SAMPLE_PROMPT!r})")
    g.add_argument("--prompt-file", help="read the prompt from a text file")
    g.add_argument("--batch-file", metavar="PROMPTS",
                   help="decode every prompt of a JSONL prompt file (or a shipped set) as one "
                   "batch, greedy; the tree follows the number of live sequences (its "
                   "per-batch table from `search --batch`)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    add_adapt_arg(p)
    p.add_argument("--temperature", type=finite_float(0.0), default=0.0,
                   help="0 = greedy (lossless); > 0 = typical acceptance sampling")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--baseline", action="store_true",
                   help="also run plain greedy and HF generate; report speedups and identity")
    p.add_argument("--out", help="also write the run JSON here (with the records of its steps: "
                   "`treeopt search --acceptance` learns from it)")


class _Streamer:
    """Prints decoded text as tokens arrive (re-decoding the tail keeps UTF-8 intact)."""

    def __init__(self, tokenizer, enabled: bool):
        self.tok, self.enabled, self.ids, self.shown = tokenizer, enabled, [], ""

    def __call__(self, new: list[int]) -> None:
        if not self.enabled:
            return
        self.ids.extend(new)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def main(args) -> dict:
    if args.batch_file:
        return _batch(args)
    if args.prompt_file:
        text = prompts.read_text(input_file(args.prompt_file, "--prompt-file"))
    else:
        text = SAMPLE_PROMPT if args.prompt is None else args.prompt
    if not text.strip():
        raise BadInput("empty prompt")
    inp = resolve_inputs(args.model, tree=args.tree, prompt_tokens=args.prompt_tokens,
                         device=args.device, dtype=args.dtype,
                         want=("tree", "profile", "acceptance", "corpus"), corpus=args.corpus)
    out_path = check_out(args.out) if args.out else None
    dec, info = open_decoder(inp, args.model, args.dtype, args.device, args.threads,
                             cache_tokens=args.cache_tokens, hf_beside=args.baseline)
    dec.engine_options = {**dec.engine_options, "adapt": not args.no_adapt}
    ids = prompts.encode(dec.lm.tokenizer, text, raw=args.raw)
    dec.check_prompt(ids, args.max_new_tokens)
    maybe_calibrate(args, inp, dec, info, not args.json)
    for note in decode_notes(inp, info, args):  # inputs all good
        warn(note)
    human = not args.json
    if human:
        say(f"model {info['model']} on {info['device']} ({info['dtype']}), tree {info['tree']}")
    res = dec.ppd(ids, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                  on_tokens=_Streamer(dec.lm.tokenizer, human))
    if human:
        sys.stdout.write("\n")
    chooser = dec.engine().chooser
    out = {"schema": "treeopt.run/1", "kind": "run", **info, "prompt": text,
           **({"adapt": chooser.summary()} if chooser is not None else {}),
           "prompt_tokens_count": len(ids), "temperature": args.temperature,
           **res.summary(), "text": dec.lm.tokenizer.decode(res.output_ids,
                                                            skip_special_tokens=True)}
    speed = None
    if inp.profile:  # how fast this machine runs against the profile in use
        speed = speed_vs_profile([(len(ids), res)], inp.profile)
        out["speed_vs_profile"] = round(speed, 4) if speed else None
    if args.temperature <= 0:  # greedy: the text is the model's own, its records hold
        measured = {"decode": decode_phase([(len(ids), res)])}
        pred = predicted_vs_measured(dec.tree, measured, inp.profile, inp.profile_src,
                                     inp.acceptance, inp.acceptance_src, speed)
        block, d = assess(dec.tree, dec.prompt_tokens.num, info["model"], [ids], [res],
                          measured["decode"], pred, inp.profile, speed, dec.cache_settings,
                          run="run",
                          prompt_file=args.prompt_file or "--prompt",
                          tree_file=info["tree"])
        recent = on_recent_text(dec.tree, measured, inp, speed, info["model"])
        out.update({k: v for k, v in (("predicted", pred), ("acceptance", block),
                                      ("drift", d), ("predicted_on_recent_text", recent))
                    if v})
        keep_text(info["model"], block)
    if human:
        say(f"PPD: {res.new_tokens} tokens in {res.seconds:.2f} s = "
            f"{res.tokens_per_second:.1f} tok/s, {res.tokens_per_step:.2f} tokens/step")
    if args.baseline:
        base = dec.baseline(ids, args.max_new_tokens, temperature=args.temperature,
                            seed=args.seed)
        hf = dec.hf_generate(ids, args.max_new_tokens)
        out["baseline"] = base.summary()
        out["hf_generate"] = hf.summary()
        out["speedup_vs_baseline"] = round(res.tokens_per_second / base.tokens_per_second, 4)
        out["speedup_vs_hf"] = round(res.tokens_per_second / hf.tokens_per_second, 4)
        out["identical"] = res.output_ids == hf.output_ids
        out["baseline_identical"] = base.output_ids == hf.output_ids
        if human:
            say(f"plain greedy: {base.tokens_per_second:.1f} tok/s; HF generate: "
                f"{hf.tokens_per_second:.1f} tok/s")
            say(f"speedup vs HF generate {out['speedup_vs_hf']:.2f}x, vs plain loop "
                f"{out['speedup_vs_baseline']:.2f}x; PPD output identical to HF greedy: "
                f"{out['identical']}")
    out["peak_memory"] = peak_memory(dec.device)
    if out_path is not None:
        write_json(out_path, out)
    kept = keep_correction(args, inp, speed, full_steps(res), "run", inp.profile and
                           speed_by_length([(len(ids), res)], inp.profile))
    drift_lines = lines(out.get("drift"), out_path or "<this run's JSON: --out>",
                        inp.acceptance_src, inp.profile_src, model_flag(args.model))
    for line in [x for x in drift_lines if not (kept and x.startswith("speed drift"))] + [
            kept, recent_line(out.get("predicted_on_recent_text")),
            adapt_line(out.get("adapt"))]:
        if line:
            warn(line)
    return out


def _batch(args) -> dict:
    if args.temperature > 0 or args.baseline:
        raise BadInput("--batch-file decodes greedily; drop --temperature and --baseline")
    texts = prompts.load(args.batch_file)
    if len(texts) > BOUNDS["batch_prompts"]:
        raise BadInput(f"--batch-file {args.batch_file}: {len(texts)} prompts, at most "
                       f"{BOUNDS['batch_prompts']} in one batch (split the file)")
    inp = resolve_inputs(args.model, tree=args.tree, prompt_tokens=args.prompt_tokens,
                         device=args.device, dtype=args.dtype, want=("tree", "corpus"),
                         corpus=args.corpus)
    dec, info = open_decoder(inp, args.model, args.dtype, args.device, args.threads,
                             cache_tokens=args.cache_tokens)
    encoded = dec.encode_prompts(texts, args.max_new_tokens, args.raw, "--batch-file prompt")
    out_path = check_out(args.out) if args.out else None
    for note in decode_notes(inp, info, args):
        warn(note)
    bd = BatchDecoder(dec.lm, dec.prompt_tokens, schedule_of(dec.tree), dec.cache_source,
                      adapt=not args.no_adapt)
    res = bd.generate(encoded, args.max_new_tokens)
    rows = [{"prompt": t, **r.summary(),
             "text": dec.lm.tokenizer.decode(r.output_ids, skip_special_tokens=True)}
            for t, r in zip(texts, res.results)]
    out = {"schema": "treeopt.run/1", "kind": "batch-run", **info, "prompts": len(rows),
           "new_tokens": res.new_tokens, "seconds": round(res.seconds, 4),
           "tokens_per_second": round(res.tokens_per_second, 3),
           "tokens_per_step": round(res.tokens_per_step, 4), "results": rows,
           **({"adapt": bd.engine.chooser.summary()} if bd.engine.chooser else {}),
           "peak_memory": peak_memory(dec.device)}
    block = of_run(info["model"], dec.prompt_tokens.num, encoded, res.results, bd.lookup,
                   dec.cache_settings, run="batch-run", prompt_file=args.batch_file,
                   tree_file=info["tree"])
    if block:
        out["acceptance"] = block
    if out_path is not None:
        write_json(out_path, out)
    if not args.json:
        say(f"model {info['model']} on {info['device']} ({info['dtype']}), tree {info['tree']}")
        for i, r in enumerate(rows):
            say(f"--- {i}: {r['new_tokens']} tokens, {r['finish_reason']}")
            sys.stdout.write(r["text"] + "\n")
        say(f"batch of {len(rows)}: {res.new_tokens} tokens in {res.seconds:.2f} s = "
            f"{res.tokens_per_second:.1f} tok/s, {res.tokens_per_step:.2f} tokens per "
            "sequence-step")
    return out
