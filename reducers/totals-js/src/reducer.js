// totals_js: totals by key, e.g. items in a basket (the reducer of `statefold new`, in
// JavaScript). State: {"apples": 5, "pears": 1} (a key whose total comes back to 0 is
// dropped). Diff: {"add": {"apples": 2, "pears": -1}}. A diff that would take a total past
// Number.MAX_SAFE_INTEGER is refused, and changes nothing. Diffs compose (merge: the sums
// per key) and the diff between two states is computed (delta).
import { define, Refusal, NotComposable } from './statefold.js';

const MAX = Number.MAX_SAFE_INTEGER;

function check(diff) {
  if (typeof diff !== 'object' || diff === null || typeof diff.add !== 'object' || diff.add === null || Object.keys(diff).length !== 1) {
    throw new Refusal('a diff is {"add": {KEY: N, ...}}');
  }
  for (const [key, n] of Object.entries(diff.add)) {
    if (!Number.isSafeInteger(n)) throw new Refusal(`${key}: ${n} is not an integer`);
  }
}

// The `reducer` export of the WIT world `guest`.
export const reducer = define({
  name: 'totals_js',
  version: '0.1.0',
  empty: () => ({}),
  apply(state, diff) {
    check(diff);
    for (const [key, n] of Object.entries(diff.add)) {
      const total = (state[key] ?? 0) + n;
      if (Math.abs(total) > MAX) throw new Refusal(`${key} would overflow`);
      if (total === 0) delete state[key];
      else state[key] = total;
    }
    return state;
  },
  merge(diffs) {
    const add = {};
    for (const diff of diffs) {
      for (const [key, n] of Object.entries(diff.add)) {
        const sum = (add[key] ?? 0) + n;
        if (Math.abs(sum) > MAX) throw new NotComposable(`the changes to ${key} do not fit in one diff`);
        add[key] = sum;
      }
    }
    return { add };
  },
  delta(from, to) {
    const add = {};
    for (const key of new Set([...Object.keys(from), ...Object.keys(to)])) {
      const change = (to[key] ?? 0) - (from[key] ?? 0);
      if (change !== 0) add[key] = change;
    }
    return { add };
  },
});
