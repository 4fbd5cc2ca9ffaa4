"""SVG charts of the HTML report (no matplotlib): ablation bars against random controls, and a
faithfulness curve on a log axis. Every mark has a ``data-info`` tooltip."""

from __future__ import annotations

import math

from ._html import escape
from .ablation import AblationReport
from .faithfulness import FaithfulnessCurve


def _svg(width: int, height: int, body: list[str], kind: str) -> str:
    return (
        f'<svg class="si-chart si-{kind}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
        f'font-size="11">{"".join(body)}</svg>'
    )


def _scale(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    low, high = min(finite + [0.0]), max(finite + [0.0])
    if high == low:
        high = low + 1.0
    pad = 0.08 * (high - low)
    return (low - pad if low < 0 else low), high + pad


def ablation_chart(report: AblationReport) -> str:
    """Bars for the full model, the subnetwork kept / removed and the empty model, then each
    density-matched control as a dot with their mean and standard deviation."""
    names = ["full", "kept", "removed", "empty"]
    values = [report.full, report.kept, report.removed, report.empty]
    colours = ["#9e9e9e", "#1f77b4", "#ff7f0e", "#d9d9d9"]
    controls = report.controls.tolist()
    low, high = _scale(values + controls)
    left, top, plot_h, bar = 60, 34, 220, 70
    width = left + bar * (5 if controls else 4) + 30
    y = lambda v: top + plot_h * (high - v) / (high - low)  # noqa: E731
    body = [
        f'<line x1="{left}" y1="{y(0.0):.1f}" x2="{width - 10}" y2="{y(0.0):.1f}" stroke="#999"/>',
        f'<text x="8" y="14" fill="#555">{escape(report.metric)}</text>',
    ]
    for tick in (low, (low + high) / 2, high):
        body.append(
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" fill="#777">'
            f"{tick:.3g}</text>"
        )
    for i, (name, value, colour) in enumerate(zip(names, values, colours, strict=True)):
        x = left + bar * i + 10
        y0, y1 = sorted((y(0.0), y(value)))
        info = f"{name}: {escape(report.metric)} {value:.4g}"
        body.append(
            f'<rect class="bar" x="{x}" y="{y0:.1f}" width="{bar - 20}" height="{y1 - y0:.1f}" '
            f'fill="{colour}" data-info="{info}"><title>{info}</title></rect>'
            f'<text x="{x + (bar - 20) / 2}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{name}</text>"
        )
    if controls:
        x = left + bar * 4 + 10 + (bar - 20) / 2
        for j, value in enumerate(controls):
            dx = (j / max(1, len(controls) - 1) - 0.5) * (bar - 30)
            info = f"{report.control_kind} control {j}: {value:.4g}"
            body.append(
                f'<circle class="control" cx="{x + dx:.1f}" cy="{y(value):.1f}" r="3" '
                f'fill="#2ca02c" data-info="{info}"><title>{info}</title></circle>'
            )
        mean, std = report.control_mean, report.control_std
        if math.isfinite(std):
            body.append(
                f'<line x1="{x}" y1="{y(mean - std):.1f}" x2="{x}" y2="{y(mean + std):.1f}" '
                'stroke="#000"/>'
            )
        body.append(
            f'<line x1="{x - 12}" y1="{y(mean):.1f}" x2="{x + 12}" y2="{y(mean):.1f}" '
            f'stroke="#000" stroke-width="2"/><text x="{x}" y="{top + plot_h + 16}" '
            f'text-anchor="middle">{len(controls)} {report.control_kind}</text>'
        )
    return _svg(width, top + plot_h + 30, body, "ablation")


def faithfulness_chart(curve: FaithfulnessCurve) -> str:
    """Faithfulness against circuit size (fraction of scored weights, log axis; a size of 0 is
    left out), with ``f = 1`` and ``f = 0`` dashed and CPR / CMD above."""
    points = [(d, f) for d, f in zip(curve.densities, curve.faithfulness, strict=True) if d > 0]
    left, top, plot_w, plot_h = 60, 30, 420, 200
    values = [f for _, f in points if math.isfinite(f)] + [0.0, 1.0]
    low, high = _scale(values)
    xs = [math.log10(d) for d, _ in points] or [0.0]
    x_low, x_high = min(xs), max(xs)
    if x_high == x_low:
        x_low -= 1
    x = lambda d: left + plot_w * (math.log10(d) - x_low) / (x_high - x_low)  # noqa: E731
    y = lambda v: top + plot_h * (high - v) / (high - low)  # noqa: E731
    body = [
        f'<text x="{left}" y="16">{escape(curve.ablation)} ablation: CPR {curve.cpr:.3f} '
        f"(higher is better), CMD {curve.cmd:.3f} (lower)</text>",
        f'<text x="14" y="{top + plot_h / 2}" fill="#555" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">faithfulness</text>',
    ]
    for level, colour in ((1.0, "#999"), (0.0, "#ccc")):
        body.append(
            f'<line x1="{left}" y1="{y(level):.1f}" x2="{left + plot_w}" y2="{y(level):.1f}" '
            f'stroke="{colour}" stroke-dasharray="5,4"/><text x="{left - 6}" '
            f'y="{y(level) + 4:.1f}" text-anchor="end" fill="#777">{level:g}</text>'
        )
    finite = [(d, f) for d, f in points if math.isfinite(f)]
    if len(finite) > 1:
        line = " ".join(f"{x(d):.1f},{y(f):.1f}" for d, f in finite)
        body.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for d, f in finite:
        info = f"density {d:g}: faithfulness {f:.4f}"
        body.append(
            f'<circle class="point" cx="{x(d):.1f}" cy="{y(f):.1f}" r="4" fill="#1f77b4" '
            f'data-info="{info}"><title>{info}</title></circle>'
        )
    for d, _ in points:
        body.append(
            f'<text x="{x(d):.1f}" y="{top + plot_h + 16}" text-anchor="middle" fill="#777">'
            f"{d:g}</text>"
        )
    body.append(
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 32}" text-anchor="middle">'
        "circuit size (fraction of scored weights, log scale)</text>"
    )
    return _svg(left + plot_w + 30, top + plot_h + 40, body, "faithfulness")


__all__ = ["ablation_chart", "faithfulness_chart"]
