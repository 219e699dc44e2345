// The inspector page: kinds and models, one model followed live (through the client
// library's ModelStream), reducers and their versions, readiness and per-partition lag.
// Served by the host from the binary; `client.js` is @statefold/client's build.
import { ModelStream, mergePatch, serverFold } from "./client.js";

const base = location.origin;
const $ = (id) => document.getElementById(id);
const tokenInput = $("token");
tokenInput.value = sessionStorage.getItem("statefold-token") ?? "";
const headers = () => (tokenInput.value ? { authorization: `Bearer ${tokenInput.value}` } : {});
const PAGE = 50;
const LOG_MAX = 200;

async function get(path) {
  const response = await fetch(`${base}${path}`, { headers: headers() });
  const body = await response.json().catch(() => null);
  if (!response.ok && response.status !== 503) {
    throw new Error(`${path}: ${response.status} ${body?.error?.code ?? ""} ${body?.error?.message ?? ""}`);
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "onclick") node.onclick = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// A JSON value as a tree: objects and arrays fold open, leaves are coloured.
function tree(value, key) {
  const label = key === undefined ? [] : [el("span", { class: "key" }, JSON.stringify(key)), ": "];
  if (value !== null && typeof value === "object") {
    const entries = Array.isArray(value) ? value.map((v, i) => [i, v]) : Object.entries(value);
    const open = Array.isArray(value) ? `[${entries.length}]` : `{${entries.length}}`;
    const details = el("details", { open: "" }, el("summary", {}, ...label, open));
    for (const [k, v] of entries) details.append(tree(v, k));
    return details;
  }
  const cls = typeof value === "string" ? "str" : typeof value === "number" ? "num" : "lit";
  return el("div", { style: "margin-left:1em" }, ...label, el("span", { class: cls }, JSON.stringify(value)));
}

// Readiness and partitions, every two seconds.
async function refreshReady() {
  try {
    const ready = await get("/readyz");
    const ok = ready?.ready === true;
    $("ready").textContent = ok ? "ready" : `not ready: ${ready?.error?.message ?? ready?.reason ?? "?"}`;
    $("ready").className = ok ? "yes" : "no";
    const rows = (ready?.partitions ?? []).map((p) =>
      el("tr", {}, el("td", {}, `${p.topic}/${p.partition}`), el("td", {}, `next ${p.next}`), el("td", {}, `lag ${p.lag ?? "?"}`)),
    );
    $("partitions").replaceChildren(el("tr", {}, el("th", {}, "partition"), el("th", {}, "next"), el("th", {}, "lag")), ...rows);
  } catch (error) {
    $("ready").textContent = `unreachable: ${error.message}`;
    $("ready").className = "no";
  }
}

let kind = null;
let reducerOf = new Map();

async function loadKinds() {
  const { reducers } = await get("/v1/reducers");
  reducerOf = new Map(reducers.flatMap((r) => r.kinds.map((k) => [k, r.name])));
  $("kinds").replaceChildren(
    ...[...reducerOf.keys()].sort().map((k) =>
      el("li", {}, el("button", { "data-kind": k, class: k === kind ? "on" : "", onclick: () => pickKind(k) }, k)),
    ),
  );
  const reducerBlocks = [];
  for (const r of reducers) {
    const shown = await get(`/v1/reducers/${encodeURIComponent(r.name)}`);
    const rows = shown.versions.map((v) =>
      el(
        "tr",
        {},
        el("td", { class: "mono", title: v.version }, v.version.slice(0, 12)),
        el("td", {}, v.status),
        el("td", {}, v.declared ? `${v.declared.name}@${v.declared.version}` : ""),
        el("td", {}, `${v.origin}${v.subject ? ` by ${v.subject}` : ""}`),
        el("td", {}, new Date(v.changed_ms).toISOString().replace("T", " ").slice(0, 19)),
      ),
    );
    reducerBlocks.push(
      el("h3", { style: "font-size:1em;margin:.6em 0 .2em" }, `${r.name} `, el("span", { class: "muted" }, `(${r.kinds.join(", ")})`)),
      el("table", {}, ...rows),
    );
  }
  $("reducers").replaceChildren(...reducerBlocks);
}

// The models list: a page from a cursor; the search box pages from a prefix.
let cursor = null;
async function loadModels(after) {
  if (!kind) return;
  const prefix = $("search").value;
  const from = after ?? (prefix ? before(prefix) : null);
  const query = new URLSearchParams({ limit: String(PAGE) });
  if (from !== null) query.set("after", from);
  const page = await get(`/v1/models/${encodeURIComponent(kind)}?${query}`);
  const models = page.models.filter((m) => m.id.startsWith(prefix));
  cursor = models.length === page.models.length ? page.next : null;
  $("models").replaceChildren(
    ...models.map((m) =>
      el("li", {}, el("button", { "data-id": m.id, title: `seq ${m.seq}`, onclick: () => follow(kind, m.id) }, m.id)),
    ),
  );
  $("more").disabled = !cursor;
}

// The id just before every id that starts with `prefix` (the list's `after` is exclusive).
function before(prefix) {
  const last = prefix.codePointAt(prefix.length - 1);
  return last > 0 ? prefix.slice(0, -1) + String.fromCodePoint(last - 1) + "\u{10FFFF}" : "";
}

function pickKind(k) {
  kind = k;
  $("kind-name").textContent = k;
  for (const b of $("kinds").querySelectorAll("button")) b.className = b.dataset.kind === k ? "on" : "";
  loadModels();
}

let stream = null;
async function follow(k, id) {
  if (stream) await stream.close();
  $("model-name").textContent = `${k}/${id}`;
  $("log").replaceChildren();
  const fold = k === "document" ? mergePatch : serverFold({ baseUrl: base, headers });
  // Without a token, the browser's own EventSource; with one, fetch (it sends the header).
  const transport = tokenInput.value ? { headers } : { transport: "eventsource" };
  stream = new ModelStream({ baseUrl: base, kind: k, id, fold, ...transport, onError: (e) => logLine("error", e.message) });
  window.inspected = stream;
  stream.onStatus((status) => ($("status").textContent = status));
  stream.onChange((change) => {
    $("hash").textContent = change.hash ?? "—";
    $("seq").textContent = String(change.seq);
    $("version").textContent = change.version ? change.version.slice(0, 12) : "—";
    $("state").replaceChildren(change.state === undefined ? "—" : tree(change.state));
    $("state").className = "mono";
    const diff = change.diff === undefined ? "" : ` ${JSON.stringify(change.diff).slice(0, 200)}`;
    logLine(change.event, `seq ${change.seq} ${change.hash ? change.hash.slice(0, 12) : ""}${diff}`);
  });
}

function logLine(event, text) {
  const log = $("log");
  log.prepend(el("tr", { class: event }, el("td", {}, new Date().toISOString().slice(11, 23)), el("td", {}, event), el("td", {}, text)));
  while (log.rows.length > LOG_MAX) log.deleteRow(log.rows.length - 1);
}

$("first").onclick = () => loadModels();
$("more").onclick = () => cursor && loadModels(cursor);
$("search").oninput = () => loadModels();
$("search").onkeydown = (e) => {
  if (e.key === "Enter" && kind && $("search").value) follow(kind, $("search").value);
};
tokenInput.onchange = () => {
  sessionStorage.setItem("statefold-token", tokenInput.value);
  start();
};

async function start() {
  refreshReady();
  try {
    await loadKinds();
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.get("kind")) pickKind(params.get("kind"));
    if (params.get("kind") && params.get("id")) follow(params.get("kind"), params.get("id"));
  } catch (error) {
    $("reducers").textContent = error.message;
  }
}
setInterval(refreshReady, 2000);
start();
