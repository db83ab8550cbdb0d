// Status icons as inline SVG (stroke in the text colour), so they look the same on
// every system: no icon font, no emoji that a system may lack.

const SVG = "http://www.w3.org/2000/svg";

const PATHS = {
  healthy: "M4 12.5l5 5L20 6.5",
  silent: "M8.5 5v14M15.5 5v14",
  skewed: "M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18M12 7v5.5l3.5 2.5",
  lagging: "M4 6h16M4 12h16M4 18h9",
  expiring: "M12 3L2 20.5h20ZM12 9.5v5M12 17.2v.6",
  unknown: "M9 9a3 3 0 1 1 4 2.8c-.8.4-1 1-1 2v.5M12 17.5v.5",
};

/** A 1em icon for a status; hidden from screen readers (the word next to it says it). */
export function icon(name) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", "1em");
  svg.setAttribute("height", "1em");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("class", `icon icon-${name}`);
  const path = document.createElementNS(SVG, "path");
  path.setAttribute("d", PATHS[name] ?? PATHS.unknown);
  path.setAttribute("fill", "none");
  path.setAttribute("stroke", "currentColor");
  path.setAttribute("stroke-width", "2.6");
  path.setAttribute("stroke-linecap", "round");
  path.setAttribute("stroke-linejoin", "round");
  svg.append(path);
  return svg;
}
