"""A generated batch crystallization seen by an in-situ probe: full frames with ground truth.

``synth-process OUT_DIR`` writes::

    OUT_DIR/frames/frame_00000_t000000.00s.png   grey frames (1024 x 768 by default), time in the name
    OUT_DIR/truth/run.json                        onset_s, interval_s, frame size, seed, options
    OUT_DIR/truth/frames.csv                      frame, file, time_s, n_particles, n_cex, n_pg, pg_rate, pg_fraction
    OUT_DIR/truth/particles.csv                   frame, time_s, particle, class, x0, y0, x1, y1, defocused,
                                                  area_px2, ecd_px, length_px, width_px, aspect, visible_area_px2

Particles are drawn by the crop generator's public functions (:func:`render_cex`,
:func:`render_pg`) at the crops' own scale (CEX 151 px, PG 130-230 px), so a model trained on
crops sees particles of the size it knows. Each crop is blended into the frame whole (with its
own dark surroundings) through a feathered window, so that a particle cut back out of the frame
looks like a training crop; a later particle covers an earlier one where they overlap. The particle count rises slowly over the run;
PG is absent before ``pg_onset_s`` and its share rises after it as
``pg_max * (1 - exp(-(t - onset) / rise))``. Each frame draws from its own generator derived
from ``(seed, frame index)``: files are byte-identical on rerun.

A ground-truth box is the bounding box of the pixels the particle makes at least
:data:`VISIBLE_LEVEL` grey levels brighter than the frame under it: what can be seen, not the
crop's square. The particle's true mask is the same set of pixels (holes filled); its area,
equivalent diameter, length and width (the narrowest bounding rectangle,
:func:`crystalscope.monitor.measure.feret`) are those of the drawn particle, and
``visible_area_px2`` what later particles leave uncovered. The scale, :data:`UM_PER_PX`, is an
assumption: a 1024 px wide frame showing about 1.2 mm, the field of view of an EasyViewer-like
in-line microscope probe (no datasheet was at hand).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from crystalscope.data.synth import DIFFICULTIES, Difficulty, render_cex, render_pg, smooth_field
from crystalscope.data.layout import natural_key
from crystalscope.errors import CrystalscopeError, check_number
from crystalscope.io import atomic_dir
from crystalscope.safety import claim_output

FRAMES_SUBDIR = "frames"
TRUTH_SUBDIR = "truth"
COMMAND = "synth-process"  # named in the output's manifest: --force replaces only what it wrote
RUN_FILE = "run.json"
TRUTH_FRAMES_COLUMNS = ("frame", "file", "time_s", "n_particles", "n_cex", "n_pg", "pg_rate", "pg_fraction")
TRUTH_PARTICLES_COLUMNS = ("frame", "time_s", "particle", "class", "x0", "y0", "x1", "y1", "defocused",
                           "area_px2", "ecd_px", "length_px", "width_px", "aspect", "visible_area_px2")
#: Assumed scale of generated frames (written into truth/run.json): 1024 px across about 1.2 mm.
UM_PER_PX = 1.2
#: Grey levels a particle must add to a pixel for that pixel to count as visible (box truth).
VISIBLE_LEVEL = 20.0
#: Mean particles in a 1024 x 768 frame at the start and the end of the run (scaled by area).
COUNT_START, COUNT_END = 5.0, 10.0
_REFERENCE_AREA = 1024 * 768
#: Share of a crop's side over which it fades into the frame.
FEATHER = 0.06
_TIME_IN_NAME = re.compile(r"_t(\d+(?:\.\d+)?)s$")
_STATIC_CODE = 7  # SeedSequence code of the run-wide illumination field (fixed forever)
_PNG_COMPRESS_LEVEL = 3


@dataclass(frozen=True)
class ProcessSpec:
    """Options of one generated run (saved in ``truth/run.json``).

    Attributes:
        frames: number of frames.
        interval_s: seconds between frames.
        pg_onset_s: time of PG appearance; later than the last frame gives a run without PG.
        pg_max: PG share of new particles long after the onset.
        pg_rise_s: time constant of the rise of the PG share after the onset.
        width, height: frame size in px.
        defocus: chance a particle is out of focus (blurred and dimmer).
        difficulty: crop generator difficulty (``easy``, ``realistic``, ``hard``).
        seed: the same seed gives byte-identical frames.
        density: factor on the particle count (1: 5 rising to 10 a 1024 x 768 frame; 6: 30 to 60,
            overlapping).
        um_per_px: the frames' scale, recorded in ``truth/run.json`` (the particles do not change).
    """

    frames: int = 120
    interval_s: float = 30.0
    pg_onset_s: float = 1800.0
    pg_max: float = 0.4
    pg_rise_s: float = 600.0
    width: int = 1024
    height: int = 768
    defocus: float = 0.2
    difficulty: str = "realistic"
    seed: int = 0
    density: float = 1.0
    um_per_px: float = UM_PER_PX


def frame_name(index: int, time_s: float) -> str:
    """File name of frame ``index`` taken ``time_s`` after the first: ``frame_00012_t000360.00s.png``."""
    return f"frame_{index:05d}_t{time_s:09.2f}s.png"


def time_from_name(path: str | os.PathLike) -> float | None:
    """The time written in a frame's name (``..._t000360.00s.png`` -> 360.0), else ``None``.

    Example:
        >>> time_from_name("frame_00012_t000360.00s.png")
        360.0
    """
    match = _TIME_IN_NAME.search(Path(path).stem)
    return float(match.group(1)) if match else None


def raw_frame_time(path: str | os.PathLike) -> float | None:
    """When a frame was taken: the time in its name, else its modification time (None: no stat).

    Example:
        >>> raw_frame_time("frame_00012_t000360.00s.png")
        360.0
    """
    named = time_from_name(path)
    if named is not None:
        return named
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def frame_sort_key(path: str | os.PathLike) -> tuple:
    """The order frames are monitored in: by :func:`raw_frame_time`, ties (and no time) by name.

    Example:
        >>> sorted(["b_t000010.00s.png", "a_t000020.00s.png"], key=frame_sort_key)
        ['b_t000010.00s.png', 'a_t000020.00s.png']
    """
    raw = raw_frame_time(path)
    return (raw is None, raw if raw is not None else 0.0, natural_key(Path(path).name))


def pg_rate(spec: ProcessSpec, time_s: float) -> float:
    """Chance that a particle at ``time_s`` is PG (0 before the onset)."""
    if time_s < spec.pg_onset_s:
        return 0.0
    return spec.pg_max * (1.0 - math.exp(-(time_s - spec.pg_onset_s) / max(spec.pg_rise_s, 1e-9)))


def _feather(h: int, w: int) -> np.ndarray:
    """1 inside, falling smoothly to 0 over the outer 6 % of each side (softens the seams).

    Only a narrow band: a crop faded to the dark background over a wider band looks like a PG
    crop (an object with a dark halo) to a crop-trained model; measured in docs/monitor.md.
    """
    def ramp(n: int) -> np.ndarray:
        d = np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5) / max(FEATHER * n, 1.0)
        d = np.clip(d, 0.0, 1.0)
        return d * d * (3 - 2 * d)
    return np.outer(ramp(h), ramp(w)).astype(np.float32)


def particle_image(crop: np.ndarray, defocus_sigma: float) -> np.ndarray:
    """One generated crop as the frame will show it: grey float, blurred and flattened when out of focus.

    Works with any grey-looking ``uint8`` crop, ``(H, W)`` or ``(H, W, C)``.
    """
    grey = crop.astype(np.float32) if crop.ndim == 2 else crop.astype(np.float32).mean(axis=2)
    if defocus_sigma > 0:
        img = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))
        grey = np.asarray(img.filter(ImageFilter.GaussianBlur(defocus_sigma)), dtype=np.float32)
        grey = grey.mean() + 0.7 * (grey - grey.mean())  # out of focus: less contrast too
    return grey


@dataclass(frozen=True)
class Particle:
    """One particle of a generated frame (ground truth); the box is ``x0, y0, x1, y1`` (x1, y1 exclusive)."""

    class_name: str
    box: tuple[int, int, int, int]
    defocused: bool
    size: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)  # area, ecd, length, width, aspect
    visible_area: float = 0.0


def _place(rng: np.random.Generator, size: tuple[int, int], frame: tuple[int, int],
           taken: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Top-left corner of a crop: a few tries to avoid touching another, then anywhere (dense frames overlap)."""
    (h, w), (fh, fw) = size, frame
    y = x = 0
    for _ in range(12):
        y = int(rng.integers(0, max(fh - h, 0) + 1))
        x = int(rng.integers(0, max(fw - w, 0) + 1))
        if all(box_iou((x, y, x + w, y + h), other) == 0.0 for other in taken):
            break
    return y, x


def box_iou(a, b) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes.

    Example:
        >>> box_iou((0, 0, 10, 10), (5, 0, 15, 10))
        0.3333333333333333
    """
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _add_particle(canvas: np.ndarray, particle: np.ndarray, y: int, x: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Blend ``particle`` into the frame at ``(y, x)`` through a feathered window.

    The crop is blended in whole (its own dark surroundings too), so a particle cut back out of
    the frame looks like the crops the classifier was trained on; the feathering hides the seams.

    Returns:
        ``(visible, covers)`` in the frame's coordinates of the crop's window (clipped to the
        frame): the pixels the particle makes at least :data:`VISIBLE_LEVEL` brighter, and
        the pixels where it replaces more than half of what was under it; ``None`` when nothing
        of it is visible.
    """
    fh, fw = canvas.shape
    h, w = min(particle.shape[0], fh - y), min(particle.shape[1], fw - x)
    window = _feather(*particle.shape)[:h, :w]
    patch = canvas[y:y + h, x:x + w]
    change = window * (particle[:h, :w] - patch)
    patch += change
    visible = change >= VISIBLE_LEVEL
    if not visible.any():
        return None
    return visible, window > 0.5


def _box_of(mask: np.ndarray, y: int, x: int) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return (x + int(cols.min()), y + int(rows.min()), x + int(cols.max()) + 1, y + int(rows.max()) + 1)


def _true_size(visible: np.ndarray) -> tuple[float, float, float, float, float]:
    """Area, equivalent diameter, length, width, aspect of a drawn particle's mask (holes filled)."""
    from crystalscope.monitor.detect import fill_holes
    from crystalscope.monitor.measure import equivalent_diameter, feret

    mask = fill_holes(visible)
    area = float(mask.sum())
    length, width = feret(mask)
    return area, equivalent_diameter(area), length, width, length / max(width, 1.0)


def render_frame(spec: ProcessSpec, index: int, illumination: np.ndarray) -> tuple[np.ndarray, list[Particle]]:
    """Draw frame ``index`` of a run: ``uint8 (height, width)`` grey and its particles.

    Example:
        >>> spec = ProcessSpec(width=320, height=240)
        >>> grey, particles = render_frame(spec, 0, run_illumination(spec))
        >>> grey.shape
        (240, 320)
    """
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index]))
    difficulty: Difficulty = DIFFICULTIES[spec.difficulty]
    time_s = index * spec.interval_s
    progress = index / max(spec.frames - 1, 1)
    mean_count = (COUNT_START + (COUNT_END - COUNT_START) * progress) * spec.width * spec.height / _REFERENCE_AREA
    count = max(1, int(rng.poisson(mean_count * spec.density)))
    share = pg_rate(spec, time_s)
    canvas = illumination.copy()
    drawn: list[tuple[str, bool, int, int, np.ndarray, np.ndarray]] = []
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(count):
        class_name = "pg" if rng.random() < share else "cex"
        crop = render_pg(rng, difficulty) if class_name == "pg" else render_cex(rng, difficulty)
        defocused = bool(rng.random() < spec.defocus)
        particle = particle_image(crop, rng.uniform(2.5, 5.0) if defocused else 0.0)
        y, x = _place(rng, particle.shape, canvas.shape, taken)
        taken.append((x, y, x + particle.shape[1], y + particle.shape[0]))
        masks = _add_particle(canvas, particle, y, x)
        if masks is not None:
            drawn.append((class_name, defocused, y, x, *masks))
    noise = rng.uniform(1.5, 3.0)
    canvas += noise * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), _particles(drawn, canvas.shape)


def _particles(drawn, shape: tuple[int, int]) -> list[Particle]:
    """Ground truth of the drawn particles; each one's visible area is what later ones leave uncovered."""
    covered = np.zeros(shape, dtype=bool)
    visible_areas = []
    for _, _, y, x, visible, covers in reversed(drawn):
        h, w = visible.shape
        visible_areas.append(float((visible & ~covered[y:y + h, x:x + w]).sum()))
        covered[y:y + h, x:x + w] |= covers
    return [Particle(class_name, _box_of(visible, y, x), defocused, _true_size(visible), area)
            for (class_name, defocused, y, x, visible, _), area in zip(drawn, reversed(visible_areas))]


def run_illumination(spec: ProcessSpec) -> np.ndarray:
    """The probe's dark field with uneven illumination, the same in every frame of a run."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _STATIC_CODE]))
    h, w = spec.height, spec.width
    return (rng.uniform(35, 50) + 10.0 * smooth_field(rng, h, w, 4)).astype(np.float32)


def _check_spec(spec: ProcessSpec) -> None:
    if spec.frames < 1:
        raise CrystalscopeError(f"--frames {spec.frames} must be 1 or more")
    # every float option finite and in range: a nan onset would be written into truth/run.json
    check_number("--interval-s", spec.interval_s, 0, low_open=True)
    check_number("--pg-onset-s", spec.pg_onset_s, 0)
    check_number("--pg-rise-s", spec.pg_rise_s, 0, low_open=True)
    check_number("--pg-max", spec.pg_max, 0, 1)
    check_number("--defocus", spec.defocus, 0, 1)
    if spec.seed < 0:
        raise CrystalscopeError(f"--seed {spec.seed} must be 0 or more")
    if spec.width < 160 or spec.height < 160:
        raise CrystalscopeError(f"--width/--height {spec.width}x{spec.height}: frames must be at least "
                                "160 px a side (particles are drawn at the crops' 130-230 px scale)")
    # the density and the scale go into truth/run.json too: finite and in range
    check_number("--density", spec.density, 0, 20, low_open=True)
    check_number("--um-per-px", spec.um_per_px, 0, low_open=True)
    if spec.difficulty not in DIFFICULTIES:
        raise CrystalscopeError(f"--difficulty {spec.difficulty!r} is not known: use one of {', '.join(DIFFICULTIES)}")


def _png(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def generate_process(out_dir: str | os.PathLike, spec: ProcessSpec = ProcessSpec(), force: bool = False) -> dict:
    """Write a generated batch run (frames + ground truth) into ``out_dir``, atomically.

    Returns:
        Summary: ``out_dir``, ``frames_dir``, ``n_frames``, ``n_particles``, ``n_pg``,
        ``onset_s`` (``None`` when PG never appears), ``seconds``.

    Example:
        >>> generate_process("/tmp/run1", ProcessSpec(frames=10, pg_onset_s=120))  # doctest: +SKIP
    """

    _check_spec(spec)
    # the one output rule: a new folder, or an earlier synth-process run replaced with --force
    with claim_output(out_dir, kind="folder", force=force, command=COMMAND,
                      option="OUT_DIR") as out_dir:
        return _write_process(out_dir, spec)


def _write_process(out_dir: Path, spec: "ProcessSpec") -> dict:
    import json
    import time

    started = time.perf_counter()
    illumination = run_illumination(spec)
    frame_rows, particle_rows = [], []
    with atomic_dir(out_dir, force=True, command=COMMAND) as staging:  # claim_output already decided
        (staging / FRAMES_SUBDIR).mkdir()
        (staging / TRUTH_SUBDIR).mkdir()
        for index in range(spec.frames):
            time_s = index * spec.interval_s
            grey, particles = render_frame(spec, index, illumination)
            name = frame_name(index, time_s)
            (staging / FRAMES_SUBDIR / name).write_bytes(_png(grey))
            n_pg = sum(p.class_name == "pg" for p in particles)
            fraction = n_pg / len(particles) if particles else 0.0
            frame_rows.append((index, f"{FRAMES_SUBDIR}/{name}", f"{time_s:.2f}", len(particles),
                               len(particles) - n_pg, n_pg, f"{pg_rate(spec, time_s):.6f}", f"{fraction:.6f}"))
            particle_rows += [(index, f"{time_s:.2f}", k, p.class_name, *p.box, int(p.defocused),
                               *(f"{v:.3f}" for v in p.size), f"{p.visible_area:.0f}")
                              for k, p in enumerate(particles)]
        last_s = (spec.frames - 1) * spec.interval_s
        onset = spec.pg_onset_s if spec.pg_onset_s <= last_s and spec.pg_max > 0 else None
        run = {"onset_s": onset, "frame_width": spec.width, "frame_height": spec.height,
               "frames_dir": FRAMES_SUBDIR, "visible_level": VISIBLE_LEVEL, "um_per_px": spec.um_per_px,
               "spec": asdict(spec)}
        (staging / TRUTH_SUBDIR / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        _write_csv(staging / TRUTH_SUBDIR / "frames.csv", TRUTH_FRAMES_COLUMNS, frame_rows)
        _write_csv(staging / TRUTH_SUBDIR / "particles.csv", TRUTH_PARTICLES_COLUMNS, particle_rows)
    return {"out_dir": str(out_dir), "frames_dir": str(out_dir / FRAMES_SUBDIR), "n_frames": spec.frames,
            "n_particles": len(particle_rows), "n_pg": sum(r[3] == "pg" for r in particle_rows),
            "onset_s": onset, "seconds": round(time.perf_counter() - started, 2)}


def read_truth(frames_dir: str | os.PathLike) -> dict | None:
    """Ground truth of a generated run whose frames are in ``frames_dir`` (``None`` if there is none).

    Returns ``{"onset_s", "frames": {frame index: row}, "particles": {frame index: [row, ...]}}``.
    """
    import json

    truth = Path(frames_dir).parent / TRUTH_SUBDIR
    if not (truth / RUN_FILE).is_file():
        return None
    try:
        run = json.loads((truth / RUN_FILE).read_text(encoding="utf-8"))
        with open(truth / "frames.csv", newline="", encoding="utf-8") as handle:
            frames = {int(r["frame"]): r for r in csv.DictReader(handle)}
        particles: dict[int, list[dict]] = {}
        with open(truth / "particles.csv", newline="", encoding="utf-8") as handle:
            for r in csv.DictReader(handle):
                particles.setdefault(int(r["frame"]), []).append(r)
    except (OSError, ValueError, KeyError) as exc:
        raise CrystalscopeError(f"{truth}: ground truth is unreadable ({exc}); regenerate it with synth-process") from None
    return {"onset_s": run.get("onset_s"), "um_per_px": run.get("um_per_px"), "frames": frames,
            "particles": particles}
