// Revenue: revenue per product per month, and usage trends across accounts, as
// charts and tables; each can be exported as CSV exactly as shown.
//
// Revenue is what the ledger recognised: the credits to each account's
// revenue:<product> ledger accounts per calendar month (UTC, by the time the entry was
// posted), product and currency, from GET /v1/reports/revenue (each shard sums its own
// entries; the collector adds the parts up). Usage trends come from GET /v1/usage
// without an account filter: one request, summed per account, metric and bucket; the
// accounts with the most usage of a metric get a line each, the rest share one ("other
// accounts").

import { all, describe, get } from "./api.js";
import { barChart, lineChart } from "./chart.js";
import { amount as moneyText, compare, minorUnits, money, padScale, sum } from "./decimal.js";
import { toCsv, download } from "./csv.js";
import { field, fill, h, notice, select } from "./dom.js";
import { parseTime, utcDate, utcMonth } from "./format.js";
import { go, href } from "./nav.js";
import { bucketStarts, floor, next } from "./range.js";

const MONTH_CHOICES = [["3", "3 months"], ["6", "6 months"], ["12", "12 months"], ["24", "24 months"]];
const TREND_BUCKETS = [["day", "per day"], ["month", "per month"]];
const MAX_SERIES = 6;
const MONTH_NAMES = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

function monthLabel(t) {
  const d = new Date(t);
  return `${MONTH_NAMES[d.getUTCMonth()]} ${d.getUTCFullYear()}`;
}

/** Axis labels: the year only on the first month and on each January. */
function shortMonthLabels(months) {
  return months.map((t, i) => {
    const d = new Date(t);
    const januaryNext = i + 1 < months.length && new Date(months[i + 1]).getUTCMonth() === 0;
    return (i === 0 && !januaryNext) || d.getUTCMonth() === 0 ? monthLabel(t) : MONTH_NAMES[d.getUTCMonth()];
  });
}

/**
 * The revenue report's items ({month: "YYYY-MM", product, currency, amount}) with the
 * month as the milliseconds of its first instant (UTC), in month, product, currency order.
 */
export function revenueRows(items) {
  return items
    .map(({ month, product, currency, amount }) => {
      const [year, number] = month.split("-").map(Number);
      return { month: Date.UTC(year, number - 1, 1), product, currency, amount };
    })
    .sort((a, b) => a.month - b.month || a.product.localeCompare(b.product) || a.currency.localeCompare(b.currency));
}

function revenueSection(rows, months) {
  const currencies = [...new Set(rows.map((r) => r.currency))].sort();
  const body = h("div");
  if (rows.length === 0) {
    body.append(notice("empty", "No revenue posted in this range."));
  }
  for (const currency of currencies) {
    const mine = rows.filter((r) => r.currency === currency);
    const products = [...new Set(mine.map((r) => r.product))].sort();
    const amount = (m, p) => mine.find((r) => r.month === m && r.product === p)?.amount ?? null;
    const cur = currency.toUpperCase();
    const text = (value) => moneyText(value, currency);
    body.append(barChart({
      title: `Revenue per product per month, ${cur}`,
      description: `Revenue recognised in the ledger per product and calendar month (UTC), in ${cur}, stacked by product.`,
      unit: cur,
      categories: months.map(monthLabel),
      labels: shortMonthLabels(months),
      series: products.map((p) => ({ name: p, values: months.map((m) => amount(m, p)) })),
      formatValue: text,
      width: 900,
    }));
    const monthTotals = months.map((m) => sum(products.map((p) => amount(m, p) ?? "0")));
    body.append(h("div", { class: "table-wrap" }, h("table", { class: "revenue-table", dataset: { currency } },
      h("caption", {}, `Revenue per month, ${cur}`),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Month"),
        products.map((p) => h("th", { scope: "col", class: "num" }, p)), h("th", { scope: "col", class: "num" }, "Total"))),
      h("tbody", {}, months.map((m, i) => h("tr", { dataset: { month: utcMonth(m) } },
        h("th", { scope: "row" }, utcMonth(m)),
        products.map((p) => h("td", { class: "num" }, amount(m, p) === null ? "—" : text(amount(m, p)))),
        h("td", { class: "num" }, text(monthTotals[i]))))),
      h("tfoot", {}, h("tr", {}, h("th", { scope: "row" }, "Total"),
        products.map((p) => h("td", { class: "num", dataset: { product: p } }, text(sum(mine.filter((r) => r.product === p).map((r) => r.amount))))),
        h("td", { class: "num revenue-total" }, money(sum(monthTotals), currency)))))));
  }
  return body;
}

/** Usage rows per metric: the top accounts as series, the rest summed as one. */
export function trendSeries(rows, starts) {
  const metrics = new Map();
  for (const row of rows) {
    const key = `${row.metric}\u0000${row.unit}`;
    if (!metrics.has(key)) metrics.set(key, { metric: row.metric, unit: row.unit, accounts: new Map() });
    const accounts = metrics.get(key).accounts;
    if (!accounts.has(row.account)) accounts.set(row.account, []);
    accounts.get(row.account).push(row);
  }
  return [...metrics.values()].sort((a, b) => a.metric.localeCompare(b.metric)).map(({ metric, unit, accounts }) => {
    const totals = [...accounts.entries()].map(([account, list]) => [account, sum(list.map((r) => r.quantity))])
      .sort((a, b) => compare(b[1], a[1]) || a[0].localeCompare(b[0]));
    const top = totals.slice(0, MAX_SERIES - (totals.length > MAX_SERIES ? 1 : 0)).map(([a]) => a);
    const groups = top.map((a) => [a, accounts.get(a)]);
    const rest = totals.filter(([a]) => !top.includes(a)).flatMap(([a]) => accounts.get(a));
    if (rest.length) groups.push([`other accounts (${totals.length - top.length})`, rest]);
    const series = groups.map(([name, list]) => {
      const byStart = new Map();
      for (const r of list) {
        const t = parseTime(r.start);
        byStart.set(t, [...(byStart.get(t) ?? []), r.quantity]);
      }
      return { name, points: starts.map((t) => ({ t, value: byStart.has(t) ? sum(byStart.get(t)) : "0" })) };
    });
    return { metric, unit, series };
  });
}

export async function render(container, { params }) {
  const months = MONTH_CHOICES.some(([m]) => m === params.get("months")) ? Number(params.get("months")) : 12;
  const bucket = TREND_BUCKETS.some(([b]) => b === params.get("bucket")) ? params.get("bucket") : "month";
  const now = Date.now();
  const start = new Date(floor(now, "month"));
  start.setUTCMonth(start.getUTCMonth() - (months - 1));
  const from = start.getTime();
  const to = next(now, "month");
  const monthStarts = bucketStarts(from, to, "month");
  const span = { from: new Date(from).toISOString(), to: new Date(to).toISOString() };

  const monthsSelect = select("months", MONTH_CHOICES, String(months));
  monthsSelect.addEventListener("change", () => go(href("revenue", [], { months: monthsSelect.value, bucket }), { replace: true }));
  const bucketSelect = select("bucket", TREND_BUCKETS, bucket);
  bucketSelect.addEventListener("change", () => go(href("revenue", [], { months, bucket: bucketSelect.value }), { replace: true }));

  const revenueBody = h("div", {}, notice("loading", "Loading revenue…"));
  const trendBody = h("div", {}, notice("loading", "Loading usage…"));
  const revenueExport = h("button", { type: "button", class: "secondary", disabled: true }, "Export revenue as CSV");
  const trendExport = h("button", { type: "button", class: "secondary", disabled: true }, "Export usage as CSV");
  fill(container,
    h("h1", {}, "Revenue"),
    h("p", { class: "hint" }, `${utcDate(from)} to ${utcDate(to - 1)} (UTC). Revenue is what the ledger recognised when usage was posted.`),
    h("div", { class: "controls", role: "group", "aria-label": "Range" },
      field("Months", monthsSelect), field("Usage trend", bucketSelect)),
    h("section", { class: "part", "aria-labelledby": "revenue-title" },
      h("h2", { id: "revenue-title" }, "Revenue per product per month"), revenueExport, revenueBody),
    h("section", { class: "part", "aria-labelledby": "trends-title" },
      h("h2", { id: "trends-title" }, "Usage across accounts"), trendExport, trendBody));

  async function revenuePart() {
    const rows = revenueRows((await get("/v1/reports/revenue", span)).items);
    fill(revenueBody, revenueSection(rows, monthStarts));
    revenueExport.disabled = rows.length === 0;
    revenueExport.onclick = () => download(`meterd-revenue-${utcMonth(from)}-${utcMonth(to - 1)}.csv`,
      toCsv(["month", "product", "currency", "amount"], rows.map((r) => [utcMonth(r.month), r.product, r.currency, padScale(r.amount, minorUnits(r.currency))])));
  }

  async function trendPart() {
    const rows = await all("/v1/usage", { bucket, ...span }, 1000);
    const starts = bucketStarts(from, to, bucket);
    const metrics = trendSeries(rows, starts);
    const format = bucket === "month" ? utcMonth : utcDate;
    fill(trendBody, metrics.length === 0 ? notice("empty", "No usage in this range.")
      : h("div", { class: "charts" }, metrics.map((m) => lineChart({
        title: `${m.metric} (${m.unit}) per ${bucket}, by account`,
        description: `Usage of ${m.metric} per ${bucket} across accounts, ${utcDate(from)} to ${utcDate(to - 1)}.`,
        unit: m.unit,
        series: m.series,
        domain: [from, to],
        formatTime: format,
      }))));
    trendExport.disabled = metrics.length === 0;
    trendExport.onclick = () => download(`meterd-usage-${bucket}-${utcMonth(from)}-${utcMonth(to - 1)}.csv`,
      toCsv(["bucket_start", "metric", "unit", "account", "quantity"],
        metrics.flatMap((m) => m.series.flatMap((s) => s.points.filter((p) => p.value !== "0")
          .map((p) => [new Date(p.t).toISOString(), m.metric, m.unit, s.name, p.value])))));
  }

  await Promise.all([
    revenuePart().catch((err) => fill(revenueBody, notice("error", describe(err)))),
    trendPart().catch((err) => fill(trendBody, notice("error", describe(err)))),
  ]);
}
