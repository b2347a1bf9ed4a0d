"""Writing a checkpoint so that it appears complete or not at all.

A run that writes the output folder ``OUT`` keeps everything in hidden siblings of it:

- ``.OUT.moequant-partial/``: the output being built, every file under its final name (one
  safetensors shard per unit of work: a decoder layer, or the tensors outside the layers);
- ``.OUT.moequant-resume/``: what a resumed run needs; its content belongs to the caller;
- ``.OUT.moequant-lock``: locked (``flock``) for as long as a run writes ``OUT``;
- ``.OUT.moequant-old/``: under ``--overwrite``, the previous ``OUT`` between the two renames
  that swap the new one in.

:meth:`CheckpointWriter.finish` writes the index and publishes the partial folder with one rename
(two when it replaces an existing ``OUT``); :func:`recover_output` undoes a swap that a killed run
left half done. Failed writes become a one-line :class:`MoequantError` naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moequant.errors import MoequantError

INDEX_FILE = "model.safetensors.index.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def partial_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.moequant-partial"


def resume_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.moequant-resume"


def old_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.moequant-old"


def lock_path_for(out: Path) -> Path:
    return out.parent / f".{out.name}.moequant-lock"


def shard_names(keys: list[str]) -> dict[str, str]:
    """The file name of each unit's shard: ``model.safetensors`` alone, else ``model-i-of-n``."""
    if len(keys) == 1:
        return {keys[0]: "model.safetensors"}
    return {key: f"model-{i:05d}-of-{len(keys):05d}.safetensors" for i, key in enumerate(keys, start=1)}


def write_error(path: Path, exc: OSError) -> MoequantError:
    """A failed write to ``path`` as one line that says what to do."""
    if exc.errno in _NO_SPACE:
        fix = ("free some space there (or choose another --output) and rerun; with --resume it continues "
               "from the last completed layer")
    elif exc.errno in _NOT_WRITABLE:
        fix = "that folder is not writable; choose another --output"
    else:
        fix = "fix that and rerun; with --resume it continues from the last completed layer"
    return MoequantError(f"cannot write {path}: {exc.strerror or exc}; {fix}")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` (or safetensors' I/O error) raised while writing ``path`` into one line."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from exc
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise write_error(path, OSError(int(code.group(1)), os.strerror(int(code.group(1))))) from exc


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write ``tensors`` as one safetensors file at ``path``; returns its size in bytes."""
    with writing(path):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        os.chmod(path, _FILE_MODE)
        return path.stat().st_size


def write_json_atomic(path: Path, data: object) -> None:
    """Replace ``path`` with ``data`` as JSON in one rename: readers see the old file or the new one."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        tmp.write_text(text)
        os.replace(tmp, path)


def check_output(out: Path, source: Path | None, overwrite: bool, resume: bool = False) -> None:
    """Refuse outputs that would lose data: inside the source, equal to it, or existing."""
    out = out.resolve()
    if source is not None:
        src = source.resolve()
        if out == src or src in out.parents:
            raise MoequantError(f"output {out} is inside the source checkpoint {src}; choose a folder outside it")
        if out in src.parents:
            raise MoequantError(f"output {out} contains the source checkpoint {src}; choose another folder")
    if resume and not partial_dir_for(out).is_dir():
        if out.is_dir():
            raise MoequantError(f"nothing to resume: {out} is complete; run without --resume")
        raise MoequantError(f"nothing to resume: no partial run at {partial_dir_for(out)}; run without --resume")
    if out.exists() and not overwrite:
        raise MoequantError(f"{out} already exists; pass --overwrite to replace it or choose another folder")
    if out.exists() and not out.is_dir():
        raise MoequantError(f"{out} exists and is not a folder; remove it or choose another output")
    if overwrite and out.exists() and old_dir_for(out).exists():
        raise MoequantError(
            f"{old_dir_for(out)} is left from an earlier --overwrite of {out} (the output it replaced); "
            "delete it or move it away, then rerun"
        )


def recover_output(out: Path) -> str | None:
    """Undo what a killed run left half done around ``out``; returns a note for the user, if any.

    A run killed between the two renames of an ``--overwrite`` swap leaves ``OUT`` only in
    ``.OUT.moequant-old``: it is put back. Resume state without a partial folder belongs to a
    run that published its output before it was killed: it is removed.
    """
    old, partial, resume = old_dir_for(out), partial_dir_for(out), resume_dir_for(out)
    note = None
    if old.is_dir() and not out.exists():
        with writing(out):
            os.replace(old, out)
        note = f"put {out} back from {old}, where a killed --overwrite run had moved it"
        if partial.is_dir():
            note += f"; its replacement is in {partial} (rerun with --resume to finish it)"
    if resume.is_dir() and not partial.exists():
        shutil.rmtree(resume)
    return note


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on writing ``out`` (released by the OS if the process dies)."""
    path = lock_path_for(out)
    fd = _acquire(path, out)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MoequantError(
                f"another moequant run is writing {out}; wait for it to end or choose another --output"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed the file as we opened it: lock the new one


class CheckpointWriter:
    """Shards of one output checkpoint, written into a partial folder and published at the end.

    ``shard_keys`` lists the units of work in the order their shards are numbered.
    """

    def __init__(self, out: str | os.PathLike, shard_keys: list[str], fresh: bool = True) -> None:
        self.out = Path(out).resolve()
        self.partial = partial_dir_for(self.out)
        self.resume_dir = resume_dir_for(self.out)
        self.names = shard_names(shard_keys)
        if fresh:
            shutil.rmtree(self.resume_dir, ignore_errors=True)
            shutil.rmtree(self.partial, ignore_errors=True)
        with writing(self.partial):
            self.partial.mkdir(parents=True, exist_ok=True)

    def shard_path(self, key: str) -> Path:
        return self.partial / self.names[key]

    def write_shard(self, key: str, tensors: dict[str, torch.Tensor]) -> int:
        """Write one unit's tensors; returns the bytes written."""
        return save_tensors(self.shard_path(key), tensors)

    def write_json(self, name: str, data: object) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        with writing(self.partial / name):
            (self.partial / name).write_text(text)

    def copy_file(self, src: Path, name: str | None = None) -> None:
        with writing(self.partial / (name or src.name)):
            shutil.copyfile(src, self.partial / (name or src.name))

    def finish(self, overwrite: bool) -> Path:
        """Write the index, move the partial folder into place and drop the resume state."""
        if len(self.names) > 1:
            self.write_json(INDEX_FILE, self._index())
        if self.out.exists():
            if not overwrite:
                raise MoequantError(f"{self.out} appeared while compressing; pass --overwrite to replace it")
            old = old_dir_for(self.out)
            with writing(self.out.parent):
                os.replace(self.out, old)
                os.replace(self.partial, self.out)
            shutil.rmtree(old)
        else:
            with writing(self.out.parent):
                os.replace(self.partial, self.out)
        shutil.rmtree(self.resume_dir, ignore_errors=True)
        return self.out

    def _index(self) -> dict:
        weight_map: dict[str, str] = {}
        total_size = 0
        for key, name in self.names.items():
            path = self.partial / name
            if not path.is_file():
                raise MoequantError(f"internal: shard {key} was never written; rerun with --resume")
            with safe_open(str(path), framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), name))
            total_size += path.stat().st_size
        return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
