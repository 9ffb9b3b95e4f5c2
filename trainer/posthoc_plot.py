"""The sweep's plot: score against sigma_rel, one panel (one line) per measure, drawn with Pillow.

Pillow is already a dependency (sample grids); a few lines of drawing spare the project a plotting
library for one figure. Fixed-decay EMAs of the same run appear as dashed horizontal lines; the
best profile is ringed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline.storage import atomic_write

_W, _PANEL_H, _LEFT, _RIGHT, _TOP, _BOTTOM = 760, 230, 78, 24, 30, 44
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def plot_scores(rows: Sequence[dict[str, Any]], measures: Sequence[tuple[str, str]], path: str | Path,
                best: dict[str, Any] | None = None, best_key: str | None = None, title: str = "") -> Path:
    """Write a PNG: for each (key, label) of ``measures`` a panel of rows[key] against rows['sigma_rel'];
    ``best`` is ringed in the panel of ``best_key``, the measure it was chosen by."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    img = Image.new("RGB", (_W, _TOP + _PANEL_H * len(measures) + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((_LEFT, 8), title, fill="black", font=font)
    curve = sorted((r for r in rows if r.get("sigma_rel") is not None), key=lambda r: r["sigma_rel"])
    xs = [r["sigma_rel"] for r in curve]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x_lo, x_hi = (x_lo - 0.05 * (x_hi - x_lo or 1), x_hi + 0.05 * (x_hi - x_lo or 1))
    for p, (key, label) in enumerate(measures):
        top = _TOP + p * _PANEL_H
        box = (_LEFT, top + 10, _W - _RIGHT, top + _PANEL_H - _BOTTOM)
        values = [r[key] for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        if not values:
            continue
        y_lo, y_hi = min(values), max(values)
        pad = 0.08 * (y_hi - y_lo or abs(y_hi) or 1.0)
        y_lo, y_hi = y_lo - pad, y_hi + pad

        def to_px(x: float, y: float, box=box, y_lo=y_lo, y_hi=y_hi) -> tuple[float, float]:
            return (box[0] + (x - x_lo) / (x_hi - x_lo) * (box[2] - box[0]),
                    box[3] - (y - y_lo) / (y_hi - y_lo) * (box[3] - box[1]))

        draw.rectangle(box, outline="black")
        for y in _ticks(y_lo, y_hi):
            _, py = to_px(x_lo, y)
            draw.line((box[0] - 4, py, box[0], py), fill="black")
            draw.text((4, py - 6), f"{y:.4g}", fill="black", font=font)
        for x in _ticks(x_lo, x_hi, 7):
            px, _ = to_px(x, y_lo)
            draw.line((px, box[3], px, box[3] + 4), fill="black")
            draw.text((px - 12, box[3] + 6), f"{x:.3g}", fill="black", font=font)
        draw.text((box[0] + 6, box[1] + 4), label, fill="black", font=font)
        draw.text((box[2] - 60, box[3] + 20), "sigma_rel", fill="black", font=font)
        colour = _COLOURS[p % len(_COLOURS)]
        pts = [to_px(r["sigma_rel"], r[key]) for r in curve if isinstance(r.get(key), int | float)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        for r in rows:  # fixed decays: no sigma_rel, a dashed level across the panel
            if r.get("sigma_rel") is None and isinstance(r.get(key), int | float):
                _, py = to_px(x_lo, r[key])
                for x0 in range(box[0], box[2], 12):
                    draw.line((x0, py, min(x0 + 6, box[2]), py), fill=(90, 90, 90))
                draw.text((box[0] + 6, py + 2), r["profile"], fill=(90, 90, 90), font=font)
        if best is not None and key == best_key and best.get("sigma_rel") is not None:
            px, py = to_px(best["sigma_rel"], best[key])
            draw.ellipse((px - 7, py - 7, px + 7, py + 7), outline="black", width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue(), what="sweep plot")
