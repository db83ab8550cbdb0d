// Where the dashboard is: the view and its state, all in the URL's hash.
//
//   #/fleet?status=silent&q=web&sort=last_seen&dir=desc
//   #/account/<account>?range=30d&bucket=day[&invoice=<invoice id>]
//   #/revenue?months=12
//
// The state of a view lives in its URL, so a view can be bookmarked, shared and
// reloaded. Moving to another view or opening an invoice adds a history entry (the
// back button returns); changing a filter, a sort or a range replaces the URL and
// keeps the keyboard focus where it was.

export function parseHash(hash = window.location.hash) {
  const text = hash.replace(/^#/, "") || "/fleet";
  const [path, query = ""] = text.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { view: parts[0] ?? "fleet", args: parts.slice(1), params: new URLSearchParams(query) };
}

/** A link target for a view with its state: href("account", ["acme"], {range: "7d"}). */
export function href(view, args = [], params = {}) {
  const path = [view, ...args].map(encodeURIComponent).join("/");
  const entries = Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined);
  const query = new URLSearchParams(entries).toString();
  return `#/${path}${query ? `?${query}` : ""}`;
}

/**
 * Go to a view state. replace: true updates the URL without a history entry and
 * without moving focus (a filter typed into a field keeps the cursor there).
 */
export function go(target, { replace = false } = {}) {
  if (target === window.location.hash) return;
  if (replace) {
    history.replaceState(null, "", target);
    window.dispatchEvent(new CustomEvent("meterd:route"));
  } else {
    window.location.hash = target;
  }
}

const live = () => document.querySelector(".live");

/** Say something to screen readers (the page's polite live region). */
export function announce(text) {
  const region = live();
  if (!region) return;
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 50);
}
