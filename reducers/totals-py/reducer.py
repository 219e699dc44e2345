"""totals_py: totals by key, e.g. items in a basket (the reducer of `statefold new`, in Python).

State: {"apples": 5, "pears": 1} (a key whose total comes back to 0 is dropped).
Diff: {"add": {"apples": 2, "pears": -1}}. A diff that would take a total past a 64-bit
integer is refused, and changes nothing. Diffs compose (merge: the sums per key) and the
diff between two states is computed (delta).
"""

from statefold import NotComposable, Refusal, define

LIMIT = 2**63 - 1


def check(diff):
    if not isinstance(diff, dict) or set(diff) != {"add"} or not isinstance(diff["add"], dict):
        raise Refusal('a diff is {"add": {KEY: N, ...}}')
    for key, n in diff["add"].items():
        if not isinstance(n, int) or isinstance(n, bool):
            raise Refusal(f"{key}: {n!r} is not an integer")


class Totals:
    name = "totals_py"
    version = "0.1.0"

    @staticmethod
    def empty(id):
        return {}

    @staticmethod
    def apply(state, diff, ctx):
        check(diff)
        for key, n in diff["add"].items():
            total = state.get(key, 0) + n
            if abs(total) > LIMIT:
                raise Refusal(f"{key} would overflow")
            if total == 0:
                state.pop(key, None)
            else:
                state[key] = total
        return state

    @staticmethod
    def merge(diffs):
        add = {}
        for diff in diffs:
            for key, n in diff["add"].items():
                add[key] = add.get(key, 0) + n
                if abs(add[key]) > LIMIT:
                    raise NotComposable(f"the changes to {key} do not fit in one diff")
        return {"add": add}

    @staticmethod
    def delta(from_, to):
        add = {}
        for key in {**from_, **to}:
            change = to.get(key, 0) - from_.get(key, 0)
            if change != 0:
                add[key] = change
        return {"add": add}


# componentize-py exports `Reducer` (the `reducer` interface) and `Model` (its resource) from
# the module named after the interface: this one.
Reducer, Model = define(Totals)
