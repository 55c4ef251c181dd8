"""One self-contained HTML report (inline SVG plots, no scripts, no network) from any subset
of profiles, an acceptance file, a tree and a run/bench result."""
from __future__ import annotations

import datetime
import html
import io
import pathlib
import re

import numpy as np

from . import __version__
from .acceptance import accuracy_array, search_inputs
from .errors import BadInput
from .latency import Latency, batches, sweep_spread
from .models import canonical_model
from .paths import display_path
from .search.exact import universe

def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return text[text.index("<svg"):]


def _log2(ax, which: str = "x") -> None:
    """A base-2 log axis with plain tick labels: figures are drawn with maths text off (an
    artefact's "$x$" is text), so the default "$2^{k}$" labels would show raw."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=2)
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _esc(x) -> str:
    return html.escape(str(x))


def _kv(rows: dict) -> str:
    return "<table class='kv'>" + "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows.items()
        if v is not None) + "</table>"


def _table(head: list[str], rows: list[list]) -> str:
    """A table with a header row (every cell escaped)."""
    return ("<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        + "</table>")


def _figure(svg: str, caption: str, fid: str) -> str:
    return (f"<figure id='{fid}' class='plot'>{svg}<figcaption>{_esc(caption)}</figcaption>"
            "</figure>")


# ---- sections -----------------------------------------------------------------------
def latency_section(profiles: list[tuple[str, dict]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    facts = []
    for path, prof in profiles:
        lat = Latency(prof, with_overhead=False)
        label = prof["device"].get("name", "?") + (" (simulated)" if prof.get("simulated") else "")
        for c in lat.contexts:
            pts = sorted((p for p in prof["points"] if p["context"] == c
                          and p.get("batch", 1) == 1), key=lambda p: p["size"])
            x = np.array([p["size"] for p in pts])
            y = np.array([p["median_s"] for p in pts]) * 1000
            lo = np.array([p.get("p10_s", p["median_s"]) for p in pts]) * 1000
            hi = np.array([p.get("p90_s", p["median_s"]) for p in pts]) * 1000
            style = "--" if prof.get("simulated") else "-"
            line, = ax.plot(x, y, "o", ms=3, label=f"{label}, C={c}")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
            xs = np.arange(1, int(x.max()) + 1)
            ax.plot(xs, lat(xs, c) * 1000, style, color=line.get_color(), lw=1)
            knee = lat.knee(c)
            ax.axvline(knee, color=line.get_color(), lw=0.6, ls=":")
        facts.append(f"<li>{_esc(label)} — knee (t ≤ 1.1·t(1)) at "
                     + ", ".join(f"C={c}: L={lat.knee(c)}" for c in lat.contexts)
                     + f"; per-step overhead {1000 * prof['overhead']['per_step_s']:.2f} ms"
                     + (f"; drift between sweeps {100 * spread:.1f} %"
                        if (spread := sweep_spread(prof["points"])) is not None else "")
                     + (f"; batch sizes {', '.join(map(str, batches(prof)))} (curves: B = 1)"
                        if batches(prof) != [1] else "")
                     + (" — <b>simulated by roofline</b>" if prof.get("simulated") else "")
                     + f" <span class='src'>({_esc(display_path(path))})</span></li>")
    _log2(ax)
    ax.set_xlabel("input length L (tokens in one forward)")
    ax.set_ylabel("ms per forward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ("<section id='latency'><h2>Latency</h2>"
            + _figure(_svg(fig), "t(L) per context: measured medians (dots), p10–p90 band, "
                      "monotone fit (line), knee (dotted)", "fig-latency")
            + f"<ul>{''.join(facts)}</ul></section>")


def acceptance_section(obj: dict) -> str:
    import matplotlib.pyplot as plt

    acc = accuracy_array(obj)
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.55 * acc.shape[0]))
    im = ax.imshow(np.nan_to_num(acc, nan=-0.01), cmap="viridis", aspect="auto", vmin=0)
    ci = obj.get("ci95")
    for d in range(acc.shape[0]):
        for r in range(acc.shape[1]):
            v = acc[d, r]
            txt = "—" if np.isnan(v) else f"{v:.2f}"
            if ci and not np.isnan(v):
                txt += f"\n±{(ci['high'][d][r] - ci['low'][d][r]) / 2:.2f}"
            ax.text(r, d, txt, ha="center", va="center", fontsize=6,
                    color="white" if (np.isnan(v) or v < acc[~np.isnan(acc)].max() / 2) else "k")
    ax.set_yticks(range(acc.shape[0]), [f"token {d + 1}" for d in range(acc.shape[0])])
    ax.set_xticks(range(acc.shape[1]))
    ax.set_xlabel("rank")
    fig.colorbar(im, ax=ax, fraction=0.03)
    parts = [_figure(_svg(fig), "accuracy[depth][rank] (± half the 95% Wilson interval; "
                     "— = not covered)", "fig-accept")]
    if obj.get("path_probs"):
        acc_p, _ = search_inputs(obj, conditional=False)
        acc_f, pp = search_inputs(obj, conditional=True)
        u = universe(acc_f, acc.shape[0], 20, pp)
        prod = universe(acc_p, acc.shape[0], 2000)
        pmap = dict(zip(prod.paths, prod.prob))
        fig, ax = plt.subplots(figsize=(7.5, 3.2))
        x = np.arange(len(u.paths))
        ax.bar(x - 0.2, u.prob, 0.4, label="conditional (measured/fitted)")
        ax.bar(x + 0.2, [pmap.get(p, 0) for p in u.paths], 0.4, label="product model")
        ax.set_xticks(x, [",".join(map(str, p)) for p in u.paths], rotation=60, fontsize=7)
        ax.set_ylabel("P(path accepted)")
        ax.legend(fontsize=8)
        parts.append(_figure(_svg(fig), "the 20 most likely paths: conditional vs product",
                             "fig-paths"))
    info = {"model": obj["model"], "source": obj.get("source"),
            "positions": obj.get("positions"), "prompts": obj.get("prompts"),
            "correlation factors": (obj.get("fit") or {}).get("correlation"),
            "created": obj.get("created"), "command": obj.get("command")}
    check = obj.get("check", {}).get("trees")
    table = _table(["tree", "measured tok/step", "product", "fitted"], [
        [c["tree"], f"{c['measured_tokens_per_step']:.3f}",
         f"{c['predicted_product']:.3f} ({100 * c['error_product']:+.1f}%)",
         f"{c['predicted_fitted']:.3f} ({100 * c['error_fitted']:+.1f}%)"]
        for c in check]) if check else ""
    return ("<section id='acceptance'><h2>Acceptance</h2>" + _kv(info) + "".join(parts)
            + table + "</section>")


def search_section(tree_obj: dict, search_report: dict | None) -> str:
    import matplotlib.pyplot as plt

    meta = tree_obj.get("meta", {})
    rows = (search_report or {}).get("per_input_length")
    pred = meta.get("predicted", {})
    if not rows:
        return ("<section id='search'><h2>Search</h2><p>No search report beside the tree "
                "(hand-made or static tree).</p>" + _kv(pred) + "</section>")
    g = (search_report or {}).get("greedy_curve", [])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = [r["input_length"] for r in rows]
    a1.plot(x, [r["tokens_per_step"] for r in rows], label="search (best per cap)")
    a2.plot(x, [r["tokens_per_second"] for r in rows], label="search (best per cap)")
    if g:
        a1.plot([r["input_length"] for r in g], [r["tokens_per_step"] for r in g], "--",
                label="greedy static top-N")
        a2.plot([r["input_length"] for r in g], [r["tokens_per_second"] for r in g], "--",
                label="greedy static top-N")
    L = max(int(v) for v in pred.get("input_lengths", {"0": 0}).values())
    a1.plot([L], [pred.get("tokens_per_step", np.nan)], "r*", ms=10, label="chosen")
    a2.plot([L], [pred.get("tokens_per_second", np.nan)], "r*", ms=10, label="chosen")
    for a, lab in ((a1, "tokens per step"), (a2, "tokens per second")):
        _log2(a)
        a.set_xlabel("input-length cap L")
        a.set_ylabel(lab)
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    info = {"model": meta.get("model"), "device": meta.get("device"),
            "profile": meta.get("profile"), "acceptance": meta.get("acceptance"),
            "predicted tokens/step": pred.get("tokens_per_step"),
            "predicted tokens/s": pred.get("tokens_per_second"),
            "speedup vs t(1)": pred.get("speedup_vs_t1"),
            "input lengths": pred.get("input_lengths"), "searched in (s)":
                meta.get("search_seconds"), "created": meta.get("created")}
    return ("<section id='search'><h2>Search</h2>" + _kv(info)
            + _figure(_svg(fig), "predicted tokens/step and tokens/s vs the input-length cap; "
                      "the chosen tree (star) and the greedy static tree", "fig-search")
            + "</section>")


def tree_section(tree_obj: dict) -> str:
    import matplotlib.pyplot as plt

    states = tree_obj["states"]
    n = len(states)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.6), squeeze=False)
    for ax, (m, nodes) in zip(axes[0], sorted(states.items(), key=lambda kv: int(kv[0]))):
        paths = [tuple(nd["path"]) for nd in nodes]
        count = {tuple(nd["path"]): nd["prompt_tokens"] for nd in nodes}
        by_depth: dict[int, list] = {}
        for p in paths:
            by_depth.setdefault(len(p), []).append(p)
        pos = {(): (0.5, 0)}
        for d in sorted(by_depth):
            row = sorted(by_depth[d])
            for i, p in enumerate(row):
                pos[p] = ((i + 1) / (len(row) + 1), -d)
        for p in paths:
            (x0, y0), (x1, y1) = pos[p[:-1]], pos[p]
            ax.plot([x0, x1], [y0, y1], color="#999", lw=0.6, zorder=1)
        ax.scatter([0.5], [0], s=60, c="k", zorder=2)
        if paths:
            cs = [count[p] for p in paths]
            ax.scatter([pos[p][0] for p in paths], [pos[p][1] for p in paths], s=40, c=cs,
                       cmap="plasma", vmin=1, vmax=tree_obj["num_prompt_tokens"], zorder=2)
            if len(paths) <= 40:
                for p in paths:
                    ax.annotate(f"{p[-1]}·{count[p]}", pos[p], fontsize=6,
                                textcoords="offset points", xytext=(0, 5), ha="center")
        ax.set_title(f"state {m}: {len(paths)} nodes, L={tree_obj.get('input_lengths', {}).get(m, '?')}",
                     fontsize=8)
        ax.axis("off")
    return ("<section id='tree'><h2>Tree</h2>"
            + _figure(_svg(fig), "each state's tree by depth; labels rank·prompt tokens, colour "
                      f"= prompt tokens; the root carries {tree_obj['root_prompt_tokens']}",
                      "fig-tree") + "</section>")


def run_section(run: dict, tree_obj: dict | None) -> str:
    import matplotlib.pyplot as plt

    # the bench's own prediction (at its context, against its decode phase) where it has
    # one, else the search's
    pred = run.get("predicted") or (tree_obj or {}).get("meta", {}).get("predicted", {})
    dec = run.get("decode") if run.get("predicted") else None
    err = pred.get("error", {})

    def vs(key, digits):
        if not dec or key not in err:
            return pred.get(key)
        return f"{pred[key]:.{digits}f} ({100 * err[key]:+.1f}% vs measured {dec[key]:.{digits}f})"

    info = {"kind": run.get("kind"), "model": run.get("model"), "dtype": run.get("dtype"),
            "tree": run.get("tree"), "prompt tokens": run.get("prompt_tokens"),
            "prompts": run.get("prompts"), "tokens/step (measured)": run.get("tokens_per_step"),
            "tokens/step (predicted)": vs("tokens_per_step", 3),
            "tokens/s PPD": run.get("tokens_per_second"),
            "tokens/s (predicted)": vs("tokens_per_second", 1),
            "machine speed vs profile": pred.get("speed_vs_profile"),
            "tokens/s HF generate": run.get("hf_tokens_per_second") or
            (run.get("hf_generate") or {}).get("tokens_per_second"),
            "speedup vs HF generate": run.get("speedup_vs_hf"),
            "per-step overhead": run.get("step_overhead_fraction"),
            "identical outputs": run.get("identical_fraction", run.get("identical")),
            "unexplained divergences": run.get("unexplained_divergences")}
    parts = [_kv(info)]
    per = run.get("per_prompt")
    if per:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        a1.hist([p["speedup_vs_hf"] for p in per], bins=min(20, len(per)), color="#4a7")
        a1.axvline(1.0, color="k", lw=0.8)
        a1.set_xlabel("speedup vs HF generate (per prompt)")
        a2.hist([p["tokens_per_step"] for p in per], bins=min(20, len(per)), color="#47a")
        if pred.get("tokens_per_step"):
            a2.axvline(pred["tokens_per_step"], color="r", lw=1, label="predicted")
            a2.legend(fontsize=7)
        a2.set_xlabel("tokens per step (per prompt)")
        parts.append(_figure(_svg(fig), "per-prompt distributions", "fig-run"))
        ok = sum(p["identical"] for p in per)
        parts.append(f"<p class='lossless'>Lossless check: {ok}/{len(per)} prompts "
                     f"token-identical to HF greedy; {_esc(run.get('unexplained_divergences'))} "
                     "divergences unexplained (explained: HF's logit margin at most the larger "
                     f"of {_esc(run.get('margin_tolerance'))} and twice the reduction-order "
                     "noise measured there)</p>")
    return "<section id='run'><h2>Run / bench</h2>" + "".join(parts) + "</section>"


def _batch_table(rows: list[dict]) -> str:
    head = ["B", "chosen tok/s", "plain batched", "HF batched", "PPD one at a time",
            "vs plain", "vs HF", "tokens/step", "predicted tok/s (full batches)"]
    return _table(head, [
        [r["batch"], r["chosen_tokens_per_second"], r["plain_tokens_per_second"],
         r["hf_tokens_per_second"], r["single_tokens_per_second"],
         f"{r['speedup_vs_plain']:.2f}x", f"{r['speedup_vs_hf']:.2f}x", r["tokens_per_step"],
         f"{p['tokens_per_second']} ({100 * p['error']:+.1f}%)" if (p := r.get("predicted"))
         else "-"] for r in rows])


def batch_section(run: dict | None, trees: list[tuple[str, dict]]) -> str:
    """Throughput vs batch size (chosen / plain / HF, from a batch bench) beside the chosen
    input length vs batch size of each tree's per-batch table (e.g. this CPU and a
    simulated GPU)."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    rows = (run or {}).get("batch") or []
    if rows:
        bs = [r["batch"] for r in rows]
        for key, label in (("chosen", "chosen (per-batch table)"), ("plain", "plain batched"),
                           ("hf", "HF generate batched"), ("single", "PPD one at a time")):
            a1.plot(bs, [r[f"{key}_tokens_per_second"] for r in rows], marker="o", label=label)
        pred = [(r["batch"], r["predicted"]["tokens_per_second"]) for r in rows
                if r.get("predicted")]
        if pred:
            a1.plot(*zip(*pred), "r*", ms=9, label="predicted (full batches)")
        a1.legend(fontsize=7)
    a1.set_ylabel("tokens/s over all sequences")
    for name, tree in trees:
        tab = (tree.get("meta") or {}).get("batch") or []
        if tab:
            a2.plot([r["batch"] for r in tab], [r["input_length"] for r in tab], marker="o",
                    label=str((tree.get("meta") or {}).get("device") or name))
    if trees:
        a2.legend(fontsize=7)
    a2.set_ylabel("chosen input length (1 = plain)")
    _log2(a2, "y")
    for a in (a1, a2):
        _log2(a)
        a.set_xlabel("batch size B")
        a.grid(alpha=0.3)
    return ("<section id='batch'><h2>Batches</h2>"
            + _figure(_svg(fig), "left: measured throughput per batch size; right: the tree "
                      "size each per-batch table chooses (it shrinks as the batch grows)",
                      "fig-batch") + (_batch_table(rows) if rows else "") + "</section>")


def _acceptance_row(obj: dict) -> list:
    """One prompt family's acceptance per source: the guesses' top-1 by depth, and
    prompt lookup's share of positions, mean accepted run and how often its run is
    longer than the rank-0 guesses', per match length n."""
    acc = accuracy_array(obj)
    lk = obj.get("lookup") or {}
    by = lk.get("by_match") or {}
    ns = sorted((int(n) for n in by if int(n) > 0))

    def per_n(key, fmt):
        return " / ".join(fmt.format(by[str(n)][key]) if key in by[str(n)] else "—"
                          for n in ns) or "—"
    matched = 1 - by["0"]["share"] if "0" in by else None
    return [obj.get("prompt_file", "?"), obj.get("prompts"), (obj.get("positions") or ["?"])[0],
            " / ".join(f"{row[0]:.2f}" for row in acc),
            f"{matched:.2f}" if matched is not None else "—", per_n("share", "{:.2f}"),
            per_n("mean_accepted", "{:.2f}"), per_n("longer_than_rank0_guesses", "{:.2f}"),
            f"n ≤ {lk['max_ngram']}, chain ≤ {lk['max_tokens']}" if lk else "not measured"]


def families_section(accs: list[dict], run: dict | None) -> str:
    """Per prompt family: acceptance per source (one acceptance file per family) and the
    bench of `bench --prompts A --prompts B ...` (hybrid, PPD alone, HF generate and HF
    prompt lookup, interleaved per prompt within each family)."""
    import matplotlib.pyplot as plt

    parts = []
    if accs:
        parts.append("<h3>Acceptance per source</h3>" + _table(
            ["prompt family", "prompts", "positions", "guesses top-1 by depth",
             "lookup matched", "share by n = 1 / 2 / ..", "lookup mean run by n",
             "lookup run > rank-0 guesses' by n", "lookup settings"],
            [_acceptance_row(a) for a in accs]))
    rows = (run or {}).get("families") or []
    if rows:
        fams = [r["family"] for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.4))
        x = np.arange(len(rows))
        bars = [("hybrid", [r["speedup_vs_hf"] for r in rows])]
        alone = "PPD + lookup" if rows[0].get("ppd_alone_is") == "ppd+lookup" else "PPD alone"
        if all("ppd_alone_tokens_per_second" in r for r in rows):
            bars.append((alone, [r["ppd_alone_tokens_per_second"]
                                       / r["hf_tokens_per_second"] for r in rows]))
        if all("hf_lookup_tokens_per_second" in r for r in rows):
            bars.append((f"HF prompt lookup (k={run.get('hf_lookup')})",
                         [r["hf_lookup_tokens_per_second"] / r["hf_tokens_per_second"]
                          for r in rows]))
        w = 0.8 / len(bars)
        for i, (label, ys) in enumerate(bars):
            a1.bar(x + (i - (len(bars) - 1) / 2) * w, ys, w, label=label)
        a1.axhline(1.0, color="k", lw=0.8)
        a1.set_xticks(x, fams)
        a1.set_ylabel("speedup vs HF generate")
        a1.legend(fontsize=7)
        a2.bar(x - 0.2, [r["tokens_per_step"] for r in rows], 0.4, label="hybrid")
        a2.bar(x + 0.2, [r.get("ppd_alone_tokens_per_step", np.nan) for r in rows], 0.4,
               label=alone)
        pred = [(i, r["predicted"]["tokens_per_step"]) for i, r in enumerate(rows)
                if r.get("predicted")]
        if pred:
            a2.plot(*zip(*pred), "r*", ms=9, label="predicted (acceptance file's replay)")
        a2.set_xticks(x, fams)
        a2.set_ylabel("tokens per step")
        a2.legend(fontsize=7)
        parts.append(_figure(_svg(fig), "per prompt family: speedup over HF generate (left) "
                             "and tokens per step (right)", "fig-families"))

        def cell(r, key, fmt="{:.2f}x"):
            return fmt.format(r[key]) if key in r else "—"

        def shares(r):  # each source's share of the tokens won beyond the root's
            s = ((r.get("drift") or {}).get("replayed") or {}).get("shares")
            return " / ".join(f"{100 * s[k]:.0f}%" for k in ("ppd", "lookup", "cache")) \
                if s else "—"
        parts.append("<h3>Bench per prompt family</h3>" + _table(
            ["family", "prompts", "tok/step", f"{alone} tok/step", "tok/s", "HF tok/s",
             "HF lookup tok/s", "vs HF", f"vs {alone}", "vs HF lookup", "identical",
             "unexplained", "predicted tok/step", "tokens won: guesses / lookup / cache"],
            [[r["family"], r["prompts"], r["tokens_per_step"],
              r.get("ppd_alone_tokens_per_step", "—"), r["tokens_per_second"],
              r["hf_tokens_per_second"], r.get("hf_lookup_tokens_per_second", "—"),
              cell(r, "speedup_vs_hf"), cell(r, "speedup_vs_ppd_alone"),
              cell(r, "speedup_vs_hf_lookup"), f"{100 * r['identical_fraction']:.0f}%",
              r["unexplained_divergences"],
              (f"{r['predicted']['tokens_per_step']} "
               f"({100 * r['predicted']['error']['tokens_per_step']:+.1f}%)")
              if r.get("predicted") else "—", shares(r)] for r in rows]))
    return ("<section id='families'><h2>Prompt families</h2>" + "".join(parts)
            + "</section>")


def _drifts(run: dict) -> list[tuple[str, dict]]:
    """(part, drift) of a run: the run's own, each family's, each batch size's."""
    out = [("run", run["drift"])] if run.get("drift") else []
    out += [(r["family"], r["drift"]) for r in run.get("families") or [] if r.get("drift")]
    out += [(f"B = {r['batch']}", r["drift"]) for r in run.get("batch") or [] if r.get("drift")]
    return out


def drift_section(run: dict) -> str:
    """Predicted (acceptance data) → replayed on the run's own steps → measured, and the
    three drifts between them (:mod:`treeopt.drift`)."""
    def pct(v):
        return "—" if v is None else f"{100 * v:+.1f}%"
    rows = [[part, d.get("predicted_tokens_per_step", "—"), d["replayed"]["tokens_per_step"],
             d["measured_tokens_per_step"], pct(d.get("text")),
             pct(d["model"].get("tokens_per_step")),
             pct(d["model"].get("tokens_per_second_at_run_speed")), pct(d.get("speed"))]
            for part, d in _drifts(run)]
    return ("<section id='drift'><h2>Drift: prediction, this text, this machine</h2>"
            "<p>Text drift: the tree replayed over this run's own recorded steps against "
            "the acceptance data's prediction (beyond ±15 %: re-search from this run, "
            "<code>treeopt search --acceptance RUN.json</code>). Model error: measured "
            "against that replay (treeopt's own error). Speed drift: measured step time "
            "against the profile's (beyond ±25 %: re-profile).</p>" + _table(
                ["part", "predicted tok/step", "replayed on this text", "measured tok/step",
                 "text drift", "model error tok/step", "model error tok/s at run speed",
                 "speed drift"], rows) + "</section>")


CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;margin-top:2em}table{border-collapse:
collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
font-size:13px}table.kv th{background:#f5f5f5}figure{margin:1em 0}svg{max-width:100%;
height:auto}figcaption{font-size:12px;color:#555}.src{color:#888;font-size:12px}"""


def model_of(name: str, obj: dict) -> str | None:
    if name == "tree":
        return obj.get("meta", {}).get("model")
    return obj.get("model")


def build(profiles=(), acceptance=None, tree=None, run=None, title="treeopt report",
          allow_mixed=False, search_report: dict | None = None,
          compare_trees: list[tuple[str, dict]] = (), more_acceptance: list[dict] = ()
          ) -> str:
    """The report's HTML from already-loaded artefacts (every string escaped);
    `compare_trees` are more trees whose per-batch tables join the batch panel;
    `more_acceptance`, acceptance files of other prompt families for the families panel."""
    if not (profiles or acceptance or tree or run):
        raise BadInput("report needs at least one of --profile, --acceptance, --tree, --run")
    models = {}
    for name, obj in [("profile", p) for _, p in profiles] + [("acceptance", acceptance),
                                                               ("tree", tree), ("run", run)] \
            + [("tree", t) for _, t in compare_trees] \
            + [("acceptance", a) for a in more_acceptance]:
        if obj is not None and model_of(name, obj):
            m = model_of(name, obj)
            models.setdefault(canonical_model(m), name)
    if len(models) > 1 and not allow_mixed:
        raise BadInput("artefacts of different models (" + ", ".join(models) +
                       "): pass --allow-mixed to report them together")
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # an artefact's "$x$" is text, not maths
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    head = {"models": ", ".join(models), "generated": now, "treeopt": __version__}
    for path, prof in profiles:
        d = prof["device"]
        head[f"device ({pathlib.Path(path).name})"] = ", ".join(
            f"{k}={v}" for k, v in d.items() if not isinstance(v, dict))
        head[f"dtype / made ({pathlib.Path(path).name})"] = \
            f"{prof.get('dtype')} / {prof.get('created', '?')}: {prof.get('command', '?')}" \
            + (" (random weights: the model's shape only)" if prof.get("weights") == "random"
               else "")
    if run:
        head["run made"] = f"{run.get('kind')} on {run.get('device')} ({run.get('dtype')})"
    body = [f"<h1>{_esc(title)}</h1><section id='header'><h2>Artefacts</h2>{_kv(head)}</section>"]
    if profiles:
        body.append(latency_section(list(profiles)))
    if acceptance:
        body.append(acceptance_section(acceptance))
    if tree:
        body.append(search_section(tree, search_report))
        body.append(tree_section(tree))
    batch_trees = [(n, t) for n, t in [("tree", tree), *compare_trees]
                   if t and (t.get("meta") or {}).get("batch")]
    if run and run.get("kind") == "batch-bench" or batch_trees:
        body.append(batch_section(run, batch_trees))
    accs = [a for a in [acceptance, *more_acceptance] if a and a.get("lookup")]
    if accs or run and run.get("kind") == "bench-families":
        body.append(families_section(accs, run))
    if run and run.get("kind") not in ("batch-bench", "bench-families"):
        body.append(run_section(run, tree))
    if run and _drifts(run):
        body.append(drift_section(run))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>"
            f"{_esc(title)}</title><style>{CSS}</style></head><body>{''.join(body)}"
            "</body></html>\n")
