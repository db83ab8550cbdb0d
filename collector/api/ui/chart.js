// Line and bar charts as inline SVG, with axes, tick labels, a legend and the data as a
// table. No library: a few hundred lines cover what the dashboard draws.
//
// Values arrive as the API's decimal strings. They become numbers only to compute
// positions (decimal.toNumber); every label a reader sees next to a chart (point
// titles, the data table) is the exact string. Tick labels on the value axis are
// round numbers chosen by niceTicks, not amounts from the API.
//
// Series are told apart without colour: each has its own line dash and marker shape
// (line charts) or fill pattern (bar charts), shown the same way in the legend.

import { group, toNumber } from "./decimal.js";

const SVG = "http://www.w3.org/2000/svg";
// Charts are drawn in a box of width x HEIGHT units and scaled to their container.
const WIDTH = 600;
const HEIGHT = 270;
const MARGIN = { top: 16, right: 22, bottom: 50, left: 70 };
const LABEL_WIDTH = 80; // room for one time or category label on the x axis
// Okabe-Ito: distinguishable with the common colour-vision deficiencies.
const COLOURS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000"];
const DASHES = ["", "7 4", "2 3", "9 3 2 3", "4 2", "1 2", "12 4"];
const MARKERS = ["circle", "square", "triangle", "diamond", "cross", "circle", "square"];
const PATTERNS = ["solid", "diagonal", "dots", "horizontal", "cross", "vertical", "solid"];
const MAX_MARKERS = 90;
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

let chartCount = 0;

function svg(name, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }
  return node;
}

function html(name, attrs = {}, ...children) {
  const node = document.createElement(name);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

const round = (v) => Math.round(v * 10) / 10;

/** Round tick values (1, 2 or 5 times a power of ten) covering [min, max]. */
export function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
  if (min === max) {
    if (min === 0) return [0, 1];
    const pad = Math.abs(min) / 2;
    [min, max] = [Math.min(0, min - pad), Math.max(0, max + pad)];
  }
  const raw = (max - min) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => raw <= s) ?? 10 * power;
  const start = Math.floor(min / step) * step;
  const ticks = [];
  for (let v = start; v < max + step * 0.5; v += step) {
    ticks.push(Number(v.toPrecision(12)));
    if (ticks.length > 50) break;
  }
  if (ticks[ticks.length - 1] < max) ticks.push(Number((start + ticks.length * step).toPrecision(12)));
  return ticks;
}

/** A short axis label for a round tick value: 1500 -> "1.5k", 2e9 -> "2G". */
export function formatTick(value) {
  const abs = Math.abs(value);
  for (const [size, suffix] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (abs >= size) return `${Number((value / size).toPrecision(4))}${suffix}`;
  }
  return String(Number(value.toPrecision(6)));
}

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
const TIME_STEPS = [MINUTE, 5 * MINUTE, 15 * MINUTE, 30 * MINUTE, HOUR, 3 * HOUR, 6 * HOUR,
  12 * HOUR, DAY, 2 * DAY, 7 * DAY, 14 * DAY];
const MONTH_STEPS = [1, 2, 3, 6, 12, 24, 60];

const pad2 = (n) => String(n).padStart(2, "0");

/** Tick instants (ms since the epoch, UTC) for a time axis, and how to label them. */
export function timeTicks(start, end, count = 6) {
  const span = Math.max(end - start, MINUTE);
  const step = TIME_STEPS.find((s) => span / s <= count);
  const ticks = [];
  if (step !== undefined) {
    for (let t = Math.ceil(start / step) * step; t < end; t += step) ticks.push(t);
    const label = (t) => {
      const d = new Date(t);
      const day = `${MONTHS[d.getUTCMonth()]} ${d.getUTCDate()}`;
      if (step >= DAY) return day;
      const clock = `${pad2(d.getUTCHours())}:${pad2(d.getUTCMinutes())}`;
      return d.getUTCHours() === 0 && d.getUTCMinutes() === 0 ? `${day} ${clock}` : clock;
    };
    return { ticks, label };
  }
  const months = span / (30 * DAY);
  const monthStep = MONTH_STEPS.find((s) => months / s <= count) ?? 120;
  const first = new Date(start);
  let year = first.getUTCFullYear();
  let month = first.getUTCMonth();
  if (Date.UTC(year, month, 1) < start) month += 1;
  month = Math.ceil(month / monthStep) * monthStep;
  for (let t = Date.UTC(year, month, 1); t < end; t = Date.UTC(year, month, 1)) {
    ticks.push(t);
    month += monthStep;
  }
  const label = (t) => {
    const d = new Date(t);
    return `${MONTHS[d.getUTCMonth()]} ${d.getUTCFullYear()}`;
  };
  return { ticks, label };
}

function frame(kind, title, description, width) {
  chartCount += 1;
  const id = `chart-${chartCount}`;
  const figure = html("figure", { class: `chart chart-${kind}`, "data-chart": kind });
  figure.append(html("figcaption", { id: `${id}-caption` }, title));
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${HEIGHT}`,
    role: "img",
    "aria-labelledby": `${id}-title ${id}-desc`,
    preserveAspectRatio: "xMidYMid meet",
    class: "chart-svg",
  });
  root.append(svg("title", { id: `${id}-title` }, title));
  root.append(svg("desc", { id: `${id}-desc` }, description));
  return { id, figure, root };
}

function valueAxis(root, ticks, scaleY, unit, width) {
  const axis = svg("g", { class: "axis axis-y" });
  for (const tick of ticks) {
    const y = round(scaleY(tick));
    axis.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y, y2: y,
      class: tick === 0 ? "grid grid-zero" : "grid" }));
    axis.append(svg("text", { x: MARGIN.left - 8, y, dy: "0.32em", "text-anchor": "end" },
      formatTick(tick)));
  }
  if (unit) {
    axis.append(svg("text", { class: "axis-label", "text-anchor": "middle",
      transform: `translate(16 ${(MARGIN.top + HEIGHT - MARGIN.bottom) / 2}) rotate(-90)` }, unit));
  }
  root.append(axis);
}

function marker(shape, x, y, size = 4) {
  switch (shape) {
    case "square":
      return svg("rect", { x: round(x - size), y: round(y - size), width: 2 * size, height: 2 * size });
    case "triangle":
      return svg("path", { d: `M${round(x)} ${round(y - size - 1)}L${round(x + size + 1)} ${round(y + size)}L${round(x - size - 1)} ${round(y + size)}Z` });
    case "diamond":
      return svg("path", { d: `M${round(x)} ${round(y - size - 1)}L${round(x + size + 1)} ${round(y)}L${round(x)} ${round(y + size + 1)}L${round(x - size - 1)} ${round(y)}Z` });
    case "cross":
      return svg("path", { d: `M${round(x - size)} ${round(y - size)}L${round(x + size)} ${round(y + size)}M${round(x + size)} ${round(y - size)}L${round(x - size)} ${round(y + size)}`, "stroke-width": 2.5 });
    default:
      return svg("circle", { cx: round(x), cy: round(y), r: size });
  }
}

function legendItem(index, name, kind, patternId) {
  const colour = COLOURS[index % COLOURS.length];
  const swatch = svg("svg", { width: 34, height: 14, viewBox: "0 0 34 14", "aria-hidden": "true" });
  if (kind === "line") {
    swatch.append(svg("line", { x1: 1, x2: 33, y1: 7, y2: 7, stroke: colour, "stroke-width": 2.5,
      "stroke-dasharray": DASHES[index % DASHES.length] || undefined }));
    const m = marker(MARKERS[index % MARKERS.length], 17, 7, 3.5);
    m.setAttribute("fill", colour);
    m.setAttribute("stroke", colour);
    swatch.append(m);
  } else {
    swatch.append(svg("rect", { x: 1, y: 1, width: 32, height: 12, fill: `url(#${patternId})`,
      stroke: colour, "stroke-width": 1.5 }));
  }
  return html("li", {}, swatch, ` ${name}`);
}

function dataTable(caption, header, rows) {
  const table = html("table", { class: "data-table" });
  table.append(html("caption", { class: "visually-hidden" }, caption));
  const head = html("tr");
  for (const cell of header) head.append(html("th", { scope: "col" }, cell));
  table.append(html("thead", {}, head));
  const body = html("tbody");
  for (const row of rows) {
    const tr = html("tr");
    row.forEach((cell, i) => {
      tr.append(i === 0 ? html("th", { scope: "row" }, cell) : html("td", { class: "num" }, cell));
    });
    body.append(tr);
  }
  table.append(body);
  return html("details", { class: "chart-data" }, html("summary", {}, "Show the data"), table);
}

/**
 * A time series chart.
 *
 * series: [{name, points: [{t: ms since epoch, value: "decimal string"}]}]
 * domain: [start, end] in ms (the selected range); unit: the value axis label.
 * formatTime: how the data table writes an instant.
 */
export function lineChart({ title, description, unit = "", series, domain, formatTime,
  formatValue = group, width = WIDTH }) {
  const { figure, root } = frame("line", title, description, width);
  const all = series.flatMap((s) => s.points);
  const times = all.map((p) => p.t);
  const [start, end] = domain ?? [Math.min(...times), Math.max(...times)];
  const values = all.map((p) => toNumber(p.value));
  const ticks = niceTicks(Math.min(0, ...values), Math.max(0, ...values));
  const low = ticks[0];
  const high = ticks[ticks.length - 1];
  const plotW = width - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const scaleX = (t) => MARGIN.left + (end > start ? ((t - start) / (end - start)) * plotW : plotW / 2);
  const scaleY = (v) => MARGIN.top + plotH - ((v - low) / (high - low || 1)) * plotH;

  valueAxis(root, ticks, scaleY, unit, width);
  const xAxis = svg("g", { class: "axis axis-x" });
  const baseline = HEIGHT - MARGIN.bottom;
  xAxis.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: baseline, y2: baseline,
    class: "axis-line" }));
  const { ticks: tTicks, label } = timeTicks(start, end, Math.max(2, Math.floor(plotW / LABEL_WIDTH)));
  for (const t of tTicks) {
    const x = round(scaleX(t));
    xAxis.append(svg("line", { x1: x, x2: x, y1: baseline, y2: baseline + 5, class: "axis-line" }));
    xAxis.append(svg("text", { x, y: baseline + 20, "text-anchor": "middle" }, label(t)));
  }
  xAxis.append(svg("text", { class: "axis-label", x: MARGIN.left + plotW / 2, y: HEIGHT - 6,
    "text-anchor": "middle" }, "time (UTC)"));
  root.append(xAxis);

  const legend = html("ul", { class: "legend" });
  series.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const points = [...s.points].sort((a, b) => a.t - b.t);
    const d = points
      .map((p, j) => `${j === 0 ? "M" : "L"}${round(scaleX(p.t))} ${round(scaleY(toNumber(p.value)))}`)
      .join("");
    const g = svg("g", { class: "series", "data-series": s.name });
    g.append(svg("path", { d, class: "series-line", fill: "none", stroke: colour,
      "stroke-width": 2.5, "stroke-dasharray": DASHES[i % DASHES.length] || undefined,
      "data-points": points.length }));
    if (points.length <= MAX_MARKERS) {
      const marks = svg("g", { class: "markers", fill: colour, stroke: colour });
      for (const p of points) {
        const m = marker(MARKERS[i % MARKERS.length], scaleX(p.t), scaleY(toNumber(p.value)));
        m.append(svg("title", {}, `${s.name}, ${formatTime(p.t)}: ${formatValue(p.value)} ${unit}`.trim()));
        marks.append(m);
      }
      g.append(marks);
    }
    root.append(g);
    legend.append(legendItem(i, s.name, "line"));
  });
  if (all.length === 0) {
    root.append(svg("text", { x: width / 2, y: HEIGHT / 2, "text-anchor": "middle",
      class: "empty" }, "No data in this range"));
  }
  figure.append(html("div", { class: "chart-box" }, root));
  if (series.length > 1) figure.append(legend);

  const instants = [...new Set(times)].sort((a, b) => a - b);
  const lookup = series.map((s) => new Map(s.points.map((p) => [p.t, p.value])));
  const rows = instants.map((t) => [formatTime(t), ...lookup.map((m) => (m.has(t) ? formatValue(m.get(t)) : ""))]);
  figure.append(dataTable(title, ["Time (UTC)", ...series.map((s) => `${s.name}${unit ? ` (${unit})` : ""}`)], rows));
  return figure;
}

function patternDefs(root, id, count) {
  const defs = svg("defs");
  for (let i = 0; i < count; i += 1) {
    const colour = COLOURS[i % COLOURS.length];
    const kind = PATTERNS[i % PATTERNS.length];
    const pattern = svg("pattern", { id: `${id}-p${i}`, patternUnits: "userSpaceOnUse",
      width: 8, height: 8 });
    pattern.append(svg("rect", { width: 8, height: 8, fill: colour, "fill-opacity": kind === "solid" ? 1 : 0.55 }));
    const ink = { stroke: "#fff", "stroke-width": 1.6 };
    if (kind === "diagonal") pattern.append(svg("path", { d: "M-2 2L2 -2M0 8L8 0M6 10L10 6", ...ink }));
    if (kind === "horizontal") pattern.append(svg("path", { d: "M0 4H8", ...ink }));
    if (kind === "vertical") pattern.append(svg("path", { d: "M4 0V8", ...ink }));
    if (kind === "cross") pattern.append(svg("path", { d: "M0 4H8M4 0V8", ...ink }));
    if (kind === "dots") pattern.append(svg("circle", { cx: 4, cy: 4, r: 1.8, fill: "#fff" }));
    defs.append(pattern);
  }
  root.append(defs);
}

/**
 * A stacked bar chart: one bar per category, one segment per series.
 *
 * categories: ["Nov 2026", ...]; series: [{name, values: ["decimal string" | null, ...]}]
 */
export function barChart({ title, description, unit = "", categories, labels = categories, series,
  formatValue = group, width = WIDTH }) {
  const { id, figure, root } = frame("bar", title, description, width);
  patternDefs(root, id, series.length);
  const tops = categories.map((_, c) => series.reduce((acc, s) => acc + Math.max(0, toNumber(s.values[c] ?? "0")), 0));
  const bottoms = categories.map((_, c) => series.reduce((acc, s) => acc + Math.min(0, toNumber(s.values[c] ?? "0")), 0));
  const ticks = niceTicks(Math.min(0, ...bottoms), Math.max(0, ...tops));
  const low = ticks[0];
  const high = ticks[ticks.length - 1];
  const plotW = width - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const scaleY = (v) => MARGIN.top + plotH - ((v - low) / (high - low || 1)) * plotH;
  valueAxis(root, ticks, scaleY, unit, width);

  const slot = plotW / Math.max(categories.length, 1);
  const barW = Math.min(64, slot * 0.7);
  const baseline = HEIGHT - MARGIN.bottom;
  const xAxis = svg("g", { class: "axis axis-x" });
  xAxis.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: baseline, y2: baseline,
    class: "axis-line" }));
  const every = Math.max(1, Math.ceil((categories.length * LABEL_WIDTH * 0.75) / plotW));
  labels.forEach((name, c) => {
    if (c % every === 0) {
      xAxis.append(svg("text", { x: round(MARGIN.left + slot * (c + 0.5)), y: baseline + 20,
        "text-anchor": "middle" }, name));
    }
  });
  root.append(xAxis);

  const legend = html("ul", { class: "legend" });
  series.forEach((s, i) => {
    const g = svg("g", { class: "series", "data-series": s.name, stroke: COLOURS[i % COLOURS.length],
      "stroke-width": 1 });
    categories.forEach((category, c) => {
      const text = s.values[c];
      if (text === null || text === undefined) return;
      const value = toNumber(text);
      if (value === 0) return;
      const before = series.slice(0, i).reduce((acc, o) => {
        const v = toNumber(o.values[c] ?? "0");
        return acc + (Math.sign(v) === Math.sign(value) ? v : 0);
      }, 0);
      const y0 = scaleY(before);
      const y1 = scaleY(before + value);
      const rect = svg("rect", { class: "bar", x: round(MARGIN.left + slot * c + (slot - barW) / 2),
        y: round(Math.min(y0, y1)), width: round(barW), height: Math.max(round(Math.abs(y1 - y0)), 0.5),
        fill: `url(#${id}-p${i})`, "data-value": text });
      rect.append(svg("title", {}, `${s.name}, ${category}: ${formatValue(text)} ${unit}`.trim()));
      g.append(rect);
    });
    root.append(g);
    legend.append(legendItem(i, s.name, "bar", `${id}-p${i}`));
  });
  if (categories.length === 0) {
    root.append(svg("text", { x: width / 2, y: HEIGHT / 2, "text-anchor": "middle",
      class: "empty" }, "No data in this range"));
  }
  // The legend's swatches use this chart's patterns, so they live in the same document.
  figure.append(html("div", { class: "chart-box" }, root));
  figure.append(legend);
  const rows = categories.map((name, c) => [name, ...series.map((s) => (s.values[c] == null ? "" : formatValue(s.values[c])))]);
  figure.append(dataTable(title, ["", ...series.map((s) => `${s.name}${unit ? ` (${unit})` : ""}`)], rows));
  return figure;
}
