"""What the serving engines' speculative settings accept, per release, and where each rule
was read — so an export is checked before it is written, without any engine installed.

None of vLLM, SGLang or TensorRT-LLM takes a tree or prompt tokens; each drafts from the
text itself (n-gram / suffix matching) and takes a draft length, per batch size where it
can:

| engine | release | treeopt writes | per batch size |
|---|---|---|---|
| vLLM | 0.34.0 | `--speculative-config` JSON, method `ngram` (lookup) or `suffix` (cache) | `num_speculative_tokens_per_batch_size`: inclusive ranges `[lo, hi, K]` |
| SGLang | 0.5.23 | `--speculative-algorithm NGRAM` flags, or the YAML `--config` takes | none: one trie budget N |
| TensorRT-LLM | 1.2.1, main | LLM-API YAML `speculative_config:` with `decoding_type: NGram` | `draft_len_schedule`: keys are lower bounds (1.2.1) or upper bounds (main) |

Each rule below names its source (:data:`SOURCES`). :func:`check` refuses an unknown or
extra key, a wrong type and a broken constraint with one line; :func:`k_at` is the draft
length the engine uses at a batch size under that release's key semantics (the round trip
the tests take); :func:`render` writes the text the engine reads.
"""
from __future__ import annotations

import json

from .bounds import int_key
from .errors import BadInput

ENGINES = ("vllm", "sglang", "trtllm")
VERSIONS = {"vllm": ("0.34.0",), "sglang": ("0.5.23",), "trtllm": ("1.2.1", "main")}
NEWEST = {"vllm": "0.34.0", "sglang": "0.5.23", "trtllm": "1.2.1"}

# where each rule was read (wheels downloaded with `pip download --no-deps`; TensorRT-LLM's
# files from NVIDIA/TensorRT-LLM)
SOURCES = {
    "vllm": {
        "fields": "vllm-0.34.0 wheel: vllm/config/speculative.py (SpeculativeConfig, a "
                  "pydantic config: unknown keys raise)",
        "ngram": "vllm/v1/worker/gpu/spec_decode/ngram/config.py (prompt_lookup_min/max "
                 "default 5/5, min ≤ max) and ngram/speculator.py (longest n in min..max, "
                 "rightmost match, K tokens after it, filler where fewer)",
        "suffix": "vllm/v1/worker/gpu/spec_decode/suffix/config.py (max_tree_depth ≥ 1, "
                  "corpus_tokens in [0, 2^31), max_cached_requests ≥ 0) and "
                  "suffix/speculator.py (longest suffix match in the request's own "
                  "history; a corpus of finished responses; the longer match wins, ties "
                  "to the own history)",
        "schedule": "vllm/v1/spec_decode/dynamic/utils.py (ranges positive, start ≤ end, "
                    "K ≥ 0, sorted and non-overlapping, the first starting at 1; gaps and "
                    "the tail carry the last K forward; K capped by num_speculative_tokens)",
    },
    "sglang": {
        "fields": "sglang-0.5.23 wheel: sglang/srt/arg_groups/fields/spec.py (the ngram "
                  "flags, defaults: breadth 1..10, BFS, trie depth 18, capacity 1e7)",
        "handler": "sglang/srt/arg_groups/speculative_hook.py _handle_ngram (num draft "
                   "tokens default 12; eagle_topk set to max breadth; no DP attention)",
        "trie": "sglang/kernels/jit/csrc/ngram_corpus/trie.cpp and ngram.cpp (one shared "
                "trie; draft_token_num − 1 nodes a step, BFS from the longest anchor, "
                "breadth shrinking with depth) and srt/speculative/ngram_worker.py (after "
                "each step the last max_trie_depth tokens of prompt + output go in)",
        "adaptive": "--speculative-adaptive applies to EAGLE with topk 1 only",
    },
    "trtllm": {
        "fields": "tensorrt_llm/llmapi/llm_args.py NGramDecodingConfig (max_draft_len ≥ 0, "
                  "max_matching_ngram_size ≥ 1, is_keep_all, is_use_oldest, is_public_pool; "
                  "a strict model: unknown keys raise)",
        "schedule-1.2.1": "llm_args.py DecodingBaseConfig.draft_len_schedule in the 1.2 "
                          "releases: keys are lower bounds ({1: 4, 4: 2, 8: 0}: B ≥ 4 "
                          "drafts 2), key 1 required, its value = max_draft_len",
        "schedule-main": "llm_args.py on main (PR #10860): keys are upper bounds ({4: 4, "
                         "8: 2}: B 1-4 draft 4, 5-8 draft 2, past 8 none); the smallest "
                         "key's value = max_draft_len; every value ≤ max_draft_len; "
                         "exclusive with max_concurrency",
        "ngram": "tensorrt_llm/_torch/speculative/ngram.py NGramPoolManager (pattern → "
                 "matches pool, longest pattern first, oldest match; public pool shared "
                 "by all requests)",
    },
}

_INT, _BOOL, _STR = "integer", "boolean", "string"
# the keys treeopt may write, their types, and their bounds (lo, hi; None = open)
VLLM_KEYS = {"method": (_STR, None, None), "num_speculative_tokens": (_INT, 1, None),
             "prompt_lookup_min": (_INT, 1, None), "prompt_lookup_max": (_INT, 1, None),
             "num_speculative_tokens_per_batch_size": ("schedule", None, None),
             "suffix_decoding_max_tree_depth": (_INT, 1, None),
             "suffix_decoding_max_cached_requests": (_INT, 0, None),
             "suffix_decoding_corpus_tokens": (_INT, 0, (1 << 31) - 1)}
VLLM_METHOD_KEYS = {"ngram": {"prompt_lookup_min", "prompt_lookup_max"},
                    "suffix": {"suffix_decoding_max_tree_depth",
                               "suffix_decoding_max_cached_requests",
                               "suffix_decoding_corpus_tokens"}}
SGLANG_FLAGS = {"speculative-algorithm": (_STR, None, None),
                "speculative-num-draft-tokens": (_INT, 1, None),
                "speculative-ngram-min-bfs-breadth": (_INT, 1, None),
                "speculative-ngram-max-bfs-breadth": (_INT, 1, None),
                "speculative-ngram-match-type": (_STR, None, None),
                "speculative-ngram-max-trie-depth": (_INT, 1, None),
                "speculative-ngram-capacity": (_INT, 1, None)}
# flags that clash with NGRAM: set by its handler, or meant for other algorithms
SGLANG_CLASHES = {"speculative-eagle-topk": "set by SGLang to the max BFS breadth for NGRAM",
                  "speculative-adaptive": "EAGLE with topk 1 only (silently off for NGRAM)",
                  "speculative-num-steps": "derived by SGLang from the draft tokens"}
TRT_KEYS = {"decoding_type": (_STR, None, None), "max_draft_len": (_INT, 0, None),
            "max_matching_ngram_size": (_INT, 1, None), "is_keep_all": (_BOOL, None, None),
            "is_use_oldest": (_BOOL, None, None), "is_public_pool": (_BOOL, None, None),
            "draft_len_schedule": ("keyed", None, None)}


def check_version(engine: str, version: str | None) -> str:
    """The release (the newest where None), or a one-line BadInput."""
    if engine not in VERSIONS:
        raise BadInput(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    version = version or NEWEST[engine]
    if version not in VERSIONS[engine]:
        raise BadInput(f"{engine} {version}: treeopt knows the rules of "
                       f"{', '.join(VERSIONS[engine])} only")
    return version


def _typed(where: str, key: str, value, kind: str, lo, hi) -> None:
    ok = {_INT: isinstance(value, int) and not isinstance(value, bool),
          _BOOL: isinstance(value, bool), _STR: isinstance(value, str)}.get(kind, True)
    if not ok:
        raise BadInput(f"{where}: {key} must be a {kind}, got {value!r}")
    if kind == _INT and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        raise BadInput(f"{where}: {key} = {value} is outside "
                       f"{lo if lo is not None else '−∞'}..{hi if hi is not None else '∞'}")


def _known(where: str, got: dict, keys: dict) -> None:
    extra = sorted(set(got) - set(keys))
    if extra:
        raise BadInput(f"{where}: unknown key {extra[0]!r} (the engine refuses it)")
    for key, value in got.items():
        _typed(where, key, value, *keys[key])


def check_vllm_schedule(ranges, num_tokens: int, where: str) -> None:
    """vLLM 0.34's rules for num_speculative_tokens_per_batch_size."""
    if not isinstance(ranges, list) or not ranges:
        raise BadInput(f"{where}: the schedule must be a non-empty list of [lo, hi, K]")
    prev = 0
    for entry in ranges:
        if not isinstance(entry, list) or len(entry) != 3 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in entry):
            raise BadInput(f"{where}: schedule entry {entry!r} is not [lo, hi, K] integers")
        lo, hi, k = entry
        if lo <= 0 or hi <= 0 or lo > hi:
            raise BadInput(f"{where}: batch-size range ({lo}, {hi}) must be positive, lo ≤ hi")
        if k < 0 or k > num_tokens:
            raise BadInput(f"{where}: K = {k} for ({lo}, {hi}) outside 0..{num_tokens} "
                           "(num_speculative_tokens)")
        if lo <= prev:
            raise BadInput(f"{where}: batch-size ranges must be sorted and non-overlapping")
        prev = hi
    if ranges[0][0] != 1:
        raise BadInput(f"{where}: the first batch-size range must start at 1")


def check_trt_schedule(schedule, max_draft: int, version: str, where: str) -> None:
    """TensorRT-LLM's draft_len_schedule rules for the release."""
    if not isinstance(schedule, dict) or not schedule:
        raise BadInput(f"{where}: draft_len_schedule must be a non-empty mapping")
    # a JSON object's keys are strings: pydantic reads "4" as 4, and so do we
    schedule = {int_key(b) if isinstance(b, str) and int_key(b) is not None else b: k
                for b, k in schedule.items()}
    for b, k in schedule.items():
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise BadInput(f"{where}: draft_len_schedule key {b!r} is not a batch size ≥ 1")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= max_draft:
            raise BadInput(f"{where}: draft_len_schedule[{b}] = {k!r} outside 0..{max_draft} "
                           "(max_draft_len)")
    if version == "1.2.1" and 1 not in schedule:
        raise BadInput(f"{where}: draft_len_schedule needs key 1 in {version} (lower bounds)")
    first = min(schedule)
    if schedule[first] != max_draft:
        raise BadInput(f"{where}: draft_len_schedule[{first}] must equal max_draft_len "
                       f"({max_draft}), the smallest key's value")


def check(engine: str, version: str, setting: dict) -> None:
    """A one-line BadInput where `setting` (what :func:`render` writes) breaks a rule of
    the release: an unknown key, a wrong type, a bound, a schedule rule, a clash."""
    where = f"{engine} {version}"
    if engine == "vllm":
        _known(where, setting, VLLM_KEYS)
        method = setting.get("method")
        if method not in VLLM_METHOD_KEYS:
            raise BadInput(f"{where}: method must be ngram or suffix, got {method!r}")
        other = set().union(*VLLM_METHOD_KEYS.values()) - VLLM_METHOD_KEYS[method]
        wrong = sorted(other & set(setting))
        if wrong:
            raise BadInput(f"{where}: {wrong[0]} does not belong to method {method}")
        if "num_speculative_tokens" not in setting:
            raise BadInput(f"{where}: num_speculative_tokens is required")
        if method == "ngram" and setting.get("prompt_lookup_min", 5) > setting.get(
                "prompt_lookup_max", setting.get("prompt_lookup_min", 5)):
            raise BadInput(f"{where}: prompt_lookup_min must be ≤ prompt_lookup_max")
        if "num_speculative_tokens_per_batch_size" in setting:
            check_vllm_schedule(setting["num_speculative_tokens_per_batch_size"],
                                setting["num_speculative_tokens"], where)
    elif engine == "sglang":
        clash = sorted(set(setting) & set(SGLANG_CLASHES))
        if clash:
            raise BadInput(f"{where}: --{clash[0]} clashes with NGRAM "
                           f"({SGLANG_CLASHES[clash[0]]})")
        _known(where, setting, SGLANG_FLAGS)
        if setting.get("speculative-algorithm") != "NGRAM":
            raise BadInput(f"{where}: speculative-algorithm must be NGRAM")
        if setting.get("speculative-ngram-match-type", "BFS") not in ("BFS", "PROB"):
            raise BadInput(f"{where}: speculative-ngram-match-type must be BFS or PROB")
        if setting.get("speculative-ngram-min-bfs-breadth", 1) > setting.get(
                "speculative-ngram-max-bfs-breadth", 10):
            raise BadInput(f"{where}: min BFS breadth must be ≤ max BFS breadth")
    else:
        _known(where, setting, TRT_KEYS)
        if setting.get("decoding_type") != "NGram":
            raise BadInput(f"{where}: decoding_type must be NGram")
        if "max_draft_len" not in setting:
            raise BadInput(f"{where}: max_draft_len is required")
        if "draft_len_schedule" in setting:
            check_trt_schedule(setting["draft_len_schedule"], setting["max_draft_len"],
                               version, where)


def k_at(engine: str, version: str, setting: dict | None, batch: int) -> int:
    """The draft length (tokens verified after the root) the engine uses for `batch`
    live requests under `setting` (None: no speculation). SGLang: its trie's node budget
    N − 1, the same at every batch size."""
    if setting is None:
        return 0
    if engine == "sglang":
        return setting.get("speculative-num-draft-tokens", 12) - 1
    if engine == "vllm":
        k, ranges = setting["num_speculative_tokens"], setting.get(
            "num_speculative_tokens_per_batch_size")
        if not ranges:
            return k
        last = None
        for lo, hi, kk in sorted(ranges):
            if lo <= batch <= hi:
                return min(k, kk)
            if lo > batch:  # a gap: the previous range's K carried forward
                break
            last = kk
        return min(k, last if last is not None else k)
    sched, top = setting.get("draft_len_schedule"), setting["max_draft_len"]
    if not sched:
        return top
    keys = sorted(sched)
    if version == "1.2.1":  # lower bounds: the largest key ≤ batch
        return sched[max(b for b in keys if b <= batch)]
    above = [b for b in keys if b >= batch]  # main: upper bounds; past the last, none
    return sched[above[0]] if above else 0


def schedule_from(engine: str, version: str, ks: dict[int, int]) -> tuple[dict, list[str]]:
    """The engine's per-batch-size field for the measured batch sizes' K(B), and notes on
    the batch sizes between and beyond them. vLLM and TensorRT-LLM 1.2.1 give each measured
    B's K to the batch sizes up to the next one (and vLLM beyond the last); TensorRT-LLM
    main gives it to those down to the previous one, and none past the last."""
    sizes = sorted(ks)
    notes = []
    if engine == "vllm":
        ranges = []
        for b, nxt in zip(sizes, sizes[1:] + [None]):
            hi = nxt - 1 if nxt else b
            if ranges and ranges[-1][2] == ks[b]:
                ranges[-1][1] = hi
            else:
                ranges.append([b, hi, ks[b]])
        ranges[0][0] = 1
        notes.append(f"batch sizes past {sizes[-1]} keep K = {ks[sizes[-1]]} (vLLM carries "
                     "the last range forward)")
        return {"num_speculative_tokens_per_batch_size": ranges}, notes
    sched = {}
    if version == "1.2.1":
        for b in sizes:
            if not sched or list(sched.values())[-1] != ks[b]:
                sched[1 if not sched else b] = ks[b]
        notes.append(f"batch sizes past {sizes[-1]} keep K = {ks[sizes[-1]]} (keys are lower "
                     "bounds in 1.2.1)")
    else:
        for b in reversed(sizes):  # upper bounds: a run of one K keeps its largest key
            if not sched or sched[min(sched)] != ks[b]:
                sched[b] = ks[b]
        sched = dict(sorted(sched.items()))
        notes.append(f"batch sizes past {sizes[-1]} do not draft (keys are upper bounds on "
                     "main)")
    return {"draft_len_schedule": sched}, notes


def render(engine: str, version: str, setting: dict | None, header: list[str]) -> str:
    """The text the engine reads: vLLM's JSON (nothing else may be in it: unknown keys
    raise), SGLang's `--config` YAML, TensorRT-LLM's LLM-API YAML; YAML files start with
    `header` as comments. None (no speculation pays): a file that says so."""
    if engine == "vllm":
        return json.dumps(setting, separators=(", ", ": ")) + "\n" if setting else "null\n"
    lines = [f"# {h}" for h in header]
    if setting is None:
        return "\n".join(lines + ["# no drafting pays at any batch size: serve without "
                                  "speculative decoding", "{}"]) + "\n"
    if engine == "sglang":
        lines += [f"{k}: {_yaml(v)}" for k, v in setting.items()]
    else:
        lines.append("speculative_config:")
        for k, v in setting.items():
            if isinstance(v, dict):
                lines.append(f"  {k}:")
                lines += [f"    {b}: {kk}" for b, kk in v.items()]
            else:
                lines.append(f"  {k}: {_yaml(v)}")
    return "\n".join(lines) + "\n"


def flags(setting: dict | None) -> list[str]:
    """SGLang's command-line flags for the setting."""
    return [] if not setting else [a for k, v in setting.items() for a in (f"--{k}", str(v))]


def _yaml(v) -> str:
    return "true" if v is True else "false" if v is False else str(v)
