// CSV export of what a view shows, built in the browser (RFC 4180: comma separated,
// CRLF line ends, fields quoted when they hold a comma, quote or line break).
//
// A spreadsheet runs a cell that starts with = + @ or a tab as a formula. Such a cell
// (a host or product name chosen by someone else) is written with a leading
// apostrophe. Decimal strings such as "-12.50" are left as they are, so amounts stay
// numbers in the spreadsheet.

const FORMULA = /^[=+@\t\r]|^-(?!\d)/;

export function cell(value) {
  let text = value === null || value === undefined ? "" : String(value);
  if (FORMULA.test(text)) text = `'${text}`;
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

export function toCsv(header, rows) {
  return [header, ...rows].map((row) => row.map(cell).join(",")).join("\r\n") + "\r\n";
}

/** Offer text as a file download named filename. */
export function download(filename, text) {
  const blob = new Blob([text], { type: "text/csv;charset=utf-8" });
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
