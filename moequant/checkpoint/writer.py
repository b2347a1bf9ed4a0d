"""Writing a checkpoint so that it appears complete or not at all.

Everything goes into a hidden sibling folder ``.<OUT>.moequant-partial`` first: one safetensors
file per unit of work (a decoder layer, or the tensors outside the layers), each written to a
temporary name and renamed when whole. :meth:`CheckpointWriter.finish` numbers the shards,
writes the index and the small files, and renames the folder to ``OUT`` in one step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moequant.errors import MoequantError

SHARD_DIR = "shards"
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def partial_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.moequant-partial"


def check_output(out: Path, source: Path | None, overwrite: bool, resume: bool = False) -> None:
    """Refuse outputs that would lose data: inside the source, equal to it, or existing."""
    out = out.resolve()
    if source is not None:
        src = source.resolve()
        if out == src or src in out.parents:
            raise MoequantError(f"output {out} is inside the source checkpoint {src}; choose a folder outside it")
        if out in src.parents:
            raise MoequantError(f"output {out} contains the source checkpoint {src}; choose another folder")
    if out.exists() and not overwrite:
        raise MoequantError(f"{out} already exists; pass --overwrite to replace it or choose another folder")
    if out.exists() and not out.is_dir():
        raise MoequantError(f"{out} exists and is not a folder; remove it or choose another output")
    if resume and not partial_dir_for(out).is_dir():
        raise MoequantError(f"nothing to resume: no partial run at {partial_dir_for(out)}; run without --resume")


class CheckpointWriter:
    """Shards of one output checkpoint, written into a partial folder and published at the end."""

    def __init__(self, out: str | os.PathLike, fresh: bool = True) -> None:
        self.out = Path(out).resolve()
        self.partial = partial_dir_for(self.out)
        if fresh and self.partial.exists():
            shutil.rmtree(self.partial)
        (self.partial / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def shard_path(self, key: str) -> Path:
        return self.partial / SHARD_DIR / f"{key}.safetensors"

    def has_shard(self, key: str) -> bool:
        return self.shard_path(key).is_file()

    def write_shard(self, key: str, tensors: dict[str, torch.Tensor]) -> int:
        """Write one unit's tensors atomically; returns the bytes written."""
        path = self.shard_path(key)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
        return path.stat().st_size

    def write_json(self, name: str, data: object) -> None:
        write_json_atomic(self.partial / name, data)

    def write_text(self, name: str, text: str) -> None:
        tmp = self.partial / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.partial / name)

    def copy_file(self, src: Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.partial / (name or src.name))

    def finish(self, shard_order: list[str], overwrite: bool) -> Path:
        """Number the shards, write the index and move the folder into place.

        ``shard_order`` lists the unit keys in the order their files should be numbered.
        """
        total = len(shard_order)
        weight_map: dict[str, str] = {}
        total_size = 0
        for i, key in enumerate(shard_order, start=1):
            src = self.shard_path(key)
            if not src.is_file():
                raise MoequantError(f"internal: shard {key} was never written; rerun with --resume")
            final_name = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
            from safetensors import safe_open

            with safe_open(str(src), framework="pt") as f:
                for name in f.keys():
                    weight_map[name] = final_name
            total_size += src.stat().st_size
            os.replace(src, self.partial / final_name)
        if total > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            write_json_atomic(self.partial / "model.safetensors.index.json", index)
        shutil.rmtree(self.partial / SHARD_DIR, ignore_errors=True)
        for leftover in self.partial.glob("*.tmp"):
            leftover.unlink()
        resume_state = self.partial / "resume"
        if resume_state.exists():
            shutil.rmtree(resume_state)
        if self.out.exists():
            if not overwrite:
                raise MoequantError(f"{self.out} appeared while compressing; pass --overwrite to replace it")
            old = self.out.parent / f".{self.out.name}.moequant-old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.partial, self.out)
        return self.out


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
