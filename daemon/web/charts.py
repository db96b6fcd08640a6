"""The Overview's charts as SVG made on the server: no JavaScript, nothing fetched by the browser.

Pure: numbers in, an SVG string out. Every piece of text is escaped here (labels are category names
from the config, but an SVG is markup all the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

# Colours per outcome, and a palette for categories; chosen to read on white and for colour-blind eyes.
OUTCOME_COLOURS = {"filed": "#2b7bb9", "unsure": "#e6a700", "failed": "#c0392b", "quarantined": "#7d3c98"}
PALETTE = ("#2b7bb9", "#e6a700", "#009e73", "#c0392b", "#7d3c98", "#56b4e9", "#d55e00", "#444444")
WIDTH, HEIGHT = 720, 220
_LEFT, _BOTTOM, _TOP = 40, 30, 10


def _frame(title: str, body: list[str], legend: list[tuple[str, str]]) -> str:
    items = []
    x = _LEFT
    for name, colour in legend:
        items.append(f'<rect x="{x}" y="{HEIGHT + 8}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{HEIGHT + 17}" font-size="11">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT + 26}" '
            f'width="{WIDTH}" height="{HEIGHT + 26}" font-family="sans-serif"><title>{escape(title)}</title>'
            + "".join(body) + "".join(items) + "</svg>")


def _axis(top_value: float, fmt: str) -> list[str]:
    out = []
    plot_h = HEIGHT - _BOTTOM - _TOP
    for i in range(5):
        value = top_value * i / 4
        y = HEIGHT - _BOTTOM - plot_h * i / 4
        out.append(f'<line x1="{_LEFT}" x2="{WIDTH - 5}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{fmt.format(value)}</text>')
    return out


def stacked_bars(title: str, days: Sequence[tuple[str, Mapping[str, int]]],
                 colours: Mapping[str, str] = OUTCOME_COLOURS) -> str:
    """One bar per day, stacked by outcome (``days``: (YYYY-MM-DD, {outcome: count}) oldest first)."""
    # Rounded up to a multiple of 4, so the four grid lines fall on whole messages.
    peak = -(-max([sum(c.values()) for _, c in days] + [1]) // 4) * 4
    plot_w, plot_h = WIDTH - _LEFT - 5, HEIGHT - _BOTTOM - _TOP
    step = plot_w / max(len(days), 1)
    body = _axis(peak, "{:.0f}")
    for i, (day, counts) in enumerate(days):
        y = HEIGHT - _BOTTOM
        x = _LEFT + i * step + step * 0.1
        for outcome, colour in colours.items():
            n = counts.get(outcome, 0)
            if not n:
                continue
            h = plot_h * n / peak
            y -= h
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{step * 0.8:.1f}" height="{h:.1f}" fill="{colour}">'
                        f'<title>{escape(day)}: {n} {escape(outcome)}</title></rect>')
        if i % max(1, len(days) // 6) == 0:
            body.append(f'<text x="{x:.1f}" y="{HEIGHT - _BOTTOM + 14}" font-size="10">{escape(day[5:])}</text>')
    return _frame(title, body, list(colours.items()))


def lines(title: str, xs: Sequence[str], series: Mapping[str, Sequence[float | None]]) -> str:
    """One line per series over ``xs`` on a 0..100% axis; None is a gap (nothing to measure)."""
    plot_w, plot_h = WIDTH - _LEFT - 5, HEIGHT - _BOTTOM - _TOP
    step = plot_w / max(len(xs) - 1, 1)
    body = _axis(100, "{:.0f}%")
    legend = []
    for n, (name, values) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        legend.append((name, colour))
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        coords = [(_LEFT + i * step, HEIGHT - _BOTTOM - plot_h * v) for i, v in points]
        if len(coords) > 1:
            body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                        + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
        for (x, y), (i, v) in zip(coords, points, strict=True):
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}">'
                        f'<title>{escape(name)} week of {escape(xs[i])}: {v:.1%}</title></circle>')
    for i, x in enumerate(xs):
        body.append(f'<text x="{_LEFT + i * step:.1f}" y="{HEIGHT - _BOTTOM + 14}" font-size="10" '
                    f'text-anchor="middle">{escape(x[5:])}</text>')
    return _frame(title, body, legend)
