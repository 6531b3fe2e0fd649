"""Pictures a chemist reads: a frame with boxes coloured by class, and the fraction over time.

Figures use matplotlib's ``Figure`` with the Agg canvas (no pyplot global state), so they can
be redrawn after every frame in ``--watch`` from any thread.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from crystalscope.figures import new_figure, png_bytes
from crystalscope.monitor.timeline import Timeline

#: Box colours (RGB); classes beyond these get the fallback colour.
CLASS_COLOURS = {"cex": (70, 170, 255), "pg": (255, 80, 40)}
FALLBACK_COLOUR = (255, 220, 0)
REJECTED_COLOUR = (200, 200, 200)


def overlay_jpeg(image: Image.Image, particles: list[dict]) -> bytes:
    """JPEG bytes of ``image`` with a box per particle: coloured by class, rejected ones hatched.

    JPEG (quality 85) keeps a 1024 x 768 overlay near 100 KB: a run writes one per frame.

    ``particles`` are rows with ``box`` (x0, y0, x1, y1), ``class`` and ``status``; every status but ``ok`` (rejected, out of focus, error) is drawn hatched grey. An optional ``size`` text (the measures) is written in the box.

    Example:
        >>> jpeg = overlay_jpeg(Image.new("L", (64, 48)), [{"box": (5, 5, 30, 30), "class": "pg", "status": "ok"}])
        >>> jpeg[:2] == b"\\xff\\xd8"
        True
    """
    canvas = image.convert("L").convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(2, canvas.width // 400)
    for p in particles:
        x0, y0, x1, y1 = p["box"]
        size = p.get("size")  # "ECD 183 um, L/W 1.0" when measured
        if p["status"] == "ok":
            colour = CLASS_COLOURS.get(p["class"], FALLBACK_COLOUR)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width)
            draw.text((x0 + 3, y0 + 2), f"{p['class']} {p.get('confidence', 0):.2f}", fill=colour)
            if size:
                draw.text((x0 + 3, y0 + 14), size, fill=colour)
            continue
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=REJECTED_COLOUR, width=width)
        _hatch(draw, (x0, y0, x1, y1), REJECTED_COLOUR)
        if size:
            draw.text((x0 + 3, y0 + 2), size, fill=REJECTED_COLOUR)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _hatch(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour) -> None:
    """Diagonal lines every 12 px inside ``box`` (a rejected or unclassifiable region)."""
    x0, y0, x1, y1 = box
    for offset in range(0, (x1 - x0) + (y1 - y0), 12):
        # the line x + y = x0 + y0 + offset, clipped to the box
        ax, ay = x0 + max(0, offset - (y1 - y0)), y0 + min(offset, y1 - y0)
        bx, by = x0 + min(offset, x1 - x0), y0 + max(0, offset - (x1 - x0))
        draw.line((ax, ay, bx, by), fill=colour, width=1)


def timeline_png(timeline: Timeline, onset_s: float | None = None) -> bytes:
    """PNG bytes of the watched fraction over time: points, 95 % band, EWMA, limit, alarms, true onset.

    Times (records, alarms, ``onset_s``) are seconds since the first frame.
    """
    records = [r for r in timeline.records if r.status == "ok"]
    minutes = lambda t: t / 60.0  # noqa: E731 - a unit conversion
    fig = new_figure(8, 3.6, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    scored = [r for r in records if r.fraction is not None]
    if scored:
        t = [minutes(r.time_s) for r in scored]
        ax.fill_between(t, [r.low for r in scored], [r.high for r in scored], color="tab:red", alpha=0.15,
                        linewidth=0, label="95 % interval")
        ax.plot(t, [r.fraction for r in scored], ".", color="tab:red", markersize=4,
                label=f"{timeline.watched} fraction per frame")
        ax.plot(t, [r.ewma for r in scored], "-", color="darkred", linewidth=1.5, label="EWMA")
    ax.axhline(timeline.rule.fraction, color="black", linestyle="--", linewidth=1, label="alarm limit")
    for i, alarm in enumerate(timeline.alarms):
        ax.axvline(alarm["time_s"] / 60.0, color="orange", linewidth=2, label="alarm" if i == 0 else None)
    if onset_s is not None:
        ax.axvline(minutes(onset_s), color="tab:green", linestyle=":", linewidth=2, label="true onset")
    ax.set_xlabel("time since first frame (min)")
    ax.set_ylabel(f"{timeline.watched} fraction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    return png_bytes(fig)


#: Band colours of the size picture per group (``all`` grey, then the classes' box colours).
_GROUP_COLOURS = {"all": "dimgrey", "cex": "tab:blue", "pg": "tab:red"}


def sizes_png(timeline: Timeline) -> bytes:
    """PNG bytes of the sizes over time: D10-D90 band and D50 of the equivalent diameter per group
    (top), and the count of all measured particles per size class as a heat map (bottom).

    Example:
        >>> from crystalscope.monitor.timeline import AlarmRule
        >>> t = Timeline(["cex", "pg"], "pg", AlarmRule())
        >>> sizes_png(t)[:4] == b"\\x89PNG"
        True
    """
    import numpy as np

    records = [r for r in timeline.records if r.status == "ok"]
    fig = new_figure(8, 5.4, dpi=100)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    minutes = [r.time_s / 60.0 for r in records]
    for group in timeline.groups():
        rows = [(t, r.sizes[group].ecd) for t, r in zip(minutes, records) if group in r.sizes and r.sizes[group].ecd]
        if not rows:
            continue
        t = [row[0] for row in rows]
        colour = _GROUP_COLOURS.get(group, "goldenrod")
        top.fill_between(t, [row[1][0] for row in rows], [row[1][2] for row in rows], color=colour, alpha=0.15,
                         linewidth=0)
        top.plot(t, [row[1][1] for row in rows], "-", color=colour, linewidth=1.3, label=f"{group} D50 (band D10-D90)")
    top.set_ylabel(f"equivalent diameter ({timeline.unit})")
    top.grid(alpha=0.3)
    if top.lines:
        top.legend(loc="upper left", fontsize=8, ncol=3)
    edges = timeline.size_classes.edges()
    counts = np.array([r.sizes["all"].class_counts if "all" in r.sizes else (0,) * (len(edges) - 1)
                       for r in records], dtype=float).reshape(len(records), len(edges) - 1)
    if records:
        span = [minutes[0], minutes[-1] if len(minutes) > 1 else minutes[0] + 1.0]
        image = bottom.imshow(counts.T, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                              extent=(span[0], span[1], 0, len(edges) - 1))
        fig.colorbar(image, ax=bottom, label="particles per frame")
    ticks = range(0, len(edges), max(1, len(edges) // 6))
    bottom.set_yticks(list(ticks), [f"{edges[i]:.0f}" if edges[i] >= 10 else f"{edges[i]:.2g}" for i in ticks])
    bottom.set_ylabel(f"size class, ECD ({timeline.unit})")
    bottom.set_xlabel("time since first frame (min)")
    return png_bytes(fig)
