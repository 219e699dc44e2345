// @statefold/client: follow one Statefold model (see README.md for the states and
// transitions of ModelStream).
/** RFC 7396 JSON merge patch of `target` by `patch`. */
export function applyMergePatch(target, patch) {
    if (patch === null || typeof patch !== "object" || Array.isArray(patch))
        return patch;
    const out = target !== null && typeof target === "object" && !Array.isArray(target) ? { ...target } : {};
    for (const [key, value] of Object.entries(patch)) {
        if (value === null)
            delete out[key];
        else
            out[key] = applyMergePatch(out[key] ?? null, value);
    }
    return out;
}
/** Diffs are JSON merge patches (the `document` reducer). */
export const mergePatch = { apply: (state, diff) => applyMergePatch(state, diff) };
/** Each diff is the whole new state. */
export const replace = { apply: (_state, diff) => diff };
/**
 * Asks the server for the state at each new hash (`GET …?at=HASH`): exact for any reducer
 * without its module, at one request per diff (for tools such as the inspector page).
 */
export function serverFold(options) {
    const fetchFn = options.fetch ?? globalThis.fetch.bind(globalThis);
    const base = options.baseUrl.replace(/\/$/, "");
    return {
        async apply(_state, _diff, at) {
            const headers = await headersOf(options.headers);
            const path = `/v1/models/${encodeURIComponent(at.kind)}/${encodeURIComponent(at.id)}?at=${at.hash}`;
            const response = await fetchFn(`${base}${path}`, { headers });
            if (!response.ok)
                throw new Error(`GET ${path}: HTTP ${response.status}`);
            return (await response.json()).state;
        },
    };
}
/** Why a connection ended, given to `onError`. */
export class StreamError extends Error {
    reason;
    status;
    code;
    constructor(
    /** `http`: the server answered an error; `network`: no answer, or the stream broke;
     * `expired`: the token expired (the server's `expired` event); `fold`: the fold threw. */
    reason, message, status, code) {
        super(message);
        this.reason = reason;
        this.status = status;
        this.code = code;
        this.name = "StreamError";
    }
}
/**
 * Follows one model: catch-up from the held hash, then live diffs, folded into `state`.
 * A fetch-based SSE client, so it can send headers; it resumes from the hash it holds
 * after any break, losslessly.
 */
export class ModelStream {
    options;
    state = undefined;
    hash = null;
    seq = 0;
    /** The reducer version of the last diff, patch or snapshot taken. */
    version = undefined;
    status = "connecting";
    /** Connections opened so far. */
    connections = 0;
    fold;
    fetch;
    changes = new Set();
    statuses = new Set();
    abort = null;
    retryMs;
    attempt = 0;
    closed = false;
    done;
    constructor(options) {
        this.options = options;
        this.fold = options.fold ?? mergePatch;
        if (options.transport === "eventsource" && options.headers) {
            throw new Error("an EventSource sends no headers: use the fetch transport, or a cookie");
        }
        this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
        if (options.since) {
            this.state = options.since.state;
            this.hash = options.since.hash;
            this.seq = options.since.seq;
        }
        this.done = this.run();
    }
    /** Called with each change of the state. Returns a function that unsubscribes. */
    onChange(callback) {
        this.changes.add(callback);
        return () => this.changes.delete(callback);
    }
    /** Called with each change of status. Returns a function that unsubscribes. */
    onStatus(callback) {
        this.statuses.add(callback);
        return () => this.statuses.delete(callback);
    }
    /** Resolves once the stream is `live` at a hash for which `until` holds (default: any). */
    async synced(until = () => true, timeoutMs = 30000) {
        const deadline = Date.now() + timeoutMs;
        while (!(this.status === "live" && until(this))) {
            if (this.closed)
                throw new Error("the stream is closed");
            if (Date.now() > deadline)
                throw new Error(`not synced within ${timeoutMs} ms (status ${this.status})`);
            await sleep(20);
        }
    }
    /** Ends the stream. */
    async close() {
        this.closed = true;
        this.abort?.abort();
        await this.done;
    }
    setStatus(status) {
        if (this.status === status)
            return;
        this.status = status;
        for (const callback of this.statuses)
            callback(status);
    }
    changed(event, diff) {
        const change = { event, state: this.state, hash: this.hash, seq: this.seq, version: this.version, diff };
        for (const callback of this.changes)
            callback(change);
    }
    url() {
        const { baseUrl, kind, id } = this.options;
        const path = `${baseUrl.replace(/\/$/, "")}/v1/models/${encodeURIComponent(kind)}/${encodeURIComponent(id)}/events`;
        return this.hash ? `${path}?since=${this.hash}` : path;
    }
    async run() {
        while (!this.closed) {
            this.setStatus("connecting");
            let error;
            try {
                error = this.options.transport === "eventsource" ? await this.connectEventSource() : await this.connect();
            }
            catch (thrown) {
                error = thrown instanceof StreamError ? thrown : new StreamError("network", String(thrown));
            }
            if (this.closed)
                break;
            if (error) {
                const verdict = this.options.onError ? await this.options.onError(error) : defaultVerdict(error);
                if (verdict === "stop")
                    break;
            }
            // An out-of-chain event or an expired token reconnects at once; failures back off.
            if (error && error.reason !== "expired") {
                this.setStatus("backoff");
                await sleep(this.delay());
                this.attempt += 1;
            }
        }
        this.closed = true;
        this.setStatus("closed");
    }
    delay() {
        const { initialMs, maxMs = 30000, multiplier = 2 } = this.options.backoff ?? {};
        const base = Math.min(maxMs, (initialMs ?? this.retryMs ?? 1000) * multiplier ** this.attempt);
        return base * (0.5 + Math.random());
    }
    /** One connection through the platform's EventSource; as `connect`. */
    connectEventSource() {
        return new Promise((resolve) => {
            const source = new EventSource(this.url(), { withCredentials: this.options.withCredentials ?? false });
            this.connections += 1;
            this.abort = new AbortController();
            let settled = false;
            const finish = (outcome) => {
                if (settled)
                    return;
                settled = true;
                source.close();
                resolve(outcome);
            };
            this.abort.signal.addEventListener("abort", () => finish(null));
            source.onopen = () => this.setStatus("catching-up");
            // EventSource would reconnect by itself, from the last `id:`; the stream does, from
            // the hash it holds (the same, unless a fold failed), with its own backoff.
            source.onerror = () => finish(new StreamError("network", "the EventSource connection failed or ended"));
            // Events are taken one at a time, in order (a fold may be asynchronous).
            let queue = Promise.resolve();
            for (const event of ["reset", "snapshot", "patch", "diff", "synced", "expired", "moved"]) {
                source.addEventListener(event, (message) => {
                    const data = message.data;
                    queue = queue.then(async () => {
                        if (settled)
                            return;
                        const block = [`event: ${event}`, ...data.split("\n").map((line) => `data: ${line}`)].join("\n");
                        try {
                            const outcome = await this.take(block);
                            if (outcome !== "ok")
                                finish(outcome === "resume" ? null : outcome);
                        }
                        catch (thrown) {
                            finish(thrown instanceof StreamError ? thrown : new StreamError("network", String(thrown)));
                        }
                    });
                });
            }
        });
    }
    /** One connection: null when it ended without an error (the server closed it, or the
     * chain broke and must resume from the held hash), else why it failed. */
    async connect() {
        const headers = await headersOf(this.options.headers);
        this.abort = new AbortController();
        this.connections += 1;
        const response = await this.fetch(this.url(), {
            headers: { accept: "text/event-stream", ...headers },
            signal: this.abort.signal,
            redirect: "follow",
        }).catch((e) => {
            throw new StreamError("network", `cannot reach the server: ${e}`);
        });
        if (!response.ok || !response.body) {
            const text = await response.text().catch(() => "");
            let code;
            try {
                code = JSON.parse(text).error?.code;
            }
            catch {
                // not the API's error shape
            }
            return new StreamError("http", `HTTP ${response.status}: ${text}`, response.status, code);
        }
        this.setStatus("catching-up");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        try {
            for (;;) {
                const { value, done } = await reader.read();
                if (done)
                    return new StreamError("network", "the server ended the stream");
                buffer += value;
                let end;
                while ((end = blankLine(buffer)) >= 0) {
                    const block = buffer.slice(0, end);
                    buffer = buffer.slice(end).replace(/^(\r\n|\n|\r){2}/, "");
                    const outcome = await this.take(block);
                    if (outcome !== "ok") {
                        await reader.cancel().catch(() => { });
                        return outcome === "resume" ? null : outcome;
                    }
                }
            }
        }
        catch (thrown) {
            if (thrown instanceof StreamError)
                return thrown;
            return new StreamError("network", `the stream broke: ${thrown}`);
        }
    }
    /** One event block: "ok", "resume" (reconnect from the held hash), or an error. */
    async take(block) {
        let event = "message";
        const data = [];
        for (const line of block.split(/\r\n|\n|\r/)) {
            if (line.startsWith(":"))
                continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event")
                event = value;
            else if (field === "data")
                data.push(value);
            else if (field === "retry" && /^\d+$/.test(value))
                this.retryMs = Number(value);
        }
        if (data.length === 0)
            return "ok";
        const body = JSON.parse(data.join("\n"));
        const { kind, id } = this.options;
        const apply = async (diff, at) => {
            try {
                this.state = await this.fold.apply(this.state ?? null, diff, at);
            }
            catch (e) {
                throw new StreamError("fold", `cannot fold ${kind}/${id} at seq ${at.seq}: ${e}`);
            }
        };
        switch (event) {
            case "reset":
                this.state = undefined;
                this.hash = null;
                this.seq = 0;
                this.changed("reset");
                return "ok";
            case "snapshot":
                this.state = body.state;
                this.hash = body.hash;
                this.seq = body.seq;
                this.version = body.version;
                this.changed("snapshot");
                return "ok";
            case "patch":
                if (body.from !== this.hash)
                    return "resume";
                await apply(body.diff, { kind, id, prevHash: body.from, hash: body.to, seq: body.seq, version: body.version });
                this.hash = body.to;
                this.seq = body.seq;
                this.version = body.version;
                this.changed("patch", body.diff);
                return "ok";
            case "diff":
                if (body.prev !== this.hash)
                    return "resume";
                await apply(body.diff, {
                    kind,
                    id,
                    prevHash: body.prev,
                    hash: body.hash,
                    seq: body.seq,
                    offset: body.offset,
                    version: body.version,
                });
                this.hash = body.hash;
                this.seq = body.seq;
                this.version = body.version;
                this.changed("diff", body.diff);
                return "ok";
            case "synced":
                this.attempt = 0;
                if (body.hash === this.hash)
                    this.setStatus("live");
                return "ok";
            case "expired":
                return new StreamError("expired", body.reason ?? "the token expired");
            case "moved":
                // Sharded servers: a rebalance moved the model; reconnect at once (the server
                // redirects to where it is served now), from the hash held.
                return "resume";
            default:
                return "ok";
        }
    }
}
/** Without `onError`: give up on a 4xx that waiting will not cure. */
function defaultVerdict(error) {
    const status = error.status ?? 0;
    if (status >= 400 && status < 500 && ![401, 404, 408, 429].includes(status))
        return "stop";
}
function blankLine(buffer) {
    const match = /(\r\n|\n|\r)(\r\n|\n|\r)/.exec(buffer);
    return match ? match.index : -1;
}
/** The headers a connection or request sends: given, or asked for now (a fresh token). */
async function headersOf(headers) {
    return typeof headers === "function" ? headers() : headers;
}
function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
}
/**
 * Folds with the reducer's own component, the version the server names on each diff: the
 * same code on both sides. One model instance is kept per model while its hash follows on.
 */
export function componentFold(options) {
    const fetchFn = options.fetch ?? globalThis.fetch.bind(globalThis);
    const base = options.baseUrl.replace(/\/$/, "");
    const versions = new Map();
    const resident = new Map();
    let reducerName;
    const get = async (path) => {
        const headers = await headersOf(options.headers);
        const response = await fetchFn(`${base}${path}`, { headers });
        if (!response.ok)
            throw new Error(`GET ${path}: HTTP ${response.status} ${await response.text()}`);
        return response;
    };
    const nameOf = () => (reducerName ??= get("/v1/reducers").then(async (response) => {
        const { reducers } = (await response.json());
        const reducer = reducers.find((r) => r.kinds.includes(options.kind));
        if (!reducer)
            throw new Error(`no reducer folds kind ${options.kind}`);
        return reducer.name;
    }));
    const load = (version) => {
        let loaded = versions.get(version);
        if (!loaded) {
            loaded = (async () => {
                const path = `/v1/reducers/${encodeURIComponent(await nameOf())}/versions/${version}/module`;
                const bytes = new Uint8Array(await (await get(path)).arrayBuffer());
                return options.instantiate(bytes, version);
            })();
            loaded.catch(() => versions.delete(version));
            versions.set(version, loaded);
        }
        return loaded;
    };
    const encoder = new TextEncoder();
    return {
        async apply(state, diff, at) {
            if (!at.version)
                throw new Error("the server named no reducer version (a server older than this client)");
            const key = `${at.kind}/${at.id}`;
            let held = resident.get(key);
            if (!held || held.version !== at.version || held.hash !== at.prevHash) {
                const reducer = await load(at.version);
                const snapshot = encoder.encode(JSON.stringify(state));
                held = { version: at.version, hash: at.prevHash, model: reducer.Model.restore(at.id, snapshot) };
                resident.set(key, held);
            }
            const context = {
                offset: BigInt(at.offset ?? 0),
                timestampMs: undefined,
                headers: [],
                prevHash: hexBytes(at.prevHash),
            };
            const result = held.model.apply([{ context, payload: encoder.encode(JSON.stringify(diff)) }]);
            if (result.refusal || result.applied !== 1) {
                resident.delete(key);
                throw new Error(`the reducer refused what the server applied: ${result.refusal?.reason}`);
            }
            held.hash = at.hash;
            return JSON.parse(new TextDecoder().decode(held.model.snapshot()));
        },
    };
}
function hexBytes(hex) {
    const out = new Uint8Array(hex.length / 2);
    for (let i = 0; i < out.length; i++)
        out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
    return out;
}
