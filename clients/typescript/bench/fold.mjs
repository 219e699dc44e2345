// Per-diff cost of folding in the client, side by side in one run: the built-in JSON merge
// patch, and the `document` reducer's own component (transpiled by jco, run in Node) on the
// same diffs; `counter`'s component beside them. Medians of ROUNDS rounds of N diffs.
//   STATEFOLD_REDUCERS=<dir of built .wasm> node bench/fold.mjs
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { componentFold, mergePatch } from "../dist/index.js";
import { instantiateReducer } from "../dist/node.js";

const dir = process.env.STATEFOLD_REDUCERS;
if (!dir) throw new Error("set STATEFOLD_REDUCERS to the built reducers' directory");
const N = 2000;
const ROUNDS = 11;

// A fold that is given the module directly (no server): what componentFold does per diff.
async function localFold(name) {
  const reducer = await instantiateReducer(readFileSync(join(dir, `${name}.wasm`)));
  return componentFold({
    baseUrl: "http://unused",
    kind: name,
    instantiate: async () => reducer,
    fetch: async (url) => {
      if (url.endsWith("/v1/reducers")) return Response.json({ reducers: [{ name, kinds: [name] }] });
      return new Response(new Uint8Array(0));
    },
  });
}

const hex = (n) => n.toString(16).padStart(64, "0");
async function perDiff(fold, kind, diffs, initial) {
  const samples = [];
  for (let round = 0; round < ROUNDS; round++) {
    let state = initial;
    const start = performance.now();
    for (let i = 0; i < diffs.length; i++) {
      const at = { kind, id: `m${round}`, prevHash: hex(i), hash: hex(i + 1), seq: i + 1, offset: i, version: "v" };
      state = await fold.apply(state, diffs[i], at);
    }
    samples.push(((performance.now() - start) * 1000) / diffs.length);
  }
  samples.sort((a, b) => a - b);
  return samples[Math.floor(samples.length / 2)];
}

const documentDiffs = Array.from({ length: N }, (_, i) => ({ title: `t${i}`, items: { [`k${i % 10}`]: i } }));
const counterDiffs = Array.from({ length: N }, (_, i) => (i % 3 ? { add: 2 } : { sub: 1 }));
const patch = await perDiff(mergePatch, "document", documentDiffs, {});
const documentComponent = await perDiff(await localFold("document"), "document", documentDiffs, {});
const counterComponent = await perDiff(await localFold("counter"), "counter", counterDiffs, 0);

console.log(`\nclient folding in Node ${process.version} (median of ${ROUNDS} rounds of ${N} diffs, per diff)`);
console.log(`${"case".padEnd(52)} ${"per diff".padStart(10)}  ratio`);
const row = (name, us, base) => console.log(`${name.padEnd(52)} ${`${us.toFixed(2)} µs`.padStart(10)}  ${(us / base).toFixed(1)}x`);
row("document, built-in JSON merge patch", patch, patch);
row("document, the reducer's component (jco)", documentComponent, patch);
row("counter, the reducer's component (jco)", counterComponent, patch);
