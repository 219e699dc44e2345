//! Every error and rejection code Statefold answers with: the `code` of an HTTP error body,
//! of an SSE `error` event, of a request/reply error, of a stored rejection, of a refused
//! deploy. One enum, so a code is a name the compiler knows; the error table of
//! docs/reference.md and the OpenAPI document are checked against [`Code::ALL`] (`tests/tests/readme.rs`).

macro_rules! codes {
    ($( $(#[doc = $doc:literal])* $variant:ident = $text:literal, )*) => {
        /// A machine-readable error code (see the module documentation).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Code {
            /// Every code, in the order of their names.
            pub const ALL: &[Code] = &[$(Code::$variant,)*];

            /// The code named `name`, as sent (`None`: no such code).
            pub fn from_name(name: &str) -> Option<Code> {
                match name {
                    $($text => Some(Code::$variant),)*
                    _ => None,
                }
            }

            /// The code as it is sent.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $text,)*
                }
            }
        }
    };
}

codes! {
    /// 400: a body that cannot be read.
    BadBody = "bad_body",
    /// 400: a query parameter that does not parse, or is out of its range (`limit=0`).
    BadQuery = "bad_query",
    /// Request/reply: a request that is not well-formed (a payload field missing or of the wrong type).
    BadRequest = "bad_request",
    /// Deploy refusal: the component's `statefold:reducer` export does not match the contract.
    ContractMismatch = "contract_mismatch",
    /// Deploy refusal: a core WebAssembly module, not a component.
    CoreModule = "core_module",
    /// 403: a POST, PUT or DELETE authenticated by the cookie from an origin that is not allowed.
    CrossSite = "cross_site",
    /// 500: a deploy that failed for a reason no deploy code names.
    Deploy = "deploy",
    /// Deploy refusal: the component's `describe` failed.
    DescribeFailed = "describe_failed",
    /// 503 from `/readyz`: this replica disagrees with the others.
    Diverged = "diverged",
    /// Rejection: a diff whose idempotency key the model applied already.
    Duplicate = "duplicate",
    /// 403: the token grants no such action on that model or kind.
    Forbidden = "forbidden",
    /// 502, sharded mode, `route = "proxy"`: the server that serves the model could not be reached.
    ForwardFailed = "forward_failed",
    /// 409 (and a rejection): an append whose expected hash is not the model's hash.
    HashMismatch = "hash_mismatch",
    /// Deploy refusal: built against a `statefold:reducer` version this host does not load.
    IncompatibleVersion = "incompatible_version",
    /// 500: a failure inside the server that no other code names.
    Internal = "internal",
    /// Deploy refusal: not a valid WebAssembly component.
    InvalidComponent = "invalid_component",
    /// Rejection: a deploy record whose module cannot load here.
    InvalidDeploy = "invalid_deploy",
    /// 400: a model id that is empty, over 256 bytes, not UTF-8 or with control characters.
    InvalidId = "invalid_id",
    /// Rejection: a record with no key, or a key that is not a valid id.
    InvalidKey = "invalid_key",
    /// 503: a write to a kind whose topic is not the log the store folded.
    KindStopped = "kind_stopped",
    /// 400: `since`, `at` or `Last-Event-ID` is not a hash.
    MalformedHash = "malformed_hash",
    /// 400: a body that is not the JSON the route takes.
    MalformedJson = "malformed_json",
    /// 409 (and a rejection): a create for a model that exists.
    ModelExists = "model_exists",
    /// 404: no replay of the kind has run.
    NoReplay = "no_replay",
    /// 404: no such route.
    NotFound = "not_found",
    /// 503 from `/readyz`: catching up, the brokers unreachable, a topic missing, a kind stopped, the store unwritable.
    NotReady = "not_ready",
    /// 404: `GET /v1/cluster` on a server without `[cluster]`.
    NotSharded = "not_sharded",
    /// Deploy refusal: not a WebAssembly file.
    NotWasm = "not_wasm",
    /// Rejection: a record whose offset is not after its model's last one.
    OffsetRegressed = "offset_regressed",
    /// 503, sharded mode: no server has caught up on the model's partition yet, or a request
    /// that came by a hop reached a server that does not fold it.
    PartitionUnavailable = "partition_unavailable",
    /// 410: `?at=` a version no longer retained.
    Pruned = "pruned",
    /// 403: a write to a read-only server.
    ReadOnly = "read_only",
    /// 422 (and a rejection): the reducer trapped or hit a limit on this diff.
    ReducerFailed = "reducer_failed",
    /// 409 (and a rejection): the reducer refused the diff; the model is as it was.
    Refused = "refused",
    /// 409: a replay of the kind is running.
    ReplayRunning = "replay_running",
    /// Deploy refusal: the new version cannot restore the states the kind holds.
    RestoreFailed = "restore_failed",
    /// 503: the server is stopping.
    ShuttingDown = "shutting_down",
    /// 500: the store is corrupted; the process stops.
    Store = "store",
    /// 503: the store failed a write (disk full, I/O error); folding stopped until a restart.
    StoreUnwritable = "store_unwritable",
    /// 413 (and a rejection, and a deploy refusal): a body over `diff_bytes_max`, a module
    /// over `reducer_module_bytes_max`.
    TooLarge = "too_large",
    /// 503: `sse_subscribers_max` streams are open.
    TooManySubscribers = "too_many_subscribers",
    /// Deploy refusal: the file ends inside a section (cut short).
    Truncated = "truncated",
    /// 401, with `[auth]`: no token, or one that is invalid, expired, or for another audience or issuer.
    Unauthenticated = "unauthenticated",
    /// 503: the log did not take the append (broker down, produce queue full, timeout).
    Unavailable = "unavailable",
    /// 404: no such version of the model.
    UnknownHash = "unknown_hash",
    /// 404: no such kind.
    UnknownKind = "unknown_kind",
    /// 404: no such model.
    UnknownModel = "unknown_model",
    /// Request/reply: an operation that does not exist.
    UnknownOperation = "unknown_operation",
    /// 404: `?folded=PARTITION:OFFSET` names no record of the log: no such partition, or past its end.
    UnknownPosition = "unknown_position",
    /// 404: no such reducer.
    UnknownReducer = "unknown_reducer",
    /// Rejection: a record from a topic no kind reads.
    UnknownTopic = "unknown_topic",
    /// 404: no such stored version of the reducer.
    UnknownVersion = "unknown_version",
    /// Deploy refusal: the module file cannot be read.
    Unreadable = "unreadable",
    /// Deploy refusal: a diff or state format the API does not serve.
    UnsupportedFormat = "unsupported_format",
    /// Deploy refusal: imports the sandbox does not provide.
    UnsupportedImports = "unsupported_imports",
    /// 504: `?wait=applied` or `?folded=` not folded within `wait_applied_ms_max`.
    WaitTimeout = "wait_timeout",
    /// Rejection: a record not on its model's partition.
    WrongPartition = "wrong_partition",
    /// Deploy refusal: the component does not export `statefold:reducer/reducer`.
    WrongWorld = "wrong_world",
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_snake_case_names() {
        let names: std::collections::BTreeSet<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), Code::ALL.len());
        assert!(names.iter().all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')), "{names:?}");
        assert!(Code::ALL.iter().all(|c| Code::from_name(c.as_str()) == Some(*c)));
        assert_eq!(Code::from_name("no_such_code"), None);
    }
}
