"""Build a corpus for the cache source: the model's own greedy answers to prompt sets
(`--prompts NAME[START:STOP]`, repeatable) and/or your own documents (`--text FILE`: a
text file is one document, a JSONL file one document per row's `text` or prompt field).
Decoding proposes continuations of the text it has just written from this corpus and from
the answers of earlier requests (`--sources ...,cache` in `treeopt search`)."""
from __future__ import annotations

from .. import corpus, paths, prompts
from ..artefact import check_out, input_file, stamp, write_json
from ..bounds import BOUNDS, count
from ..distill import greedy_responses
from ..errors import BadInput
from ..inputs import model_id
from ..models import dtype_name, load
from ..prompts import tokenize
from .common import add_model_args, int_in, say

HELP = "build a corpus of the model's own answers (or your text) for the cache source"


def add_arguments(p) -> None:
    add_model_args(p, tree=False)
    p.add_argument("--prompts", action="append", default=[], metavar="SET[START:STOP]",
                   help="answer these prompts greedily and keep the answers: a shipped set or "
                   "a JSONL file, optionally sliced (gsm8k-train[3000:3100]); repeatable")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="your own documents: a text file (one document) or JSONL (one per "
                   "row: `text` or a prompt field); repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="SET[START:STOP]",
                   help="leave out every prompt that is also in this set (the prompts you "
                   "will bench or measure on); repeatable")
    p.add_argument("--max-new-tokens", type=int_in(2, 65536), default=160,
                   help="length of each greedy answer (default 160)")
    p.add_argument("--out", help="corpus path (default: $TREEOPT_HOME/profiles/"
                   "<model>.corpus.json, which decoding then uses)")


def text_documents(path: str) -> list[str]:
    """The documents of one --text file, read (and registered as an input) before the
    model loads: a text file is one document, a JSONL file one a row; none → BadInput."""
    p = input_file(path, "--text")
    text = prompts.read_text(p)
    if p.suffix == ".jsonl" or p.name.endswith(".jsonl.gz"):
        rows = [row["text"] if isinstance(row.get("text"), str) else
                prompts.prompt_text(row, f"--text {p} line {i}")
                for i, row in prompts.jsonl_rows(text, f"--text {p}")]
    else:
        rows = [text]
    rows = [r for r in rows if r.strip()]
    if not rows:
        raise BadInput(f"--text {p}: no text in it (an empty document adds nothing)")
    return rows


def main(args) -> dict:
    if not args.prompts and not args.text:
        raise BadInput("nothing to build from: give --prompts SET and/or --text FILE")
    excluded = set()
    for spec in args.exclude:
        excluded |= set(prompts.load(spec))
    sets = []
    for spec in args.prompts:
        texts = prompts.load(spec)
        kept = [t for t in texts if t not in excluded]
        sets.append((spec, kept, len(texts) - len(kept)))
    own = {path: text_documents(path) for path in args.text}  # every input read first
    out = check_out(args.out or paths.user_profiles() / paths.corpus_name(
        model_id(args.model)))
    lm = load(args.model, args.dtype, args.device, threads=args.threads)
    human = not args.json
    docs, sources, hashes = [], [], []
    for spec, texts, dropped in sets:
        pairs = greedy_responses(lm, texts, args.max_new_tokens, quiet=not human, tag=spec) \
            if texts else []
        docs += [r for _, r in pairs]
        hashes += [corpus.prompt_hash(t) for t in texts]
        sources.append({"prompts": prompts.family_name(spec), "slice": spec,
                        "count": len(texts), "excluded": dropped,
                        "tokens": sum(len(r) for _, r in pairs)})
    for path, rows in own.items():
        got = [tokenize(lm.tokenizer, r, BOUNDS["corpus_tokens"], f"--text {path}")
               for r in rows]
        docs += got
        sources.append({"text": paths.display_path(path), "documents": len(got),
                        "tokens": sum(map(len, got))})
    count(sum(map(len, docs)), "corpus_tokens", "the corpus", lo=0)
    obj = corpus.make(lm.model_id, lm.tokenizer, docs, sources,
                      excluding=args.exclude,
                      max_new_tokens=args.max_new_tokens, dtype=dtype_name(lm.dtype),
                      prompt_hashes=hashes, **stamp())
    write_json(out, obj)
    if human:
        for s in sources:
            what = s.get("prompts") or s.get("text")
            say(f"{what}: {s.get('count', s.get('documents'))} documents, {s['tokens']} tokens"
                + (f" ({s['excluded']} prompts left out: also in --exclude)"
                   if s.get("excluded") else ""))
        say(f"{obj['documents']} documents, {obj['tokens']} tokens; wrote {out}")
    return {"out": str(out), "documents": obj["documents"], "tokens": obj["tokens"],
            "sources": sources}
