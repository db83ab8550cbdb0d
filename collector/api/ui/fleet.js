// Fleet: every agent with its status, last seen, backlog, clock skew and certificate
// expiry; a summary by status; filter and sort. Needs a token with the operator role.
//
// Silent and skewed agents stand out three ways: the status badge (icon and word), a
// marked row ("attention", with a bar on its left edge and a text note under the host
// id), and they sort first by default. Colour only repeats what the words say.

import { all, describe } from "./api.js";
import { fill, field, h, notice, select } from "./dom.js";
import { announce, go, href } from "./nav.js";
import { duration, isoAttr, parseTime, skew, utc, utcDate } from "./format.js";
import { toCsv, download } from "./csv.js";
import { icon } from "./icons.js";

// Worst first: the default sort puts what needs a person at the top.
export const STATUSES = ["silent", "expiring", "skewed", "lagging", "healthy"];
const MEANING = {
  healthy: "shipping on time",
  lagging: "records are waiting in its spool",
  silent: "no batch received for too long",
  skewed: "its clock is off",
  expiring: "its certificate expires soon",
};
const ATTENTION = new Set(["silent", "skewed"]);
const REFRESH_MS = 30_000;

const COLUMNS = [
  { key: "host", label: "Host", value: (a) => a.host },
  { key: "status", label: "Status", value: (a) => STATUSES.indexOf(a.status) },
  { key: "last_seen", label: "Last seen", value: (a) => a.lastSeen ?? -Infinity },
  { key: "version", label: "Version", value: (a) => a.version },
  { key: "backlog", label: "Backlog", num: true, value: (a) => a.backlog },
  { key: "skew", label: "Clock skew", num: true, value: (a) => Math.abs(a.skewMs ?? 0) },
  { key: "cert", label: "Certificate expires", value: (a) => a.certExpires ?? Infinity },
  { key: "dead_letters", label: "Dead letters", num: true, value: (a) => a.deadLetters ?? -1 },
];

/**
 * One agent of GET /v1/fleet/agents, in the names this view uses. Ages ("5 min ago",
 * "in 40 days") come from the collector's clock (seconds_since_seen, days_left), not
 * the browser's, so a laptop with a wrong clock still reads the fleet right.
 */
export function agentOf(raw) {
  return {
    host: raw.host_id,
    status: STATUSES.includes(raw.status) ? raw.status : "unknown",
    conditions: raw.conditions ?? [],
    lastSeen: parseTime(raw.last_seen),
    secondsSinceSeen: raw.seconds_since_seen ?? null,
    version: raw.version ?? "",
    backlog: raw.backlog_records ?? 0,
    skewMs: raw.clock_skew_ms ?? null,
    certExpires: parseTime(raw.certificate?.expires_at),
    certDaysLeft: raw.certificate?.days_left ?? null,
    deadLetters: raw.dead_letters ?? null,
  };
}

export function badge(status) {
  return h("span", { class: `badge status-${status}`, title: MEANING[status] ?? "" },
    icon(status), status);
}

function state(params) {
  const sort = COLUMNS.some((c) => c.key === params.get("sort")) ? params.get("sort") : "status";
  return {
    status: STATUSES.includes(params.get("status")) ? params.get("status") : "",
    q: params.get("q") ?? "",
    sort,
    dir: params.get("dir") === "desc" ? "desc" : "asc",
  };
}

function visible(agents, s) {
  const q = s.q.trim().toLowerCase();
  const column = COLUMNS.find((c) => c.key === s.sort);
  const sign = s.dir === "desc" ? -1 : 1;
  return agents
    .filter((a) => !s.status || a.status === s.status)
    .filter((a) => !q || a.host.toLowerCase().includes(q) || a.version.toLowerCase().includes(q))
    .sort((a, b) => {
      const x = column.value(a);
      const y = column.value(b);
      const order = typeof x === "string" ? x.localeCompare(y) : x - y;
      return sign * order || a.host.localeCompare(b.host);
    });
}

function certCell(agent) {
  if (agent.certExpires === null) return h("td", { "data-label": "Certificate expires" }, "—");
  const days = agent.certDaysLeft;
  const text = days === null ? "" : days < 0 ? `expired ${-days} days ago` : `in ${days} days`;
  const flagged = agent.conditions.includes("expiring");
  return h("td", { "data-label": "Certificate expires" },
    h("time", { datetime: isoAttr(agent.certExpires) }, utcDate(agent.certExpires)),
    h("span", { class: "sub" }, flagged ? [icon("expiring"), ` ${text}`] : text));
}

function seen(agent) {
  if (agent.lastSeen === null) return "never";
  const ago = agent.secondsSinceSeen === null ? "" : agent.secondsSinceSeen < 1 ? "just now"
    : `${duration(agent.secondsSinceSeen)} ago`;
  return [h("time", { datetime: isoAttr(agent.lastSeen) }, ago || utc(agent.lastSeen)),
    h("span", { class: "sub" }, utc(agent.lastSeen))];
}

function row(agent) {
  const attention = ATTENTION.has(agent.status) || agent.conditions.some((c) => ATTENTION.has(c));
  const notes = agent.conditions.length ? agent.conditions : [agent.status];
  return h("tr", { class: attention ? "attention" : agent.status === "healthy" ? null : "warning",
    dataset: { host: agent.host, status: agent.status } },
    h("th", { scope: "row" }, agent.host,
      notes.filter((c) => c in MEANING && c !== "healthy").map((c) =>
        h("span", { class: "sub" }, icon(c), ` ${c}: ${MEANING[c]}`))),
    h("td", { "data-label": "Status" }, badge(agent.status)),
    h("td", { "data-label": "Last seen" }, seen(agent)),
    h("td", { "data-label": "Version" }, agent.version || "—"),
    h("td", { class: "num", "data-label": "Backlog" }, `${agent.backlog.toLocaleString("en")} records`),
    h("td", { class: "num", "data-label": "Clock skew" },
      agent.conditions.includes("skewed") ? [icon("skewed"), ` ${skew(agent.skewMs)}`] : skew(agent.skewMs)),
    certCell(agent),
    h("td", { class: "num", "data-label": "Dead letters" }, agent.deadLetters === null ? "—" : String(agent.deadLetters)));
}

export async function render(container, { params, isCurrent }) {
  const s = state(params);
  // Filters and sorting replace the URL (no history entry, focus stays on the control).
  const setState = (change) => go(href("fleet", [], { ...s, ...change }), { replace: true });

  const heading = h("h1", {}, "Fleet");
  const updated = h("p", { class: "hint" }, "Loading…");
  const summary = h("ul", { class: "summary", "aria-label": "Agents by status" });
  const search = h("input", { type: "search", name: "q", value: s.q, placeholder: "host or version" });
  search.addEventListener("change", () => setState({ q: search.value }));
  const statusSelect = select("status", [["", "All statuses"], ...STATUSES.map((x) => [x, x])], s.status);
  statusSelect.addEventListener("change", () => setState({ status: statusSelect.value }));
  const refresh = h("button", { type: "button", class: "secondary" }, "Refresh");
  const exportButton = h("button", { type: "button", class: "secondary" }, "Export CSV");

  const headRow = h("tr");
  for (const column of COLUMNS) {
    const active = column.key === s.sort;
    const next = active && s.dir === "asc" ? "desc" : "asc";
    const th = h("th", { scope: "col", class: column.num ? "num" : null,
      "aria-sort": active ? (s.dir === "asc" ? "ascending" : "descending") : null },
      h("button", { type: "button", class: "sort", dataset: { key: `sort-${column.key}` },
        onclick: () => setState({ sort: column.key, dir: next }) },
        column.label, h("span", { class: "arrow", "aria-hidden": "true" }, active ? (s.dir === "asc" ? " ▲" : " ▼") : " ↕"),
        h("span", { class: "visually-hidden" }, active ? `, sorted ${s.dir === "asc" ? "ascending" : "descending"}` : ", sort")));
    headRow.append(th);
  }
  const body = h("tbody");
  const caption = h("caption", { class: "visually-hidden" }, "Agents");
  const table = h("table", { class: "responsive fleet-table" }, caption, h("thead", {}, headRow), body);
  const message = h("div");

  fill(container, heading, updated, summary,
    h("form", { class: "controls", role: "search", "aria-label": "Filter agents",
      onsubmit: (event) => { event.preventDefault(); setState({ q: search.value }); } },
    field("Search", search), field("Status", statusSelect), refresh, exportButton),
    message, h("div", { class: "table-wrap" }, table));

  let shown = [];
  async function load() {
    let agents;
    try {
      agents = (await all("/v1/fleet/agents")).map(agentOf);
    } catch (err) {
      fill(message, notice("error", describe(err)));
      return false;
    }
    if (!isCurrent()) return false;
    const now = Date.now();
    const counts = Object.fromEntries(STATUSES.map((x) => [x, 0]));
    for (const a of agents) counts[a.status] = (counts[a.status] ?? 0) + 1;
    const focused = summary.contains(document.activeElement) ? document.activeElement.dataset.key : null;
    fill(summary, h("li", {}, h("button", { type: "button", "aria-pressed": String(!s.status),
      dataset: { key: "status-all" }, onclick: () => setState({ status: "" }) },
    h("span", { class: "count" }, String(agents.length)), "all agents")),
    STATUSES.map((x) => h("li", {}, h("button", {
      type: "button",
      class: ATTENTION.has(x) && counts[x] ? "attention" : null,
      "aria-pressed": String(s.status === x),
      dataset: { status: x, key: `status-${x}` },
      onclick: () => setState({ status: s.status === x ? "" : x }),
    }, h("span", { class: "count" }, String(counts[x])), badge(x)))));
    if (focused) summary.querySelector(`[data-key="${focused}"]`)?.focus();
    shown = visible(agents, s);
    caption.textContent = `Agents${s.status ? ` with status ${s.status}` : ""}${s.q ? ` matching “${s.q}”` : ""}: ${shown.length} of ${agents.length}`;
    fill(body, shown.map((a) => row(a)));
    fill(message, shown.length ? null : notice("empty", agents.length ? "No agent matches this filter." : "No agent has called this collector yet."));
    const attention = STATUSES.filter((x) => ATTENTION.has(x) && counts[x]).map((x) => `${counts[x]} ${x}`);
    fill(updated, `${agents.length} agents, updated ${utc(now)}.`,
      attention.length ? h("strong", {}, ` Needs attention: ${attention.join(", ")}.`) : null);
    return true;
  }

  refresh.addEventListener("click", async () => {
    if (await load()) announce("Fleet refreshed");
  });
  exportButton.addEventListener("click", () => {
    const rows = shown.map((a) => [a.host, a.status, isoAttr(a.lastSeen) ?? "", a.version, a.backlog,
      a.skewMs ?? "", isoAttr(a.certExpires) ?? "", a.deadLetters ?? ""]);
    download("meterd-fleet.csv", toCsv(["host", "status", "last_seen", "version", "backlog_records",
      "clock_skew_ms", "certificate_not_after", "dead_letters"], rows));
  });
  await load();
  const timer = setInterval(() => {
    if (!isCurrent() || !container.isConnected) clearInterval(timer);
    else load();
  }, REFRESH_MS);
}
