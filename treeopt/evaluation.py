"""Measured against predicted: the interleaved bench (PPD, HF greedy `generate`, the plain
loop), tree checks for `accept`, the decode-phase accounting they share, and how fast
this machine runs against the profile in use.

For every prompt whose PPD output differs from HF greedy, the first differing position and
HF's logit margin there (logit of HF's token minus logit of PPD's token, recomputed with
one plain forward over the shared prefix) are recorded. A tree forward and a one-token
forward sum in different orders (and on a GPU a 1-row and a many-row GEMM take different
kernels, in float32 too), so a near-tie can flip the argmax. The divergence is *explained*
only when the margin is at most that noise: the larger of the dtype's measured floor
(:data:`MARGIN_TOLERANCE`) and twice the noise measured right there,

    noise = max_v |z_many(v) − z_one(v)|,   explained ⇔ margin ≤ max(floor, 2·noise, ulp),

z_many being the position's logits from a forward over the whole prefix and z_one those of
a one-token forward on the cache of the prefix less its last token (a margin is the
difference of two logits, hence the factor 2), and ulp = eps(the model's dtype) · the
larger of the two logits' magnitudes (a tie up to the head's own rounding). One rule for
every dtype and device.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time

import numpy as np
import torch

from . import prompts
from .acceptance import search_inputs, unpack_records
from .adapt import Chooser
from .latency import Latency, batches
from .batch import BatchDecoder, BatchResult, hf_generate_batch, schedule_of
from .drift import batch_assess
from .progress import progress
from .runtime import Decoder, Result, full_steps
from .sources import SuffixCache
from .search.batch import flat_step
from .search.exact import predict
from .search.hybrid import replay_predict
from .tree import Tree

# Floor of the logit margin a reduction-order difference can explain, per dtype. Measured by
# `python benchmarks/logit_noise.py --dtype D` (max |tree-forward logit − one-token-forward
# logit| at the same position over 8 prompts × 64 tokens, ~470 rows, SmolLM2-135M on this
# CPU): float32 1.2e-4, bfloat16 1.75, float16 0.21. A margin is the difference of two
# logits, so it can be off by twice that: bfloat16 3.5, float16 0.43. float32 gets no
# floor: only twice the noise measured at the divergence itself explains a flip.
MARGIN_TOLERANCE = {"float32": 0.0, "bfloat16": 3.5, "float16": 0.43}


@torch.inference_mode()
def logit_margin(dec: Decoder, ids: list[int], ref: list[int], other: list[int],
                 floor: float = 0.0) -> dict | None:
    """First position where `other` departs from `ref`, ref's logit margin there, the
    reduction-order noise measured at that position and whether it explains the flip
    (module docstring; `floor`: the dtype's, :data:`MARGIN_TOLERANCE`)."""
    pos = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), None)
    if pos is None:
        return None  # one is a prefix of the other (different stopping), no token flip
    prefix = ids + ref[:pos]
    _, logits = dec.prefill(prefix)
    many = logits[-1].float()
    margin = float(many[ref[pos]] - many[other[pos]])
    # a tie up to rounding: one unit in the last place of the logits' dtype at that scale
    ulp = torch.finfo(dec.lm.dtype).eps * float(many[[ref[pos], other[pos]]].abs().max())
    noise = 0.0
    if len(prefix) > 1:
        cache, _ = dec.prefill(prefix[:-1])
        one = dec.call(dec.embed(torch.tensor(prefix[-1:], device=dec.device)), cache,
                       torch.tensor([len(prefix) - 1], device=dec.device))[-1].float()
        noise = float((many - one).abs().max())
    tolerance = max(floor, 2 * noise, ulp)
    return {"position": pos, "hf_token": ref[pos], "ppd_token": other[pos],
            "margin": round(margin, 6), "noise": round(noise, 6),
            "tolerance": round(tolerance, 6), "explained": margin <= tolerance}


def decode_phase(runs: list[tuple[int, Result]]) -> dict:
    """Steady-state decoding over (prompt length, Result) pairs: what the search's
    objective models. Prefill is left out, and so are steps that did not run in full
    (:func:`runtime.full_steps`). `context` is the mean KV length the counted steps
    attended to."""
    tokens = steps = 0
    seconds = ctx_sum = 0.0
    for prompt_len, r in runs:
        ctx = prompt_len
        for a, sec in zip(r.accepted[:full_steps(r)], r.step_seconds):
            tokens, steps, seconds, ctx_sum = tokens + a, steps + 1, seconds + sec, ctx_sum + ctx
            ctx += a
    if not steps:
        return {"steps": 0}
    return {"steps": steps, "tokens_per_step": round(tokens / steps, 4),
            "step_seconds": round(seconds / steps, 6),
            "tokens_per_second": round(tokens / seconds, 3), "context": round(ctx_sum / steps)}


def steps_vs_profile(runs: list[tuple[int, Result]], profile: dict
                     ) -> dict[int, tuple[float, float, int]]:
    """The decodes' full steps against the profile, per input length they ran at:
    {L: (measured seconds, profiled seconds, steps)}, each step read at its own context."""
    lat = Latency(profile)
    out: dict[int, list] = {}
    for prompt_len, r in runs:
        ctx = prompt_len
        n = full_steps(r)
        for a, sec, length in zip(r.accepted[:n], r.step_seconds, r.lengths):
            at = out.setdefault(int(length), [0.0, 0.0, 0])
            at[0] += sec
            at[1] += float(lat([length], ctx)[0])
            at[2] += 1
            ctx += a
    return {L: tuple(v) for L, v in sorted(out.items())}


def speed_vs_profile(runs: list[tuple[int, Result]], profile: dict) -> float | None:
    """Measured ÷ profiled time of the decodes' full steps, each read at its own input
    length and context (1.0 = the machine runs as fast as when it was profiled)."""
    by = steps_vs_profile(runs, profile).values()
    predicted = sum(p for _, p, _ in by)
    return sum(m for m, _, _ in by) / predicted if predicted > 0 else None


def speed_by_length(runs: list[tuple[int, Result]], profile: dict) -> dict[int, tuple]:
    """{L: (measured ÷ profiled, steps)} per input length the steps ran at."""
    return {L: (m / p, n) for L, (m, p, n) in steps_vs_profile(runs, profile).items()
            if p > 0}


def fresh_evidence(engine) -> None:
    """An adapting engine's chooser forgets the warm-up steps (allocator warm-up and lazy
    init are no evidence of what a step costs)."""
    if engine.chooser is not None:
        engine.chooser = Chooser()


def adapt_line(summary: dict | None, what: str = "") -> str | None:
    """One line on what an adapting run's steps ran (each candidate's estimate per batch
    size) and why it switched; a batch bench's per-B block (:func:`_adapt_at`) too."""
    if not summary or not summary["steps"]:
        return None
    at = f" ({what})" if what else ""
    sw = summary["switches"]
    using = "; ".join(
        f"B={b}: {v['using']} (" + ", ".join(f"{x} {e['tokens_per_second']:.1f}"
                                            for x, e in v.items() if x != "using") + ")"
        for b, v in summary["by_batch"].items())
    return (f"adapt{at}: {summary['explored']} of {summary['steps']} steps explored; using "
            f"{using} tokens/s a sequence"
            + ("; switched " + "; ".join(f"at step {s['step']} (B={s['batch']}) to {s['to']}: "
                                         f"{s['why']}" for s in sw[-3:]) if sw else
               "; no switch"))


def _adapt_at(chooser: Chooser, b: int) -> dict | None:
    """The chooser's summary narrowed to one batch size's evidence and switches."""
    full = chooser.summary()
    at = full["by_batch"].get(str(b))
    return at and {**full, "by_batch": {str(b): at},
                   "switches": [s for s in chooser.switches if s["batch"] == b]}


def alone_tree(tree: Tree) -> Tree:
    """What a bench sets a hybrid tree beside: without the cache where it has one (PPD +
    lookup), else its PPD part."""
    if tree.cache is not None:
        return dataclasses.replace(tree, cache=None, by_batch={})
    return tree.ppd_part()


def run_bench(dec: Decoder, encoded: list[list[int]], max_new_tokens: int, dtype: str,
              plain: bool = True, quiet: bool = False,
              hf_lookup: int | None = None, hf_static: bool = False) -> tuple[dict, list]:
    """PPD, HF generate and (optionally) the plain loop, interleaved per prompt — and, for
    a hybrid tree, the same tree without its last chain source (:func:`alone_tree`: "PPD
    alone", or PPD + lookup for a tree with the cache) and, with
    `hf_lookup` = k, HF's prompt-lookup decoding, and with `hf_static` HF generate on its
    static KV cache (compiled by HF on a GPU: the fastest loop HF users have); `plain` is
    the engine's own plain loop. The figures, and the PPD runs as (prompt length, Result)
    pairs."""
    tol = MARGIN_TOLERANCE.get(dtype, 0.0)
    alone = None
    if dec.tree.has_chains:
        alone = Decoder(dec.lm, dec.prompt_tokens, alone_tree(dec.tree))
    extra: dict[str, list] = {"ppd_alone": [], "hf_lookup": [], "hf_static": []}
    # burn-in: first calls pay for allocator warm-up and lazy init (nothing joins the cache)
    dec.ppd(encoded[0], 8, learn=False)
    dec.hf_generate(encoded[0], 8)
    if alone is not None:
        alone.ppd(encoded[0], 8, learn=False)
    if hf_lookup:
        dec.hf_generate(encoded[0], 8, prompt_lookup=hf_lookup)
    if hf_static:  # its compilation happens here, not in the timed runs
        dec.hf_generate(encoded[0], 8, static=True)
    fresh_evidence(dec.engine())  # the chooser's evidence starts with the timed runs
    per_prompt, ppd_runs, base_runs = [], [], []
    ppd_tok = ppd_sec = hf_tok = hf_sec = base_tok = base_sec = 0.0
    steps = fwd = step = 0.0
    for i, ids in enumerate(progress(encoded, "bench", quiet=quiet)):
        r = dec.ppd(ids, max_new_tokens, timed=True)  # A
        h = dec.hf_generate(ids, max_new_tokens)  # B
        ppd_runs.append((len(ids), r))
        row = {"prompt": i, "prompt_tokens": len(ids), "new_tokens": r.new_tokens,
               "steps": r.steps, "tokens_per_step": round(r.tokens_per_step, 4),
               "tokens_per_second": round(r.tokens_per_second, 3),
               "hf_new_tokens": h.new_tokens,
               "hf_tokens_per_second": round(h.tokens_per_second, 3),
               "speedup_vs_hf": round(r.tokens_per_second / h.tokens_per_second, 4),
               "identical": r.output_ids == h.output_ids}
        if alone is not None:
            a = alone.ppd(ids, max_new_tokens)
            extra["ppd_alone"].append((len(ids), a))
            row["ppd_alone_tokens_per_step"] = round(a.tokens_per_step, 4)
            row["ppd_alone_identical"] = a.output_ids == h.output_ids
        if hf_lookup:
            g = dec.hf_generate(ids, max_new_tokens, prompt_lookup=hf_lookup)
            extra["hf_lookup"].append((len(ids), g))
            row["hf_lookup_identical"] = g.output_ids == h.output_ids
        if hf_static:
            g = dec.hf_generate(ids, max_new_tokens, static=True)
            extra["hf_static"].append((len(ids), g))
            row["hf_static_identical"] = g.output_ids == h.output_ids
        if plain:
            b = dec.baseline(ids, max_new_tokens)  # C
            base_runs.append((len(ids), b))
            row["baseline_tokens_per_second"] = round(b.tokens_per_second, 3)
            row["baseline_identical"] = b.output_ids == h.output_ids
            base_tok += b.new_tokens
            base_sec += b.seconds
        if not row["identical"]:
            row["divergence"] = logit_margin(dec, ids, h.output_ids, r.output_ids, tol)
        per_prompt.append(row)
        ppd_tok += r.new_tokens
        ppd_sec += r.seconds
        hf_tok += h.new_tokens
        hf_sec += h.seconds
        steps += r.steps
        fwd += sum(r.forward_seconds)
        step += sum(r.step_seconds)
    unexplained = sum(1 for row in per_prompt
                      if not row["identical"] and not (row.get("divergence") or {}).get("explained"))
    out = {
        "prompts": len(per_prompt),
        "max_new_tokens": max_new_tokens,
        "new_tokens": int(ppd_tok),
        "tokens_per_step": round(ppd_tok / steps, 4),
        "tokens_per_second": round(ppd_tok / ppd_sec, 3),
        "hf_tokens_per_second": round(hf_tok / hf_sec, 3),
        "speedup_vs_hf": round((ppd_tok / ppd_sec) / (hf_tok / hf_sec), 4),
        "median_speedup_vs_hf": round(statistics.median(r["speedup_vs_hf"] for r in per_prompt), 4),
        "identical_fraction": round(sum(r["identical"] for r in per_prompt) / len(per_prompt), 4),
        "unexplained_divergences": unexplained,
        "margin_tolerance": tol,
        "step_overhead_fraction": round((step - fwd) / fwd, 4) if fwd else None,
        "graphs": ppd_runs[-1][1].graphs,  # how the engine ran its steps (at the end)
        # graph captures while timed: counted and timed apart, not in any tokens/s
        "captures": sum(r.captures for _, r in ppd_runs),
        "capture_seconds": round(sum(r.capture_seconds for _, r in ppd_runs), 4),
        "kernels": ppd_runs[0][1].kernels,  # and with which kernels (treeopt.engine.kernels)
        "decode": decode_phase(ppd_runs),
        # asking the chain sources (lookup, cache) against the steps' time
        "propose_fraction": round(sum(r.propose_seconds for _, r in ppd_runs) / max(
            1e-12, sum(sum(r.step_seconds) for _, r in ppd_runs)), 6),
        "per_prompt": per_prompt,
    }
    for name, runs in extra.items():
        if runs:
            tok, sec = sum(r.new_tokens for _, r in runs), sum(r.seconds for _, r in runs)
            out[f"{name}_tokens_per_second"] = round(tok / sec, 3)
            out[f"speedup_vs_{name}"] = round((ppd_tok / ppd_sec) / (tok / sec), 4)
            if name == "ppd_alone":
                out["ppd_alone_is"] = "ppd+lookup" if alone.tree.lookup else "ppd"
                out["ppd_alone_tokens_per_step"] = round(tok / sum(r.steps for _, r in runs), 4)
                out["ppd_alone_decode"] = decode_phase(runs)
    if dec.engine().chooser is not None:  # what the steps ran, and why it switched
        out["adapt"] = dec.engine().chooser.summary()
    if hf_static:
        out["hf_static_compiled"] = dec.device.type == "cuda"  # HF compiles on a GPU only
    if plain:
        out["baseline_tokens_per_second"] = round(base_tok / base_sec, 3)
        out["baseline_vs_hf"] = round((base_tok / base_sec) / (hf_tok / hf_sec), 4)
        out["baseline_decode"] = decode_phase(base_runs)
    return out, ppd_runs


def batch_speed(rows: list[dict]) -> tuple[float | None, int]:
    """The machine's step time over the profile's across a batch bench: each batch size's
    measured ratio weighted by its full-batch steps (a geometric mean: ratios compound),
    and those steps."""
    pairs = [((r.get("predicted") or {}).get("speed_vs_profile"),
              (r.get("chosen_full_batch") or {}).get("steps", 0)) for r in rows]
    pairs = [(s, n) for s, n in pairs if s and n]
    steps = sum(n for _, n in pairs)
    if not steps:
        return None, 0
    return math.exp(sum(n * math.log(s) for s, n in pairs) / steps), steps


def predicted_vs_measured(tree: Tree, res: dict, profile: dict | None, profile_src: str | None,
                          acceptance: dict | None, acceptance_src: str | None,
                          speed: float | None = None) -> dict | None:
    """The search's prediction for the benched tree at the bench's mean context, beside the
    measured decode phase. `speed` is the run's step time over the profile's at each
    step's own input length and context (:func:`speed_vs_profile`; 1.0 = the machine runs
    as fast as when profiled); the prediction scaled by it separates the prediction's
    error from the machine's drift. None without a profile and an acceptance file."""
    dec_m = res.get("decode", {})
    if profile is None or acceptance is None or not dec_m.get("steps"):
        return None
    lat = Latency(profile)
    ctx = dec_m["context"]
    rec = unpack_records(acceptance) if tree.has_chains else None
    if rec is not None:  # hybrid: replayed over the acceptance file's measured positions
        pred = replay_predict(tree, rec, lambda L: lat(L, ctx))
    else:
        conditional = ((tree.meta or {}).get("config") or {}).get("conditional", True)
        acc, pp = search_inputs(acceptance, conditional=conditional)
        pred = predict(tree, acc, lambda L: lat(L, ctx), path_prob=pp)
    out = {"profile": profile_src, "acceptance": acceptance_src,
           "method": "replay" if rec is not None else "stationary", "context": ctx,
           "tokens_per_step": round(pred["tokens_per_step"], 4),
           "step_seconds": round(pred["step_seconds"], 6),
           "tokens_per_second": round(pred["tokens_per_second"], 3),
           "error": {k: round(pred[k] / dec_m[k] - 1, 4)
                     for k in ("tokens_per_step", "step_seconds", "tokens_per_second")},
           **({"shares": pred["shares"]} if "shares" in pred else {})}
    if speed:
        out["speed_vs_profile"] = round(speed, 4)
        out["tokens_per_second_at_run_speed"] = round(pred["tokens_per_second"] / speed, 3)
        out["error"]["tokens_per_second_at_run_speed"] = round(
            pred["tokens_per_second"] / speed / dec_m["tokens_per_second"] - 1, 4)
    return out


def check_trees(dec: Decoder, trees: dict[str, Tree], obj: dict, texts: list[str],
                max_new_tokens: int, quiet: bool = False) -> list[dict]:
    """Predicted (product-only and fitted) vs measured tokens per decode step, counted
    over full steps as the bench counts them. A hybrid tree's prediction is the replay
    over the measured positions (both figures: the replay needs neither model)."""
    acc_p, _ = search_inputs(obj, conditional=False)
    acc_f, pp = search_inputs(obj, conditional=True)
    rec = unpack_records(obj)
    rows = []
    for name, tree in trees.items():
        method = "replay" if tree.has_chains and rec is not None else "stationary"
        if method == "replay":
            pred_p = pred_f = replay_predict(tree, rec, flat_step)["tokens_per_step"]
        else:
            pred_p = predict(tree, acc_p)["tokens_per_step"]
            pred_f = predict(tree, acc_f, path_prob=pp)["tokens_per_step"]
        dec.set_tree(tree, dec.prompt_tokens)
        runs = [(0, dec.ppd(prompts.encode(dec.lm.tokenizer, text), max_new_tokens))
                for text in progress(texts, f"check {name}", quiet=quiet)]
        phase = decode_phase(runs)
        measured = phase.get("tokens_per_step", 0.0)
        rows.append({"tree": name, "input_lengths": {str(m): tree.input_length(m)
                                                     for m in tree.states},
                     "method": method,
                     "measured_tokens_per_step": measured, "steps": phase["steps"],
                     "predicted_product": round(pred_p, 4), "predicted_fitted": round(pred_f, 4),
                     "error_product": round(pred_p / measured - 1, 4) if measured else None,
                     "error_fitted": round(pred_f / measured - 1, 4) if measured else None})
    return rows


def _full(runs: list[BatchResult], b: int) -> tuple[float, float, int]:
    """(tokens, seconds, steps) of the steps where all b sequences of a group were live."""
    tok = sec = n = 0
    for r in runs:
        for live, t, k in zip(r.live, r.step_seconds, r.step_tokens):
            if live == b:
                tok, sec, n = tok + k, sec + t, n + 1
    return tok, sec, n


def full_batch_speed(res: BatchResult, batch: int) -> float:
    """Tokens/s of a batched decode over the steps that ran with the batch full."""
    tok, sec, _ = _full([res], batch)
    return tok / sec if sec else 0.0


def _full_speed(runs: list[BatchResult], b: int, profile: dict) -> float | None:
    """Measured ÷ profiled time of the steps where all b sequences were live, each read at
    its own (padded) input length and cache length, as :func:`speed_vs_profile` does for
    one sequence."""
    lat = Latency(profile, batch=b)
    measured = predicted = 0.0
    for r in runs:
        for live, sec, length, ctx in zip(r.live, r.step_seconds, r.lengths, r.contexts):
            if live == b:
                measured += sec
                predicted += float(lat([length], ctx)[0])
    return measured / predicted if predicted > 0 else None


def batch_bench(lm, prompt_tokens, tree: Tree | None, encoded: list[list[int]],
                batch_sizes: list[int], max_new_tokens: int, profile: dict | None = None,
                quiet: bool = False, acceptance: dict | None = None,
                cache: SuffixCache | None = None, adapt: bool = False) -> list[dict]:
    """Per batch size B, one configuration after the other over the same prompts: the
    chosen configuration (the tree's per-batch table) and the plain batched loop of the
    same runtime, each with at most B sequences live and a waiting prompt joining as one
    finishes (continuous batching); HF `generate` batched (left padding) in static groups
    of B; and B = 1 PPD run one prompt after another. Throughput is tokens over wall
    seconds, prefill included; `full_batch` counts only the steps where all B sequences
    were live — what the search predicts, read here from the profile at the cache length
    of each of those steps (at B = 1 a hybrid tree's own per-step inputs, replayed over the
    acceptance file's positions as the search does). Each row keeps the records of the
    chosen configuration's steps and their drifts (:func:`treeopt.drift.batch_assess`).
    With a cache source, the chosen configuration and the B = 1 runs each start every
    batch size from their own copy of it, which learns their outputs in request order.
    `adapt`: the chosen configuration picks its tree, a smaller one, its chains alone or
    plain step by step (treeopt.adapt), its evidence per batch size in each row."""
    def fresh() -> tuple[BatchDecoder, Decoder]:
        chosen = BatchDecoder(lm, prompt_tokens, schedule_of(tree), copy.deepcopy(cache),
                              adapt=adapt)
        one = chosen.pick(1)
        return chosen, Decoder(lm, prompt_tokens, one.tree, copy.deepcopy(cache)) \
            if one.tree is not None else one
    chosen, single = fresh()
    plain = BatchDecoder(lm, None, {1: None})
    for run in (lambda: chosen.generate(encoded[:2], 8, learn=False),
                lambda: plain.generate(encoded[:2], 8),
                lambda: hf_generate_batch(single, encoded[:2], 8),
                lambda: single.ppd(encoded[0], 8, learn=False) if single.tree is not None
                else single.baseline(encoded[0], 8)):
        run()  # burn-in: allocator warm-up and lazy init (nothing joins the cache)
    fresh_evidence(chosen.engine)
    predicted = {r["batch"]: r for r in ((tree.meta or {}).get("batch") or [])} if tree else {}
    one = single.tree  # B = 1: a hybrid tree is predicted by replay, as the search does
    rec = unpack_records(acceptance) if acceptance and one is not None and \
        one.has_chains else None
    rows = []
    for b in batch_sizes:
        chosen, single = fresh() if cache is not None else (chosen, single)
        solo = single.ppd if single.tree is not None else single.baseline
        runs: dict[str, list] = {"chosen": [], "plain": [], "hf": [], "single": []}
        chunks = [encoded[i:i + 2 * b] for i in range(0, len(encoded), 2 * b)]
        for chunk in progress(chunks, f"batch {b}", quiet=quiet):  # interleaved per chunk
            runs["chosen"].append(chosen.generate(chunk, max_new_tokens, max_batch=b))
            runs["plain"].append(plain.generate(chunk, max_new_tokens, max_batch=b))
            runs["hf"] += [hf_generate_batch(single, chunk[i:i + b], max_new_tokens)
                           for i in range(0, len(chunk), b)]
            t0 = time.perf_counter()
            res = [solo(ids, max_new_tokens) for ids in chunk]
            runs["single"].append(BatchResult(res, time.perf_counter() - t0))
        tps = {k: sum(r.new_tokens for r in v) / sum(r.seconds for r in v)
               for k, v in runs.items()}
        same = [a.output_ids == p.output_ids for c, pl in zip(runs["chosen"], runs["plain"])
                for a, p in zip(c.results, pl.results)]
        row = {"batch": b, "chunks": len(chunks),
               **({"adapt": _adapt_at(chosen.engine.chooser, b)}
                  if chosen.engine.chooser is not None else {}),
               **{f"{k}_tokens_per_second": round(v, 3) for k, v in tps.items()},
               "speedup_vs_plain": round(tps["chosen"] / tps["plain"], 4),
               "speedup_vs_hf": round(tps["chosen"] / tps["hf"], 4),
               "speedup_vs_single": round(tps["chosen"] / tps["single"], 4),
               "tokens_per_step": round(sum(r.new_tokens for r in runs["chosen"]) / max(1, sum(
                   x.steps for r in runs["chosen"] for x in r.results)), 4),
               "identical_to_plain_fraction": round(sum(same) / len(same), 4)}
        for name in ("chosen", "plain"):
            tok, sec, n = _full(runs[name], b)
            if n:
                row[f"{name}_full_batch"] = {"steps": n, "tokens_per_step": round(tok / n / b, 4),
                                             "step_seconds": round(sec / n, 6),
                                             "tokens_per_second": round(tok / sec, 3)}
        speed = _full_speed(runs["chosen"], b, profile) if profile is not None and \
            b in batches(profile) else None
        if b in predicted and profile is not None and "chosen_full_batch" in row:
            # the search's configuration, its step time read at each full step's own
            # cache length (what the step's attention really read)
            p, lat = predicted[b], Latency(profile, batch=b)
            ctxs = [c for r in runs["chosen"] for c, n in zip(r.contexts, r.live) if n == b]
            ctx = round(float(np.mean(ctxs)))
            t = float(np.mean([lat([p["input_length"]], c)[0] for c in ctxs]))
            if b == 1 and rec is not None:
                r1 = replay_predict(one, rec, lambda L: lat(L, ctx))
                p = dict(p, tokens_per_step=r1["tokens_per_step"])
                t = r1["step_seconds"]
            m = row["chosen_full_batch"]
            pred = b * p["tokens_per_step"] / t
            row["predicted"] = {"input_length": p["input_length"], "plain": p["plain"],
                                "tokens_per_step": p["tokens_per_step"],
                                "step_seconds": round(t, 6), "tokens_per_second": round(pred, 3),
                                "context": ctx,
                                "searched_at_context": p.get("context"),
                                "error": round(pred / m["tokens_per_second"] - 1, 4)}
            if speed:  # the machine now vs when profiled: the same steps, own lengths
                row["predicted"]["speed_vs_profile"] = round(speed, 4)
                row["predicted"]["error_at_run_speed"] = round(
                    pred / speed / m["tokens_per_second"] - 1, 4)
        batch_assess(row, chosen.pick(b).tree, prompt_tokens.num if prompt_tokens else 0,
                     lm.model_id, [ids for c in chunks for ids in c],
                     [r for br in runs["chosen"] for r in br.results], chosen.lookup,
                     profile if speed else None, speed,
                     cache.settings() if cache is not None else None)
        rows.append(row)
    return rows
