"""Resuming an interrupted run: the state saved after every layer, checked before it is trusted.

After each layer the next layer's inputs go to a file named by the number of completed layers,
then ``state.json`` is replaced in one rename, naming that file and the size of every layer file
written; the previous inputs are removed only after. A kill at any point leaves either the old
state or the new one, each consistent with the files on disk, so a resumed run continues from
exactly what an uninterrupted one had and writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moequant import __version__
from moequant.checkpoint.output_form import OutputForm
from moequant.checkpoint.reader import CheckpointReader
from moequant.checkpoint.writer import (
    CheckpointWriter,
    partial_dir_for,
    resume_dir_for,
    save_tensors,
    shard_names,
    write_json_atomic,
    writing,
)
from moequant.compression.calibration import CalibSettings
from moequant.compression.record import Record
from moequant.errors import MoequantError
from moequant.recipe import Recipe

_STATE_FILE = "state.json"


def layer_key(layer: int) -> str:
    """The writer's key of layer ``layer``'s file."""
    return f"layer-{layer:05d}"


def fingerprint(reader: CheckpointReader, recipe: Recipe, method: str | None, calib: CalibSettings | None,
                form: OutputForm) -> str:
    """What a run must share with the partial run it resumes: version, source files and config, recipe,
    method, calibration settings and output form."""
    files = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in reader.files()]
    payload = json.dumps({"v": __version__, "config": reader.config, "files": files, "recipe": recipe.model_dump(),
                          "method": method, "calib": None if calib is None else vars(calib),
                          "form": [form.format, form.layout]}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_state(out: Path, fingerprint: str, shard_keys: list[str], calibrate: bool) -> dict | None:
    """The resume state of a partial run of ``out``, checked against the files it names.

    ``None`` when the run completed no layer (it starts over). A state that does not parse, or
    names files that are missing or of another size, is refused: a resumed run only ever
    continues from exactly what an uninterrupted one had at that layer.
    """
    resume_dir = resume_dir_for(out)
    state_file = resume_dir / _STATE_FILE
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(resume_dir, f"{_STATE_FILE} does not parse: {exc}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), str):
        raise _damaged(resume_dir, f"{_STATE_FILE} is not a resume state")
    if state["fingerprint"] != fingerprint:
        raise MoequantError(
            f"the partial run at {partial_dir_for(out)} used other settings or another source; rerun without "
            "--resume (with --overwrite) to start over"
        )
    problem = _state_problem(state, len(shard_keys) - 1, calibrate) or _files_problem(out, state, shard_keys)
    if problem:
        raise _damaged(resume_dir, problem)
    return state


def _state_problem(state: dict, n_layers: int, calibrate: bool) -> str | None:
    """What is wrong with the fields of a parsed resume state, or ``None``."""
    done = state.get("completed_layers")
    if type(done) is not int or not 1 <= done <= n_layers:
        return f"completed_layers is {done!r}, not a layer count from 1 to {n_layers}"
    expected = {"shards": dict, "modules": dict, "layers": list,
                "hidden": dict if calibrate else type(None), "calibration": dict if calibrate else type(None)}
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind):
            return f"{key} is {type(state.get(key)).__name__}, not {kind.__name__}"
    if len(state["layers"]) != done or not all(isinstance(r, dict) for r in state["layers"]):
        return f"layers does not hold one record for each of the {done} completed layers"
    if not all(type(size) is int for size in state["shards"].values()):
        return "shards holds a size that is not an integer"
    if calibrate and (state["hidden"].get("file") != _hidden_name(done) or type(state["hidden"].get("bytes")) is not int):
        return f"hidden does not name {_hidden_name(done)} and its size"
    return None


def _files_problem(out: Path, state: dict, shard_keys: list[str]) -> str | None:
    """Which file the state names is missing or of another size than recorded, or ``None``."""
    names = shard_names(shard_keys)
    expected = {names[k] for k in shard_keys[:state["completed_layers"]]}
    if set(state["shards"]) != expected:
        return f"it lists shards {sorted(state['shards'])}, not those of the completed layers {sorted(expected)}"
    files = {partial_dir_for(out) / name: size for name, size in state["shards"].items()}
    if state["hidden"] is not None:
        files[resume_dir_for(out) / state["hidden"]["file"]] = state["hidden"]["bytes"]
    for path, size in files.items():
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} holds {path.stat().st_size} bytes, not the {size} written"
    return None


def load_hidden(out: Path, state: dict) -> torch.Tensor:
    """The next layer's inputs that a checked resume state names, ``[samples, seqlen, hidden]``."""
    path = resume_dir_for(out) / state["hidden"]["file"]
    try:
        hidden = load_file(str(path)).get("hidden")
    except (OSError, SafetensorError) as exc:
        raise _damaged(path.parent, f"{path.name} does not load: {exc}") from exc
    calib = state["calibration"]
    if hidden is None or list(hidden.shape[:2]) != [calib.get("samples"), calib.get("seqlen")]:
        raise _damaged(path.parent, f"{path.name} does not hold the inputs of {calib.get('samples')} windows")
    return hidden


def _damaged(resume_dir: Path, what: str) -> MoequantError:
    return MoequantError(f"the resume state in {resume_dir} is damaged ({what}); rerun with --overwrite instead "
                         "of --resume to start over")


def _hidden_name(completed: int) -> str:
    return f"hidden-{completed:05d}.safetensors"


def save_state(writer: CheckpointWriter, fingerprint: str, completed: int, record: Record,
               calib_info: dict | None, hidden: torch.Tensor | None) -> None:
    """Record that ``completed`` layers are written, in one rename of the state file.

    The next layer's inputs go to a file named by the layer count, which only the new state
    names; the previous one is removed after the state is replaced.
    """
    resume_dir = writer.resume_dir
    with writing(resume_dir):
        resume_dir.mkdir(exist_ok=True)
    hidden_ref = None
    if hidden is not None:
        name = _hidden_name(completed)
        hidden_ref = {"file": name, "bytes": save_tensors(resume_dir / name, {"hidden": hidden.cpu()})}
    shards = {writer.shard_path(layer_key(i)).name: writer.shard_path(layer_key(i)).stat().st_size
              for i in range(completed)}
    write_json_atomic(resume_dir / _STATE_FILE, {
        "fingerprint": fingerprint, "completed_layers": completed, "shards": shards, "hidden": hidden_ref,
        "modules": record.modules, "layers": record.layers, "calibration": calib_info,
    })
    for stale in resume_dir.glob("hidden-*.safetensors"):
        if hidden_ref is None or stale.name != hidden_ref["file"]:
            stale.unlink()
