"""The Statefold reducer contract (statefold:reducer@0.2.0) for a reducer written in Python
over JSON states and diffs: `define(spec)` gives the `Reducer` and `Model` classes that
componentize-py exports (the module named after the `reducer` interface defines both).

spec is a class with:
    name, version               what `describe` says
    empty(id)                   a new model's state
    apply(state, diff, ctx)     the next state; raise Refusal(reason) to refuse (`state` is
                                a copy: a refused diff changes nothing)
    merge(diffs)                optional: one diff for a run, or raise NotComposable(reason)
    delta(from_, to)            optional: the diff from one state to another
ctx: offset, timestamp_ms, headers, emit(topic, key, value).
"""

import copy
import json

from componentize_py_types import Err
from wit_world.imports import meter, reactions, types


class Refusal(Exception):
    pass


class NotComposable(Exception):
    pass


def _encode(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class Context:
    def __init__(self, context):
        self.offset = context.offset
        self.timestamp_ms = context.timestamp_ms
        self.headers = context.headers
        self.emitted = []

    def emit(self, topic, key, value):
        self.emitted.append(reactions.Reaction(topic, key, _encode(value), []))


def define(spec):
    capabilities = types.Capabilities(0)
    if hasattr(spec, "merge"):
        capabilities |= types.Capabilities.MERGE
    if hasattr(spec, "delta"):
        capabilities |= types.Capabilities.DELTA

    class Model:
        def __init__(self, id, state=None):
            self.id = id
            self.state = spec.empty(id) if state is None else state

        @classmethod
        def restore(cls, id, snapshot):
            try:
                return cls(id, json.loads(snapshot))
            except ValueError as e:
                raise Err(str(e))

        def apply(self, diffs):
            for i, diff in enumerate(diffs):
                meter.start_diff()
                ctx = Context(diff.context)
                try:
                    state = spec.apply(copy.deepcopy(self.state), json.loads(diff.payload), ctx)
                except (Refusal, ValueError) as e:
                    return types.ApplyResult(i, types.Refusal(i, str(e)))
                self.state = state
                for reaction in ctx.emitted:
                    reactions.emit(reaction)
            return types.ApplyResult(len(diffs), None)

        def snapshot(self):
            return _encode(self.state)

    class Reducer:
        def describe(self):
            return types.Info(spec.name, spec.version, "json", "json", capabilities)

        def merge(self, diffs):
            try:
                return types.Composed_Diff(_encode(spec.merge([json.loads(d) for d in diffs])))
            except NotComposable as e:
                return types.Composed_NotComposable(str(e))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise Err(f"malformed diffs: {e}")

        def delta(self, from_, to):
            try:
                return _encode(spec.delta(json.loads(from_), json.loads(to)))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise Err(f"malformed states: {e}")

        def heap_bytes(self):
            return 0

    return Reducer, Model
