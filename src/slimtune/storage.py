"""Saved tunings: a folder with `slimtune.json` (method, model fingerprint, checksum) and
`tuning.safetensors` (only the tuning's tensors). Both are written atomically: to a temporary
file in the same folder, then renamed, the JSON last, so a crash never leaves a tuning that
loads half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .errors import ModelMismatchError, TuningFileError

FORMAT = "slimtune-tuning"
VERSION = 1
RECORD = "slimtune.json"
TENSORS = "tuning.safetensors"

MAX_JSON_BYTES = 1 << 20  # a tuning's record, a PEFT config, a task: kilobytes in practice
MAX_JSON_DEPTH = 32  # the deepest of them nests 4 levels

_UMASK = os.umask(0o022)  # read once (reading it means setting it), then put back
os.umask(_UMASK)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`. The file gets the
    permissions `open()` would give it (the temporary file's own are owner-only): an existing file's,
    or 0o666 less the umask the process had when this module was imported; or exactly `mode` if given
    (e.g. 0o600 for a file no other user may read, whatever the umask or the replaced file's mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX; elsewhere the temporary file's owner-only mode stands
                if mode is None:
                    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK
                os.fchmod(f.fileno(), mode)  # before any data: a private file is never readable by others
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_bytes(value, **options) -> bytes:
    """`value` as indented JSON ending in a newline, the form of every JSON file slimtune writes."""
    return (json.dumps(value, indent=2, **options) + "\n").encode()


def atomic_write_json(path: Path, value, *, mode: int | None = None, **options) -> None:
    """`value` as JSON (`json_bytes`, `options` for `json.dumps`), written by `atomic_write` with its `mode`."""
    atomic_write(path, json_bytes(value, **options), mode=mode)


def load_json(data: str | bytes, what: str):
    """JSON that may come from outside (an uploaded file, a form field): at most MAX_JSON_BYTES, nested at most
    MAX_JSON_DEPTH deep. Anything else is a `TuningFileError` naming `what` and the limit, never a RecursionError."""
    if len(data) > MAX_JSON_BYTES:
        raise TuningFileError(f"{what} is {len(data)} bytes of JSON; at most {MAX_JSON_BYTES} are accepted")
    try:
        value = json.loads(data)
    except RecursionError:
        raise TuningFileError(f"{what} is JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TuningFileError(f"{what} is not valid JSON ({err})") from err
    level, todo = 0, [value] if isinstance(value, (dict, list)) else []
    while todo:
        level += 1
        if level > MAX_JSON_DEPTH:
            raise TuningFileError(f"{what} is JSON nested more than {MAX_JSON_DEPTH} levels deep")
        todo = [v for item in todo for v in (item.values() if isinstance(item, dict) else item)
                if isinstance(v, (dict, list))]
    return value


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_tensors({name: t.detach().contiguous().cpu() for name, t in tensors.items()})


def serialise(record: dict, tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    """The two files of a saved tuning: (record JSON, tensors)."""
    data = encode(tensors)
    record = {"format": FORMAT, "version": VERSION, **record, "sha256": hashlib.sha256(data).hexdigest()}
    return json_bytes(record), data


def write(path: str | os.PathLike, record: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder = Path(path)
    record_data, tensor_data = serialise(record, tensors)
    atomic_write(folder / TENSORS, tensor_data)
    atomic_write(folder / RECORD, record_data)
    return folder


def read_record(path: str | os.PathLike) -> dict:
    """A saved tuning's record (method, model fingerprint, task, checksum), checked to be one."""
    folder = Path(path)
    record_file, tensor_file = folder / RECORD, folder / TENSORS
    if not record_file.is_file() or not tensor_file.is_file():
        raise TuningFileError(f"no slimtune tuning at '{folder}': expected the files {RECORD} and {TENSORS} there")
    record = load_json(record_file.read_bytes(), f"'{record_file}'")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise TuningFileError(f"'{record_file}' is not a slimtune tuning record (expected format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise TuningFileError(f"'{folder}' has tuning format version {record.get('version')}; this slimtune reads {VERSION}")
    return record


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    record = read_record(path)
    tensor_file = Path(path) / TENSORS
    data = tensor_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("sha256"):
        raise TuningFileError(
            f"'{tensor_file}' is corrupt or truncated: its checksum does not match the one recorded in {RECORD} "
            f"({len(data)} bytes on disk)"
        )
    try:
        tensors = load_tensors(data)
    except Exception as err:  # safetensors raises its own error types
        raise TuningFileError(f"'{tensor_file}' cannot be read as safetensors: {err}") from err
    return record, tensors


def check_model(stored: dict, current: dict, where: str) -> None:
    """Refuse a tuning made for a model of another type or shape, naming the difference."""
    if stored.get("model_type") != current.get("model_type"):
        raise ModelMismatchError(
            f"tuning '{where}' was made for a {stored.get('model_type')} model ({stored.get('architecture')}), "
            f"this is a {current.get('model_type')} model ({current.get('architecture')})"
        )
    for field, value in stored.items():
        if field in ("architecture", "model_type", "weights_sample") or field not in current:
            continue
        if current[field] != value:
            raise ModelMismatchError(
                f"tuning '{where}' was made for {field} {value} ({stored.get('architecture')}), "
                f"this model ({current.get('architecture')}) has {current[field]}"
            )
    mine, theirs = current.get("weights_sample"), stored.get("weights_sample")
    if mine is not None and theirs is not None and not _close(mine, theirs):
        raise ModelMismatchError(
            f"tuning '{where}' was made for another base model: same architecture and size "
            f"({stored.get('architecture')}), other weights (its embedding sample {theirs[:3]}..., this model's {mine[:3]}...)"
        )


def _close(a: list[float], b: list[float]) -> bool:
    """Equal up to the rounding of a lower-precision copy of the same weights (bf16 keeps ~3 digits)."""
    return len(a) == len(b) and all(abs(x - y) <= 1e-2 * abs(y) + 1e-3 for x, y in zip(a, b, strict=True))
