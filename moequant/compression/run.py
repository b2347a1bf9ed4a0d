"""The compression run: one decoder layer at a time, from a checkpoint to packed low-bit weights.

For every layer: read its weights, quantise them (calibrated through the layer forward when any
module is solved by GPTQ, else rounded one tensor at a time), write the layer's file and save the
resume state; then the tensors outside the layers, the record and the config, and publish the
output folder in one rename.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moequant.arch.base import Architecture
from moequant.arch.registry import adapter_for
from moequant.calib import check_token_ids
from moequant.checkpoint.against_config import check_tensors
from moequant.checkpoint.output_form import output_form, stored_tensors
from moequant.checkpoint.reader import CheckpointReader, resolve_source
from moequant.checkpoint.writer import (
    CheckpointWriter,
    check_output,
    output_lock,
    partial_dir_for,
    recover_output,
)
from moequant.compression import parallel
from moequant.compression.calibration import CalibSettings, calibration_ids, windows_per_chunk
from moequant.compression.job import Job
from moequant.compression.layer import calibrated_layer, global_tensors, rounded_layer
from moequant.compression.plan import plan
from moequant.compression.record import Record, finish_record, write_metadata
from moequant.compression.resume import fingerprint, layer_key, load_hidden, load_state, save_state
from moequant.device import resolve_device
from moequant.errors import MoequantError
from moequant.memory import map_large_blocks, release_freed_memory
from moequant.numeric import check_int
from moequant.progress import Progress
from moequant.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from moequant.budget.plan import Budget

_GLOBALS_KEY = "globals"


@dataclass
class CompressResult:
    """What :func:`compress` produced: the output folder and its record (``moequant.json``)."""

    path: Path
    record: dict


def open_original(source: Path, allow_pickle: bool = False) -> tuple[CheckpointReader, Architecture]:
    """The 16-bit checkpoint at ``source``, read and checked against its config, and its family."""
    reader = CheckpointReader(source, allow_pickle=allow_pickle)
    if reader.config.get("quantization_config"):
        raise MoequantError(f"{source} is already quantised; start from the original 16-bit checkpoint")
    arch = adapter_for(reader.config)
    check_tensors(reader, arch)
    return reader, arch


def _holding_output_lock(fn):
    """Run ``fn(model, out, ...)`` holding the lock on writing ``out`` (rank 0 of an expert-parallel run)."""

    @functools.wraps(fn)
    def locked(model, out, *args, **kwargs):
        if not parallel.current().leader:
            return fn(model, out, *args, **kwargs)
        with output_lock(Path(out).expanduser().resolve()):
            return fn(model, out, *args, **kwargs)

    return locked


@_holding_output_lock
def compress(
    model: str | Path,
    out: str | Path,
    recipe: str | Path | Recipe = "a4e3",
    method: str | None = None,
    device: str = "auto",
    calib: CalibSettings | None = None,
    overwrite: bool = False,
    resume: bool = False,
    allow_pickle: bool = False,
    expert_batch: int = 0,
    progress: Progress | None = None,
    output_format: str = "gptq",
    layout: str | None = None,
    budget: Budget | None = None,
) -> CompressResult:
    """Compress the MoE checkpoint ``model`` into ``out``.

    Args:
        model: local checkpoint folder or hub id.
        out: output folder; written complete or not at all, by one run at a time.
        recipe: built-in recipe name, YAML path or a :class:`Recipe`.
        method: ``gptq`` or ``rtn`` to override the recipe's solver for every module.
        device: ``auto``, ``cpu`` or ``cuda``.
        calib: calibration settings (only used when some module is solved with GPTQ).
        overwrite: replace an existing ``out``.
        resume: continue a partial run of the same settings from its last completed layer.
        allow_pickle: accept pickled ``.bin`` weights (loaded with ``weights_only=True``).
        expert_batch: experts solved together (0: all experts of a layer at once).
        progress: receives progress events.
        output_format: ``gptq`` or ``compressed-tensors`` (:data:`~moequant.checkpoint.output_form.FORMATS`).
        layout: the module names written (the family's ``layouts``; None: its first, the one vLLM reads).
        budget: plan the widths of ``recipe``'s modules to fit it first (:func:`moequant.budget.make_plan`);
            the plan is written beside the recipe as ``plan.yaml``, and a resumed run replays it.

    Under ``torchrun`` each rank solves its share of every layer's experts and rank 0 writes the
    output (:mod:`moequant.compression.parallel`); the result is that of one process.
    """
    group = parallel.current()
    progress = (progress or Progress()) if group.leader else Progress()
    calib = calib or CalibSettings()
    map_large_blocks()
    if method is not None and method not in ("gptq", "rtn"):
        raise MoequantError(f"unknown method {method!r}; use gptq or rtn")
    check_int(expert_batch, "--expert-batch", 0, meaning="experts solved together; 0: all of a layer")
    started = time.perf_counter()
    source = resolve_source(model)
    out_path = Path(out).expanduser().resolve()
    partial = partial_dir_for(out_path)
    if group.leader:
        note = recover_output(out_path)
        if note:
            progress.note(note)
        check_output(out_path, source, overwrite, resume)
        if partial.exists() and not resume and not overwrite:
            raise MoequantError(f"a partial run of {out_path} exists at {partial}; pass --resume to continue it or "
                                "--overwrite to start over")
    group.barrier()
    reader, arch = open_original(source, allow_pickle)
    recipe_obj = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    dev = group.device(resolve_device(device))
    budget_plan = None
    if budget is not None:
        from moequant.budget.plan import PLAN_FILE, check_size, plan_run  # the planner builds on compression

        budget_plan = plan_run(out_path, reader, arch, recipe_obj, budget, output_form(arch, output_format, layout),
                               calib, dev, progress, resume, expert_batch)
        recipe_obj = budget_plan.recipe
    specs = plan(arch, recipe_obj, method)
    form = output_form(arch, output_format, layout, specs)
    calibrate = any(s is not None and s.method == "gptq" for s in specs.values())

    run_fingerprint = fingerprint(reader, recipe_obj, method, calib if calibrate else None, form)
    n_layers = arch.config.num_layers
    shard_keys = [layer_key(i) for i in range(n_layers)] + [_GLOBALS_KEY]
    state = load_state(out_path, run_fingerprint, shard_keys, calibrate) if resume else None
    start_layer = 0
    hidden: torch.Tensor | None = None
    calib_info: dict | None = None
    if state is None and calibrate:
        ids, calib_info = calibration_ids(source, calib, arch, progress)
        check_token_ids(ids, reader.shape(arch.embed_name)[0], arch.embed_name)
        hidden = reader.get(arch.embed_name, dtype=torch.float32, device=dev)[ids.to(dev)]
    group.barrier()  # every rank has read the resume state before rank 0 starts a fresh one
    writer = CheckpointWriter(out_path, shard_keys, fresh=state is None) if group.leader else None
    if budget_plan is not None and writer is not None:
        budget_plan.save(writer.resume_dir)
    job = Job(reader, arch, recipe_obj, specs, dev, progress, windows=windows_per_chunk(calib, arch),
              expert_batch=expert_batch or arch.config.num_experts, form=form, group=group)
    record = Record()
    if state is not None:
        start_layer = state["completed_layers"]
        record, calib_info = Record(state["modules"], state["layers"]), state["calibration"]
        if calibrate:
            hidden = load_hidden(out_path, state).to(dev)
        progress.note(f"resuming from layer {start_layer} of {n_layers}")

    progress.begin(n_layers, f"compressing {source.name}")
    for layer in range(start_layer):
        progress.advance(layer)
    try:
        for layer in range(start_layer, n_layers):
            t0 = time.perf_counter()
            job.phases.seconds = {}
            if calibrate:
                tensors, layer_record = calibrated_layer(job, record, layer, hidden)
            else:
                tensors, layer_record = rounded_layer(job, record, layer)
            layer_record["time_s"] = round(time.perf_counter() - t0, 3)
            if job.phases.seconds:
                layer_record["phases_s"] = {name: round(sec, 3) for name, sec in job.phases.seconds.items()}
            if writer is not None:
                writer.write_shard(layer_key(layer), stored_tensors(form, arch, specs, tensors))
            del tensors  # not held while the next layer is computed
            record.layers.append(layer_record)
            if writer is not None:
                save_state(writer, run_fingerprint, layer + 1, record, calib_info, hidden)
            release_freed_memory()
            progress.advance(layer, layer_record)
    except BaseException:
        if writer is not None and not record.layers:  # nothing worth resuming: leave no partial folder behind
            shutil.rmtree(writer.resume_dir, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        progress.end()

    if writer is None:  # the other ranks' part is done; rank 0 writes the rest
        group.barrier()
        return CompressResult(path=out_path, record={})
    writer.write_shard(_GLOBALS_KEY, stored_tensors(form, arch, specs, global_tensors(job, record, hidden)))
    out_bytes = sum(writer.shard_path(k).stat().st_size for k in shard_keys)
    result = finish_record(job, record, source, calib_info, method, out_bytes, time.perf_counter() - started)
    if budget_plan is not None:
        result["plan"] = {"file": PLAN_FILE, **budget_plan.summary}
        writer.write_text(PLAN_FILE, budget_plan.text)
    write_metadata(job, writer, source, result)
    if budget is not None and budget.size is not None:
        check_size(writer.partial, budget.size)
    final = writer.finish(overwrite=overwrite)
    group.barrier()
    return CompressResult(path=final, record=result)
