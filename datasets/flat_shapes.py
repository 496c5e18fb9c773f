"""Plain, flat pictures of many subjects in many colours: what the demo base model learns from.

Each picture is one subject, filled with one flat colour, on a plain background of another
colour, captioned ``a red fish on a light blue background``. No outlines, textures or
shading: nothing of the demo style (`make_demo.py`), so a LoRA trained on the demo set has
something visible to teach. The subjects are the demo set's 24 plus as many others, drawn with
the same unit-space pen calls.

Some subject–colour pairs are held out of training (`held_out`): the base model is scored on
prompts it never saw (`eval_prompts`, `benchmarks/base_quality.py`).

Output is deterministic: `render_sample(index, size, seed)` gives the same pixels every time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from make_demo import SUBJECTS as DEMO_SUBJECTS
from make_demo import arc
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Point = tuple[float, float]

COLORS: dict[str, RGB] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 40),
    "green": (40, 160, 60),
    "blue": (35, 80, 200),
    "purple": (125, 50, 165),
    "pink": (245, 150, 190),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "light blue": (150, 205, 245),
}
MIN_CONTRAST = 100.0  # RGB distance below which a subject would hardly stand out
SUPERSAMPLE = 2  # drawn at twice the size and box-filtered down: smooth edges
SEED = 2024


def color_distance(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


def color_pairs() -> list[tuple[str, str]]:
    """Every (subject colour, background colour) pair with enough contrast."""
    return [
        (fg, bg)
        for fg in COLORS
        for bg in COLORS
        if fg != bg and color_distance(COLORS[fg], COLORS[bg]) >= MIN_CONTRAST
    ]


class FlatPen:
    """The drawing calls of `make_demo.Pen`, but flat: every part of the subject takes the
    subject colour and no part gets an outline; the 'bg' and 'ink' parts (holes, eyes) are
    cut out in the background colour."""

    def __init__(self, img: Image.Image, fg: RGB, bg: RGB, cx: float, cy: float, r: float,
                 flip: bool) -> None:  # fmt: skip
        self.draw = ImageDraw.Draw(img)
        self.fg, self.bg = fg, bg
        self.cx, self.cy, self.r, self.flip = cx, cy, r, flip
        self.width = max(2, round(img.width * 0.035))

    def pt(self, x: float, y: float) -> Point:
        return (self.cx + (-x if self.flip else x) * self.r, self.cy + y * self.r)

    def _color(self, role: str) -> RGB:
        return self.bg if role in ("bg", "ink") else self.fg

    def ellipse(self, x: float, y: float, rx: float, ry: float, role: str) -> None:
        px, py = self.pt(x, y)
        box = [px - rx * self.r, py - ry * self.r, px + rx * self.r, py + ry * self.r]
        self.draw.ellipse(box, fill=self._color(role))

    def blob(self, parts: list[tuple[float, float, float, float]], role: str) -> None:
        for part in parts:
            self.ellipse(*part, role)

    def poly(self, pts: list[Point], role: str) -> None:
        self.draw.polygon([self.pt(x, y) for x, y in pts], fill=self._color(role))

    def rect(self, x0: float, y0: float, x1: float, y1: float, role: str) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], role)

    def line(self, pts: list[Point], scale: float = 1.0) -> None:
        width = max(1, round(self.width * scale))
        self.draw.line([self.pt(x, y) for x, y in pts], fill=self.fg, width=width, joint="curve")


# --- the subjects the demo set does not have ----------------------------------------------


def diamond(p: FlatPen) -> None:
    p.poly([(0, -0.9), (0.62, 0), (0, 0.9), (-0.62, 0)], "fill")


def hexagon(p: FlatPen) -> None:
    p.poly(_regular(6, 0.85, 0), "fill")


def pentagon(p: FlatPen) -> None:
    p.poly(_regular(5, 0.88, -math.pi / 2), "fill")


def cross(p: FlatPen) -> None:
    p.rect(-0.25, -0.85, 0.25, 0.85, "fill")
    p.rect(-0.85, -0.25, 0.85, 0.25, "fill")


def ring(p: FlatPen) -> None:
    p.ellipse(0, 0, 0.82, 0.82, "fill")
    p.ellipse(0, 0, 0.48, 0.48, "bg")


def semicircle(p: FlatPen) -> None:
    p.poly(arc(0, 0.35, 0.9, 0.9, math.pi, 2 * math.pi), "fill")


def lightning(p: FlatPen) -> None:
    p.poly([(0.15, -0.92), (-0.5, 0.1), (-0.02, 0.1), (-0.2, 0.92), (0.5, -0.15),
            (0.05, -0.15), (0.35, -0.92)], "fill")  # fmt: skip


def drop(p: FlatPen) -> None:
    p.ellipse(0, 0.3, 0.55, 0.55, "fill")
    p.poly([(0, -0.92), (0.5, 0.1), (-0.5, 0.1)], "fill")


def apple(p: FlatPen) -> None:
    p.blob([(-0.3, 0.1, 0.5, 0.62), (0.3, 0.1, 0.5, 0.62)], "fill")
    p.line([(0, -0.45), (0.12, -0.9)], 0.8)
    p.ellipse(0.32, -0.7, 0.2, 0.1, "fill")


def pear(p: FlatPen) -> None:
    p.blob([(0, 0.38, 0.55, 0.5), (0, -0.25, 0.3, 0.38)], "fill")
    p.line([(0, -0.6), (0.08, -0.92)], 0.8)


def umbrella(p: FlatPen) -> None:
    p.poly(arc(0, -0.05, 0.92, 0.75, math.pi, 2 * math.pi), "fill")
    p.line([(0, -0.05), (0, 0.7)])
    p.line(arc(0.15, 0.7, 0.15, 0.15, 0, math.pi, 8))


def tshirt(p: FlatPen) -> None:
    p.poly([(-0.35, -0.75), (-0.9, -0.4), (-0.7, -0.05), (-0.5, -0.2), (-0.5, 0.85),
            (0.5, 0.85), (0.5, -0.2), (0.7, -0.05), (0.9, -0.4), (0.35, -0.75),
            (0, -0.55)], "fill")  # fmt: skip


def hat(p: FlatPen) -> None:
    p.rect(-0.45, -0.7, 0.45, 0.35, "fill")
    p.ellipse(0, 0.4, 0.92, 0.2, "fill")


def bell(p: FlatPen) -> None:
    p.poly(arc(0, -0.2, 0.5, 0.55, math.pi, 2 * math.pi) + [(0.75, 0.55), (-0.75, 0.55)], "fill")
    p.ellipse(0, 0.68, 0.16, 0.16, "fill")
    p.ellipse(0, -0.8, 0.1, 0.1, "fill")


def tent(p: FlatPen) -> None:
    p.poly([(0, -0.8), (0.92, 0.75), (-0.92, 0.75)], "fill")
    p.poly([(0, 0.05), (0.25, 0.75), (-0.25, 0.75)], "bg")


def rocket(p: FlatPen) -> None:
    p.blob([(0, 0.05, 0.3, 0.7)], "fill")
    p.poly([(-0.3, 0.2), (-0.62, 0.8), (-0.2, 0.55)], "fill")
    p.poly([(0.3, 0.2), (0.62, 0.8), (0.2, 0.55)], "fill")
    p.ellipse(0, -0.15, 0.12, 0.12, "bg")


def car(p: FlatPen) -> None:
    p.rect(-0.9, -0.05, 0.9, 0.4, "fill")
    p.poly([(-0.5, -0.05), (-0.3, -0.45), (0.35, -0.45), (0.6, -0.05)], "fill")
    p.ellipse(-0.5, 0.45, 0.22, 0.22, "fill")
    p.ellipse(0.5, 0.45, 0.22, 0.22, "fill")


def bone(p: FlatPen) -> None:
    p.rect(-0.6, -0.13, 0.6, 0.13, "fill")
    for x in (-0.68, 0.68):
        p.blob([(x, -0.18, 0.2, 0.2), (x, 0.18, 0.2, 0.2)], "fill")


def ghost(p: FlatPen) -> None:
    p.ellipse(0, -0.25, 0.6, 0.6, "fill")
    p.poly([(-0.6, -0.25), (0.6, -0.25), (0.6, 0.85), (0.3, 0.6), (0, 0.85), (-0.3, 0.6),
            (-0.6, 0.85)], "fill")  # fmt: skip
    p.ellipse(-0.22, -0.3, 0.1, 0.14, "ink")
    p.ellipse(0.22, -0.3, 0.1, 0.14, "ink")


def cactus(p: FlatPen) -> None:
    p.blob([(0, 0.05, 0.2, 0.85)], "fill")
    p.rect(-0.6, 0.05, -0.1, 0.25, "fill")
    p.blob([(-0.55, -0.15, 0.13, 0.35)], "fill")
    p.rect(0.1, -0.2, 0.55, 0.0, "fill")
    p.blob([(0.5, -0.4, 0.13, 0.35)], "fill")


def pine_tree(p: FlatPen) -> None:
    p.poly([(0, -0.92), (0.45, -0.3), (-0.45, -0.3)], "fill")
    p.poly([(0, -0.55), (0.65, 0.2), (-0.65, 0.2)], "fill")
    p.poly([(0, -0.15), (0.85, 0.65), (-0.85, 0.65)], "fill")
    p.rect(-0.12, 0.6, 0.12, 0.92, "fill")


def hourglass(p: FlatPen) -> None:
    p.poly([(-0.6, -0.85), (0.6, -0.85), (0.08, 0), (0.6, 0.85), (-0.6, 0.85), (-0.08, 0)],
           "fill")  # fmt: skip


def crown(p: FlatPen) -> None:
    p.poly([(-0.85, 0.6), (-0.85, -0.55), (-0.42, -0.05), (0, -0.7), (0.42, -0.05),
            (0.85, -0.55), (0.85, 0.6)], "fill")  # fmt: skip


def shield(p: FlatPen) -> None:
    p.poly([(-0.75, -0.8), (0.75, -0.8), (0.75, 0.0)] + arc(0, 0.0, 0.75, 0.9, 0, math.pi, 16),
           "fill")  # fmt: skip


def candle(p: FlatPen) -> None:
    p.rect(-0.25, -0.3, 0.25, 0.9, "fill")
    p.blob([(0, -0.6, 0.14, 0.22)], "fill")


def snowman(p: FlatPen) -> None:
    p.blob([(0, 0.45, 0.48, 0.45), (0, -0.25, 0.35, 0.33), (0, -0.75, 0.22, 0.2)], "fill")


def hammer(p: FlatPen) -> None:
    p.rect(-0.1, -0.45, 0.1, 0.92, "fill")
    p.rect(-0.65, -0.85, 0.65, -0.45, "fill")


def spoon(p: FlatPen) -> None:
    p.ellipse(0, -0.5, 0.32, 0.42, "fill")
    p.rect(-0.08, -0.15, 0.08, 0.92, "fill")


def ladder(p: FlatPen) -> None:
    p.rect(-0.55, -0.92, -0.4, 0.92, "fill")
    p.rect(0.4, -0.92, 0.55, 0.92, "fill")
    for y in (-0.6, -0.2, 0.2, 0.6):
        p.rect(-0.45, y - 0.07, 0.45, y + 0.07, "fill")


def egg(p: FlatPen) -> None:
    p.blob([(0, 0.15, 0.6, 0.7), (0, -0.25, 0.48, 0.62)], "fill")


def bowl(p: FlatPen) -> None:
    p.poly(arc(0, -0.2, 0.9, 0.8, 0, math.pi), "fill")
    p.rect(-0.3, 0.55, 0.3, 0.72, "fill")


def chair(p: FlatPen) -> None:
    p.rect(-0.5, -0.9, -0.3, 0.9, "fill")
    p.rect(-0.5, 0.0, 0.55, 0.18, "fill")
    p.rect(0.38, 0.0, 0.55, 0.9, "fill")


def _regular(n: int, r: float, a0: float) -> list[Point]:
    return [(r * math.cos(a0 + 2 * math.pi * i / n), r * math.sin(a0 + 2 * math.pi * i / n))
            for i in range(n)]  # fmt: skip


OTHER_SUBJECTS: list[tuple[str, Callable[[FlatPen], None]]] = [
    ("diamond", diamond), ("hexagon", hexagon), ("pentagon", pentagon), ("cross", cross),
    ("ring", ring), ("semicircle", semicircle), ("lightning bolt", lightning), ("drop", drop),
    ("apple", apple), ("pear", pear), ("umbrella", umbrella), ("t-shirt", tshirt), ("hat", hat),
    ("bell", bell), ("tent", tent), ("rocket", rocket), ("car", car), ("bone", bone),
    ("ghost", ghost), ("cactus", cactus), ("pine tree", pine_tree), ("hourglass", hourglass),
    ("crown", crown), ("shield", shield), ("candle", candle), ("snowman", snowman),
    ("hammer", hammer), ("spoon", spoon), ("ladder", ladder), ("egg", egg), ("bowl", bowl),
    ("chair", chair),
]  # fmt: skip
SUBJECTS: list[tuple[str, Callable]] = list(DEMO_SUBJECTS) + OTHER_SUBJECTS
SUBJECT_NAMES: list[str] = [name for name, _ in SUBJECTS]


def article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Sample:
    """What one picture shows."""

    subject: str
    fg: str
    bg: str

    @property
    def caption(self) -> str:
        return self.caption_naming(fg=True, bg=True)

    def caption_naming(self, fg: bool, bg: bool) -> str:
        """The caption, naming the subject's colour and the background's or not:
        `a red fish on a light blue background`, `a red fish`, `a fish on a ...`, `a fish`."""
        subject = f"{self.fg} {self.subject}" if fg else self.subject
        text = f"{article(subject)} {subject}"
        return f"{text} on {article(self.bg)} {self.bg} background" if bg else text


def render(sample: Sample, size: int, rng: random.Random | None = None) -> Image.Image:
    """Draw `sample`; with `rng`, at a random size, near the centre, perhaps mirrored; else
    centred. Near the centre: a small model learns 56 shapes in time, not 56 shapes anywhere."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLORS[sample.bg])
    if rng is None:
        r, cx, cy, flip = big * 0.38, big / 2, big / 2, False
    else:
        r = big * rng.uniform(0.34, 0.42)
        cx, cy = (big / 2 + big * rng.uniform(-0.04, 0.04) for _ in range(2))
        flip = rng.random() < 0.5
    draw = dict(SUBJECTS)[sample.subject]
    draw(FlatPen(img, COLORS[sample.fg], COLORS[sample.bg], cx, cy, r, flip))
    return img.resize((size, size), Image.Resampling.BOX)


@cache
def held_out(seed: int = SEED) -> frozenset[tuple[str, str]]:
    """One (subject, subject colour) pair per subject, never drawn in training. Each colour is
    held out for about as many subjects as any other."""
    rng = random.Random(f"held-out-{seed}")
    colors = list(COLORS)
    rng.shuffle(colors)
    return frozenset((name, colors[i % len(colors)]) for i, name in enumerate(SUBJECT_NAMES))


@cache
def training_combinations(seed: int = SEED) -> list[Sample]:
    hidden = held_out(seed)
    return [
        Sample(name, fg, bg)
        for name in SUBJECT_NAMES
        for fg, bg in color_pairs()
        if (name, fg) not in hidden
    ]


def training_sample(index: int, size: int, seed: int = SEED) -> tuple[Image.Image, str]:
    """Training picture number `index` and its caption (any index; deterministic)."""
    rng = random.Random(f"{seed}-{index}")
    sample = rng.choice(training_combinations(seed))
    image = render(sample, size, rng)
    return image, sample.caption_naming(*CAPTION_FORMS[rng.choice(CAPTION_WEIGHTS)])


# Most captions name both colours; some leave one or both out, so that the model also draws
# `a fish` (in colours of its choosing), as the demo set's captions and a user's prompts ask.
CAPTION_FORMS = [(True, True), (True, False), (False, True), (False, False)]
CAPTION_WEIGHTS = [0] * 7 + [1, 2, 3]


def eval_prompts(seed: int = SEED) -> list[Sample]:
    """One held-out prompt per subject, each on a background of enough contrast."""
    rng = random.Random(f"eval-{seed}")
    out = []
    for name, fg in sorted(held_out(seed)):
        bgs = [bg for f, bg in color_pairs() if f == fg]
        out.append(Sample(name, fg, rng.choice(bgs)))
    return out


def template_mask(subject: str, size: int) -> np.ndarray:
    """The subject's silhouette (bool array) as the generator draws it, centred."""
    img = render(Sample(subject, "white", "black"), size)
    return np.asarray(img.convert("L")) > 127


def training_images(count: int, size: int, seed: int = SEED) -> Iterator[tuple[Image.Image, str]]:
    for index in range(count):
        yield training_sample(index, size, seed)
