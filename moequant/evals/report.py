"""Evaluation reports: the JSON record, its Markdown rendering and a per-layer chart."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

from moequant import __version__
from moequant.checkpoint.reader import CheckpointReader
from moequant.compression.record import RECORD_FILE
from moequant.errors import MoequantError
from moequant.evals.agreement import summarize
from moequant.evals.perplexity import perplexity, perplexity_stderr
from moequant.evals.streamed import EvalResult

PROTOCOL = (
    "whole text tokenised once without special tokens; consecutive non-overlapping windows of seqlen tokens "
    "(remainder dropped); each window scored on its own; perplexity = exp(mean NLL of every predicted token); "
    "stderr by the delta method over per-window mean NLL; KL(baseline || model) per predicted token"
)
REPORT_KEYS = (
    "model", "baseline", "dataset", "seqlen", "windows", "tokens", "windows_hash", "perplexity",
    "perplexity_stderr", "baseline_perplexity", "kl_divergence", "top1_agreement", "router_agreement",
    "router_agreement_per_layer", "hidden_error_per_layer", "bits_per_weight", "size_bytes",
    "baseline_size_bytes", "recipe", "moequant_version",
)
_PACKED_AUX = (".qzeros", ".scales", ".g_idx")


def windows_hash(windows: torch.Tensor) -> str:
    """SHA-256 of the token windows ``[W, L]`` (as int64, with their shape): equal data, equal hash."""
    data = windows.detach().to(device="cpu", dtype=torch.int64).contiguous()
    digest = hashlib.sha256(f"int64{list(data.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def checkpoint_size(path: str | Path) -> dict:
    """``bytes``, ``parameters`` and ``bits_per_weight`` of a checkpoint folder.

    From the ``totals`` of its ``moequant.json`` when present; otherwise the weight files' bytes
    and the parameter count of the original model (a packed module counts its ``[N, K]`` weight),
    with ``bits_per_weight = 8 * bytes / parameters``.
    """
    path = Path(path)
    record_file = path / RECORD_FILE
    if record_file.is_file():
        try:
            totals = json.loads(record_file.read_text())["totals"]
            return {"bytes": int(totals["bytes"]), "parameters": int(totals["parameters"]),
                    "bits_per_weight": float(totals["bits_per_weight"])}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    reader = CheckpointReader(path)
    params = 0
    for name in reader.names:
        if name.endswith(_PACKED_AUX):
            continue
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            params += reader.shape(module + ".g_idx")[0] * reader.shape(name)[1]
        else:
            params += reader.numel(name)
    size = reader.total_bytes()
    return {"bytes": size, "parameters": params, "bits_per_weight": 8 * size / max(params, 1)}


def recipe_of(path: str | Path) -> dict | None:
    """The ``recipe`` entry of a compressed checkpoint's ``moequant.json`` (``None`` for originals, or when the
    record is unreadable: it only labels the report)."""
    record_file = Path(path) / RECORD_FILE
    if not record_file.is_file():
        return None
    try:
        recipe = json.loads(record_file.read_text()).get("recipe")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return recipe if isinstance(recipe, dict) else None


def check_finite_scores(result: EvalResult) -> None:
    """Refuse to report scores that are not finite numbers, naming the windows that gave them.

    ``nll``/``base_nll``/``kl`` are ``[W, L-1]``; a NaN or Inf there comes from non-finite logits
    (weights or activations gone NaN/Inf), and a mean NLL past ``log`` of the largest float would
    overflow the perplexity.
    """
    scores = {"model": result.nll, "baseline": result.base_nll, "KL divergence": result.kl}
    for label, values in scores.items():
        if values is None:
            continue
        bad = (~torch.isfinite(values.reshape(values.shape[0], -1))).any(dim=1).nonzero().flatten().tolist()
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            source = "the model's and the baseline's logits" if label == "KL divergence" else f"the {label}'s logits"
            raise MoequantError(
                f"{source} are not finite (NaN or Inf) on windows {shown} of {values.shape[0]}, so there is no "
                f"{'KL divergence' if label == 'KL divergence' else 'perplexity'} to report; "
                "check the checkpoint with moequant inspect, or evaluate in --dtype float32"
            )
        mean = float(values.double().mean())
        if label != "KL divergence" and mean > math.log(sys.float_info.max):
            raise MoequantError(f"the {label}'s mean NLL is {mean:.1f} nats, so its perplexity overflows a float")


def build_report(result: EvalResult, model: str | Path, baseline: str | Path | None, dataset: str,
                 extra: dict | None = None) -> dict:
    """The report of one evaluation (see :data:`REPORT_KEYS`); ``extra`` adds settings such as the device."""
    check_finite_scores(result)
    w, seqlen = result.windows.shape
    size = checkpoint_size(model)
    base_size = checkpoint_size(baseline) if baseline is not None else None
    ppl = perplexity(result.nll)
    report: dict = {
        "model": str(model),
        "baseline": str(baseline) if baseline is not None else None,
        "dataset": dataset,
        "seqlen": int(seqlen),
        "windows": int(w),
        "tokens": int(result.nll.numel()),
        "windows_hash": windows_hash(result.windows),
        "protocol": PROTOCOL,
        "perplexity": ppl,
        "perplexity_stderr": perplexity_stderr(result.nll),
        "baseline_perplexity": None,
        "perplexity_change_pct": None,
        "kl_divergence": None,
        "top1_agreement": None,
        "router_agreement": None,
        "router_agreement_per_layer": None,
        "hidden_error_per_layer": None,
        "bits_per_weight": size["bits_per_weight"],
        "size_bytes": size["bytes"],
        "parameters": size["parameters"],
        "baseline_size_bytes": base_size["bytes"] if base_size else None,
        "baseline_bits_per_weight": base_size["bits_per_weight"] if base_size else None,
        "recipe": recipe_of(model),
        "layers": result.num_layers,
        "engine": result.engine,
        "time_s": round(result.time_s, 3),
        "tokens_per_s": round(result.windows.numel() / max(result.time_s, 1e-9), 1),
        "moequant_version": __version__,
    }
    if result.base_nll is not None:
        base_ppl = perplexity(result.base_nll)
        per_layer = result.router_agreement_per_layer() or []
        moe = [r for r in per_layer if r is not None]
        report.update(
            baseline_perplexity=base_ppl,
            baseline_perplexity_stderr=perplexity_stderr(result.base_nll),
            perplexity_change_pct=100.0 * (ppl / base_ppl - 1.0),
            kl_divergence=summarize(result.kl),
            top1_agreement=float(result.top1.double().mean()),
            router_agreement=sum(moe) / len(moe) if moe else None,
            router_agreement_per_layer=per_layer,
            hidden_error_per_layer=result.hidden_error,
        )
    report.update(extra or {})
    return report


def _fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def render_markdown(report: dict, chart: str | None = None) -> str:
    """A Markdown page of ``report``; ``chart`` is the file name of the per-layer chart, if any."""
    stderr = report.get("perplexity_stderr")
    ppl = _fmt(report["perplexity"]) + (f" ± {stderr:.4f}" if stderr is not None else "")
    lines = [
        f"# Evaluation of `{report['model']}`",
        "",
        f"Dataset `{report['dataset']}`, {report['windows']} windows of {report['seqlen']} tokens "
        f"({report['tokens']} predicted tokens), engine {report.get('engine', '-')}, moequant "
        f"{report['moequant_version']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| perplexity | {ppl} |",
        f"| size | {report['size_bytes']:,} bytes |",
        f"| bits per weight | {_fmt(report['bits_per_weight'], '.3f')} |",
    ]
    if report.get("baseline") is not None:
        kl = report["kl_divergence"]
        lines += [
            f"| baseline | `{report['baseline']}` |",
            f"| baseline perplexity | {_fmt(report['baseline_perplexity'])} |",
            f"| perplexity change | {_fmt(report['perplexity_change_pct'], '+.2f')} % |",
            f"| baseline size | {report['baseline_size_bytes']:,} bytes |",
            f"| KL(baseline ‖ model), mean / median / p99 (nats) | {kl['mean']:.5f} / {kl['median']:.5f} / "
            f"{kl['p99']:.5f} |",
            f"| top-1 agreement | {_fmt(report['top1_agreement'])} |",
            f"| router agreement (equal top-k sets) | {_fmt(report['router_agreement'])} |",
        ]
    if report.get("recipe"):
        lines.append(f"| recipe | {report['recipe'].get('name', '-')} |")
    lines += ["", f"Protocol: {report.get('protocol', PROTOCOL)}.", ""]
    per_layer = report.get("router_agreement_per_layer")
    if per_layer:
        errors = report.get("hidden_error_per_layer") or [None] * len(per_layer)
        lines += ["## Per layer", "", "| layer | router agreement | hidden-state error |", "|---|---|---|"]
        lines += [f"| {i} | {_fmt(r)} | {_fmt(e)} |" for i, (r, e) in enumerate(zip(per_layer, errors, strict=True))]
        lines.append("")
        lines.append("Hidden-state error: ||h_model - h_baseline|| / ||h_baseline|| of the layer's output over all "
                     "tokens.")
        lines.append("")
    if chart:
        lines += [f"![per-layer router agreement and hidden-state error]({chart})", ""]
    elif per_layer:
        lines += ["(No chart: matplotlib is not installed; pip install 'moequant[plot]'.)", ""]
    return "\n".join(lines)


def plot_layers(report: dict, path: str | Path) -> bool:
    """Chart per-layer router agreement and hidden-state error to ``path`` (PNG).

    Returns ``False`` (writing nothing) when matplotlib is missing or the report has no baseline.
    """
    per_layer = report.get("router_agreement_per_layer")
    if not per_layer:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = list(range(len(per_layer)))
    moe = [(i, r) for i, r in enumerate(per_layer) if r is not None]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.bar([i for i, _ in moe], [r for _, r in moe], color="tab:blue")
    top.set_ylabel("router agreement")
    lowest = min((r for _, r in moe), default=1.0)
    top.set_ylim(lowest * 0.98 if lowest > 0.5 else 0.0, 1.0)
    errors = report.get("hidden_error_per_layer")
    if errors:
        bottom.plot(layers, errors, marker="o", color="tab:red")
    bottom.set_ylabel("hidden-state rel. error")
    bottom.set_ylim(0, 1.15 * max(errors) if errors and max(errors) > 0 else 1.0)
    bottom.set_xlabel("layer")
    bottom.set_xticks(layers if len(layers) <= 32 else layers[::4])
    fig.suptitle(f"{Path(report['model']).name} vs {Path(report['baseline']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: dict, path: str | Path) -> dict[str, Path | None]:
    """Write ``path`` (JSON), the Markdown page beside it (``.md``) and the chart (``.png``).

    Returns the paths written; ``png`` is ``None`` when no chart could be drawn.
    """
    json_path = Path(path).expanduser()
    if json_path.suffix.lower() != ".json":
        raise MoequantError(f"report path {json_path} should end in .json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    png_path = json_path.with_suffix(".png")
    chart = plot_layers(report, png_path)
    md_path = json_path.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report, png_path.name if chart else None))
    return {"json": json_path, "md": md_path, "png": png_path if chart else None}


def load_report(path: str | Path) -> dict:
    """Read an evaluation report, refusing files that are not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MoequantError(f"no such report: {path}")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoequantError(f"{path} is not a JSON report ({exc})") from exc
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise MoequantError(f"{path} is not a moequant eval report (lacks {', '.join(missing[:3])})")
    fields = {key: (report.get(key), kinds) for key, kinds in _REPORT_TYPES.items()}
    if isinstance(report["kl_divergence"], dict):
        fields.update({f"kl_divergence.{k}": (report["kl_divergence"].get(k), _NUMBER) for k in ("mean", "median", "p99")})
    for key, (value, kinds) in fields.items():
        if not _is_kind(value, kinds):
            raise MoequantError(f"{path}: field {key} must be {' or '.join(_KIND_NAMES[k] for k in kinds)}, got "
                                f"{_short(value)}; re-create the report with moequant eval")
    return report


_NUMBER = (float,)
_REPORT_TYPES: dict[str, tuple] = {
    "model": (str,), "dataset": (str,), "seqlen": (int,), "windows": (int,), "tokens": (int,),
    "windows_hash": (str,), "perplexity": _NUMBER, "perplexity_stderr": (float, None),
    "baseline": (str, None), "baseline_perplexity": (float, None), "perplexity_change_pct": (float, None),
    "kl_divergence": (dict, None), "top1_agreement": (float, None), "router_agreement": (float, None),
    "router_agreement_per_layer": (list, None), "hidden_error_per_layer": (list, None),
    "bits_per_weight": _NUMBER, "size_bytes": (int,), "baseline_size_bytes": (int, None), "recipe": (dict, None),
    "moequant_version": (str,),
}
_KIND_NAMES = {str: "a string", int: "a whole number", float: "a number", dict: "an object", list: "a list",
               None: "null"}


def _is_kind(value: object, kinds: tuple) -> bool:
    """Whether a JSON ``value`` is one of ``kinds`` (``float`` takes any number, ``None`` null; never a bool)."""
    if value is None:
        return None in kinds
    if isinstance(value, bool):
        return False
    if isinstance(value, int) and (int in kinds or float in kinds):
        return True
    return any(k is not None and k is not int and isinstance(value, k) for k in kinds)


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
