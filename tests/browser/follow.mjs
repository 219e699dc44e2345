// Drives a real Chromium for tests/tests/browser.rs: serves page.html from an origin of its
// own (HTTPS with the given certificate, or HTTP), opens it, and has it follow models of a
// Statefold server. JSON lines, one exchange at a time:
//   argv: --chromium PATH [--cert FILE --key FILE]
//   out:  {"page": ORIGIN}
//   in:   {"api", "token", "ids", "cookieEvery", "settleMs"}  (cookieEvery: every Nth
//         stream is an EventSource with the token in a cookie; 0: all fetch + header)
//   out:  {"synced": [ids], "protocols": {id: "h2" | "http/1.1"}, "connections": {id: its
//         connection's id}, "models": {...}}
//         once every stream is synced, or after settleMs with the ones that are
//   in:   {"expect": {id: hash}, "timeoutMs"}
//   out:  {"models": {id: {state, hash, seq, ...}}} once each holds its expected hash, or
//         at the timeout with what each holds
import { chromium } from "playwright-core";
import { createServer as createHttps } from "node:https";
import { createServer as createHttp } from "node:http";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";

const { values: args } = parseArgs({
  options: { chromium: { type: "string" }, cert: { type: "string" }, key: { type: "string" } },
});
const page = readFileSync(new URL("./page.html", import.meta.url));
const serve = (request, response) => {
  response.writeHead(200, { "content-type": "text/html; charset=utf-8" });
  response.end(page);
};
const server = args.cert
  ? createHttps({ cert: readFileSync(args.cert), key: readFileSync(args.key) }, serve)
  : createHttp(serve);
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const origin = `${args.cert ? "https" : "http"}://127.0.0.1:${server.address().port}`;

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async () => JSON.parse((await lines.next()).value);
const say = (value) => process.stdout.write(JSON.stringify(value) + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

say({ page: origin });
const follow = await next();

const browser = await chromium.launch({ executablePath: args.chromium, args: ["--no-sandbox"] });
try {
  // The test's certificate is self-signed: the context accepts it (for the page and the API).
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  if (follow.cookieEvery) {
    await context.addCookies([
      { name: "statefold_token", value: follow.token, url: follow.api, httpOnly: true, secure: true, sameSite: "Strict" },
    ]);
  }
  const tab = await context.newPage();
  // Which protocol each stream's response came over, as Chromium's network stack saw it.
  const protocols = {};
  const connections = {};
  const cdp = await context.newCDPSession(tab);
  await cdp.send("Network.enable");
  cdp.on("Network.responseReceived", ({ response }) => {
    const match = /\/v1\/models\/document\/([^/]+)\/events/.exec(response.url);
    if (match) {
      protocols[decodeURIComponent(match[1])] = response.protocol;
      connections[decodeURIComponent(match[1])] = response.connectionId;
    }
  });
  tab.on("console", (message) => process.stderr.write(`page: ${message.text()}\n`));
  await tab.goto(origin);
  await tab.evaluate((options) => window.follow(options), follow);

  const models = () => tab.evaluate(() => window.models);
  const deadline = Date.now() + follow.settleMs;
  let held = await models();
  while (Date.now() < deadline && !Object.values(held).every((m) => m.synced)) {
    await sleep(100);
    held = await models();
  }
  const synced = Object.values(held).filter((m) => m.synced).map((m) => m.id);
  say({ synced, protocols, connections, models: held });

  const { expect, timeoutMs } = await next();
  const until = Date.now() + timeoutMs;
  held = await models();
  while (Date.now() < until && !Object.entries(expect).every(([id, hash]) => held[id].hash === hash)) {
    await sleep(100);
    held = await models();
  }
  say({ models: held });
} finally {
  await browser.close();
  server.close();
}
process.exit(0);
