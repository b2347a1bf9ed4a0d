"""Lazy, per-tensor reading of Hugging Face checkpoints (local folders or hub ids)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moequant.arch.base import TensorView
from moequant.arch.registry import canonical_views
from moequant.checkpoint.compressed_tensors import is_compressed_tensors, present_as_gptq
from moequant.errors import MoequantError, first_line

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = ("pytorch_model.bin", "model.pt", "model.bin")
PICKLE_INDEX = "pytorch_model.bin.index.json"
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def resolve_source(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for ``model``: the folder itself, or a hub snapshot downloaded on demand.

    Only safetensors, JSON and tokenizer files are fetched from the hub; no code is ever run.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MoequantError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path.resolve()
    text = str(model)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise MoequantError(f"no such folder: {text}; pass a checkpoint folder or a hub id like org/name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise MoequantError("reading hub ids needs huggingface_hub; pip install huggingface_hub") from exc
    try:
        local = snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise MoequantError(
            f"could not fetch {text} from the hub ({first_line(exc)}); when offline, pass a local checkpoint folder"
        ) from exc
    return Path(local)


def _read_json(file: Path):
    """The JSON value in ``file``, or a one-line refusal that says what is wrong with it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MoequantError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise MoequantError(f"{file} is not UTF-8 text; it must be a JSON file") from exc
    except RecursionError as exc:
        raise MoequantError(f"{file} nests too deeply to be a checkpoint's JSON file") from exc


class SafetensorsFile:
    """One safetensors file, read with plain positional reads instead of a memory map.

    Reading through ``pread`` keeps only the tensors asked for in memory: a memory map would
    leave every page it touched counted in the process's resident memory until it is closed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 8, 0)
            if len(head) < 8:
                raise ValueError("file shorter than a safetensors header")
            header_len = int.from_bytes(head, "little")
            if header_len > size - 8 or header_len > 100_000_000:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(os.pread(self._fd, header_len, 8))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (OSError, ValueError, RecursionError) as exc:
            self._close_quietly()
            raise MoequantError(f"shard {path.name} is truncated or corrupt ({exc}); re-download it") from exc
        header.pop("__metadata__", None)
        self._base = 8 + header_len
        try:
            self.entries = _entries(path.name, header)
        except MoequantError:
            self._close_quietly()
            raise
        end = max((stop for *_, stop in self.entries.values()), default=0)
        if self._base + end != size:
            self._close_quietly()
            raise MoequantError(
                f"shard {path.name} is truncated or corrupt (expected {self._base + end} bytes, found {size}); "
                "re-download it"
            )

    def _close_quietly(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str, part: TensorView | None = None) -> torch.Tensor:
        """Tensor ``name``, or the contiguous part of it that ``part`` names."""
        dtype, shape, start, stop = self.entries[name]
        if part is not None:
            size = dtype.itemsize
            start, shape = start + part.offset * size, part.shape
            stop = start + size * math.prod(shape)
        buf = bytearray(stop - start)
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [view[done:]], self._base + start + done)
            if n <= 0:
                raise MoequantError(f"shard {self.path.name} ended while reading {name}; the file may be truncated")
            done += n
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._close_quietly()


def _entries(file: str, header: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``name -> (dtype, shape, start, stop)`` of a safetensors header, each entry checked.

    As the safetensors library requires, the byte ranges must tile the data from its first byte:
    each tensor starts where the one before it ends, none overlaps another and none leaves a gap.
    """
    entries = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            start, stop = (_natural_number(v) for v in info["data_offsets"])
            shape = tuple(_natural_number(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MoequantError(f"shard {file} has a malformed entry for {name}; re-download it") from exc
        if stop - start != math.prod(shape) * dtype.itemsize:
            raise MoequantError(f"shard {file} is corrupt: {name} does not fit its byte range")
        entries[name] = (dtype, shape, start, stop)
    end, last = 0, None
    for name, (*_, start, stop) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if start != end:
            what = f"overlaps {last}" if start < end else f"leaves a gap after {last or 'the header'}"
            raise MoequantError(f"shard {file} is corrupt: the bytes of {name} {what}; re-download it")
        end, last = stop, name
    return entries


def _natural_number(value) -> int:
    """A JSON integer of at least 0 (a bool, float or string is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count of bytes or elements")
    return value


class CheckpointReader:
    """Tensors of one checkpoint, read one at a time.

    Nothing is loaded at construction but the headers; :meth:`get` reads a single tensor.
    Pickled weights (``.bin``/``.pt``) are refused unless ``allow_pickle`` is set, in which case
    they are loaded with ``torch.load(weights_only=True)``. Tensors that the architecture stores
    fused (a layer's experts in one tensor) are listed and read under their per-module names, each
    read taking only its own bytes.
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MoequantError(f"no such folder: {self.path}")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise MoequantError(f"{self.path} has no config.json; pass a Hugging Face checkpoint folder")
        self.config: dict = _read_json(config_file)
        if not isinstance(self.config, dict):
            raise MoequantError(f"{config_file} is not a JSON object")
        self._weight_map: dict[str, Path] = {}
        self._handles: dict[Path, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self._views: dict[str, TensorView] = {}
        self._derived: dict[str, _Derived] = {}
        self._zeros_v2 = False
        self._consumed: dict[str, Path] = {}
        self._discover(allow_pickle)
        self.source_format = "compressed-tensors" if is_compressed_tensors(self.config.get("quantization_config")) \
            else None
        if self.source_format:
            present_as_gptq(self)
        self.add_views(canonical_views(self.config, {n: self.shape(n) for n in self._weight_map}))
        if not self.config.get("quantization_config") and any(n.endswith(".qweight") for n in self._weight_map):
            self._adopt_quant_config_file()
        qcfg = self.config.get("quantization_config")
        if self.source_format is None and isinstance(qcfg, dict) and qcfg:
            self.source_format = "gptq"
        self._zeros_v2 = isinstance(qcfg, dict) and str(qcfg.get("checkpoint_format", "")).lower() == "gptq_v2"

    def _adopt_quant_config_file(self) -> None:
        """Take the quantisation config of packed weights from ``quantize_config.json``.

        AutoGPTQ-era checkpoints keep it only there, not in config.json; vLLM reads it there too.
        """
        for name in QUANT_CONFIG_FILES:
            file = self.path / name
            if not file.is_file():
                continue
            qcfg = _read_json(file)
            if not isinstance(qcfg, dict) or not qcfg:
                raise MoequantError(f"{file} is not a JSON object of quantisation settings")
            self.config["quantization_config"] = qcfg
            return

    def _discover(self, allow_pickle: bool) -> None:
        index = self.path / SAFE_INDEX
        single = self.path / SAFE_SINGLE
        if index.is_file():
            self._read_index(index)
        elif single.is_file():
            self._open(single)
            for name in self._handles[single].keys():
                self._weight_map[name] = single
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if shards:
                self._read_unindexed(shards)
            else:
                self._discover_pickle(allow_pickle)
        if not self._weight_map:
            raise MoequantError(f"{self.path} holds no tensors")

    def _read_unindexed(self, shards: list[Path]) -> None:
        """Shards without an index: each tensor must lie in exactly one of them."""
        for shard in shards:
            self._open(shard)
            for name in self._handles[shard].keys():
                if name in self._weight_map:
                    raise MoequantError(
                        f"tensor {name} is in both {self._weight_map[name].name} and {shard.name}, and no "
                        f"{SAFE_INDEX} says which to use; remove the stray shard or add the index"
                    )
                self._weight_map[name] = shard

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = _read_json(index)["weight_map"]
        except (KeyError, TypeError) as exc:
            raise MoequantError(f"{index} is not a valid safetensors index (needs a weight_map)") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MoequantError(f"{index} is not a valid safetensors index: its weight_map must map tensor names to "
                                "shard file names")
        for shard_name in sorted(set(weight_map.values())):
            shard = self.path / shard_name
            if not shard.is_file():
                raise MoequantError(f"{index.name} names shard {shard_name}, which is missing from {self.path}")
            self._open(shard)
        for name, shard_name in weight_map.items():
            shard = self.path / shard_name
            if name not in self._keys(shard):
                raise MoequantError(f"{index.name} places {name} in {shard_name}, which does not hold it")
            self._weight_map[name] = shard

    def _discover_pickle(self, allow_pickle: bool) -> None:
        pickled = [self.path / n for n in PICKLE_SINGLE if (self.path / n).is_file()]
        if (self.path / PICKLE_INDEX).is_file():
            pickled = sorted(self.path.glob("pytorch_model-*.bin"))
        if not pickled:
            raise MoequantError(f"{self.path} has no model.safetensors, no safetensors index and no shards")
        if not allow_pickle:
            raise MoequantError(
                f"{self.path} holds pickled weights ({pickled[0].name}); convert them to safetensors, "
                "or pass --allow-pickle if you trust the file"
            )
        self._pickled = {}
        for file in pickled:
            try:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise MoequantError(f"cannot read {file.name}: {first_line(exc)}") from exc
            self._pickled.update(part)
            for name in part:
                self._weight_map[name] = file

    def _open(self, shard: Path) -> None:
        self._handles[shard] = SafetensorsFile(shard)

    def _keys(self, shard: Path) -> set[str]:
        return set(self._handles[shard].keys())

    def stored_module(self, module: str) -> str:
        """The name under which the checkpoint stores module ``module`` (its canonical name)."""
        for suffix in (".qweight", ".weight"):
            view = self._views.get(module + suffix)
            if view is not None and view.offset == 0 and view.source.endswith(suffix):
                return view.source[: -len(suffix)]
        return module

    def add_views(self, views: dict[str, TensorView]) -> None:
        """Present each view under its name, in place of the tensors the views lie in."""
        for name, view in views.items():
            if view.source not in self._weight_map or view.source in self._views:
                raise MoequantError(f"view {name} lies in {view.source}, which the checkpoint does not hold")
            if view.offset < 0 or view.offset + math.prod(view.shape) > self.numel(view.source):
                raise MoequantError(f"{name} would lie past the end of {view.source} {list(self.shape(view.source))}")
        for name, view in views.items():
            self._views[name] = view
            self._weight_map[name] = self._weight_map[view.source]
        for source in {v.source for v in views.values()}:
            del self._weight_map[source]

    # -- queries -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._weight_map)

    def has(self, name: str) -> bool:
        return name in self._weight_map

    def shard_of(self, name: str) -> Path:
        return self._weight_map[name]

    def files(self) -> list[Path]:
        return sorted(set(self._weight_map.values()))

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        if name in self._views:
            return self._views[name].shape
        if name in self._derived:
            return self._derived[name].shape
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return self._handles[self._weight_map[name]].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        self._require(name)
        source = self._views[name].source if name in self._views else name
        if source in self._derived:
            return self._derived[source].dtype
        if self._pickled is not None:
            return self._pickled[source].dtype
        return self._handles[self._weight_map[name]].entries[source][0]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
            check_finite: bool = False) -> torch.Tensor:
        """Read one tensor (optionally cast, moved, and checked for NaN/Inf)."""
        self._require(name)
        view = self._views.get(name)
        source = view.source if view is not None else name
        if source in self._derived:
            tensor = self._derived[source].read()
            if view is not None and (view.offset or tuple(view.shape) != tuple(tensor.shape)):
                tensor = tensor.reshape(-1)[view.offset:view.offset + math.prod(view.shape)].reshape(view.shape)
        elif self._pickled is not None:
            tensor = self._pickled[source]
            if view is not None:
                tensor = tensor.reshape(-1)[view.offset:view.offset + math.prod(view.shape)].reshape(view.shape)
        else:
            tensor = self._handles[self._weight_map[name]].get(source, view)
        if self._zeros_v2 and name.endswith(".qzeros"):
            tensor = self._v2_zeros_as_v1(name, tensor)
        if device is not None:
            tensor = tensor.to(device)
        if dtype is not None:
            tensor = tensor.to(dtype)
        if check_finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = "NaN" if torch.isnan(tensor).any() else "Inf"
            raise MoequantError(f"tensor {name} in {self._weight_map[name].name} contains {bad} values")
        return tensor

    def add_derived(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[], torch.Tensor],
                    beside: str) -> None:
        """Present tensor ``name`` (``shape``, ``dtype``), computed by ``read()`` from stored ones, as if it
        lay in the shard of tensor ``beside``."""
        self._derived[name] = _Derived(shape, dtype, read)
        self._weight_map[name] = self._weight_map.get(beside) or self._consumed[beside]

    def consume(self, name: str) -> None:
        """Stop presenting stored tensor ``name``: tensors derived from it stand for it (see :meth:`read_consumed`)."""
        self._consumed[name] = self._weight_map.pop(name)

    def read_consumed(self, name: str) -> torch.Tensor:
        """A stored tensor that the checkpoint presents only through tensors derived from it."""
        if name not in self._consumed:
            raise MoequantError(f"tensor {name} is missing from the checkpoint at {self.path}")
        if self._pickled is not None:
            return self._pickled[name]
        return self._handles[self._consumed[name]].get(name)

    def _v2_zeros_as_v1(self, name: str, qzeros: torch.Tensor) -> torch.Tensor:
        """``qzeros`` of format ``gptq_v2`` (zero points as they are) in the v1 layout (``z - 1``)."""
        from moequant.packed.bitstream import pack_qzeros, unpack_qzeros

        scales = name[: -len("qzeros")] + "scales"
        columns = self.shape(scales)[-1] if self.has(scales) else 0
        if not columns or qzeros.dim() != 2 or (qzeros.shape[-1] * 32) % columns:
            raise MoequantError(f"cannot tell the bits of {name} {list(qzeros.shape)} from {scales}")
        bits = qzeros.shape[-1] * 32 // columns
        zeros = unpack_qzeros(qzeros.to(torch.int32), bits) - 1
        if zeros.numel() and int(zeros.min()) < 1:
            raise MoequantError(
                f"{name} holds zero points of 0 (format gptq_v2), which the v1 layout moequant runs cannot "
                "hold; quantise that module symmetrically or with zero points of 1 or more"
            )
        return pack_qzeros(zeros, bits)

    def _require(self, name: str) -> None:
        if name not in self._weight_map:
            raise MoequantError(f"tensor {name} is missing from the checkpoint at {self.path}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class _Derived:
    """A tensor computed from others of the checkpoint when read (a GPTQ tensor of another format)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

