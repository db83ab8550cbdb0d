// The REST API as the dashboard uses it: the public /v1 routes, a bearer token, and
// problem+json errors. The token lives in sessionStorage: it is gone when the tab
// closes, and other tabs and sites cannot read it.

const TOKEN_KEY = "meterd.token";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.type = problem?.type ?? "";
    this.title = problem?.title ?? `HTTP ${status}`;
  }

  /** The end of the problem type URI: "forbidden", "account-not-found", ... */
  get kind() {
    return this.type.split("/").pop();
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

function url(path, params) {
  const target = new URL(path, window.location.origin);
  for (const [key, value] of Object.entries(params ?? {})) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(key, value);
  }
  return target;
}

/** GET a JSON document; an ApiError for anything but 2xx. A 401 signs the user out. */
export async function get(path, params) {
  let response;
  try {
    response = await fetch(url(path, params), {
      headers: { Accept: "application/json", Authorization: `Bearer ${token() ?? ""}` },
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(0, { title: "The collector cannot be reached", detail: String(error.message ?? error) });
  }
  const type = response.headers.get("Content-Type") ?? "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const problem = new ApiError(response.status, body);
    if (response.status === 401) window.dispatchEvent(new CustomEvent("meterd:unauthorized"));
    throw problem;
  }
  return body;
}

/**
 * Every item of a paginated list: follows next_cursor until the last page.
 * A page is {items: [...], next_cursor: "..." | null}.
 */
export async function all(path, params, limit = 500) {
  const items = [];
  let cursor = null;
  do {
    const page = await get(path, { ...params, limit, cursor });
    items.push(...page.items);
    cursor = page.next_cursor ?? null;
  } while (cursor);
  return items;
}

/** A sentence for an error from the API. */
export function describe(err) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err.message ?? err}`;
  if (err.status === 403) return `Your token's role does not allow this view (${err.message}).`;
  if (err.status === 0) return `${err.title}: ${err.message}`;
  return `${err.title}${err.message && err.message !== err.title ? `: ${err.message}` : ""}`;
}
