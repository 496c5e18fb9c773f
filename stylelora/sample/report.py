"""`report.html` in the run folder: curves, preview grids over time, config, data and timings.

It is rewritten (atomically) at every preview and at the end; images are files beside it, linked
by relative paths, so the run folder can be copied or opened anywhere. What it shows is kept as
`report/data.json`, so that `stylelora pick` can write it again with a new pick.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stylelora.export.atomic import atomic_path

CURVES = "report/curves.png"
MEASURE_CURVES = "report/measures.png"
REPORT_DATA = "report/data.json"
BASE_ROW = "measures/base.png"  # train/measuring.py writes it

# Marks each image that failed to load, and counts both kinds on <body> for a quick check.
IMAGE_CHECK = """
window.addEventListener("load", () => {
  let loaded = 0, broken = 0;
  for (const img of document.images) {
    if (img.complete && img.naturalWidth > 0) { loaded++; continue; }
    broken++;
    img.insertAdjacentText("afterend", " (missing image: " + img.getAttribute("src") + ")");
  }
  document.body.dataset.imagesLoaded = loaded;
  document.body.dataset.imagesBroken = broken;
});
"""

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; background: #fafafa; }
h1 { margin-bottom: 0.2em; } .status { color: #555; margin-top: 0; }
table { border-collapse: collapse; } td, th { padding: 2px 12px 2px 0; text-align: left; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { image-rendering: pixelated; border: 1px solid #ccc; min-width: 256px; }
.measures img { image-rendering: pixelated; height: 96px; }
.measures th { vertical-align: top; font-weight: normal; }
pre { background: #fff; border: 1px solid #ddd; padding: 1em; overflow-x: auto; }
"""


@dataclass
class ReportData:
    name: str
    status: str
    step: int
    max_steps: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    previews: list[tuple[int, str]] = field(default_factory=list)
    measures: list[dict] = field(default_factory=list)  # train/measuring.py's records
    picked: dict | None = None  # {"step", "reason"} of NAME-best.safetensors
    skipped: int = 0
    dataset: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    timings: dict[str, str] = field(default_factory=dict)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    result, average = [], None
    for value in values:
        average = value if average is None else weight * average + (1 - weight) * value
        result.append(average)
    return result


def plot_curves(data: ReportData, path: Path) -> None:
    from matplotlib.figure import Figure  # Agg, without pyplot's global state; imported late

    figure = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    steps = list(range(1, len(data.losses) + 1))
    if steps:
        loss_axes.plot(steps, data.losses, color="tab:blue", alpha=0.3, label="training loss")
        loss_axes.plot(steps, smoothed(data.losses), color="tab:blue", label="smoothed")
        lr_axes.plot(steps, data.lrs, color="tab:green")
    if data.validation:
        val_steps, val_losses = zip(*data.validation, strict=True)
        loss_axes.plot(val_steps, val_losses, "o-", color="tab:orange", label="validation loss")
    loss_axes.set_ylabel("loss")
    loss_axes.legend(loc="upper right")
    loss_axes.grid(alpha=0.3)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def plot_measures(measures: list[dict], picked: dict | None, path: Path) -> None:
    """Style, content and copying against the step, the picked step marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    steps = [record["step"] for record in measures]
    for key, color in (("style", "tab:purple"), ("content", "tab:green"), ("copying", "tab:red")):
        axes.plot(steps, [record[key] for record in measures], "o-", color=color, label=key)
    if picked:
        axes.axvline(picked["step"], color="#444", linestyle="--", label="picked")
    axes.set_xlabel("step")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def measures_html(data: ReportData) -> str:
    """The style-vs-content section: the curve, each measured step's renders, the pick."""
    if not data.measures:
        return ""
    esc = html.escape
    rows = [f'<tr><th>without the adapter</th><td><img src="{BASE_ROW}" alt="base"></td></tr>']
    for record in data.measures:
        mark = " (picked)" if data.picked and data.picked["step"] == record["step"] else ""
        rows.append(
            f"<tr><th>step {record['step']}{mark}<br>style {record['style']:.2f}<br>"
            f"content {record['content']:.2f}<br>copying {record['copying']:.2f}</th>"
            f'<td><img src="{esc(record["path"])}?v={data.step}" '
            f'alt="renders at step {record["step"]}"></td></tr>'
        )
    pick = (
        f'<p class="pick">Recommended: step {data.picked["step"]}, '
        f"{esc(data.name)}-best.safetensors: {esc(data.picked['reason'])}.</p>"
        if data.picked
        else "<p>The recommendation is made at the end of the run.</p>"
    )
    return f"""<h2>Style, content and copying</h2>
{pick}
<img src="{MEASURE_CURVES}?v={data.step}" alt="style, content and copying by step" width="800">
<table class="measures">{"".join(rows)}</table>
"""


def render_html(data: ReportData) -> str:
    esc = html.escape
    timing_rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in data.timings.items()
    )
    previews = "".join(
        f'<figure><img src="{esc(path)}?v={data.step}" alt="preview at step {step}">'
        f"<figcaption>step {step}: without the adapter | with it</figcaption></figure>"
        for step, path in reversed(data.previews)
    )
    validation = (
        f"latest validation loss {data.validation[-1][1]:.5f} (step {data.validation[-1][0]})"
        if data.validation
        else "no validation set"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(data.name)}: training report</title>
<style>{STYLE}</style><script>{IMAGE_CHECK}</script></head>
<body>
<h1>{esc(data.name)}</h1>
<p class="status">{esc(data.status)}: step {data.step} of {data.max_steps};
{data.skipped} step(s) skipped for non-finite values; {esc(validation)}</p>
<h2>Loss and learning rate</h2>
<img src="{CURVES}?v={data.step}" alt="loss and learning-rate curves" width="800">
{measures_html(data)}
<h2>Previews</h2>
{previews or "<p>no previews yet</p>"}
<h2>Timings</h2>
<table>{timing_rows}</table>
<h2>Dataset</h2>
<pre>{esc(chr(10).join(data.dataset))}</pre>
<h2>Config</h2>
<pre>{esc(json.dumps(data.config, indent=2))}</pre>
</body></html>
"""


def write_report(output_dir: Path, data: ReportData) -> Path:
    """Plot the curves and write `report.html` and `report/data.json`; returns the page's path."""
    plot_curves(data, Path(output_dir) / CURVES)
    if data.measures:
        plot_measures(data.measures, data.picked, Path(output_dir) / MEASURE_CURVES)
    with atomic_path(Path(output_dir) / REPORT_DATA) as tmp:
        tmp.write_text(json.dumps(asdict(data)), encoding="utf-8")
    path = Path(output_dir) / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(render_html(data), encoding="utf-8")
    return path


def read_report_data(output_dir: Path) -> ReportData | None:
    """What the last `write_report` showed; None where the run folder has no readable record."""
    try:
        fields = json.loads((Path(output_dir) / REPORT_DATA).read_text(encoding="utf-8"))
        data = ReportData(**fields)
    except (OSError, ValueError, TypeError):
        return None
    # JSON has no tuples: the (step, value) pairs come back as lists.
    data.validation = [tuple(pair) for pair in data.validation]
    data.previews = [tuple(pair) for pair in data.previews]
    return data
