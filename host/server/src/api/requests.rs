//! Request/reply over Kafka (the Resonate Kafka API): services that speak Kafka, not HTTP,
//! send `{target, replyTo: {topic, target, partitionKey?}, correlationId, operation,
//! requestId?, metadata?, payload}` to the request topic and get `{target, correlationId,
//! success, response | error: {code, message}}` on their reply topic.
//!
//! The operations are the HTTP API's, through the same service calls, with the same codes:
//! `models.create`, `models.append` (after the fold, with the new hash; `expectedHash`,
//! `idempotencyKey`), `models.read` (`at`), `models.since` (what a hash is missing, the plan
//! of `GET .../diffs?since=`), `models.list`. Servers share a consumer group; a request for
//! another target is dropped (a debug log and `statefold_requests_dropped_total`). A request
//! is answered before its offset is committed: a crash answers it again, and an append with
//! an `idempotencyKey` is applied once however often it is sent (the fold de-duplicates it:
//! `model::IDEMPOTENCY_KEY_HEADER`). The clients are built by the server (`source`); this
//! module speaks the protocol.

use crate::code::Code;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{PlanBody, StateBody, VersionBody};
use crate::app::{App, AppError, Route};
use crate::chain::Hash;
use crate::model::{EXPECTED_HASH_HEADER, IDEMPOTENCY_KEY_HEADER, Keyed, ModelKey};

/// Longest idempotency key, in bytes.
const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;

/// What the request/reply loop needs besides its clients.
pub struct Settings {
    /// This server's target: requests for another are dropped.
    pub target: String,
    /// Requests handled at once (each holds a task until its reply is acknowledged).
    pub in_flight_max: usize,
    /// Longest wait for a reply's acknowledgement by the broker.
    pub produce_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    target: String,
    reply_to: ReplyTo,
    correlation_id: Value,
    operation: String,
    /// Echoed in the reply, as `metadata` is (the seed's envelope).
    #[serde(default)]
    request_id: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    payload: Value,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct ReplyTo {
    topic: String,
    target: Value,
    #[serde(default)]
    partition_key: Option<String>,
}

/// A failed operation: the HTTP API's code and a message.
struct Failure {
    code: Code,
    message: String,
}

impl From<AppError> for Failure {
    fn from(error: AppError) -> Failure {
        Failure { code: error.code(), message: error.message() }
    }
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure { code: Code::BadRequest, message: message.into() }
}

/// Serves requests from `consumer` (subscribed to the request topic) until `stop`, replying
/// with `producer`.
pub async fn serve(
    app: Arc<App>,
    consumer: StreamConsumer,
    producer: FutureProducer,
    settings: Settings,
    stop: CancellationToken,
) {
    let consumer = Arc::new(consumer);
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.in_flight_max.max(1)));
    // Per partition: offsets handed out and not answered yet; the committed position is the
    // lowest of them (or the next after the last answered).
    let progress = Arc::new(std::sync::Mutex::new(Progress::default()));
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, "request topic");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { break };
        let slot_key = (message.topic().to_owned(), message.partition());
        let offset = message.offset();
        progress.lock().unwrap_or_else(|p| p.into_inner()).started(&slot_key, offset);
        let (value, headers) = (message.payload().map(<[u8]>::to_vec), traceparent_of(&message));
        let origin = Origin { topic: slot_key.0.clone(), partition: slot_key.1, offset };
        let (app, producer, settings, progress, consumer, stop) =
            (app.clone(), producer.clone(), settings.clone(), progress.clone(), consumer.clone(), stop.clone());
        tokio::spawn(async move {
            if !handle(&app, &producer, &settings, value.as_deref(), headers, &origin, &stop).await {
                // Stopping with the reply not delivered: the offset stays uncommitted, and the
                // next start answers the request again (the same way: see `Origin`).
                return;
            }
            let commit = progress.lock().unwrap_or_else(|p| p.into_inner()).done(&slot_key, offset);
            if let Some(next) = commit {
                let mut tpl = TopicPartitionList::new();
                if tpl.add_partition_offset(&slot_key.0, slot_key.1, Offset::Offset(next)).is_ok()
                    && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
                {
                    tracing::warn!(error = %e, "committing the request topic's position");
                }
            }
            drop(slot);
        });
    }
}

/// Requests in flight per partition, for committing only what every earlier request has
/// been answered for.
#[derive(Default)]
struct Progress {
    open: BTreeMap<(String, i32), BTreeSet<i64>>,
    highest: BTreeMap<(String, i32), i64>,
}

impl Progress {
    fn started(&mut self, slot: &(String, i32), offset: i64) {
        self.open.entry(slot.clone()).or_default().insert(offset);
        let highest = self.highest.entry(slot.clone()).or_insert(offset);
        *highest = (*highest).max(offset);
    }

    /// The offset to commit once `offset` is answered, if the position moved.
    fn done(&mut self, slot: &(String, i32), offset: i64) -> Option<i64> {
        let open = self.open.get_mut(slot)?;
        let lowest = open.first().copied();
        open.remove(&offset);
        if lowest != Some(offset) {
            return None;
        }
        Some(match open.first() {
            Some(next) => *next,
            None => self.highest.get(slot).copied().unwrap_or(offset) + 1,
        })
    }
}

/// The `traceparent` header of a request, if it has one.
fn traceparent_of(message: &BorrowedMessage<'_>) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == "traceparent")
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

/// Where a request was read: what makes a redelivered request do what its first delivery
/// did. An append without `idempotencyKey` gets `kafka:TOPIC/PARTITION/OFFSET`; a create
/// without an id gets one derived from the same (so a second delivery finds its model).
struct Origin {
    topic: String,
    partition: i32,
    offset: i64,
}

impl Origin {
    fn key(&self) -> String {
        format!("kafka:{}/{}/{}", self.topic, self.partition, self.offset)
    }

    /// 32 hex digits of blake3 over the key: an id like `new_id`'s, the same every delivery.
    fn id(&self) -> String {
        blake3::hash(self.key().as_bytes()).to_hex()[..32].to_owned()
    }
}

/// One request: parsed, checked, performed, answered. False only if stopped before the
/// reply was delivered (a failed delivery is retried until then, never dropped).
async fn handle(
    app: &Arc<App>,
    producer: &FutureProducer,
    settings: &Settings,
    value: Option<&[u8]>,
    header_traceparent: Option<String>,
    origin: &Origin,
    stop: &CancellationToken,
) -> bool {
    let Some(request) = value.and_then(|v| serde_json::from_slice::<Request>(v).ok()) else {
        // Without a replyTo there is no one to tell.
        app.metrics.request_dropped("malformed");
        tracing::warn!("a request that is not one (no JSON with target, replyTo, correlationId, operation): dropped");
        return true;
    };
    if request.target != settings.target {
        app.metrics.request_dropped("other_target");
        tracing::debug!(target = %request.target, ours = %settings.target, "a request for another target: dropped");
        return true;
    }
    // `traceparent` continued: from the metadata, else the record header.
    let traceparent = request
        .metadata
        .as_ref()
        .and_then(|m| m.get("traceparent"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or(header_traceparent);
    let trace_id = traceparent.as_deref().and_then(|t| t.split('-').nth(1)).unwrap_or("").to_owned();
    let span = tracing::info_span!("request", operation = %request.operation, trace_id = %trace_id);
    let _entered = span.enter();
    let started = std::time::Instant::now();
    let outcome = perform(app, &request.operation, &request.payload, origin).await;
    let mut reply = match &outcome {
        Ok(response) => json!({
            "target": request.reply_to.target,
            "correlationId": request.correlation_id,
            "success": true,
            "response": response,
        }),
        Err(failure) => json!({
            "target": request.reply_to.target,
            "correlationId": request.correlation_id,
            "success": false,
            "error": {"code": failure.code.as_str(), "message": failure.message},
        }),
    };
    for (field, value) in [("requestId", &request.request_id), ("metadata", &request.metadata)] {
        if let Some(value) = value {
            reply[field] = value.clone();
        }
    }
    app.metrics.request_answered(outcome.as_ref().err().map(|f| f.code.as_str()), started.elapsed());
    let body = reply.to_string();
    let mut headers = OwnedHeaders::new();
    if let Some(traceparent) = traceparent.as_deref().and_then(child_traceparent) {
        headers = headers.insert(Header { key: "traceparent", value: Some(traceparent.as_bytes()) });
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut record = FutureRecord::to(&request.reply_to.topic).payload(body.as_bytes()).headers(headers.clone());
        if let Some(key) = &request.reply_to.partition_key {
            record = record.key(key.as_bytes());
        }
        let sent = tokio::select! {
            _ = stop.cancelled() => return false,
            sent = producer.send(record, settings.produce_timeout) => sent,
        };
        match sent {
            Ok(_) => return true,
            Err((e, _)) => {
                tracing::warn!(topic = %request.reply_to.topic, error = %e, retry_in = ?backoff, "the reply was not delivered");
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The reply's `traceparent`: the request's trace, a span of this server's.
fn child_traceparent(parent: &str) -> Option<String> {
    let parts: Vec<&str> = parent.split('-').collect();
    let [version, trace, _, flags] = parts.as_slice() else { return None };
    use rand::RngExt;
    let span: [u8; 8] = rand::rng().random();
    Some(format!("{version}-{trace}-{}-{flags}", hex::encode(span)))
}

fn text<'a>(payload: &'a Value, field: &str) -> Result<&'a str, Failure> {
    payload
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request(format!("payload.{field}: a string is required")))
}

fn optional<'a>(payload: &'a Value, field: &str) -> Result<Option<&'a str>, Failure> {
    match payload.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad_request(format!("payload.{field}: a string, if given"))),
    }
}

fn hash(text: &str, field: &str) -> Result<Hash, Failure> {
    text.parse().map_err(|_| Failure {
        code: Code::MalformedHash,
        message: format!("payload.{field}: {text:?} is not a hash: expected 64 hex digits"),
    })
}

/// Runs blocking service code off the async threads.
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce(&App) -> Result<T, AppError> + Send + 'static,
) -> Result<T, Failure> {
    let app = app.clone();
    match tokio::task::spawn_blocking(move || f(&app)).await {
        Ok(result) => result.map_err(Failure::from),
        Err(e) => Err(Failure { code: Code::Internal, message: e.to_string() }),
    }
}

/// The answer to an append whose idempotency key was applied before: that version.
fn duplicate(id: &str, keyed: &Keyed) -> Value {
    json!({"id": id, "hash": keyed.hash.to_string(), "seq": keyed.seq, "offset": keyed.offset, "duplicate": true})
}

/// Requests for a model are answered by a server that folds it (sharded mode).
fn served_here(app: &App, model: &ModelKey) -> Result<(), Failure> {
    match app.route(model, false)? {
        Route::Local => Ok(()),
        _ => Err(Failure {
            code: Code::PartitionUnavailable,
            message: format!(
                "model {}/{} is folded by another server; request/reply is served by servers that fold every partition",
                model.kind, model.id
            ),
        }),
    }
}

const OPERATIONS: [&str; 5] = ["models.create", "models.append", "models.read", "models.since", "models.list"];

async fn perform(app: &Arc<App>, operation: &str, payload: &Value, origin: &Origin) -> Result<Value, Failure> {
    if !OPERATIONS.contains(&operation) {
        return Err(Failure {
            code: Code::UnknownOperation,
            message: format!("{operation:?}: the operations are {}", OPERATIONS.join(", ")),
        });
    }
    let kind = text(payload, "kind")?.to_owned();
    let wait = Duration::from_millis(app.limits().wait_applied_ms_max);
    match operation {
        "models.create" => create(app, kind, payload, origin, wait).await,
        "models.append" => append(app, kind, payload, origin, wait).await,
        "models.read" => {
            let id = text(payload, "id")?.to_owned();
            let at = optional(payload, "at")?.map(|at| hash(at, "at")).transpose()?;
            let model = ModelKey::new(&kind, &id);
            served_here(app, &model)?;
            let state = blocking(app, move |app| app.state(&model, at)).await?;
            Ok(serde_json::to_value(StateBody::new(kind, id, &state)).expect("serializes"))
        }
        "models.since" => {
            let id = text(payload, "id")?.to_owned();
            let since = optional(payload, "hash")?.map(|h| hash(h, "hash")).transpose()?;
            let model = ModelKey::new(&kind, &id);
            served_here(app, &model)?;
            let plan = blocking(app, move |app| app.plan(&model, since)).await?;
            Ok(serde_json::to_value(PlanBody::from(&plan)).expect("serializes"))
        }
        "models.list" => list(app, kind, payload).await,
        _ => unreachable!("checked against OPERATIONS above"),
    }
}

/// `models.create`: a create record, waited for until folded. Without an id, the request's
/// place in its topic names the model, so a redelivery answers what the first made.
async fn create(
    app: &Arc<App>,
    kind: String,
    payload: &Value,
    origin: &Origin,
    wait: Duration,
) -> Result<Value, Failure> {
    let (id, derived) = match optional(payload, "id")? {
        Some(id) => (id.to_owned(), false),
        None => (origin.id(), true),
    };
    let model = ModelKey::new(&kind, &id);
    served_here(app, &model)?;
    // A second delivery of a create without an id finds the model its first made:
    // the same answer, the model's first version.
    let again = || {
        let hash = model.genesis().to_string();
        json!({"id": model.id.to_string(), "hash": hash, "seq": 0, "duplicate": true})
    };
    let topic = match blocking(app, move |app| app.check_create(&kind, &id)).await {
        Err(Failure { code: Code::ModelExists, .. }) if derived => return Ok(again()),
        topic => topic?,
    };
    let (partition, offset) = app.write(&topic, &model.id, None, &[]).await?;
    let version = match app.wait_folded(&model, &topic, partition, offset, wait).await {
        Err(AppError::Rejected(crate::model::Rejection::Exists)) if derived => return Ok(again()),
        version => version?,
    };
    let body = VersionBody { id: model.id.to_string(), hash: version.hash.to_string(), seq: version.seq, offset: None };
    Ok(serde_json::to_value(body).expect("serializes"))
}

/// `models.append`: a diff, written with its idempotency key (the request's place in its
/// topic without one), waited for until folded.
async fn append(
    app: &Arc<App>,
    kind: String,
    payload: &Value,
    origin: &Origin,
    wait: Duration,
) -> Result<Value, Failure> {
    let id = text(payload, "id")?.to_owned();
    let diff = payload.get("diff").ok_or_else(|| bad_request("payload.diff: the diff (JSON) is required"))?;
    let diff = diff.to_string();
    if diff.len() > app.limits().diff_bytes_max {
        return Err(Failure {
            code: Code::TooLarge,
            message: format!("the diff is {} bytes, more than diff_bytes_max", diff.len()),
        });
    }
    let mut headers = Vec::new();
    if let Some(expected) = optional(payload, "expectedHash")? {
        headers.push((EXPECTED_HASH_HEADER.to_owned(), hash(expected, "expectedHash")?.to_string().into_bytes()));
    }
    let key = optional(payload, "idempotencyKey")?.map(str::to_owned);
    if let Some(key) = &key
        && (key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX)
    {
        return Err(bad_request(format!("payload.idempotencyKey: 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes")));
    }
    // Without a key, the request's place in its topic: a redelivery is the same append.
    let key = key.unwrap_or_else(|| origin.key());
    headers.push((IDEMPOTENCY_KEY_HEADER.to_owned(), key.as_bytes().to_vec()));
    let model = ModelKey::new(&kind, &id);
    served_here(app, &model)?;
    let topic = {
        let model = model.clone();
        blocking(app, move |app| app.check_append(&model)).await?
    };
    // A key applied already answers with what it applied (nothing is written).
    {
        let (model, key) = (model.clone(), key.clone());
        if let Some(keyed) = blocking(app, move |app| app.keyed(&model, &key)).await? {
            return Ok(duplicate(&id, &keyed));
        }
    }
    let (partition, offset) = app.write(&topic, &id, Some(diff.as_bytes()), &headers).await?;
    match app.wait_folded(&model, &topic, partition, offset, wait).await {
        Ok(version) => {
            Ok(json!({"id": id, "hash": version.hash.to_string(), "seq": version.seq, "offset": version.offset}))
        }
        Err(AppError::Rejected(crate::model::Rejection::Duplicate { .. })) => {
            let keyed = blocking(app, move |app| app.keyed(&model, &key)).await?;
            let keyed = keyed.ok_or_else(|| Failure {
                code: Code::Internal,
                message: "a duplicate whose key is not stored".into(),
            })?;
            Ok(duplicate(&id, &keyed))
        }
        Err(e) => Err(e.into()),
    }
}

/// `models.list`: a page of a kind's models.
async fn list(app: &Arc<App>, kind: String, payload: &Value) -> Result<Value, Failure> {
    let after = optional(payload, "after")?.map(str::to_owned);
    let max = app.limits().list_page_max;
    let limit = match payload.get("limit") {
        None | Some(Value::Null) => max,
        Some(limit) => {
            limit.as_u64().ok_or_else(|| bad_request("payload.limit: a positive integer"))?.clamp(1, max as u64)
                as usize
        }
    };
    let page = blocking(app, move |app| app.list(&kind, after.as_deref(), limit, None)).await?;
    let next = (page.len() == limit).then(|| page.last().map(|(id, _)| id.clone())).flatten();
    let models: Vec<VersionBody> = page
        .into_iter()
        .map(|(id, head)| VersionBody { id, hash: head.hash.to_string(), seq: head.seq, offset: head.offset })
        .collect();
    Ok(json!({"models": models, "next": next}))
}
