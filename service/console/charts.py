"""SVG charts drawn on the server: no script, no library, readable without colour.

Every chart has a ``<title>`` and ``<desc>``, axis titles with units, and carries its data as
``data-*`` attributes (``data-chart``, ``data-series``, ``data-value``, ``data-x``, ``data-y``) so a
test or a screen reader reads the numbers, not the pixels. Series differ by pattern, marker shape
and dash as well as by colour, and every bar or point has a text label.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

from markupsafe import Markup, escape

WIDTH = 560
_ids = itertools.count()
# Marker shape, dash pattern and colour per series: the shape and dash alone tell series apart.
_STYLES = [
    ("circle", "", "#1f5fa8"),
    ("square", "6 3", "#b3541e"),
    ("triangle", "2 3", "#2e7d32"),
    ("diamond", "10 3 2 3", "#6a3d9a"),
]


def _uid(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def format_number(value: float | int | None) -> str:
    """Short, exact enough for a label: 13 367, 0.648, 1.2e-05."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}".replace(",", "\u2009")
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3g}"
    return f"{value:.5g}"  # 0.99997 stays 0.99997: fidelity lives in the last digits


def before_after_bars(
    chart: str,
    title: str,
    unit: str,
    before: float,
    after: float,
    labels: tuple[str, str] = ("before", "after"),
    summary: str = "",
) -> Markup:
    """Before and after as two bars on one axis from zero; the after/before ratio in the description."""
    ratio = f"{after / before:.3g}x" if before else "n/a"
    return bars(
        chart,
        f"{title}: {ratio}" if before else title,
        unit,
        [(labels[0], before), (labels[1], after)],
        hatch_first=True,
        summary=f"{labels[1]} / {labels[0]} = {ratio}" + (f"; {summary}" if summary else ""),
    )


def bars(
    chart: str,
    title: str,
    unit: str,
    values: Sequence[tuple[str, float]],
    scale_max: float | None = None,
    summary: str = "",
    hatch_first: bool = False,
) -> Markup:
    """Horizontal bars from zero, labelled by name and value; with ``hatch_first`` the first ("before") is hatched."""
    uid = _uid(chart)
    top, bar, gap, left, right = 34, 24, 10, 150, 130
    height = top + len(values) * (bar + gap) + 40
    scale_max = scale_max or max([v for _, v in values] + [0]) or 1.0
    span = WIDTH - left - right
    desc = "; ".join(f"{name} {format_number(value)} {unit}" for name, value in values) + (
        f"; {summary}" if summary else ""
    )
    parts = [
        _open(uid, chart, title, desc, height),
        f'<defs><pattern id="{uid}-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#ffffff"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="#555" stroke-width="3"/></pattern></defs>',
    ]
    for index, (series, value) in enumerate(values):
        y = top + index * (bar + gap)
        length = max(span * value / scale_max, 1) if value else 0
        fill = f"url(#{uid}-hatch)" if index == 0 and hatch_first else "#1f5fa8"
        parts.append(f'<text x="{left - 8}" y="{y + bar / 2 + 5}" text-anchor="end">{escape(series)}</text>')
        parts.append(
            f'<rect class="bar" data-series="{escape(series)}" data-value="{value}" x="{left}" y="{y}" '
            f'width="{length:.1f}" height="{bar}" fill="{fill}" stroke="#333"><title>{escape(series)}: '
            f"{format_number(value)} {escape(unit)}</title></rect>"
        )
        parts.append(
            f'<text x="{left + length + 6:.1f}" y="{y + bar / 2 + 5}">{format_number(value)} '
            f"{escape(unit.split(',')[0])}</text>"
        )
    axis_y = top + len(values) * (bar + gap)
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + span}" y2="{axis_y}" stroke="#333"/>')
    for tick in _ticks(0, scale_max):
        x = left + span * tick / scale_max
        parts.append(
            f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#333"/>'
            f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle" class="tick">{format_number(tick)}</text>'
        )
    parts.append(
        f'<text x="{left + span / 2}" y="{height - 4}" text-anchor="middle" class="axis-title">{escape(unit)}</text>'
    )
    return Markup("".join(parts) + "</svg>")


def line_chart(
    chart: str,
    title: str,
    x_title: str,
    y_title: str,
    series: dict[str, Sequence[tuple[float, float]]],
    y_range: tuple[float, float] | None = None,
) -> Markup:
    """Lines with markers per series (epochs on x); each series has its own marker and dash."""
    return _xy_chart(chart, title, x_title, y_title, series, y_range)


def scatter_front(chart: str, title: str, x_title: str, y_title: str, points: Sequence[dict]) -> Markup:
    """Trials as points; the Pareto front joined by a dashed line; the chosen trial ringed and labelled.

    ``points``: dicts with ``x``, ``y``, ``label``, ``front`` (bool) and ``chosen`` (bool).
    """
    uid = _uid(chart)
    height, left, right, top, bottom = 320, 70, 20, 30, 52
    xs = [p["x"] for p in points] or [0.0]
    ys = [p["y"] for p in points] or [0.0]
    x0, x1 = _bounds(xs)
    y0, y1 = _bounds(ys)
    sx = lambda v: left + (WIDTH - left - right) * (v - x0) / (x1 - x0)  # noqa: E731
    sy = lambda v: height - bottom - (height - top - bottom) * (v - y0) / (y1 - y0)  # noqa: E731
    front = sorted((p for p in points if p.get("front")), key=lambda p: p["x"])
    chosen = [p for p in points if p.get("chosen")]
    desc = f"{len(points)} trials; {len(front)} on the Pareto front" + (
        f"; chosen: {chosen[0]['label']} ({format_number(chosen[0]['x'])}, {format_number(chosen[0]['y'])})"
        if chosen
        else ""
    )
    parts = [_open(uid, chart, title, desc, height)]
    parts += _axes(left, right, top, bottom, height, x0, x1, y0, y1, sx, sy, x_title, y_title)
    if len(front) > 1:
        path = " ".join(f"{sx(p['x']):.1f},{sy(p['y']):.1f}" for p in front)
        parts.append(
            f'<polyline class="front-line" points="{path}" fill="none" stroke="#b3541e" '
            f'stroke-dasharray="6 3" stroke-width="2"/>'
        )
    for point in points:
        x, y = sx(point["x"]), sy(point["y"])
        kind = "chosen" if point.get("chosen") else "front" if point.get("front") else "trial"
        shape = _marker(
            "square" if point.get("front") else "circle",
            x,
            y,
            5,
            "#b3541e" if point.get("front") else "#ffffff",
            "#333",
        )
        label = escape(point["label"])
        parts.append(
            f'<g class="point" data-kind="{kind}" data-front="{str(bool(point.get("front"))).lower()}" '
            f'data-chosen="{str(bool(point.get("chosen"))).lower()}" data-x="{point["x"]}" '
            f'data-y="{point["y"]}" data-label="{label}">{shape}<title>{label}: '
            f"{format_number(point['x'])}, {format_number(point['y'])}</title></g>"
        )
        if point.get("chosen"):
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="11" fill="none" stroke="#000" stroke-width="2"/>'
                f'<text x="{x + 14:.1f}" y="{y - 8:.1f}" class="chosen-label">chosen</text>'
            )
    legend_y = top - 12
    parts.append(
        f"{_marker('circle', left + 6, legend_y, 5, '#ffffff', '#333')}"
        f'<text x="{left + 16}" y="{legend_y + 4}">trial</text>'
        f"{_marker('square', left + 76, legend_y, 5, '#b3541e', '#333')}"
        f'<text x="{left + 86}" y="{legend_y + 4}">Pareto front</text>'
        f'<circle cx="{left + 196}" cy="{legend_y}" r="8" fill="none" stroke="#000" stroke-width="2"/>'
        f'<text x="{left + 210}" y="{legend_y + 4}">chosen</text>'
    )
    return Markup("".join(parts) + "</svg>")


# ---------------------------------------------------------------------------- private


def _open(uid: str, chart: str, title: str, desc: str, height: int) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{escape(chart)}" role="img" '
        f'viewBox="0 0 {WIDTH} {height}" width="100%" preserveAspectRatio="xMinYMin meet" '
        f'aria-labelledby="{uid}-title {uid}-desc"><title id="{uid}-title">{escape(title)}</title>'
        f'<desc id="{uid}-desc">{escape(desc)}</desc>'
        f'<text x="4" y="16" class="chart-title">{escape(title)}</text>'
    )


def _xy_chart(
    chart: str,
    title: str,
    x_title: str,
    y_title: str,
    series: dict[str, Sequence[tuple[float, float]]],
    y_range: tuple[float, float] | None,
) -> Markup:
    uid = _uid(chart)
    height, left, right, top, bottom = 300, 70, 20, 44, 52
    xs = [x for values in series.values() for x, _ in values] or [0.0]
    ys = [y for values in series.values() for _, y in values] or [0.0]
    x0, x1 = _bounds(xs, integer=True)
    y0, y1 = y_range or _bounds(ys)
    sx = lambda v: left + (WIDTH - left - right) * (v - x0) / (x1 - x0)  # noqa: E731
    sy = lambda v: height - bottom - (height - top - bottom) * (v - y0) / (y1 - y0)  # noqa: E731
    desc = "; ".join(
        f"{name}: " + ", ".join(f"{format_number(x)}: {format_number(y)}" for x, y in values)
        for name, values in series.items()
    )
    parts = [_open(uid, chart, title, desc, height)]
    parts += _axes(left, right, top, bottom, height, x0, x1, y0, y1, sx, sy, x_title, y_title, integer_x=True)
    for index, (name, values) in enumerate(series.items()):
        shape, dash, colour = _STYLES[index % len(_STYLES)]
        parts.append(f'<g class="series" data-series="{escape(name)}">')
        if len(values) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"'
                + (f' stroke-dasharray="{dash}"' if dash else "")
                + "/>"
            )
        for x, y in values:
            parts.append(
                f'<g class="point" data-x="{x}" data-y="{y}">'
                f"{_marker(shape, sx(x), sy(y), 4.5, colour, colour)}"
                f"<title>{escape(name)}, {escape(x_title)} {format_number(x)}: {format_number(y)}</title></g>"
            )
        parts.append("</g>")
        legend_x = left + 150 * index
        parts.append(
            f'<line x1="{legend_x}" y1="{top - 16}" x2="{legend_x + 26}" y2="{top - 16}" stroke="{colour}" '
            f'stroke-width="2"'
            + (f' stroke-dasharray="{dash}"' if dash else "")
            + "/>"
            + _marker(shape, legend_x + 13, top - 16, 4.5, colour, colour)
            + f'<text x="{legend_x + 32}" y="{top - 12}">{escape(name)}</text>'
        )
    return Markup("".join(parts) + "</svg>")


def _axes(
    left: float,
    right: float,
    top: float,
    bottom: float,
    height: float,
    x0: float,
    x1: float,
    y0: float,
    y1: float,
    sx,
    sy,
    x_title: str,
    y_title: str,
    integer_x: bool = False,
) -> list[str]:
    base, parts = height - bottom, []
    parts.append(
        f'<line x1="{left}" y1="{base}" x2="{WIDTH - right}" y2="{base}" stroke="#333"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#333"/>'
    )
    for tick in _ticks(x0, x1, integer=integer_x):
        x = sx(tick)
        parts.append(
            f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#333"/>'
            f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle" class="tick">{format_number(tick)}</text>'
        )
    for tick in _ticks(y0, y1):
        y = sy(tick)
        parts.append(
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{WIDTH - right}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 7}" y="{y + 4:.1f}" text-anchor="end" class="tick">{format_number(tick)}</text>'
        )
    parts.append(
        f'<text x="{(left + WIDTH - right) / 2}" y="{height - 6}" text-anchor="middle" class="axis-title">'
        f"{escape(x_title)}</text>"
        f'<text transform="translate(14 {(top + base) / 2}) rotate(-90)" text-anchor="middle" '
        f'class="axis-title">{escape(y_title)}</text>'
    )
    return parts


def _marker(shape: str, x: float, y: float, r: float, fill: str, stroke: str) -> str:
    if shape == "square":
        return (
            f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" fill="{fill}" '
            f'stroke="{stroke}"/>'
        )
    if shape == "triangle":
        return (
            f'<polygon points="{x:.1f},{y - r * 1.2:.1f} {x - r:.1f},{y + r:.1f} {x + r:.1f},{y + r:.1f}" '
            f'fill="{fill}" stroke="{stroke}"/>'
        )
    if shape == "diamond":
        return (
            f'<polygon points="{x:.1f},{y - r * 1.3:.1f} {x + r:.1f},{y:.1f} {x:.1f},{y + r * 1.3:.1f} '
            f'{x - r:.1f},{y:.1f}" fill="{fill}" stroke="{stroke}"/>'
        )
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}" stroke="{stroke}"/>'


def _bounds(values: Iterable[float], integer: bool = False) -> tuple[float, float]:
    values = list(values)
    low, high = min(values), max(values)
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
    elif not integer:
        pad = (high - low) * 0.08
        low, high = low - pad, high + pad
    return low, high


def _ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k) inside [low, high]."""
    span = high - low
    if span <= 0:
        return [low]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks
