"""From the per-case records to what a person reads: report.md and two PNG plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from . import core
from . import shapes as S
from .contenders import BASELINE_VARIANT, CONTENDERS, MODERN_LOOP, REFERENCE, ROOFLINE_FAMILIES, SGD_REFERENCE, VARIANTS

SUMMARY_VARIANTS = ("momentum", "momentum+proj")


def derive(records: list[dict]) -> list[dict]:
    """Add GB/s, the fraction of the roofline and the speed-ups to every timed record (in place).

    The roofline of a shape set and dtype is the best GB/s among the in-place streams measured
    in the same run (SGD, Adam, w += g): what this machine's memory gives a read-modify-write
    multi-tensor step. ``copy_`` is shown for information only: on a CPU it is slower than
    in-place streams, so a fraction of it could exceed 100%."""
    timed = [r for r in records if r.get("status") == "ok" and r.get("median_s")]
    index = {(r["label"], r["dtype"], r["contender"], r["variant"]): r for r in timed}
    for r in timed:
        r["gbps"] = r["bytes_per_step"] / r["median_s"] / 1e9
    roofline: dict[tuple, dict] = {}
    for r in timed:
        key = (r["label"], r["dtype"])
        if r["family"] in ROOFLINE_FAMILIES and not r.get("wrong_results") and (key not in roofline or r["gbps"] > roofline[key]["gbps"]):
            roofline[key] = r
    for r in timed:
        best = roofline.get((r["label"], r["dtype"]))
        r["roofline_gbps"] = best["gbps"] if best else None
        r["roofline_contender"] = best["contender"] if best else None
        r["roofline_fraction"] = r["gbps"] / best["gbps"] if best else None
        copy = index.get((r["label"], r["dtype"], "copy", BASELINE_VARIANT))
        r["copy_gbps"] = copy["gbps"] if copy else None
        ref = index.get((r["label"], r["dtype"], REFERENCE, r["variant"]))
        r["speedup_vs_ref"] = ref["median_s"] / r["median_s"] if ref and r["family"] == "alig" else None
        loop = index.get((r["label"], r["dtype"], MODERN_LOOP, r["variant"]))
        r["speedup_vs_modern_loop"] = loop["median_s"] / r["median_s"] if loop and r["family"] == "alig" else None
        sgd = index.get((r["label"], r["dtype"], SGD_REFERENCE, BASELINE_VARIANT))
        r["speedup_vs_sgd"] = sgd["median_s"] / r["median_s"] if sgd and r["family"] not in ("copy", "stream") else None
    return records


# -- formatting ----------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _gbps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


_ORDER = {key: i for i, key in enumerate(CONTENDERS)}
_VARIANT_ORDER = {key: i for i, key in enumerate(VARIANTS)}


def _sort_key(r: dict):
    return (r["family"] != "alig", _VARIANT_ORDER.get(r["variant"], 99), _ORDER.get(r["contender"], 99))


# -- report.md -----------------------------------------------------------------------------


def markdown(data: dict) -> str:
    env, records = data["environment"], data["records"]
    timed = [r for r in records if r.get("status") == "ok" and r.get("median_s")]
    lines = [f"# ALI-G step benchmarks: {env['device_name']}", ""]
    lines += _environment_table(env, data)
    lines += ["", *_how_to_read()]

    models = [r for r in timed if r["set"] in core.MODEL_SETS]
    if models:
        lines += ["", "## Summary: fastest FusedALIG backend", ""]
        lines += _summary(models)
    by_group: dict[tuple, list[dict]] = defaultdict(list)
    for r in models:
        by_group[(r["label"], r["dtype"])].append(r)
    for (label, dtype), rows in by_group.items():
        first = rows[0]
        roof, copy = first.get("roofline_gbps"), first.get("copy_gbps")
        notes = []
        if roof:
            notes.append(f"roofline {roof:.3g} GB/s: {CONTENDERS[first['roofline_contender']].name}")
        if copy:
            notes.append(f"copy_ {copy:.3g} GB/s")
        lines += [
            "",
            f"## {label}, {dtype}: {first['n_tensors']:,} tensors, N = {first['n_elements']:,} elements"
            + (f" ({'; '.join(notes)})" if notes else ""),
            "",
        ]
        lines += _case_table(sorted(rows, key=_sort_key))
        wrong = [r["wrong_results"] for r in rows if r.get("wrong_results")]
        if wrong:
            lines += [""] + [f"- {message}" for message in wrong]

    for set_name, title, x_name in (
        ("sweep_tensors", "Tensor-count sweep (fp32, 4,096 elements per tensor, ALI-G with momentum): ms/step", "tensors"),
        ("sweep_params", f"Parameter-count sweep (fp32, {S.SWEEP_TENSORS} equal tensors, ALI-G with momentum): ms/step", "params"),
    ):
        rows = [r for r in timed if r["set"] == set_name]
        if rows:
            lines += ["", f"## {title}", ""]
            lines += _sweep_table(rows, x_name)

    lines += _not_run(records)
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in data["notes"]]
    plots = data.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _environment_table(env: dict, data: dict) -> list[str]:
    rows = [
        ["device", f"{env['device']} ({env['gpu'] or 'CPU'})"],
        ["CPU", f"{env['cpu_model']} ({env['cpu_count']} logical CPUs), torch threads: {env['torch_threads']}"],
        ["torch / CUDA / triton", f"{env['torch']} / {env['cuda'] or '-'} / {env['triton'] or '-'}"],
        ["python", f"{env['python']} on {env['platform']}"],
        ["alig_fused", f"{env['alig_fused']} (git {env['git'] or '?'})"],
        ["backends", ", ".join(f"{k}: {v}" for k, v in env["backends"].items())],
        ["pytorch_optimizer", env["pytorch_optimizer"] or "not installed"],
        ["timing", data.get("timing", "?")],
        ["options", data.get("command", "")],
        ["date (UTC)", env["date"]],
    ]
    return _table(["", ""], rows)


def _how_to_read() -> list[str]:
    return [
        "How to read: *ms/step* is the median over rounds of one `step()` with the gradients already",
        "in place (warm-up first; IQR = spread between the 1st and 3rd quartile). *vs ref loop*: how many",
        "times faster than the per-parameter ALI-G loop of the reference repository with the same options",
        "(its calls transcribed; *vs loop today*: the same loop written with today's torch calls);",
        "*vs SGD*: torch SGD (foreach, Nesterov) time / this time (> 1 = faster than SGD). *GB/s* counts",
        "the bytes the algorithm must move, *traffic* x N x element size: ALI-G 6N with momentum, 8N with",
        "momentum and projection, 4N / 5N without momentum; SGD Nesterov 5N; Adam 7N (reads w, g, m, v;",
        "writes w, m, v); in-place add `w += g` 3N; copy 2N. *% roofline* compares with the best GB/s of",
        "the in-place streams (SGD, Adam, `w += g`) on the same tensors in the same run (`copy_` is",
        "slower than those on a CPU, so it is no ceiling). Every contender runs on its own copy of the",
        "same parameters and gradients; all state is in the parameters' dtype. FusedALIG times are",
        "refused (the case fails) if any step was skipped.",
    ]


def _summary(models: list[dict]) -> list[str]:
    rows = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in models:
        groups[(r["label"], r["dtype"])].append(r)
    for (label, dtype), group in groups.items():
        for variant in SUMMARY_VARIANTS:
            fused = [r for r in group if r["contender"].startswith("fused_") and r["variant"] == variant]
            if not fused:
                continue
            best = min(fused, key=lambda r: r["median_s"])
            ref = next((r for r in group if r["contender"] == REFERENCE and r["variant"] == variant), None)
            sgd = next((r for r in group if r["contender"] == SGD_REFERENCE), None)
            rows.append(
                [
                    label,
                    dtype,
                    variant,
                    best["contender_name"],
                    _ms(best["median_s"]),
                    _ms(ref and ref["median_s"]),
                    _x(best["speedup_vs_ref"]),
                    _x(best["speedup_vs_modern_loop"]),
                    _ms(sgd and sgd["median_s"]),
                    _x(best["speedup_vs_sgd"]),
                    _gbps(best["gbps"]),
                    _pct(best["roofline_fraction"]),
                ]
            )
    header = ["set", "dtype", "ALI-G", "fastest", "ms/step", "ref loop ms", "vs ref loop", "vs loop today", "SGD foreach ms", "vs SGD", "GB/s", "% roofline"]
    return _table(header, rows)


def _case_table(rows: list[dict]) -> list[str]:
    header = ["contender", "variant", "ms/step", "IQR ms", "rounds x steps", "vs ref loop", "vs SGD", "traffic", "GB/s", "% roofline"]
    body = [
        [
            r["contender_name"] + (" (wrong results: see below)" if r.get("wrong_results") else ""),
            r["variant"],
            _ms(r["median_s"]),
            _ms(r["iqr_s"]),
            f"{r['rounds']} x {r['iterations']}",
            _x(r["speedup_vs_ref"]),
            _x(r["speedup_vs_sgd"]),
            f"{r['transfers_per_element']}N",
            _gbps(r["gbps"]),
            _pct(r["roofline_fraction"]),
        ]
        for r in rows
    ]
    return _table(header, body)


def _sweep_table(rows: list[dict], x_name: str) -> list[str]:
    contenders = sorted({r["contender"] for r in rows}, key=lambda k: _ORDER.get(k, 99))
    points = sorted({r["point"] for r in rows})
    cell = {(r["point"], r["contender"]): r for r in rows}
    body = []
    for point in points:
        x = f"{point:,}" if x_name == "tensors" else f"2^{point.bit_length() - 1} ({_count(point)})"
        body.append([x] + [_ms(cell[(point, c)]["median_s"]) if (point, c) in cell else "-" for c in contenders])
    return _table([x_name] + [CONTENDERS[c].name for c in contenders], body)


def _not_run(records: list[dict]) -> list[str]:
    lines = []
    reasons: dict[tuple, list[str]] = defaultdict(list)
    for r in records:
        if r.get("status") in ("skipped", "failed"):
            reasons[(r["status"], r["contender_name"], r["reason"])].append(r["id"])
    if reasons:
        lines += ["", "## Not run", ""]
        for (status, name, reason), ids in sorted(reasons.items()):
            first = ", ".join(ids[:3]) + (f", ... ({len(ids)} cases)" if len(ids) > 3 else "")
            lines.append(f"- **{status}** {name}: {reason} [{first}]")
    return lines


# -- plots ---------------------------------------------------------------------------------


def plots(data: dict, out: Path) -> tuple[list[Path], str]:
    """The two log-log plots; ([], why) when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [], f"no plots: matplotlib is not installed ({exc})"
    timed = [r for r in data["records"] if r.get("status") == "ok" and r.get("median_s")]
    footer = core.environment_line(data["environment"])
    written = []
    for set_name, filename, xlabel, title in (
        ("sweep_params", "time_vs_params.png", f"parameters (elements, {S.SWEEP_TENSORS} equal tensors)", "time per step vs parameter count"),
        ("sweep_tensors", "time_vs_tensor_count.png", "tensors (4,096 elements each)", "time per step vs tensor count"),
    ):
        rows = [r for r in timed if r["set"] == set_name]
        if not rows:
            continue
        x_key = "n_elements" if set_name == "sweep_params" else "n_tensors"
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for key in sorted({r["contender"] for r in rows}, key=lambda k: _ORDER.get(k, 99)):
            series = sorted((r[x_key], r["median_s"] * 1e3) for r in rows if r["contender"] == key)
            style = "--" if CONTENDERS[key].family != "alig" else "-"
            color = plt.get_cmap("tab20")(_ORDER.get(key, 0) * 2 % 20)
            ax.plot([x for x, _ in series], [y for _, y in series], style, marker="o", ms=3, color=color, label=CONTENDERS[key].name)
            if set_name == "sweep_params":  # the model sets of the same run, as crosses
                points = [(r["n_elements"], r["median_s"] * 1e3) for r in _model_points(timed) if r["contender"] == key]
                ax.plot([x for x, _ in points], [y for _, y in points], "x", ms=6, color=color)
        if set_name == "sweep_params":
            _mark_models(ax, timed)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"{title} (fp32, ALI-G momentum 0.9)" + (";  x = model sets" if set_name == "sweep_params" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.text(0.01, 0.005, footer, fontsize=6, color="0.35")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = out / filename
        fig.savefig(path, dpi=120, metadata={"Description": footer})
        plt.close(fig)
        written.append(path)
    return written, ""


def _model_points(timed: list[dict]) -> list[dict]:
    """Model-set cases comparable with the sweep: fp32, ALI-G with momentum, or a baseline."""
    return [
        r
        for r in timed
        if r["set"] in core.MODEL_SETS and r["dtype"] == "fp32" and r["variant"] in ("momentum", BASELINE_VARIANT)
    ]


def _mark_models(ax, timed: list[dict]) -> None:
    """A labelled vertical line at each model set's parameter count."""
    for r in _model_points(timed):
        if r["contender"] == "copy":
            ax.axvline(r["n_elements"], color="0.8", lw=0.8, zorder=0)
            ax.text(r["n_elements"], 0.98, f" {r['label']}", transform=ax.get_xaxis_transform(), fontsize=7, rotation=90, va="top", color="0.4")
