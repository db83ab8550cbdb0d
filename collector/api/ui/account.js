// Account: usage over time per metric (charts, with a range and a bucket), balances,
// invoices with their lines (open one), late adjustments and quarantined records.
//
// Each part loads on its own: a token whose role may read usage but not, say, the
// quarantine still sees everything else, with a note where a part is refused.

import { all, describe, get } from "./api.js";
import { lineChart } from "./chart.js";
import { amount, group, money, negate, sum } from "./decimal.js";
import { field, fill, h, notice, select } from "./dom.js";
import { parseTime, utc, utcDate } from "./format.js";
import { announce, go, href } from "./nav.js";
import { BUCKETS, DEFAULT_BUCKET, PRESETS, bucketStarts, resolve } from "./range.js";

const enc = encodeURIComponent;

function state(params) {
  const preset = PRESETS.some(([p]) => p === params.get("range")) ? params.get("range") : "30d";
  const bucket = BUCKETS.includes(params.get("bucket")) ? params.get("bucket") : DEFAULT_BUCKET[preset];
  return {
    range: preset,
    bucket,
    from: params.get("from") ?? "",
    to: params.get("to") ?? "",
    invoice: params.get("invoice") ?? "",
  };
}

function section(title, id) {
  const heading = h("h2", { id }, title);
  const body = h("div", {}, notice("loading", `Loading ${title.toLowerCase()}…`));
  return { node: h("section", { class: "part", "aria-labelledby": id }, heading, body), body };
}

async function part(body, load) {
  try {
    await load();
  } catch (err) {
    fill(body, notice("error", describe(err)));
  }
}

// --- usage ----------------------------------------------------------------------------

/** Usage rows summed per metric and bucket (exactly), gaps filled with "0". */
export function seriesByMetric(rows, starts) {
  const metrics = new Map();
  for (const row of rows) {
    const key = `${row.metric}\u0000${row.unit}`;
    if (!metrics.has(key)) metrics.set(key, { metric: row.metric, unit: row.unit, buckets: new Map() });
    const t = parseTime(row.start);
    const buckets = metrics.get(key).buckets;
    buckets.set(t, [...(buckets.get(t) ?? []), row.quantity]);
  }
  return [...metrics.values()]
    .sort((a, b) => a.metric.localeCompare(b.metric))
    .map(({ metric, unit, buckets }) => ({
      metric,
      unit,
      points: starts.map((t) => ({ t, value: buckets.has(t) ? sum(buckets.get(t)) : "0" })),
      total: sum([...buckets.values()].flat()),
    }));
}

async function usagePart(body, accountId, s) {
  const range = resolve({ preset: s.range, bucket: s.bucket, fromDay: s.from, toDay: s.to });
  if (range.error) {
    fill(body, notice("error", range.error));
    return;
  }
  const rows = await all("/v1/usage", {
    account: accountId,
    bucket: s.bucket,
    from: new Date(range.from).toISOString(),
    to: new Date(range.to).toISOString(),
  });
  const starts = bucketStarts(range.from, range.to, s.bucket);
  const series = seriesByMetric(rows, starts);
  const span = `${utc(range.from)} to ${utc(range.to)}, per ${s.bucket}`;
  if (series.length === 0) {
    fill(body, h("p", { class: "hint" }, span), notice("empty", "No usage in this range."));
    return;
  }
  const format = s.bucket === "day" || s.bucket === "month" ? utcDate : utc;
  fill(body,
    h("p", { class: "hint" }, span),
    h("ul", { class: "cards" }, series.map((x) => h("li", { class: "card", dataset: { metric: x.metric } },
      h("span", { class: "label" }, `${x.metric}, total`),
      h("span", { class: "value" }, group(x.total)), ` ${x.unit}`))),
    h("div", { class: "charts" }, series.map((x) => lineChart({
      title: `${x.metric} (${x.unit}) per ${s.bucket}`,
      description: `Usage of ${x.metric} for account ${accountId}, ${span}; total ${x.total} ${x.unit}.`,
      unit: x.unit,
      series: [{ name: x.metric, points: x.points }],
      domain: [range.from, range.to],
      formatTime: format,
    }))));
}

// --- balances -------------------------------------------------------------------------

async function balancePart(body, accountId) {
  const data = await get(`/v1/accounts/${enc(accountId)}/balances`);
  const receivable = data.balances.filter((b) => b.ledger_account === "receivable");
  fill(body,
    receivable.length === 0 ? notice("empty", "Nothing owed: no receivable balance yet.")
      : h("ul", { class: "cards" }, receivable.map((b) => h("li", { class: "card balance", dataset: { currency: b.currency } },
        h("span", { class: "label" }, `Receivable, ${b.currency.toUpperCase()}`),
        h("span", { class: "value" }, money(b.amount, b.currency))))),
    h("details", {}, h("summary", {}, "Every ledger account"),
      h("table", { class: "responsive" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Ledger account"), h("th", { scope: "col" }, "Currency"),
          h("th", { scope: "col", class: "num" }, "Balance"))),
        h("tbody", {}, data.balances.map((b) => h("tr", {},
          h("th", { scope: "row" }, b.ledger_account),
          h("td", { "data-label": "Currency" }, b.currency.toUpperCase()),
          h("td", { class: "num", "data-label": "Balance" }, amount(b.amount, b.currency))))))));
}

// --- invoices, late adjustments, quarantine ---------------------------------------------
//
// Invoices: GET /v1/invoices?account= (drafts and finalized, without lines), and the
// current and the previous period as they stand (GET
// /v1/accounts/{account}/invoice-preview?at=), unless stored. Opening one reads GET
// /v1/invoices/{id} (its document: lines, adjustments, taxes, totals), or the preview of
// its period. Late usage (posted after its period was finalized) is billed on the next
// invoice as an adjustment: GET /v1/accounts/{account}/adjustments lists them, each
// with the invoice that carries it. Quarantined records: GET /v1/quarantine?account=.

const PREVIEW = "preview:";

const invoiceKey = (inv) => inv.invoice_id ?? `${PREVIEW}${inv.period_start}`;
const invoiceName = (inv) => inv.number
  ?? (inv.invoice_id ? `draft ${inv.invoice_id.slice(-8)}` : `preview ${utcDate(parseTime(inv.period_start))}`);

function span(start, end) {
  const endMs = parseTime(end);
  return `${utcDate(parseTime(start))} – ${endMs === null ? "…" : utcDate(endMs - 1)}`;
}

function lineName(line) {
  const what = line.product ?? line.price ?? line.plan ?? line.kind;
  return line.price && line.product ? `${line.product} (${line.price})` : what;
}

function quantityText(line) {
  return line.quantity === undefined || line.quantity === null ? "—"
    : `${group(line.quantity)} ${line.unit ?? ""}`.trim();
}

function linesTable(caption, lines, currency, klass) {
  return h("div", { class: "table-wrap" }, h("table", { class: `responsive ${klass}` },
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Line"), h("th", { scope: "col" }, "Kind"),
      h("th", { scope: "col", class: "num" }, "Quantity"), h("th", { scope: "col", class: "num" }, "Amount"))),
    h("tbody", {}, lines.length ? lines.map((line) => h("tr", {},
      h("th", { scope: "row" }, lineName(line),
        line.origin_period ? h("span", { class: "sub" }, `usage of ${span(line.origin_period.start, line.origin_period.end)}`) : null),
      h("td", { "data-label": "Kind" }, line.kind ?? ""),
      h("td", { class: "num", "data-label": "Quantity" }, quantityText(line)),
      h("td", { class: "num", "data-label": "Amount" }, money(line.amount, currency))))
      : h("tr", {}, h("td", { colspan: 4 }, "No lines.")))));
}

function invoiceDetail(invoice, closeHref) {
  const doc = invoice.document ?? {};
  const cur = invoice.currency;
  const adjustments = doc.adjustments?.lines ?? [];
  const totals = [
    ["Subtotal", doc.subtotal],
    ...(doc.discounts ?? []).map((d) => [`Discount ${d.coupon}`, negate(d.amount)]),
    ...(doc.taxes ?? []).map((t) => [`Tax ${t.tax_rate} (${t.percentage} %${t.inclusive ? ", included" : ""})`, t.amount]),
    ...(adjustments.length ? [["Late adjustments", doc.adjustments.total]] : []),
    ["Total", invoice.total],
  ].filter(([, v]) => v !== undefined && v !== null);
  const title = h("h3", { id: "invoice-title", tabindex: "-1" }, `Invoice ${invoiceName(invoice)}`);
  return h("article", { class: "invoice", "aria-labelledby": "invoice-title", dataset: { invoice: invoiceKey(invoice) } },
    h("header", {}, title, h("a", { href: closeHref, class: "button secondary" }, "Close invoice")),
    h("dl", { class: "facts" },
      h("dt", {}, "Status"), h("dd", { class: "invoice-status" }, invoice.invoice_id ? invoice.status : `${invoice.status} (preview: nothing stored yet)`),
      h("dt", {}, "Period"), h("dd", {}, `${span(invoice.period_start, invoice.period_end)}${doc.period?.time_zone ? ` (${doc.period.time_zone})` : ""}`),
      invoice.finalized ? [h("dt", {}, "Finalized"), h("dd", {}, utc(parseTime(invoice.finalized)))] : null,
      h("dt", {}, "Currency"), h("dd", {}, cur.toUpperCase())),
    linesTable("Invoice lines", doc.lines ?? [], cur, "invoice-lines"),
    adjustments.length ? [h("h4", {}, "Late adjustments (usage of earlier periods)"),
      linesTable("Late adjustments", adjustments, cur, "invoice-adjustments")] : null,
    h("table", { class: "invoice-totals" },
      h("caption", { class: "visually-hidden" }, "Totals"),
      h("tbody", {}, totals.map(([label, value]) => h("tr", { class: label === "Total" ? "total" : null },
        h("th", { scope: "row" }, label), h("td", { class: "num" }, money(value, cur)))))));
}

async function invoicesPart(body, accountId, s, link) {
  const previewOf = (at) => get(`/v1/accounts/${enc(accountId)}/invoice-preview`, { at }).catch(() => null);
  const [stored, current] = await Promise.all([all("/v1/invoices", { account: accountId }), previewOf()]);
  const previous = current ? await previewOf(new Date(parseTime(current.period_start) - 1000).toISOString()) : null;
  const invoices = [...stored].sort((a, b) => parseTime(b.period_start) - parseTime(a.period_start));
  const unstored = (p) => p && !invoices.some((i) => i.period_start === p.period_start);
  const busy = (p) => (p.document?.lines ?? []).length || (p.document?.adjustments?.lines ?? []).length;
  const previews = [current, previous].filter((p, i) => unstored(p) && (i === 0 || busy(p)));
  const listed = [...previews, ...invoices];

  let detail = null;
  if (s.invoice) {
    try {
      // A preview that is not listed (an adjustment's period, say) is read as it stands.
      const opened = s.invoice.startsWith(PREVIEW)
        ? previews.find((p) => invoiceKey(p) === s.invoice) ?? await previewOf(s.invoice.slice(PREVIEW.length))
        : await get(`/v1/invoices/${enc(s.invoice)}`);
      if (!opened) throw new Error("that period's preview is no longer open: it has been stored");
      detail = invoiceDetail(opened, link({ invoice: "" }));
    } catch (err) {
      detail = notice("error", describe(err));
    }
  }
  const table = listed.length === 0 ? notice("empty", "No invoices yet.")
    : h("div", { class: "table-wrap" }, h("table", { class: "responsive invoices" },
      h("caption", { class: "visually-hidden" }, "Invoices"),
      h("thead", {}, h("tr", {}, ["Invoice", "Period", "Status", "Total", ""].map((x, i) =>
        h("th", { scope: "col", class: i === 3 ? "num" : null }, x)))),
      h("tbody", {}, listed.map((inv) => h("tr", { dataset: { invoice: invoiceKey(inv) } },
        h("th", { scope: "row" }, invoiceName(inv)),
        h("td", { "data-label": "Period" }, span(inv.period_start, inv.period_end)),
        h("td", { "data-label": "Status" }, inv.invoice_id ? inv.status : `${inv.status} (preview)`),
        h("td", { class: "num", "data-label": "Total" }, money(inv.total, inv.currency)),
        h("td", {}, h("a", { href: link({ invoice: invoiceKey(inv) }), class: "open-invoice",
          "aria-label": `Open invoice ${invoiceName(inv)}` }, "Open")))))));
  fill(body, detail, table);
  const title = body.querySelector("#invoice-title");
  if (title) {
    title.focus();
    announce(`${title.textContent} opened`);
  }
}

/** Each late adjustment line with the invoice that carries it (the API's item holds both). */
async function adjustmentsPart(body, accountId, link) {
  const late = await all(`/v1/accounts/${enc(accountId)}/adjustments`);
  fill(body, late.length === 0 ? notice("empty", "No late usage: every invoice holds only its own period.")
    : h("div", { class: "table-wrap" }, h("table", { class: "responsive adjustments" },
      h("caption", { class: "visually-hidden" }, "Late adjustments"),
      h("thead", {}, h("tr", {}, ["Billed on", "Line", "Usage of", "Quantity", "Amount"].map((x, i) =>
        h("th", { scope: "col", class: i >= 3 ? "num" : null }, x)))),
      h("tbody", {}, late.map((item) => h("tr", { dataset: { kind: item.kind } },
        h("th", { scope: "row" }, h("a", { href: link({ invoice: invoiceKey(item) }) }, invoiceName(item))),
        h("td", { "data-label": "Line" }, lineName(item)),
        h("td", { "data-label": "Usage of" }, item.origin_start ? span(item.origin_start, item.origin_end) : "—"),
        h("td", { class: "num", "data-label": "Quantity" }, quantityText(item)),
        h("td", { class: "num", "data-label": "Amount" }, money(item.amount, item.currency))))))));
}

async function quarantinePart(body, accountId) {
  const items = await all("/v1/quarantine", { account: accountId });
  fill(body, items.length === 0 ? notice("empty", "No quarantined records.")
    : h("div", { class: "table-wrap" }, h("table", { class: "responsive quarantine" },
      h("caption", { class: "visually-hidden" }, "Quarantined records"),
      h("thead", {}, h("tr", {}, ["Record", "Host", "Metric", "Quantity", "Window", "Reason"].map((x, i) =>
        h("th", { scope: "col", class: i === 3 ? "num" : null }, x)))),
      h("tbody", {}, items.map((q) => h("tr", { dataset: { record: q.record_id } },
        h("th", { scope: "row" }, h("code", {}, q.record_id)),
        h("td", { "data-label": "Host" }, q.host),
        h("td", { "data-label": "Metric" }, q.metric),
        h("td", { class: "num", "data-label": "Quantity" }, `${group(q.quantity)} ${q.unit}`),
        h("td", { "data-label": "Window" }, utc(parseTime(q.start))),
        h("td", { "data-label": "Reason" }, q.reason)))))));
}

// --- the view -------------------------------------------------------------------------

export async function render(container, { args, params }) {
  const accounts = (await all("/v1/accounts")).map((a) => a.id);
  if (accounts.length === 0) {
    fill(container, h("h1", {}, "Account"), notice("empty", "No accounts are configured."));
    return;
  }
  const accountId = args[0] ?? accounts[0];
  if (!args[0]) {
    go(href("account", [accountId], Object.fromEntries(params)), { replace: true });
    return;
  }
  const s = state(params);
  const link = (change) => href("account", [accountId], { ...s, ...change });
  const update = (change) => go(link({ ...change, invoice: "" }), { replace: true });

  const accountSelect = select("account", accounts.includes(accountId) ? accounts : [accountId, ...accounts], accountId);
  accountSelect.addEventListener("change", () => go(href("account", [accountSelect.value], { range: s.range, bucket: s.bucket }), { replace: true }));
  const rangeSelect = select("range", PRESETS, s.range);
  rangeSelect.addEventListener("change", () => update({ range: rangeSelect.value, bucket: DEFAULT_BUCKET[rangeSelect.value] }));
  const bucketSelect = select("bucket", BUCKETS.map((b) => [b, b]), s.bucket);
  bucketSelect.addEventListener("change", () => update({ bucket: bucketSelect.value }));
  const controls = [field("Account", accountSelect), field("Range", rangeSelect), field("Bucket", bucketSelect)];
  if (s.range === "custom") {
    const from = h("input", { type: "date", name: "from", value: s.from });
    const to = h("input", { type: "date", name: "to", value: s.to });
    const apply = h("button", { type: "button", dataset: { key: "apply-dates" } }, "Show");
    apply.addEventListener("click", () => update({ from: from.value, to: to.value }));
    controls.push(field("From (UTC)", from), field("To (UTC, included)", to), apply);
  }

  const usage = section("Usage", "usage-title");
  const balances = section("Balance", "balance-title");
  const invoices = section("Invoices", "invoices-title");
  const adjustments = section("Late adjustments", "adjustments-title");
  const quarantine = section("Quarantined records", "quarantine-title");
  fill(container, h("h1", {}, `Account ${accountId}`),
    h("div", { class: "controls", role: "group", "aria-label": "Account, range and bucket" }, controls),
    balances.node, usage.node, invoices.node, adjustments.node, quarantine.node);

  await Promise.all([
    part(balances.body, () => balancePart(balances.body, accountId)),
    part(usage.body, () => usagePart(usage.body, accountId, s)),
    part(invoices.body, () => invoicesPart(invoices.body, accountId, s, link)),
    part(adjustments.body, () => adjustmentsPart(adjustments.body, accountId, link)),
    part(quarantine.body, () => quarantinePart(quarantine.body, accountId)),
  ]);
}
