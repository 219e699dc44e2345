// The client's conformance suite, under Node's test runner against a real `statefold
// serve` (see server.mjs): every stream's state must end equal to the server's.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ModelStream, componentFold, mergePatch, serverFold } from "../dist/index.js";
import { instantiateReducer } from "../dist/node.js";
import { Server, reducers } from "./server.mjs";

/** Waits until `stream` holds the server's head of the model, then checks the state. */
async function endsEqual(stream, server, kind, id) {
  const head = await server.model(kind, id);
  await stream.synced((s) => s.hash === head.hash);
  assert.deepEqual(stream.state, head.state, `${kind}/${id}: the client's state is not the server's`);
  assert.equal(stream.seq, head.seq);
}

/** Records every change and checks the sequence as it goes: no gap, no repeat. */
function watch(stream) {
  const seen = { events: [], seqs: [] };
  stream.onChange((change) => {
    seen.events.push(change.event);
    if (change.event === "diff") {
      const last = seen.seqs.at(-1);
      if (last !== undefined) assert.equal(change.seq, last + 1, "a diff repeated or skipped");
    }
    if (change.event !== "reset") seen.seqs.push(change.seq);
  });
  return seen;
}

const workflowRun = (i) => [
  { op: "plan", steps: ["fetch", "build"] },
  { op: "start", step: "fetch", at: 1000 + i },
  { op: "output", step: "fetch", patch: { progress: 0.5 } },
  { op: "complete", step: "fetch", at: 2000 + i, output: { bytes: i } },
  { op: "start", step: "build", at: 3000 + i },
];

test("document, counter and workflow models fold to the server's state: by merge patch, by the reducer's own module, by the server's states", async () => {
  const server = await Server.start();
  try {
    const fold = (kind) => componentFold({ baseUrl: server.url, kind, instantiate: instantiateReducer });
    const streams = [
      ["document", "d1", mergePatch],
      ["counter", "c1", fold("counter")],
      ["workflow", "w1", fold("workflow")],
      ["workflow", "w2", serverFold({ baseUrl: server.url })],
    ];
    const opened = [];
    for (const [kind, id, f] of streams) {
      await server.create(kind, id);
      opened.push([kind, id, new ModelStream({ baseUrl: server.url, kind, id, fold: f })]);
    }
    for (const [, , stream] of opened) await stream.synced();
    for (let i = 0; i < 20; i++) {
      await server.apply("document", "d1", { title: `t${i}`, [`k${i % 3}`]: i % 2 ? null : { n: i } });
      await server.apply("counter", "c1", i % 4 === 3 ? { sub: 1 } : { add: i });
    }
    for (const diff of workflowRun(1)) await server.apply("workflow", "w1", diff);
    for (const diff of workflowRun(2)) await server.apply("workflow", "w2", diff);
    for (const [kind, id, stream] of opened) {
      await endsEqual(stream, server, kind, id);
      await stream.close();
    }
  } finally {
    await server.stop();
  }
});

test("a stream resumes from its hash across a SIGKILL and a restart, with no gap or repeat", async () => {
  let server = await Server.start();
  const { dir, listen } = server;
  try {
    await server.create("counter", "k");
    const stream = new ModelStream({
      baseUrl: server.url,
      kind: "counter",
      id: "k",
      fold: componentFold({ baseUrl: server.url, kind: "counter", instantiate: instantiateReducer }),
      backoff: { initialMs: 50, maxMs: 500 },
      onError: () => {}, // keep retrying while the server is down
    });
    const seen = watch(stream);
    for (let i = 0; i < 10; i++) await server.apply("counter", "k", { add: 1 });
    await endsEqual(stream, server, "counter", "k");
    await server.kill();
    server = await Server.start({ dir, listen });
    for (let i = 0; i < 10; i++) await server.apply("counter", "k", { add: 2 });
    await endsEqual(stream, server, "counter", "k");
    assert.ok(stream.connections >= 2, "it reconnected");
    assert.deepEqual(
      seen.events.filter((e) => e === "snapshot"),
      ["snapshot"],
      "one snapshot, then only what it missed",
    );
    await stream.close();
  } finally {
    await server.stop();
    server.owned = true;
    await server.stop();
  }
});

test("a hash the server does not know gets a reset, then a snapshot", async () => {
  const server = await Server.start();
  try {
    await server.create("document", "r");
    await server.apply("document", "r", { a: 1 });
    const stream = new ModelStream({
      baseUrl: server.url,
      kind: "document",
      id: "r",
      since: { hash: "ab".repeat(32), seq: 7, state: { stale: true } },
    });
    const seen = watch(stream);
    await endsEqual(stream, server, "document", "r");
    assert.deepEqual(seen.events.slice(0, 2), ["reset", "snapshot"]);
    await stream.close();
  } finally {
    await server.stop();
  }
});

test("a slow consumer that falls a ring behind catches up with a patch and ends equal", async () => {
  // A ring of 4 events and a fold that takes 20 ms per diff: the server moves on.
  const server = await Server.start({ args: ["--sse-queue-events-max", "4"] });
  try {
    await server.create("counter", "slow");
    const inner = componentFold({ baseUrl: server.url, kind: "counter", instantiate: instantiateReducer });
    const slow = {
      async apply(state, diff, at) {
        await new Promise((r) => setTimeout(r, 20));
        return inner.apply(state, diff, at);
      },
    };
    const stream = new ModelStream({ baseUrl: server.url, kind: "counter", id: "slow", fold: slow });
    const seen = watch(stream);
    await stream.synced();
    const appends = [];
    for (let i = 0; i < 200; i++) {
      appends.push(server.request("POST", "/v1/models/counter/slow/diffs", JSON.stringify({ add: 1 })));
    }
    await Promise.all(appends);
    await server.apply("counter", "slow", { add: 1 });
    await endsEqual(stream, server, "counter", "slow");
    assert.ok(seen.events.includes("patch"), `no patch: ${seen.events.join(",")}`);
    await stream.close();
  } finally {
    await server.stop();
  }
});

test("a deploy mid-stream: the client folds each diff with the version the server names", async () => {
  const server = await Server.start();
  try {
    await server.create("counter", "v");
    const loaded = [];
    const fold = componentFold({
      baseUrl: server.url,
      kind: "counter",
      instantiate: (module, version) => {
        loaded.push(version);
        return instantiateReducer(module);
      },
    });
    const stream = new ModelStream({ baseUrl: server.url, kind: "counter", id: "v", fold });
    const versions = new Set();
    stream.onChange((change) => change.event === "diff" && versions.add(change.version));
    for (let i = 0; i < 5; i++) await server.apply("counter", "v", { add: 1 });
    await endsEqual(stream, server, "counter", "v");
    const v2 = readFileSync(join(reducers, "counter_v2.wasm"));
    const deployed = await fetch(`${server.url}/v1/reducers/counter`, { method: "PUT", body: v2 });
    assert.equal(deployed.status, 200, await deployed.text());
    for (let i = 0; i < 5; i++) await server.apply("counter", "v", { add: 1 });
    await endsEqual(stream, server, "counter", "v");
    assert.equal(versions.size, 2, "diffs before and after the deploy name two versions");
    assert.deepEqual(new Set(loaded), versions, "the client loaded each version the server named");
    await stream.close();
  } finally {
    await server.stop();
  }
});

test("100 clients hopping between two replicas of one Kafka log end equal to both", { skip: !process.env.STATEFOLD_BROKERS && "needs STATEFOLD_BROKERS (a Kafka broker with the example topics)" }, async () => {
  const kafka = ["--kafka-brokers", process.env.STATEFOLD_BROKERS, "--kafka-fetch-wait-ms", "10", "--kafka-check-interval-ms", "200"];
  const replicas = [await Server.start({ args: kafka }), await Server.start({ args: kafka })];
  try {
    const run = Math.random().toString(36).slice(2, 8); // the broker may hold earlier runs' models
    const models = [
      ...["c0", "c1", "c2", "c3"].map((id) => ["counter", `${id}-${run}`]),
      ...["d0", "d1", "d2"].map((id) => ["document", `${id}-${run}`]),
      ...["w0", "w1", "w2"].map((id) => ["workflow", `${id}-${run}`]),
    ];
    for (const [kind, id] of models) await replicas[0].create(kind, id);
    const folds = {
      counter: componentFold({ baseUrl: replicas[0].url, kind: "counter", instantiate: instantiateReducer }),
      workflow: componentFold({ baseUrl: replicas[1].url, kind: "workflow", instantiate: instantiateReducer }),
      document: mergePatch,
    };
    // Each client's connections alternate between the replicas (from one picked at random),
    // and each is cut after a few chunks: every client hops, resuming from its hash.
    const hopping = () => {
      let next = Math.floor(Math.random() * 2);
      return async (url, init) => {
        const replica = replicas[next];
        next = 1 - next;
        const response = await fetch(url.replace(replicas[0].url, replica.url), init);
        if (!response.ok) return response;
        const cut = 1 + Math.floor(Math.random() * 3);
        let chunks = 0;
        const reader = response.body.getReader();
        const body = new ReadableStream({
          async pull(controller) {
            const { value, done } = await reader.read();
            if (done || ++chunks > cut) {
              reader.cancel().catch(() => {});
              controller.close();
            } else controller.enqueue(value);
          },
          cancel: () => reader.cancel(),
        });
        return new Response(body, { status: response.status, headers: response.headers });
      };
    };
    const clients = Array.from({ length: 100 }, (_, i) => {
      const [kind, id] = models[i % models.length];
      const stream = new ModelStream({
        baseUrl: replicas[0].url,
        kind,
        id,
        fold: folds[kind],
        fetch: hopping(),
        backoff: { initialMs: 20, maxMs: 200 },
        onError: () => {},
      });
      watch(stream);
      return { kind, id, stream };
    });
    // Appends through either replica while the clients hop.
    for (let round = 0; round < 10; round++) {
      await new Promise((r) => setTimeout(r, 50));
      const writes = [];
      for (const [kind, id] of models) {
        const replica = replicas[Math.floor(Math.random() * 2)];
        const diffs =
          kind === "counter" ? [{ add: round + 1 }, { sub: 1 }]
          : kind === "document" ? [{ round, [`k${round % 3}`]: round % 2 ? null : { n: round } }]
          : round === 0 ? workflowRun(3)
          : [{ op: "output", step: "build", patch: { round } }];
        writes.push((async () => { for (const diff of diffs) await replica.apply(kind, id, diff); })());
      }
      await Promise.all(writes);
    }
    for (const { kind, id, stream } of clients) {
      // Both replicas fold the same log: wait until both are at one head, then the client.
      let head;
      for (let i = 0; ; i++) {
        const [a, b] = await Promise.all(replicas.map((r) => r.model(kind, id)));
        if (a.hash === b.hash) {
          assert.deepEqual(a.state, b.state);
          head = a;
          break;
        }
        if (i > 300) throw new Error(`${kind}/${id}: the replicas did not meet`);
        await new Promise((r) => setTimeout(r, 20));
      }
      await stream.synced((s) => s.hash === head.hash, 20000);
      assert.equal(stream.hash, head.hash, `${kind}/${id}: the client is not at the head`);
      assert.deepEqual(stream.state, head.state, `${kind}/${id}: the client's state is not the replicas'`);
    }
    for (const { kind, id, stream } of clients) {
      assert.ok(stream.connections >= 3, `${kind}/${id}: a client that did not hop (${stream.connections} connections)`);
    }
    await Promise.all(clients.map((c) => c.stream.close()));
  } finally {
    for (const replica of replicas) await replica.stop();
  }
});
