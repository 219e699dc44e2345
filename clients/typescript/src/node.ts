// @statefold/client/node: a reducer component made runnable in Node at run time, with
// jco's transpiler and the WASI preview 2 shim (both optional peer dependencies).
import type { ReducerExports } from "./index.js";

type Shim = Record<string, Record<string, unknown>>;

/**
 * Transpiles a reducer component (its `.wasm` bytes) with `@bytecodealliance/jco-transpile`
 * and instantiates it: WASI from `@bytecodealliance/preview2-shim`, and the host's meter
 * (`statefold:reducer/meter`) as a no-op, since the client sets no CPU budget. Reactions
 * (`statefold:reducer/reactions`, since 0.2.0) are dropped: the server that folded the diff
 * relayed them; a client folding it again only shows the state.
 */
export async function instantiateReducer(module: Uint8Array): Promise<ReducerExports> {
  const { transpileBytes } = await import("@bytecodealliance/jco-transpile");
  const shim = (await import("@bytecodealliance/preview2-shim")) as unknown as Shim;
  const { files, imports: needed } = await transpileBytes(module, { name: "reducer", instantiation: "async" });
  const js = new TextDecoder().decode(files["reducer.js"]);
  const generated = await import(`data:text/javascript;base64,${Buffer.from(js).toString("base64")}`);
  const camel = (name: string) => name.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
  const imports: Record<string, unknown> = {};
  for (const name of needed) {
    if (name.startsWith("statefold:reducer/meter")) {
      imports[name] = { startDiff() {} };
      continue;
    }
    if (name.startsWith("statefold:reducer/reactions")) {
      imports[name] = { emit() {} };
      continue;
    }
    const match = /^wasi:([a-z-]+)\/([a-z-]+)/.exec(name);
    const provided = match && shim[match[1]]?.[camel(match[2])];
    if (!provided) throw new Error(`the reducer imports ${name}, which the client cannot provide`);
    imports[name] = provided;
  }
  const instance = await generated.instantiate((path: string) => WebAssembly.compile(files[path] as Uint8Array<ArrayBuffer>), imports);
  return instance.reducer as ReducerExports;
}
