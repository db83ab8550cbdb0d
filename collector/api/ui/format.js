// Times and durations as people read them. The collector keeps time in UTC and the
// dashboard shows UTC too, saying so, so that two people in different time zones who
// look at the same invoice see the same instants.

const pad = (n) => String(n).padStart(2, "0");

export function parseTime(text) {
  if (text === null || text === undefined || text === "") return null;
  const ms = Date.parse(text);
  return Number.isNaN(ms) ? null : ms;
}

/** "2026-11-03 12:00 UTC" (seconds when they are not zero). */
export function utc(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  const seconds = d.getUTCSeconds() ? `:${pad(d.getUTCSeconds())}` : "";
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} `
    + `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}${seconds} UTC`;
}

export function utcDate(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
}

/** "2026-11" for a month bucket. */
export function utcMonth(ms) {
  const d = new Date(ms);
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}`;
}

/** A duration in words, to the two largest units: 93784 s -> "1 d 2 h". */
export function duration(seconds) {
  const s = Math.abs(Math.round(seconds));
  const units = [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]];
  const out = [];
  let rest = s;
  for (const [name, size] of units) {
    if (rest >= size || (out.length === 0 && size === 1)) {
      out.push(`${Math.floor(rest / size)} ${name}`);
      rest %= size;
    }
    if (out.length === 2) break;
  }
  return out.join(" ");
}

/** "5 min ago", "in 3 d" relative to now (ms). */
export function relative(ms, now = Date.now()) {
  if (ms === null || ms === undefined) return "never";
  const seconds = (now - ms) / 1000;
  if (Math.abs(seconds) < 1) return "now";
  return seconds >= 0 ? `${duration(seconds)} ago` : `in ${duration(-seconds)}`;
}

/** A <time> element's datetime value. */
export function isoAttr(ms) {
  return ms === null || ms === undefined ? null : new Date(ms).toISOString();
}

/** Clock skew in milliseconds as "+1.2 s" / "-350 ms". */
export function skew(ms) {
  if (ms === null || ms === undefined) return "—";
  const sign = ms > 0 ? "+" : ms < 0 ? "−" : "";
  const abs = Math.abs(ms);
  if (abs < 1000) return `${sign}${abs} ms`;
  if (abs < 120_000) return `${sign}${(abs / 1000).toFixed(1)} s`;
  return `${sign}${duration(abs / 1000)}`;
}
