"""Artefact I/O shared by every verb: one output rule, atomic writes, schema-checked loads
and the created/command stamp."""
from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import re
import shlex
import stat
import sys
import tempfile

from .bounds import BOUNDS, WHAT, count
from .errors import BadInput, shown
from .paths import make_folder


# every file this command has read (prompt files, artefacts, side files, defaults found
# under $TREEOPT_HOME): the output rule refuses them all
_INPUTS: set[pathlib.Path] = set()


def note_input(path: str | os.PathLike) -> None:
    """Register a file the command reads, so that no output of the command replaces it."""
    try:
        _INPUTS.add(pathlib.Path(path).resolve())
    except (OSError, RuntimeError):
        pass


def forget_inputs() -> None:
    """A new command starts with no inputs (the CLI calls this once per command)."""
    _INPUTS.clear()


def check_out(path: str | os.PathLike, inputs=(), what: str = "--out") -> pathlib.Path:
    """The one output rule: a regular file or a new path in an existing-or-creatable
    folder; never a device, a folder, a symlink, or any of the command's inputs (those
    given here and every file read so far, :func:`note_input`)."""
    p = _check_target(path, what)
    target = p.resolve()
    for src in inputs:
        if src and pathlib.Path(src).exists():
            note_input(src)
    if target in _INPUTS:
        raise BadInput(f"{what} {p}: is also an input of this command (choose another path)")
    return p


def _check_target(path: str | os.PathLike, what: str = "--out") -> pathlib.Path:
    """A path that may be written: not a symlink, a folder or a device; its folder
    writable; a name the file system refuses (over 255 bytes, a NUL) is one line."""
    p = pathlib.Path(path)
    try:
        return _writable(p, what)
    except (OSError, ValueError) as e:
        raise BadInput(f"{what} {shown(str(p), 120)}: cannot be written "
                       f"({getattr(e, 'strerror', None) or e})") from None


def _writable(p: pathlib.Path, what: str) -> pathlib.Path:
    if any(len(os.fsencode(part)) > 255 for part in p.parts):
        raise BadInput(f"{what} {shown(str(p), 120)}: a name over 255 bytes (the file "
                       "system's limit)")
    if p.is_symlink():
        raise BadInput(f"{what} {p}: is a symbolic link (give the real path)")
    if p.exists() and not p.is_file():
        kind = "a folder" if p.is_dir() else "not a regular file"
        raise BadInput(f"{what} {p}: is {kind}")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BadInput(f"{what} {p}: folder {parent} is not writable")
    return p


def write_atomic(path: str | os.PathLike, data: bytes | str) -> pathlib.Path:
    """Write to a temp file in the same folder, then rename: never half-written. Refuses
    to replace anything but a regular file (see :func:`check_out`, which the verbs call on
    every output before any work)."""
    path = _check_target(path)
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an artefact is for sharing
        if path.is_symlink() or (path.exists() and not stat.S_ISREG(path.lstat().st_mode)):
            raise BadInput(f"{path}: changed into a non-regular file while writing")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _flat(v) -> bool:
    """A scalar, a list of scalars, or a small object of those: written on one line."""
    if isinstance(v, list):  # scalars, or a short row of scalars and scalar lists
        return all(not isinstance(x, (list, dict)) for x in v) or (
            len(v) <= 4 and all(not isinstance(x, dict) and (not isinstance(x, list) or all(
                not isinstance(y, (list, dict)) for y in x)) for x in v))
    if isinstance(v, dict):
        return len(v) <= 4 and all(not isinstance(x, dict) and _flat(x) for x in v.values())
    return True


def dumps(obj, level: int = 0) -> str:
    """Strict JSON (NaN/Inf refused), indented one space a level, with flat values (number
    lists, tree nodes, table rows) kept on one line."""
    if _flat(obj) and (level > 0 or not isinstance(obj, dict)):
        return json.dumps(obj, allow_nan=False, separators=(", ", ": "))
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if not obj:
        return "[]"
    return "[\n" + ",\n".join(inner + dumps(v, level + 1) for v in obj) + f"\n{pad}]"


def write_json(path: str | os.PathLike, obj: dict) -> pathlib.Path:
    try:
        text = dumps(obj)
    except ValueError as e:
        raise ValueError(f"refusing to write {path}: a value is NaN or infinite") from e
    return write_atomic(path, text + "\n")


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON object, turning every failure into a one-line BadInput."""
    obj = read_json_any(path, what)
    if not isinstance(obj, dict):
        raise BadInput(f"{what} {path}: expected a JSON object")
    return obj


def input_file(path: str | os.PathLike, what: str = "file") -> pathlib.Path:
    """A file the command reads, registered as an input (:func:`note_input`) before any
    output is checked: a regular file, else one BadInput line saying what it is instead
    (no such file, a folder, a device or pipe, a name the file system refuses)."""
    p = pathlib.Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise BadInput(f"{what} {shown(str(p), 120)}: no such file") from None
    except (OSError, ValueError) as e:  # a name over 255 bytes, a NUL byte, a loop
        raise BadInput(f"{what} {shown(str(p), 120)}: cannot be opened "
                       f"({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{what} {p}: is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{what} {p}: is not a regular file (a device, pipe or socket)")
    note_input(p)
    return p


def read_bytes(p: pathlib.Path, what: str, bound: str = "json_bytes") -> bytes:
    """A file's bytes, at most BOUNDS[bound] of them (a larger file is refused unread)."""
    limit = BOUNDS[bound]
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise BadInput(f"{what} {p}: cannot read ({e.strerror or e})") from e
    if len(raw) > limit:
        raise BadInput(f"{what} {p}: larger than {limit >> 20} MiB (the bound on "
                       f"{WHAT[bound]})")
    return raw


MAX_DEPTH = 32  # no artefact nests deeper; a writer recursing into more would fail late


def _int_value(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # every count, id and seed fits an int64
        raise ValueError(f"the integer {text[:12]}… has {len(text.lstrip('-'))} digits")
    return int(text)


def _float_value(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:12]} is out of range")
    return v


def _depth(obj) -> int:
    """How deeply a JSON value nests (iteratively: a deep file cannot exhaust the stack)."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_json_any(path: str | os.PathLike, what: str = "file"):
    """Read any strict JSON value, failures as a one-line BadInput: a regular file of at
    most BOUNDS["json_bytes"], no NaN/Infinity, no number out of a float's range or an
    integer of over 19 digits, nothing nested deeper than MAX_DEPTH."""
    p = input_file(path, what)
    raw = read_bytes(p, what)
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constants,
                         parse_int=_int_value, parse_float=_float_value)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{what} {p}: malformed JSON ({str(e).splitlines()[0][:80]})") from e
    except RecursionError as e:
        raise BadInput(f"{what} {p}: malformed JSON (nested too deeply)") from e
    if _depth(obj) > MAX_DEPTH:
        raise BadInput(f"{what} {p}: nested deeper than {MAX_DEPTH} levels")
    return obj


def check_schema(obj: dict, schema: str, where: str) -> None:
    got = obj.get("schema")
    if got != schema:
        raise BadInput(f"{where}: field 'schema' is {got!r}, expected {schema!r}")


_KINDS = {  # kind → (check, what the error says is expected)
    "num": (lambda v: finite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true/false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "obj": (lambda v: isinstance(v, dict), "an object"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "an integer ≥ 0"),
}


def check_fields(obj, spec: dict, where: str) -> None:
    """BadInput unless `obj` is an object whose fields have the kinds `spec` names: a key
    maps to ``num`` (finite number), ``count`` (integer ≥ 0), ``batch`` (a batch size,
    :mod:`treeopt.bounds`), ``bool``, ``str`` or ``obj``; a leading ``?`` makes the key
    optional (absent or null)."""
    if not isinstance(obj, dict):
        raise BadInput(f"{where}: expected an object")
    for key, kind in spec.items():
        name = key.lstrip("?")
        v = obj.get(name)
        if v is None and key.startswith("?"):
            continue
        if kind == "batch":
            count(v, "batch", f"{where}: {name}")
            continue
        ok, expected = _KINDS[kind]
        if not ok(v):
            raise BadInput(f"{where}: field {name!r} is {shown(v)}, expected {expected}")


def finite(v) -> bool:
    """A real number (bool is not one), finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_SECRET = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")


def mask_secrets(text: str) -> str:
    """Passwords in URLs (`scheme://user:password@host`) replaced by ***."""
    return _SECRET.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def stamp() -> dict:
    """`created` (UTC) and `command` (secrets masked) for an artefact."""
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "command": mask_secrets("treeopt " + " ".join(shlex.quote(a)
                                                          for a in sys.argv[1:]))}
