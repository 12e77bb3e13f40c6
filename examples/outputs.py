"""What both demos (digits.py, lm.py) write, and how: the plots, ``summary.md`` and
``results.json``, and the helpers their summaries share."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

__all__ = ["curves_to_lists", "markdown_table", "strict_json", "write_outputs"]


def curves_to_lists(curves: Any) -> dict:
    """A dataclass of per-step series as lists: each device series stacked once and brought to
    the host (one sync per series), the others copied."""
    out = {}
    for name, values in asdict(curves).items():
        if values and isinstance(values[0], Tensor):
            out[name] = torch.stack(values).double().cpu().tolist()
        else:
            out[name] = list(values)
    return out


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table with padded columns (also readable as plain text)."""
    cells = [[str(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def strict_json(x: Any) -> Any:
    """``x`` with every non-finite float as None (strict JSON has no NaN or Infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def write_outputs(results: dict, out: str, plotters: Mapping[str, Callable], summary: Callable[[dict], str]) -> dict:
    """Into ``out``: each plot ``plotters[name](plt, results)`` (a figure, or None for none) as
    the PNG ``name``, ``summary(results)`` as summary.md, ``results`` as results.json. Sets and
    returns ``results["files"]`` (name -> path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    files = {}
    for name, plotter in plotters.items():
        fig = plotter(plt, results)
        if fig is None:
            continue
        files[name] = os.path.join(out, name)
        fig.savefig(files[name], dpi=110, bbox_inches="tight")
        plt.close(fig)
    files["summary.md"] = os.path.join(out, "summary.md")
    files["results.json"] = os.path.join(out, "results.json")
    results["files"] = files
    with open(files["summary.md"], "w") as f:
        f.write(summary(results))
    with open(files["results.json"], "w") as f:
        json.dump(strict_json(results), f, indent=1)
    return files
