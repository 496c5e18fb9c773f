"""Generate the small demo dataset used to try out and test stylelora.

Every image shares one made-up style so a LoRA has something to learn: a fixed
five-colour palette, halftone dots in the background, diagonal hatching on the
shaded side of the subject and thick charcoal outlines. Subjects are simple
shapes and objects drawn with Pillow. Each ``NN-subject.png`` has a caption
``NN-subject.txt`` beside it that starts with the trigger word ``zqxstyle``.

Output is deterministic: the same arguments always give byte-identical files.

    python datasets/make_demo.py                       # datasets/demo-style/
    python datasets/make_demo.py --out /tmp/big --count 100 --size 256
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

TRIGGER = "zqxstyle"
SEED = 1234

RGB = tuple[int, int, int]
Point = tuple[float, float]

CHARCOAL: RGB = (38, 38, 44)
# The four colours that backgrounds and subject fills rotate through.
PALETTE: dict[str, RGB] = {
    "deep teal": (18, 96, 100),
    "burnt orange": (199, 88, 34),
    "cream": (242, 230, 200),
    "mustard": (222, 166, 56),
}


@dataclass(frozen=True)
class Colors:
    """Palette roles for one image, as colour names from ``PALETTE``."""

    bg: str
    fill: str
    accent: str
    alt: str

    def rgb(self, role: str) -> RGB:
        """Return the RGB value of a role ('bg', 'fill', ...) or 'ink'."""
        return CHARCOAL if role == "ink" else PALETTE[getattr(self, role)]


@dataclass
class Pen:
    """Draws shapes given in unit coordinates ([-1, 1], y down) with outlines.

    Everything drawn is also recorded in ``mask`` (255 = subject, 0 = cut-out
    showing the background) so the hatching texture can be confined to it.
    """

    img: Image.Image
    colors: Colors
    cx: float
    cy: float
    r: float
    flip: bool
    width: int
    mask: Image.Image = field(init=False)

    def __post_init__(self) -> None:
        self.mask = Image.new("L", self.img.size, 0)
        self.draw = ImageDraw.Draw(self.img)
        self.mdraw = ImageDraw.Draw(self.mask)

    def pt(self, x: float, y: float) -> Point:
        """Map a unit-space point to pixels."""
        return (self.cx + (-x if self.flip else x) * self.r, self.cy + y * self.r)

    def box(self, x: float, y: float, rx: float, ry: float, grow: float = 0) -> list[float]:
        """Pixel bounding box of an ellipse, optionally grown by ``grow`` px."""
        px, py = self.pt(x, y)
        ex, ey = rx * self.r + grow, ry * self.r + grow
        return [px - ex, py - ey, px + ex, py + ey]

    def ellipse(self, x: float, y: float, rx: float, ry: float, role: str) -> None:
        """Filled, outlined ellipse."""
        self.blob([(x, y, rx, ry)], role)

    def blob(self, parts: list[tuple[float, float, float, float]], role: str) -> None:
        """Union of ellipses with one outline around the whole shape."""
        half = self.width / 2
        for part in parts:
            self.draw.ellipse(self.box(*part, grow=half), fill=CHARCOAL)
            self.mdraw.ellipse(self.box(*part, grow=half), fill=self._mval(role))
        for part in parts:
            self.draw.ellipse(self.box(*part, grow=-half), fill=self.colors.rgb(role))

    def poly(self, pts: list[Point], role: str) -> None:
        """Filled polygon with a round-jointed outline."""
        xy = [self.pt(x, y) for x, y in pts]
        self.draw.polygon(xy, fill=self.colors.rgb(role))
        self.mdraw.polygon(xy, fill=self._mval(role))
        self._stroke(xy + xy[:2], self.width)

    def rect(self, x0: float, y0: float, x1: float, y1: float, role: str) -> None:
        """Axis-aligned filled, outlined rectangle."""
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], role)

    def line(self, pts: list[Point], scale: float = 1.0) -> None:
        """Open charcoal stroke."""
        self._stroke([self.pt(x, y) for x, y in pts], max(1, round(self.width * scale)))

    def _stroke(self, xy: list[Point], width: int) -> None:
        self.draw.line(xy, fill=CHARCOAL, width=width, joint="curve")
        self.mdraw.line(xy, fill=255, width=width, joint="curve")
        for px, py in (xy[0], xy[-1]):  # round caps
            cap = [px - width / 2, py - width / 2, px + width / 2, py + width / 2]
            self.draw.ellipse(cap, fill=CHARCOAL)
            self.mdraw.ellipse(cap, fill=255)

    def _mval(self, role: str) -> int:
        return 0 if role == "bg" else 255


def arc(x: float, y: float, rx: float, ry: float, a0: float, a1: float, n: int = 24) -> list[Point]:
    """Points along an elliptical arc from angle a0 to a1 (radians)."""
    steps = [a0 + (a1 - a0) * i / n for i in range(n + 1)]
    return [(x + rx * math.cos(a), y + ry * math.sin(a)) for a in steps]


def star_points(outer: float, inner: float, n: int = 5) -> list[Point]:
    """Points of an n-pointed star centred on the origin, tip up."""
    pts = []
    for i in range(2 * n):
        rad = outer if i % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * i / n
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


# --- subjects: each draws itself with a Pen -------------------------------


def circle(p: Pen) -> None:
    p.ellipse(0, 0, 0.8, 0.8, "fill")
    p.ellipse(-0.3, -0.3, 0.18, 0.18, "accent")


def square(p: Pen) -> None:
    p.rect(-0.72, -0.72, 0.72, 0.72, "fill")
    p.rect(-0.72, 0.2, 0.72, 0.45, "accent")


def triangle(p: Pen) -> None:
    p.poly([(0, -0.82), (0.88, 0.72), (-0.88, 0.72)], "fill")


def star(p: Pen) -> None:
    p.poly(star_points(0.92, 0.4), "fill")
    p.ellipse(0, 0.05, 0.14, 0.14, "accent")


def house(p: Pen) -> None:
    p.rect(-0.62, -0.1, 0.62, 0.85, "fill")
    p.poly([(-0.85, -0.05), (0, -0.82), (0.85, -0.05)], "accent")
    p.rect(-0.4, 0.3, -0.1, 0.85, "alt")
    p.rect(0.15, 0.1, 0.45, 0.38, "alt")


def tree(p: Pen) -> None:
    p.rect(-0.13, 0.2, 0.13, 0.92, "accent")
    p.blob([(0, -0.45, 0.42, 0.4), (-0.35, -0.05, 0.4, 0.36), (0.35, -0.05, 0.4, 0.36)], "fill")


def fish(p: Pen) -> None:
    p.poly([(0.35, 0), (0.92, -0.45), (0.8, 0), (0.92, 0.45)], "accent")
    p.ellipse(-0.12, 0, 0.62, 0.4, "fill")
    p.line(arc(-0.12, 0, 0.3, 0.3, -0.9, 0.9, 8), 0.6)
    p.ellipse(-0.48, -0.08, 0.08, 0.08, "ink")


def mountain(p: Pen) -> None:
    p.poly([(-0.1, 0.75), (0.48, -0.25), (0.95, 0.75)], "accent")
    p.poly([(-0.95, 0.75), (-0.2, -0.72), (0.55, 0.75)], "fill")
    cap = [
        (-0.2, -0.72),
        (0.02, -0.28),
        (-0.07, -0.35),
        (-0.15, -0.26),
        (-0.25, -0.36),
        (-0.42, -0.28),
    ]
    p.poly(cap, "alt")


def sun(p: Pen) -> None:
    for i in range(8):
        a = math.pi * i / 4
        p.line([(0.6 * math.cos(a), 0.6 * math.sin(a)), (0.92 * math.cos(a), 0.92 * math.sin(a))])
    p.ellipse(0, 0, 0.5, 0.5, "fill")
    p.ellipse(0, 0, 0.22, 0.22, "accent")


def moon(p: Pen) -> None:
    r1, c, r2 = 0.78, 0.42, 0.64
    ix = (r1 * r1 - r2 * r2 + c * c) / (2 * c)
    iy = math.sqrt(r1 * r1 - ix * ix)
    t0, f0 = math.atan2(iy, ix), math.atan2(iy, ix - c)
    outer = arc(0, 0, r1, r1, t0, 2 * math.pi - t0)
    inner = arc(c, 0, r2, r2, 2 * math.pi - f0, f0)
    p.poly(outer + inner, "fill")
    p.ellipse(0.55, -0.55, 0.08, 0.08, "accent")


def cat_face(p: Pen) -> None:
    p.poly([(-0.72, -0.15), (-0.62, -0.88), (-0.15, -0.5)], "accent")
    p.poly([(0.72, -0.15), (0.62, -0.88), (0.15, -0.5)], "accent")
    p.ellipse(0, 0.1, 0.74, 0.62, "fill")
    p.ellipse(-0.28, -0.02, 0.1, 0.14, "ink")
    p.ellipse(0.28, -0.02, 0.1, 0.14, "ink")
    p.poly([(-0.1, 0.2), (0.1, 0.2), (0, 0.32)], "alt")
    for s in (-1, 1):
        p.line([(s * 0.25, 0.3), (s * 0.95, 0.2)], 0.5)
        p.line([(s * 0.25, 0.38), (s * 0.92, 0.45)], 0.5)


def cup(p: Pen) -> None:
    p.ellipse(0, 0.68, 0.88, 0.16, "alt")
    p.ellipse(0.55, 0.05, 0.32, 0.3, "accent")
    p.ellipse(0.55, 0.05, 0.14, 0.12, "bg")
    p.poly([(-0.6, -0.4), (0.55, -0.4), (0.4, 0.62), (-0.45, 0.62)], "fill")
    for x in (-0.25, 0.15):
        p.line([(x, -0.55), (x + 0.08, -0.68), (x, -0.8), (x + 0.08, -0.92)], 0.6)


def flower(p: Pen) -> None:
    p.rect(-0.06, 0.1, 0.06, 0.95, "alt")
    p.poly([(0.04, 0.7), (0.5, 0.45), (0.6, 0.55), (0.05, 0.85)], "alt")
    petals = [(0.4 * math.cos(a), -0.25 + 0.4 * math.sin(a), 0.25, 0.25) for a in _angles(6)]
    p.blob(petals, "fill")
    p.ellipse(0, -0.25, 0.22, 0.22, "accent")


def boat(p: Pen) -> None:
    p.line([(0, 0.35), (0, -0.88)])
    p.poly([(0.06, -0.82), (0.06, 0.22), (0.72, 0.22)], "fill")
    p.poly([(-0.06, -0.6), (-0.06, 0.22), (-0.55, 0.22)], "alt")
    p.poly([(-0.92, 0.3), (0.92, 0.3), (0.6, 0.68), (-0.6, 0.68)], "accent")
    p.line(
        [(-0.9, 0.86), (-0.6, 0.8), (-0.3, 0.86), (0, 0.8), (0.3, 0.86), (0.6, 0.8), (0.9, 0.86)],
        0.6,
    )


def key(p: Pen) -> None:
    p.rect(-0.2, -0.09, 0.9, 0.09, "fill")
    p.rect(0.55, 0.09, 0.68, 0.32, "fill")
    p.rect(0.76, 0.09, 0.88, 0.26, "fill")
    p.ellipse(-0.52, 0, 0.38, 0.38, "accent")
    p.ellipse(-0.52, 0, 0.14, 0.14, "bg")


def heart(p: Pen) -> None:
    pts = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 18, -y / 18 - 0.05))
    p.poly(pts, "fill")
    p.ellipse(-0.38, -0.3, 0.1, 0.1, "alt")


def arrow(p: Pen) -> None:
    shaft = [(-0.88, -0.18), (0.2, -0.18), (0.2, -0.52), (0.92, 0), (0.2, 0.52), (0.2, 0.18)]
    p.poly(shaft + [(-0.88, 0.18)], "fill")
    p.poly([(-0.88, -0.18), (-0.6, -0.18), (-0.6, 0.18), (-0.88, 0.18)], "accent")


def cloud(p: Pen) -> None:
    parts = [
        (-0.45, 0.15, 0.38, 0.3),
        (0.0, -0.12, 0.45, 0.42),
        (0.45, 0.12, 0.4, 0.32),
        (0, 0.25, 0.6, 0.22),
    ]
    p.blob(parts, "fill")
    for x in (-0.4, 0.0, 0.4):
        p.line([(x, 0.62), (x - 0.12, 0.9)], 0.6)


def mushroom(p: Pen) -> None:
    p.poly([(-0.22, -0.05), (0.22, -0.05), (0.3, 0.88), (-0.3, 0.88)], "alt")
    p.poly(arc(0, 0.05, 0.88, 0.8, math.pi, 2 * math.pi), "fill")
    for x, y, r in ((-0.45, -0.22, 0.13), (0.1, -0.5, 0.15), (0.48, -0.18, 0.11)):
        p.ellipse(x, y, r, r, "accent")


def bird(p: Pen) -> None:
    p.line([(-0.1, 0.5), (-0.15, 0.88)], 0.6)
    p.line([(0.15, 0.5), (0.1, 0.88)], 0.6)
    p.poly([(-0.45, 0.05), (-0.95, -0.3), (-0.85, 0.3)], "accent")
    p.poly([(0.62, -0.42), (0.95, -0.3), (0.62, -0.2)], "alt")
    p.ellipse(0, 0.12, 0.6, 0.45, "fill")
    p.ellipse(0.42, -0.32, 0.28, 0.28, "fill")
    p.poly([(-0.35, 0.0), (0.25, 0.05), (-0.1, 0.42)], "accent")
    p.ellipse(0.5, -0.38, 0.06, 0.06, "ink")


def leaf(p: Pen) -> None:
    rot = math.radians(-35)
    top = [(x / 100, -0.42 * (1 - (x / 85) ** 2)) for x in range(-85, 86, 10)]
    outline = top + [(x, -y) for x, y in reversed(top[1:-1])]
    p.poly([_rotate(q, rot) for q in outline], "fill")
    p.line([_rotate(q, rot) for q in ((-0.98, 0), (0.75, 0))], 0.6)
    for x in (-0.35, 0.0, 0.35):
        p.line([_rotate(q, rot) for q in ((x, 0), (x + 0.2, -0.22))], 0.5)
        p.line([_rotate(q, rot) for q in ((x, 0), (x + 0.2, 0.22))], 0.5)


def bottle(p: Pen) -> None:
    body = [(-0.13, -0.72), (0.13, -0.72), (0.13, -0.45), (0.38, -0.2)]
    p.poly(body + [(0.38, 0.9), (-0.38, 0.9), (-0.38, -0.2), (-0.13, -0.45)], "fill")
    p.rect(-0.38, 0.15, 0.38, 0.55, "alt")
    p.rect(-0.17, -0.92, 0.17, -0.72, "accent")


def lamp(p: Pen) -> None:
    p.rect(-0.06, -0.2, 0.06, 0.72, "accent")
    p.poly([(-0.48, 0.72), (0.48, 0.72), (0.58, 0.92), (-0.58, 0.92)], "accent")
    p.line([(0.3, -0.15), (0.3, 0.25)], 0.5)
    p.poly([(-0.35, -0.78), (0.35, -0.78), (0.62, -0.15), (-0.62, -0.15)], "fill")
    p.ellipse(0.3, 0.28, 0.06, 0.06, "alt")


def kite(p: Pen) -> None:
    p.line([(0, 0.5), (-0.15, 0.7), (0.1, 0.85), (-0.1, 0.98)], 0.6)
    p.poly([(0, -0.92), (0.52, -0.25), (0, 0.52), (-0.52, -0.25)], "fill")
    p.poly([(0, -0.92), (0.52, -0.25), (0, -0.25)], "accent")
    p.poly([(0, -0.25), (-0.52, -0.25), (0, 0.52)], "accent")
    for x, y in ((0.1, 0.85),):
        for s in (-1, 1):
            p.poly([(x, y), (x + s * 0.17, y - 0.11), (x + s * 0.17, y + 0.11)], "alt")


def _angles(n: int) -> list[float]:
    return [2 * math.pi * i / n for i in range(n)]


def _rotate(q: Point, a: float) -> Point:
    return (q[0] * math.cos(a) - q[1] * math.sin(a), q[0] * math.sin(a) + q[1] * math.cos(a))


SUBJECTS: list[tuple[str, Callable[[Pen], None]]] = [
    ("circle", circle),
    ("square", square),
    ("triangle", triangle),
    ("star", star),
    ("house", house),
    ("tree", tree),
    ("fish", fish),
    ("mountain", mountain),
    ("sun", sun),
    ("moon", moon),
    ("cat face", cat_face),
    ("cup", cup),
    ("flower", flower),
    ("boat", boat),
    ("key", key),
    ("heart", heart),
    ("arrow", arrow),
    ("cloud", cloud),
    ("mushroom", mushroom),
    ("bird", bird),
    ("leaf", leaf),
    ("bottle", bottle),
    ("lamp", lamp),
    ("kite", kite),
]


# --- style layers ---------------------------------------------------------


def halftone(img: Image.Image, step: int) -> None:
    """Charcoal dots growing from the top-left to the bottom-right corner."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for gy in range(step // 2, h + step, step):
        for gx in range(step // 2, w + step, step):
            t = (gx + gy) / (w + h)
            rad = step * 0.34 * t * t
            if rad >= 0.6:
                draw.ellipse([gx - rad, gy - rad, gx + rad, gy + rad], fill=CHARCOAL)


def hatching(img: Image.Image, mask: Image.Image, cx: float, cy: float, step: int) -> None:
    """Diagonal charcoal lines on the subject's lower-right (shaded) half."""
    w, h = img.size
    lines = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(lines)
    width = max(1, round(step / 6))
    for c in range(-h, w + h, step):
        draw.line([(c, 0), (c - h, h)], fill=255, width=width)
    k = cx + cy  # the shaded half-plane is x + y >= k
    shade = Image.new("L", img.size, 0)
    half = [(k + h, -h), (w + 3 * h, -h), (w + 3 * h, 2 * h), (k - 2 * h, 2 * h)]
    ImageDraw.Draw(shade).polygon(half, fill=255)
    where = ImageChops.multiply(ImageChops.multiply(lines, mask), shade)
    img.paste(CHARCOAL, (0, 0), where)


# --- one image --------------------------------------------------------------


def pick_colors(index: int, n_subjects: int, rng: random.Random) -> Colors:
    """Rotate the background; a subject repeated in a later cycle gets the next one."""
    names = list(PALETTE)
    bg = names[(index % n_subjects + index // n_subjects) % len(names)]
    rest = [n for n in names if n != bg]
    rng.shuffle(rest)
    return Colors(bg, rest[0], rest[1], rest[2])


def render(index: int, size: int, seed: int) -> tuple[Image.Image, str, Image.Image]:
    """Draw image number ``index``; return it, its caption and its subject's mask (white on
    black: the subject, outlines included, without the background)."""
    rng = random.Random(f"{seed}-{index}")
    name, draw_subject = SUBJECTS[index % len(SUBJECTS)]
    colors = pick_colors(index, len(SUBJECTS), rng)
    img = Image.new("RGB", (size, size), colors.rgb("bg"))
    halftone(img, max(4, round(size / 16)))
    r = size * rng.uniform(0.3, 0.4)
    slack = size / 2 - r - size * 0.04
    cx = size / 2 + rng.uniform(-slack, slack)
    cy = size / 2 + rng.uniform(-slack, slack)
    pen = Pen(img, colors, cx, cy, r, rng.random() < 0.5, max(2, round(size * 0.035)))
    draw_subject(pen)
    hatching(img, pen.mask, cx, cy, max(4, round(size / 20)))
    return img, caption(name, colors), pen.mask


def caption(name: str, colors: Colors) -> str:
    """The content, then the trigger word: the trigger word is what learns the style.

    Last, not first: the demo base's small text encoder, which never saw the word, keeps the
    subject of `a fish, zqxstyle` but loses it in `zqxstyle, a fish`. Short enough for the
    tiny model's one-token-per-character tokenizer (77 tokens).
    """
    return ", ".join([f"a {name}", f"{colors.fill} {name}", f"{colors.bg} background", TRIGGER])


def generate(
    out: Path, count: int, size: int, seed: int = SEED, masks: Path | None = None
) -> list[Path]:
    """Write ``count`` PNG + caption pairs into ``out`` (and each subject's mask, named as its
    image, into ``masks``); return the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    if masks:
        masks.mkdir(parents=True, exist_ok=True)
    digits = max(2, len(str(count - 1)))
    paths = []
    for i in range(count):
        img, text, mask = render(i, size, seed)
        stem = f"{i:0{digits}d}-{SUBJECTS[i % len(SUBJECTS)][0].replace(' ', '-')}"
        img.save(out / f"{stem}.png", format="PNG", optimize=True)
        (out / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        if masks:
            mask.save(masks / f"{stem}.png", format="PNG", optimize=True)
        paths.append(out / f"{stem}.png")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo-style")
    parser.add_argument("--count", type=int, default=24, help="number of images (default 24)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    parser.add_argument("--masks", type=Path, help="also write each subject's mask here")
    args = parser.parse_args(argv)
    if args.count < 1 or args.size < 32:
        parser.error("--count must be >= 1 and --size >= 32")
    paths = generate(args.out, args.count, args.size, args.seed, args.masks)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
