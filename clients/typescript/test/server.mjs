// A real `statefold serve` for the conformance suite: the binary and the built reducers
// come from the environment (tests/tests/client_typescript.rs sets them; by hand:
// STATEFOLD_BIN=target/release/statefold STATEFOLD_REDUCERS=target/wasm32-wasip2/release).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const bin = process.env.STATEFOLD_BIN;
export const reducers = process.env.STATEFOLD_REDUCERS;
if (!bin || !reducers) throw new Error("set STATEFOLD_BIN and STATEFOLD_REDUCERS");

export class Server {
  /** Starts on a new data dir (or `dir`), on a free port (or `listen`). */
  static async start({ dir, listen = "127.0.0.1:0", args = [] } = {}) {
    const server = new Server();
    server.dir = dir ?? mkdtempSync(join(tmpdir(), "statefold-client-"));
    server.owned = !dir;
    const kinds = ["counter", "document", "workflow"].flatMap((k) => ["--kind", `${k}=${k}.wasm`]);
    server.child = spawn(
      bin,
      ["serve", "--listen", listen, "--data-dir", join(server.dir, "data"), "--reducers-dir", reducers, ...kinds, ...args],
      { stdio: ["ignore", "pipe", "ignore"] },
    );
    const line = await new Promise((resolve, reject) => {
      const lines = createInterface({ input: server.child.stdout });
      lines.once("line", resolve);
      server.child.once("exit", (code) => reject(new Error(`statefold exited (${code}) before it listened`)));
    });
    server.url = line.replace("statefold listening on ", "").trim();
    server.listen = server.url.replace(/^https?:\/\//, "");
    for (let i = 0; ; i++) {
      const ready = await fetch(`${server.url}/readyz`).catch(() => null);
      if (ready?.ok) break;
      if (i > 500) throw new Error("not ready in 10 s");
      await new Promise((r) => setTimeout(r, 20));
    }
    return server;
  }

  /** SIGKILL, as a crash. */
  async kill() {
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGKILL");
    await exited;
  }

  /** Stops it and removes its data dir if it made it. */
  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) await this.kill();
    if (this.owned) rmSync(this.dir, { recursive: true, force: true });
  }

  async request(method, path, body) {
    const response = await fetch(`${this.url}${path}`, { method, body });
    const text = await response.text();
    return { status: response.status, body: text ? JSON.parse(text) : null };
  }

  async create(kind, id) {
    const { status, body } = await this.request("POST", `/v1/models/${kind}`, JSON.stringify({ id }));
    if (status !== 201) throw new Error(`create ${kind}/${id}: ${status} ${JSON.stringify(body)}`);
    return body;
  }

  /** Appends a diff and waits until it is applied. */
  async apply(kind, id, diff) {
    const path = `/v1/models/${kind}/${encodeURIComponent(id)}/diffs?wait=applied`;
    const { status, body } = await this.request("POST", path, JSON.stringify(diff));
    if (status !== 200) throw new Error(`apply ${JSON.stringify(diff)} to ${kind}/${id}: ${status} ${JSON.stringify(body)}`);
    return body;
  }

  async model(kind, id) {
    const { status, body } = await this.request("GET", `/v1/models/${kind}/${encodeURIComponent(id)}`);
    if (status !== 200) throw new Error(`GET ${kind}/${id}: ${status}`);
    return body;
  }
}
