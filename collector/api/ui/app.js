// The dashboard's shell: sign-in, sign-out, and showing the view the URL names
// (see nav.js for the routes). Signing in checks the token with GET /v1/whoami, which
// answers for any valid token with its name, role and scopes; the header shows them.

import { ApiError, clearToken, describe, get, setToken, token } from "./api.js";
import { field, fill, h, notice } from "./dom.js";
import { announce, go, href, parseHash } from "./nav.js";
import * as account from "./account.js";
import * as fleet from "./fleet.js";
import * as revenue from "./revenue.js";

const VIEWS = { fleet, account, revenue };
const main = document.getElementById("main");
const header = document.querySelector("header.top");
const who = header.querySelector(".who");

// The signed-in token as GET /v1/whoami describes it, for the token it was read with.
let me = null;

/** Who the token in this tab is (asked once per token); an ApiError when it is refused. */
async function whoami() {
  const current = token();
  if (me?.token !== current) me = { token: current, ...await get("/v1/whoami") };
  return me;
}

function showWho(found) {
  const role = found.role ?? `no role${found.scopes.length ? `, scopes: ${found.scopes.join(", ")}` : ""}`;
  fill(who, h("span", { class: "visually-hidden" }, "Signed in as "), h("strong", {}, found.name),
    ` · ${role}`);
  who.dataset.role = found.role ?? "";
  who.hidden = false;
}

function forget() {
  clearToken();
  me = null;
  who.hidden = true;
  fill(who);
}

function signInView(message) {
  header.hidden = true;
  const input = h("input", { type: "password", name: "token", autocomplete: "off", required: true,
    spellcheck: "false" });
  const error = message ? notice("error", message) : null;
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h("form", { class: "sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in to meterd"),
    h("p", {}, "Paste an API token (", h("code", {}, "meterd token create"),
      "). It stays in this browser tab only and is forgotten when the tab closes."),
    error,
    field("API token", input),
    button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    setToken(input.value.trim());
    try {
      // Any valid token signs in, whatever its role: each view says what it may not see.
      await whoami();
      route({ focus: true });
    } catch (err) {
      forget();
      button.disabled = false;
      signInView(err instanceof ApiError && err.status === 401
        ? "That token was not accepted: it is unknown, revoked or expired."
        : `Cannot sign in: ${err.message}`);
    }
  });
  fill(main, form);
  input.focus();
}

let renderCount = 0;

/** What names a control across renders: its data-key, else its form name. */
export function keyOf(element) {
  if (element.dataset?.key) return element.dataset.key;
  return element.getAttribute?.("name") ? `name:${element.getAttribute("name")}` : null;
}

async function route({ focus = true } = {}) {
  if (!token()) {
    signInView();
    return;
  }
  header.hidden = false;
  try {
    showWho(await whoami());
  } catch (err) {
    // A refused token has signed the tab out already (meterd:unauthorized); any other
    // failure leaves the name out and lets the view say what is wrong.
    if (err instanceof ApiError && err.status === 401) return;
  }
  const { view, args, params } = parseHash();
  const module = VIEWS[view];
  for (const link of header.querySelectorAll("nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!module) {
    go(href("fleet"), { replace: true });
    return;
  }
  // A control that changed the view's state (a sort button, a filter) is drawn anew:
  // keep the keyboard focus on its new self.
  const active = document.activeElement;
  const focusKey = active && main.contains(active) ? keyOf(active) : null;
  renderCount += 1;
  const mine = renderCount;
  const container = h("div", { class: `view view-${view}`, "aria-busy": "true" });
  fill(main, container);
  try {
    await module.render(container, { args, params, isCurrent: () => mine === renderCount });
  } catch (err) {
    if (mine !== renderCount) return;
    container.append(notice("error", describe(err)));
  }
  if (mine !== renderCount) return;
  container.removeAttribute("aria-busy");
  document.title = `${container.querySelector("h1")?.textContent ?? "meterd"} · meterd`;
  // A view that moved focus itself (an opened invoice) keeps it; otherwise its heading
  // takes focus, so keyboard and screen reader users start at the new content.
  if (!focus && focusKey) {
    const again = [...container.querySelectorAll("[data-key], [name]")].find((e) => keyOf(e) === focusKey);
    again?.focus();
  } else if (focus && !container.contains(document.activeElement)) {
    const heading = container.querySelector("h1");
    heading?.setAttribute("tabindex", "-1");
    heading?.focus({ preventScroll: false });
  }
  main.dataset.ready = view;
}

header.querySelector(".sign-out").addEventListener("click", () => {
  forget();
  history.replaceState(null, "", "#/fleet");
  signInView();
  announce("Signed out");
});

window.addEventListener("meterd:unauthorized", () => {
  forget();
  signInView("Your token is no longer accepted (revoked or expired). Sign in again.");
});
// Routing runs once per task, after the event that asked for it: a control that
// changes the URL while the view is being replaced cannot start a second render
// inside the first.
let pending = null;
function schedule(focus) {
  if (pending) {
    pending.focus ||= focus;
    return;
  }
  pending = { focus };
  setTimeout(() => {
    const { focus: move } = pending;
    pending = null;
    route({ focus: move });
  }, 0);
}

window.addEventListener("hashchange", () => schedule(true));
window.addEventListener("meterd:route", () => schedule(false));
route({ focus: false });
