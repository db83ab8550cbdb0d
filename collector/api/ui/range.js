// Time ranges and buckets for usage charts.
//
// A range is a preset ("24h", "7d", "30d", "90d", "12mo") or custom dates. It ends at
// the end of the current bucket, so the bucket in progress is shown, and starts at a
// bucket boundary, so the first bucket is whole. Buckets are UTC, like the API's.

export const BUCKETS = ["minute", "hour", "day", "month"];
export const PRESETS = [
  ["24h", "Last 24 hours"],
  ["7d", "Last 7 days"],
  ["30d", "Last 30 days"],
  ["90d", "Last 90 days"],
  ["12mo", "Last 12 months"],
  ["custom", "Custom dates"],
];
// The bucket a preset uses unless the URL says otherwise.
export const DEFAULT_BUCKET = { "24h": "hour", "7d": "hour", "30d": "day", "90d": "day", "12mo": "month", custom: "day" };
// More points than this make a chart unreadable and a request heavy.
export const MAX_BUCKETS = 1500;

const MINUTE = 60_000;
const SIZE = { minute: MINUTE, hour: 60 * MINUTE, day: 1440 * MINUTE };

/** The start of the bucket holding t (ms, UTC). */
export function floor(t, bucket) {
  if (bucket === "month") {
    const d = new Date(t);
    return Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), 1);
  }
  return Math.floor(t / SIZE[bucket]) * SIZE[bucket];
}

/** The start of the bucket after the one holding t. */
export function next(t, bucket) {
  if (bucket === "month") {
    const d = new Date(floor(t, bucket));
    return Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 1);
  }
  return floor(t, bucket) + SIZE[bucket];
}

/** Every bucket start in [from, to). */
export function bucketStarts(from, to, bucket) {
  const out = [];
  for (let t = floor(from, bucket); t < to && out.length <= MAX_BUCKETS; t = next(t, bucket)) out.push(t);
  return out;
}

function parseDay(text) {
  const ms = /^\d{4}-\d{2}-\d{2}$/.test(text ?? "") ? Date.parse(`${text}T00:00:00Z`) : NaN;
  return Number.isNaN(ms) ? null : ms;
}

/**
 * The instants [from, to) of a range. preset: one of PRESETS; for "custom",
 * fromDay and toDay are "YYYY-MM-DD" (toDay included).
 */
export function resolve({ preset, bucket, fromDay, toDay }, now = Date.now()) {
  if (preset === "custom") {
    const from = parseDay(fromDay);
    const toStart = parseDay(toDay);
    if (from === null || toStart === null) return { error: "Enter both dates as YYYY-MM-DD." };
    const to = toStart + SIZE.day;
    if (to <= from) return { error: "The end date is before the start date." };
    return checked(floor(from, bucket), to, bucket);
  }
  const end = next(now, bucket);
  const start = new Date(now);
  switch (preset) {
    case "24h": start.setTime(now - 24 * 60 * MINUTE); break;
    case "7d": start.setTime(now - 7 * SIZE.day); break;
    case "90d": start.setTime(now - 90 * SIZE.day); break;
    case "12mo": start.setUTCMonth(start.getUTCMonth() - 11, 1); break;
    default: start.setTime(now - 30 * SIZE.day);
  }
  return checked(floor(start.getTime(), bucket), end, bucket);
}

function checked(from, to, bucket) {
  const count = bucketStarts(from, to, bucket).length;
  if (count > MAX_BUCKETS) {
    return { error: `That is more than ${MAX_BUCKETS} ${bucket} buckets: choose a shorter range or a larger bucket.` };
  }
  return { from, to };
}
