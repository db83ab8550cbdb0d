// Exact decimal strings as the API sends them ("12.30", "-0.0125", "1000000000").
//
// Amounts and quantities are shown exactly as the API wrote them (digits grouped for
// reading) and added with BigInt, never through a float. The only place a decimal
// becomes a JavaScript number is toNumber(), which chart.js uses to place a point or a
// bar on screen; the labels and tables next to a chart still show the exact string.

const DECIMAL = /^([+-])?(\d+)(?:\.(\d+))?$/;

function parts(text) {
  const match = DECIMAL.exec(String(text).trim());
  if (!match) throw new Error(`not a decimal: ${JSON.stringify(text)}`);
  const [, sign, whole, frac = ""] = match;
  const digits = BigInt(whole + frac);
  return { units: sign === "-" ? -digits : digits, scale: frac.length };
}

function fromParts(units, scale) {
  const negative = units < 0n;
  let digits = (negative ? -units : units).toString().padStart(scale + 1, "0");
  if (scale > 0) digits = `${digits.slice(0, -scale)}.${digits.slice(-scale)}`;
  return negative ? `-${digits}` : digits;
}

export function isDecimal(text) {
  return typeof text === "string" && DECIMAL.test(text.trim());
}

/** The exact sum of decimal strings, at the largest scale among them. */
export function sum(values) {
  let units = 0n;
  let scale = 0;
  for (const value of values) {
    const p = parts(value);
    if (p.scale > scale) {
      units *= 10n ** BigInt(p.scale - scale);
      scale = p.scale;
    }
    units += p.units * 10n ** BigInt(scale - p.scale);
  }
  return fromParts(units, scale);
}

/** -1, 0 or 1, exactly. */
export function compare(a, b) {
  const x = parts(a);
  const y = parts(b);
  const scale = Math.max(x.scale, y.scale);
  const left = x.units * 10n ** BigInt(scale - x.scale);
  const right = y.units * 10n ** BigInt(scale - y.scale);
  return left < right ? -1 : left > right ? 1 : 0;
}

/** The same digits with thousands grouped: "-1234567.50" -> "-1,234,567.50". */
export function group(text) {
  if (!isDecimal(text)) return String(text);
  const match = DECIMAL.exec(text.trim());
  const [, sign = "", whole, frac] = match;
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${sign === "-" ? "-" : ""}${grouped}${frac === undefined ? "" : `.${frac}`}`;
}

// ISO 4217 currencies whose minor unit is not the cent (2 digits).
const MINOR_UNITS = {
  bhd: 3, iqd: 3, jod: 3, kwd: 3, lyd: 3, omr: 3, tnd: 3,
  bif: 0, clp: 0, djf: 0, gnf: 0, isk: 0, jpy: 0, kmf: 0, krw: 0, pyg: 0, rwf: 0,
  ugx: 0, vnd: 0, vuv: 0, xaf: 0, xof: 0, xpf: 0,
};

export function minorUnits(currency) {
  return MINOR_UNITS[String(currency).toLowerCase()] ?? 2;
}

/**
 * The API writes decimals without trailing zeros ("22.5"); an amount of money reads
 * better with its currency's minor unit ("22.50"). Zeros are only ever appended:
 * a digit the API sent is never dropped or rounded.
 */
export function padScale(text, scale) {
  if (!isDecimal(text)) return String(text);
  const trimmed = text.trim();
  const dot = trimmed.indexOf(".");
  const have = dot < 0 ? 0 : trimmed.length - dot - 1;
  if (have >= scale) return trimmed;
  return `${trimmed}${dot < 0 ? "." : ""}${"0".repeat(scale - have)}`;
}

/** An amount with its currency: ("1234.5", "eur") -> "1,234.50 EUR". */
export function money(amount, currency) {
  const digits = group(padScale(amount, minorUnits(currency)));
  return `${digits} ${String(currency || "").toUpperCase()}`.trim();
}

/** An amount without its currency, padded to the currency's minor unit. */
export function amount(text, currency) {
  return group(padScale(text, minorUnits(currency)));
}

/** For chart geometry only (see the header of this file). */
export function toNumber(text) {
  return Number(text);
}

/** The same amount with the opposite sign: "12.50" -> "-12.50", "-3" -> "3", "0" -> "0". */
export function negate(text) {
  const p = parts(text);
  return fromParts(-p.units, p.scale);
}
