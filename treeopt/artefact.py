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

from .bounds import count
from .errors import BadInput
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
    writable."""
    p = pathlib.Path(path)
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


def read_json_any(path: str | os.PathLike, what: str = "file"):
    """Read any strict JSON value (no NaN/Infinity), failures as a one-line BadInput."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise BadInput(f"{what} {p}: no such file")
    note_input(p)
    try:
        obj = json.loads(p.read_bytes().decode("utf-8"), parse_constant=_no_constants)
    except OSError as e:
        raise BadInput(f"{what} {p}: cannot read ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{what} {p}: malformed JSON ({str(e).splitlines()[0]})") from e
    except RecursionError as e:
        raise BadInput(f"{what} {p}: malformed JSON (nested too deeply)") from e
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
            raise BadInput(f"{where}: field {name!r} is {repr(v)[:40]}, expected {expected}")


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
