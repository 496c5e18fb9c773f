"use strict";

// --- a run's page: style, content and copying at each measured step (progress.jsonl's
// `measure` lines) as they come, and the step the run picked (its `pick` line) -------------

const MEASURES = [["style", "style"], ["content", "content"], ["copying", "copying"]];

class MeasureChart {
  constructor(box) {
    this.box = box;
    this.svg = box.querySelector("svg");
  }

  draw(measures, picked) {
    $("measures-section").hidden = !measures.length;
    $("measure-pick").textContent = picked ? `picked: step ${picked.step} (${picked.reason})` : "";
    if (!measures.length) return;
    const width = Math.max(240, this.box.clientWidth), height = 220;
    const plot = { x0: 58, x1: width - 20, y0: height - 34, y1: 14 };
    this.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    this.svg.setAttribute("width", width);
    this.svg.setAttribute("height", height);
    const values = measures.flatMap((m) => MEASURES.map(([key]) => m[key]));
    const ticks = niceTicks(Math.min(0, ...values), Math.max(1, ...values), 5, true);
    const lo = ticks[0], hi = ticks[ticks.length - 1];
    const last = Math.max(...measures.map((m) => m.step)) || 1;
    const x = (step) => plot.x0 + ((plot.x1 - plot.x0) * step) / last;
    const y = (value) => plot.y0 - ((plot.y0 - plot.y1) * (value - lo)) / (hi - lo);
    const nodes = [];
    for (const tick of ticks) {
      nodes.push(svgEl("line", { x1: plot.x0, x2: plot.x1, y1: y(tick), y2: y(tick), class: "grid" }));
      nodes.push(svgEl("text", { x: plot.x0 - 6, y: y(tick) + 4, "text-anchor": "end", class: "tick y" }, formatNumber(tick)));
    }
    for (const m of measures) {
      nodes.push(svgEl("text", { x: x(m.step), y: plot.y0 + 16, "text-anchor": "middle", class: "tick x" }, m.step));
    }
    nodes.push(svgEl("text", { x: (plot.x0 + plot.x1) / 2, y: height - 2, "text-anchor": "middle", class: "axis-label" }, "step"));
    nodes.push(svgEl("rect", { x: plot.x0, y: plot.y1, width: plot.x1 - plot.x0, height: plot.y0 - plot.y1, class: "frame" }));
    if (picked) nodes.push(svgEl("line", { x1: x(picked.step), x2: x(picked.step), y1: plot.y0, y2: plot.y1, class: "picked" }));
    for (const [key, kind] of MEASURES) {
      const points = measures.map((m) => `${x(m.step).toFixed(1)},${y(m[key]).toFixed(1)}`).join(" ");
      nodes.push(svgEl("polyline", { points, class: `line ${kind}` }));
      for (const m of measures) {
        const dot = svgEl("circle", { cx: x(m.step), cy: y(m[key]), r: 3, class: `${kind}-dot` });
        dot.append(svgEl("title", {}, `step ${m.step}: ${key} ${m[key].toFixed(3)}`));
        nodes.push(dot);
      }
    }
    this.svg.replaceChildren(...nodes);
  }
}
