//! The CLI's client of a running server: `statefold deploy`, `versions` and `tail` (and
//! `replay`). It speaks the HTTP API only, as any other client would: a bearer token when
//! the server has `[auth]`, redirects followed (a sharded server sends a model's requests
//! to the server that serves it).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::Value;

/// A running server: its base URL and the token to send.
pub struct Remote {
    pub base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Remote> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
        Ok(Remote { base: base.trim_end_matches('/').to_owned(), token: token.filter(|t| !t.is_empty()), http })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// The JSON body of a successful answer; the API's error (code and message) otherwise.
    async fn json(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
        let answer = request.send().await.with_context(|| format!("{what}: cannot reach {}", self.base))?;
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let (code, message) = (&body["error"]["code"], &body["error"]["message"]);
            match (code.as_str(), message.as_str()) {
                (Some(code), Some(message)) => anyhow::bail!("{what}: {status} {code}: {message}"),
                _ => anyhow::bail!("{what}: {status}: {text}"),
            }
        }
        Ok(body)
    }

    /// `PUT /v1/reducers/{name}` with the module: the version the server answers.
    pub async fn deploy(&self, name: &str, module: Vec<u8>) -> anyhow::Result<Value> {
        let request = self.request(reqwest::Method::PUT, &format!("/v1/reducers/{}", segment(name)));
        self.json(request.header("content-type", "application/wasm").body(module), &format!("deploying {name}")).await
    }

    /// `GET /v1/reducers/{name}`: the reducer's kinds and versions, active first.
    pub async fn versions(&self, name: &str) -> anyhow::Result<Value> {
        let request = self.request(reqwest::Method::GET, &format!("/v1/reducers/{}", segment(name)));
        self.json(request, &format!("the versions of {name}")).await
    }

    pub async fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.json(self.request(reqwest::Method::POST, path), path).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.json(self.request(reqwest::Method::GET, path), path).await
    }
}

/// One path segment, percent-encoded.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What `tail` prints.
#[derive(Debug, Clone, Copy)]
pub struct TailOptions {
    /// Each line the event's JSON as the server sent it (with `event`), not the text form.
    pub json: bool,
    /// After each event, the model's state at the new hash (`GET ?at=`).
    pub state: bool,
}

/// Follows `kind/id` until `stop` resolves: prints each event that moves the model once
/// (to `out`), and after a dropped connection resumes from the last hash it printed, with
/// backoff (the server's `retry:`, doubled up to 10 s). A `diff` that does not follow the
/// hash held (never expected) reconnects from the held hash instead of being printed.
pub async fn tail(
    remote: &Remote,
    kind: &str,
    id: &str,
    since: Option<String>,
    options: TailOptions,
    out: &mut (dyn Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let path = format!("/v1/models/{}/{}/events", segment(kind), segment(id));
    let (mut hash, mut retry_ms, mut attempt) = (since, 1000u64, 0u32);
    loop {
        let mut request = remote.request(reqwest::Method::GET, &path).header("accept", "text/event-stream");
        if let Some(hash) = &hash {
            request = request.header("last-event-id", hash);
        }
        let connected = tokio::select! {
            answer = request.send() => answer,
            () = &mut stop => return Ok(()),
        };
        let ended = match connected {
            Ok(answer) if answer.status().is_success() => {
                attempt = 0;
                eprintln!(
                    "tail: following {kind}/{id} at {}{}",
                    remote.base,
                    hash.as_deref().map(|h| format!(" from {h}")).unwrap_or_default()
                );
                let mut body = answer.bytes_stream();
                let mut buffer = String::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = body.next() => chunk,
                        () = &mut stop => return Ok(()),
                    };
                    match chunk {
                        Some(Ok(bytes)) => buffer.push_str(&String::from_utf8_lossy(&bytes)),
                        Some(Err(e)) => break format!("the connection broke: {e}"),
                        None => break "the server ended the stream".to_owned(),
                    }
                    let mut resume = false;
                    while let Some(end) = buffer.find("\n\n") {
                        let block: String = buffer.drain(..end + 2).collect();
                        match take(remote, kind, id, &block, &mut hash, &mut retry_ms, options, out).await? {
                            Taken::Ok => {}
                            Taken::Resume => resume = true,
                        }
                    }
                    if resume {
                        break "a diff did not follow the hash held".to_owned();
                    }
                }
            }
            Ok(answer) => {
                let status = answer.status();
                let body: Value = answer.json().await.unwrap_or(Value::Null);
                let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
                let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
                // What waiting will not cure ends the tail.
                if status.is_client_error() && ![401, 404, 408, 429].contains(&status.as_u16()) {
                    anyhow::bail!("{status} {code}: {message}");
                }
                if status.as_u16() == 404 && code != crate::code::Code::UnknownModel.as_str() {
                    anyhow::bail!("{status} {code}: {message}");
                }
                format!("{status} {code}: {message}")
            }
            Err(e) => format!("cannot reach {}: {e}", remote.base),
        };
        let delay = Duration::from_millis((retry_ms << attempt.min(4)).min(10_000));
        eprintln!("tail: {ended}; reconnecting in {delay:?}");
        attempt += 1;
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut stop => return Ok(()),
        }
    }
}

enum Taken {
    Ok,
    Resume,
}

/// One SSE block: prints it if it moves the model, keeps the new hash.
#[allow(clippy::too_many_arguments)]
async fn take(
    remote: &Remote,
    kind: &str,
    id: &str,
    block: &str,
    hash: &mut Option<String>,
    retry_ms: &mut u64,
    options: TailOptions,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Taken> {
    let (mut event, mut data) = ("message".to_owned(), Vec::new());
    for line in block.lines() {
        let (field, value) = line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
        match field {
            "event" => event = value.to_owned(),
            "data" => data.push(value),
            "retry" => *retry_ms = value.parse().unwrap_or(*retry_ms),
            _ => {}
        }
    }
    if data.is_empty() {
        return Ok(Taken::Ok);
    }
    let body: Value = serde_json::from_str(&data.join("\n")).context("an event that is not JSON")?;
    let moved_to = match event.as_str() {
        "snapshot" => body["hash"].as_str(),
        "patch" if body["from"].as_str() == hash.as_deref() => body["to"].as_str(),
        "diff" if body["prev"].as_str() == hash.as_deref() => body["hash"].as_str(),
        "patch" | "diff" => return Ok(Taken::Resume),
        "reset" => {
            *hash = None;
            None
        }
        "synced" => {
            eprintln!("tail: up to date at seq {}", body["seq"]);
            return Ok(Taken::Ok);
        }
        "moved" | "expired" => {
            eprintln!("tail: {event}: {}", body);
            return Ok(Taken::Ok);
        }
        _ => return Ok(Taken::Ok),
    }
    .map(str::to_owned);
    if options.json {
        let mut line = body.clone();
        line["event"] = Value::from(event.as_str());
        writeln!(out, "{line}")?;
    } else {
        let short = |h: &Value| h.as_str().map(|h| h.get(..12).unwrap_or(h).to_owned()).unwrap_or_default();
        let text = match event.as_str() {
            "snapshot" => format!("snapshot seq {} {} state {}", body["seq"], short(&body["hash"]), body["state"]),
            "patch" => format!("patch    seq {} {} diff {}", body["seq"], short(&body["to"]), body["diff"]),
            "diff" => format!("diff     seq {} {} diff {}", body["seq"], short(&body["hash"]), body["diff"]),
            "reset" => format!("reset    {}", body["reason"]),
            _ => unreachable!("only events that move the model are printed"),
        };
        writeln!(out, "{text}")?;
    }
    if let Some(to) = moved_to {
        if options.state {
            let at = format!("/v1/models/{}/{}?at={to}", segment(kind), segment(id));
            let state = remote.get(&at).await?;
            writeln!(out, "  state {}", state["state"])?;
        }
        *hash = Some(to);
    }
    out.flush()?;
    Ok(Taken::Ok)
}
