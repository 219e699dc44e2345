// The Statefold reducer contract (statefold:reducer@0.2.0) for a reducer written in
// JavaScript over JSON states and diffs: `define(spec)` gives the `reducer` export.
//   spec.name, spec.version        what `describe` says
//   spec.empty(id)                 a new model's state
//   spec.apply(state, diff, ctx)   the next state; throw new Refusal(reason) to refuse
//                                  (and return nothing changed: `state` is a copy)
//   spec.merge(diffs)              optional: one diff for a run, or new NotComposable(reason)
//   spec.delta(from, to)           optional: the diff from one state to another
// ctx: {offset, timestampMs, headers, emit(topic, key, value)}.
import { startDiff } from 'statefold:reducer/meter@0.2.0';
import { emit } from 'statefold:reducer/reactions@0.2.0';

export class Refusal extends Error {}
export class NotComposable extends Error {}

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const parse = (bytes) => JSON.parse(decoder.decode(bytes));
const encode = (value) => encoder.encode(JSON.stringify(value));
const message = (e) => (e instanceof Error ? e.message : String(e));

export function define(spec) {
  class Model {
    constructor(id, state) {
      this.id = id;
      this.state = state === undefined ? spec.empty(id) : state;
    }
    static restore(id, snapshot) {
      try {
        return new Model(id, parse(snapshot));
      } catch (e) {
        throw message(e);
      }
    }
    apply(diffs) {
      for (let i = 0; i < diffs.length; i++) {
        startDiff();
        const { context, payload } = diffs[i];
        const emitted = [];
        const ctx = {
          offset: context.offset,
          timestampMs: context.timestampMs,
          headers: context.headers,
          emit: (topic, key, value) => emitted.push({ topic, key, value: encode(value), headers: [] }),
        };
        let next;
        try {
          next = spec.apply(structuredClone(this.state), parse(payload), ctx);
        } catch (e) {
          if (e instanceof Refusal || e instanceof SyntaxError) {
            return { applied: i, refusal: { index: i, reason: message(e) } };
          }
          throw e;
        }
        this.state = next;
        emitted.forEach(emit);
      }
      return { applied: diffs.length };
    }
    snapshot() {
      return encode(this.state);
    }
  }
  return {
    describe: () => ({
      name: spec.name,
      version: spec.version,
      diffFormat: 'json',
      stateFormat: 'json',
      capabilities: { merge: !!spec.merge, delta: !!spec.delta },
    }),
    Model,
    merge(diffs) {
      if (!spec.merge) throw 'merge is not supported';
      let parsed;
      try {
        parsed = diffs.map(parse);
      } catch (e) {
        throw message(e);
      }
      try {
        return { tag: 'diff', val: encode(spec.merge(parsed)) };
      } catch (e) {
        if (e instanceof NotComposable) return { tag: 'not-composable', val: e.message };
        throw message(e);
      }
    },
    delta(from, to) {
      if (!spec.delta) throw 'delta is not supported';
      try {
        return encode(spec.delta(parse(from), parse(to)));
      } catch (e) {
        throw message(e);
      }
    },
    heapBytes: () => 0n,
  };
}
