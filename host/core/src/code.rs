//! Every error and rejection code Statefold answers with: the `code` of an HTTP error body,
//! of an SSE `error` event, of a request/reply error, of a stored rejection, of a refused
//! deploy. One enum, so a code is a name the compiler knows; the README's error table and
//! the OpenAPI document are checked against [`Code::ALL`] (`tests/tests/readme.rs`).

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
    /// A body that cannot be read.
    BadBody = "bad_body",
    /// A query parameter that does not parse.
    BadQuery = "bad_query",
    /// Request/reply: a request that is not well-formed.
    BadRequest = "bad_request",
    /// A deploy refusal (see the README's error table).
    ContractMismatch = "contract_mismatch",
    /// A deploy refusal (see the README's error table).
    CoreModule = "core_module",
    /// With [auth]: a POST or PUT authenticated by the cookie.
    CrossSite = "cross_site",
    /// A deploy failed for a reason no deploy code names.
    Deploy = "deploy",
    /// A deploy refusal (see the README's error table).
    DescribeFailed = "describe_failed",
    /// /readyz: this replica disagrees with the others.
    Diverged = "diverged",
    /// An append whose idempotency key the model applied already (also a rejection).
    Duplicate = "duplicate",
    /// The token grants no such action on that model or kind.
    Forbidden = "forbidden",
    /// Sharded mode, route = "proxy": the server that serves the model could not be reached.
    ForwardFailed = "forward_failed",
    /// An append whose expected hash is not the model's (also a rejection).
    HashMismatch = "hash_mismatch",
    /// A deploy refusal (see the README's error table).
    IncompatibleVersion = "incompatible_version",
    /// A failure inside the server that no other code names.
    Internal = "internal",
    /// A deploy refusal (see the README's error table).
    InvalidComponent = "invalid_component",
    /// A deploy record whose module cannot load here.
    InvalidDeploy = "invalid_deploy",
    /// A model id that is empty, over 256 bytes, not UTF-8 or with control characters.
    InvalidId = "invalid_id",
    /// A record with no key, or a key that is not a valid id.
    InvalidKey = "invalid_key",
    /// A write to a kind whose topic is not the log the store folded.
    KindStopped = "kind_stopped",
    /// Since, at or Last-Event-ID is not a hash.
    MalformedHash = "malformed_hash",
    /// A body that is not the JSON the route takes.
    MalformedJson = "malformed_json",
    /// A create for a model that exists.
    ModelExists = "model_exists",
    /// No replay of the kind has run.
    NoReplay = "no_replay",
    /// No such route.
    NotFound = "not_found",
    /// /readyz: catching up, the brokers unreachable, a topic missing, a kind stopped, the store .
    NotReady = "not_ready",
    /// GET /v1/cluster on a server without [cluster].
    NotSharded = "not_sharded",
    /// A deploy refusal (see the README's error table).
    NotWasm = "not_wasm",
    /// A record whose offset is not after its model's last one.
    OffsetRegressed = "offset_regressed",
    /// Sharded mode: no server has caught up on the model's partition yet.
    PartitionUnavailable = "partition_unavailable",
    /// ?at= a version no longer retained.
    Pruned = "pruned",
    /// A write to a read-only server.
    ReadOnly = "read_only",
    /// The reducer trapped or hit a limit on this diff: as for refused.
    ReducerFailed = "reducer_failed",
    /// The reducer refused the diff: the model is as it was.
    Refused = "refused",
    /// A replay of the kind is running.
    ReplayRunning = "replay_running",
    /// A deploy refusal (see the README's error table).
    RestoreFailed = "restore_failed",
    /// The server is stopping.
    ShuttingDown = "shutting_down",
    /// The store is corrupted: the process stops.
    Store = "store",
    /// The store failed a write.
    StoreUnwritable = "store_unwritable",
    /// A body over diff_bytes_max.
    TooLarge = "too_large",
    /// Sse_subscribers_max streams are open.
    TooManySubscribers = "too_many_subscribers",
    /// A deploy refusal (see the README's error table).
    Truncated = "truncated",
    /// With [auth]: no token, or one that is invalid, expired, or for another audience or issuer.
    Unauthenticated = "unauthenticated",
    /// The log did not take the append.
    Unavailable = "unavailable",
    /// No such kind, model, or version of the model.
    UnknownHash = "unknown_hash",
    /// No such kind, model, or version of the model.
    UnknownKind = "unknown_kind",
    /// No such kind, model, or version of the model.
    UnknownModel = "unknown_model",
    /// Request/reply: an operation that does not exist.
    UnknownOperation = "unknown_operation",
    /// `?folded=PARTITION:OFFSET` names no record of the log: no such partition, or past its end.
    UnknownPosition = "unknown_position",
    /// No such reducer, or stored version of it.
    UnknownReducer = "unknown_reducer",
    /// A rejection: a record from a topic no kind reads.
    UnknownTopic = "unknown_topic",
    /// No such reducer, or stored version of it.
    UnknownVersion = "unknown_version",
    /// A deploy refusal: the module file cannot be read.
    Unreadable = "unreadable",
    /// A deploy refusal (see the README's error table).
    UnsupportedFormat = "unsupported_format",
    /// A deploy refusal (see the README's error table).
    UnsupportedImports = "unsupported_imports",
    /// ?wait=applied or ?folded= not folded within wait_applied_ms_max.
    WaitTimeout = "wait_timeout",
    /// A record not on its model's partition.
    WrongPartition = "wrong_partition",
    /// A deploy refusal (see the README's error table).
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
