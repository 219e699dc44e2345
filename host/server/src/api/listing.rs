//! Listings: a kind's models (`GET /v1/models/{kind}`, in id order) and its rejected
//! records (`GET /v1/kinds/{kind}/rejections`, in (partition, offset) order), paged by a
//! cursor. Sharded, the server asked answers for the whole cluster: it lists the
//! partitions it serves and asks each other serving server for exactly its partitions
//! (`?partitions=`, one hop, the caller's credentials passed on), then merges the pages
//! under one cursor ([`merge`]): every item once, whoever serves it.

use crate::code::Code;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::route::{self, FORWARDED_BY};
use super::{ApiError, VersionBody, access::allow_kind, blocking, parse_position};
use crate::app::App;
use crate::auth::{Action, Caller};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// The cursor: the last id (models) or `PARTITION:OFFSET` (rejections) seen.
    after: Option<String>,
    limit: Option<u32>,
    /// Sharded mode, between servers: the partitions to list (`0,3,5`), asked of the server
    /// that serves them by the server a client asked.
    partitions: Option<String>,
}

/// An item of a listing: its order, its cursor, the field its page holds it in, and the
/// route that lists it.
trait Listed: Serialize + DeserializeOwned {
    type Key: Ord;
    const FIELD: &'static str;
    /// The listing's path for `kind` (for asking another server).
    fn path(kind: &str) -> String;
    fn key(&self) -> Self::Key;
    fn cursor(&self) -> String;
    fn parse(cursor: &str) -> Option<Self::Key>;
}

impl Listed for VersionBody {
    type Key = String;
    const FIELD: &'static str = "models";
    fn path(kind: &str) -> String {
        format!("/v1/models/{}", route::encode_query_value(kind))
    }
    fn key(&self) -> String {
        self.id.clone()
    }
    fn cursor(&self) -> String {
        self.id.clone()
    }
    fn parse(cursor: &str) -> Option<String> {
        Some(cursor.to_owned())
    }
}

#[derive(Serialize, Deserialize)]
pub(super) struct RejectionBody {
    partition: u32,
    offset: u64,
    /// The record's key as text (lossy), if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp_ms: Option<i64>,
    code: String,
    message: String,
}

impl Listed for RejectionBody {
    type Key = (u32, u64);
    const FIELD: &'static str = "rejections";
    fn path(kind: &str) -> String {
        format!("/v1/kinds/{}/rejections", route::encode_query_value(kind))
    }
    fn key(&self) -> (u32, u64) {
        (self.partition, self.offset)
    }
    fn cursor(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }
    fn parse(cursor: &str) -> Option<(u32, u64)> {
        parse_position(cursor, "next").ok()
    }
}

/// One page: items in order, and the cursor the next page starts after (`None`: no more).
struct Page<T> {
    items: Vec<T>,
    next: Option<String>,
}

impl<T: Listed> Page<T> {
    fn into_json(self) -> Response {
        Json(serde_json::json!({T::FIELD: self.items, "next": self.next})).into_response()
    }
}

/// Pages of disjoint sets of items, each in order after one cursor, as one page: the first
/// `limit` items up to where the first source with more stopped (past that point, an item
/// of that source may come before one listed).
fn merge<T: Listed>(pages: Vec<Page<T>>, limit: usize) -> Page<T> {
    let bound = pages
        .iter()
        .filter_map(|p| p.next.as_deref())
        .filter_map(|n| Some((T::parse(n)?, n.to_owned())))
        .min_by(|a, b| a.0.cmp(&b.0));
    let mut items: Vec<T> = pages
        .into_iter()
        .flat_map(|p| p.items)
        .filter(|item| bound.as_ref().is_none_or(|(b, _)| item.key() <= *b))
        .collect();
    items.sort_by_key(|item| item.key());
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(T::cursor)
    } else {
        bound.map(|(_, cursor)| cursor)
    };
    Page { items, next }
}

/// `GET /v1/models/{kind}`: every model of the kind, in id order, paged by `after`.
pub(super) async fn models(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(kind): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    allow_kind(&caller, Action::Read, &kind)?;
    let Query(query) = query?;
    // The cursor is a model id (the last of the previous page): what is not one is a
    // mistake, said as such.
    if let Some(after) = &query.after {
        crate::model::validate_id(after.as_bytes())
            .map_err(|e| ApiError::bad_request(Code::BadQuery, format!("after={after:?}: {e}")))?;
    }
    let here = |app: Arc<App>,
                caller: Caller,
                kind: String,
                after: Option<String>,
                limit: usize,
                partitions: Option<Vec<u32>>| async move {
        let page = {
            let kind = kind.clone();
            blocking(&app, move |app| app.list(&kind, after.as_deref(), limit, partitions.as_deref())).await?
        };
        let next = (page.len() == limit).then(|| page.last().map(|(id, _)| id.clone())).flatten();
        // Only the models the token may read (a page may then hold fewer than `limit`).
        let items = page
            .into_iter()
            .filter(|(id, _)| caller.may(Action::Read, &kind, Some(id)))
            .map(|(id, head)| VersionBody { id, hash: head.hash.to_string(), seq: head.seq, offset: head.offset })
            .collect();
        Ok::<_, ApiError>(Page { items, next })
    };
    cluster_wide(&app, &caller, &kind, query, &headers, here).await
}

/// `GET /v1/kinds/{kind}/rejections`: the records of a kind's topic that were not applied,
/// in (partition, offset) order, paged by `after=PARTITION:OFFSET`.
pub(super) async fn rejections(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(kind): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    allow_kind(&caller, Action::Read, &kind)?;
    let Query(query) = query?;
    if let Some(after) = &query.after {
        parse_position(after, "after")?;
    }
    let here = |app: Arc<App>,
                caller: Caller,
                kind: String,
                after: Option<String>,
                limit: usize,
                partitions: Option<Vec<u32>>| async move {
        let after = after.as_deref().map(|cursor| parse_position(cursor, "after")).transpose()?;
        let page = {
            let kind = kind.clone();
            blocking(&app, move |app| app.rejections(&kind, after, limit, partitions.as_deref())).await?
        };
        let next =
            (page.len() == limit).then(|| page.last().map(|r| format!("{}:{}", r.partition, r.offset))).flatten();
        // Only records of models the token may read (a keyless record: the whole kind's).
        let items = page
            .into_iter()
            .filter(|r| {
                let key = r.key.as_deref().map(String::from_utf8_lossy);
                caller.may(Action::Read, &kind, key.as_deref())
            })
            .map(|r| RejectionBody {
                partition: r.partition,
                offset: r.offset,
                key: r.key.map(|k| String::from_utf8_lossy(&k).into_owned()),
                timestamp_ms: r.timestamp_ms,
                code: r.reason.code().as_str().to_owned(),
                message: r.reason.message(),
            })
            .collect();
        Ok::<_, ApiError>(Page { items, next })
    };
    cluster_wide(&app, &caller, &kind, query, &headers, here).await
}

/// A listing: this server's page (`here`), and sharded, the other serving servers' pages
/// merged in. A request from another server (`partitions=`, with the hop marker) is
/// answered from here alone.
async fn cluster_wide<T, F, Fut>(
    app: &Arc<App>,
    caller: &Caller,
    kind: &str,
    query: ListQuery,
    headers: &HeaderMap,
    here: F,
) -> Result<Response, ApiError>
where
    T: Listed,
    F: Fn(Arc<App>, Caller, String, Option<String>, usize, Option<Vec<u32>>) -> Fut,
    Fut: Future<Output = Result<Page<T>, ApiError>>,
{
    if query.limit == Some(0) {
        return Err(ApiError::bad_request(Code::BadQuery, "limit=0: a page holds at least 1 item"));
    }
    let limit = query.limit.map_or(app.limits().list_page_max, |l| l as usize).min(app.limits().list_page_max);
    let hopped = headers.contains_key(FORWARDED_BY);
    let partitions = match (&query.partitions, hopped) {
        (None, _) => None,
        (Some(text), true) => Some(parse_partitions(text)?),
        (Some(_), false) => {
            return Err(ApiError::bad_request(Code::BadQuery, "partitions= is asked by one server of another only"));
        }
    };
    let sources = match hopped {
        true => None,
        false => {
            let kind = kind.to_owned();
            blocking(app, move |app| app.list_sources(&kind)).await?
        }
    };
    let (app, caller, kind_owned) = (app.clone(), caller.clone(), kind.to_owned());
    let Some(mut sources) = sources else {
        return Ok(here(app, caller, kind_owned, query.after, limit, partitions).await?.into_json());
    };
    let mut pages = Vec::new();
    if let Some(mine) = sources.remove(&None) {
        pages.push(here(app.clone(), caller, kind_owned, query.after.clone(), limit, Some(mine)).await?);
    }
    for (url, partitions) in sources {
        let url = url.expect("this server's partitions were taken out");
        pages.push(page_at(&app, &url, &T::path(kind), query.after.as_deref(), limit, &partitions, headers).await?);
    }
    Ok(merge(pages, limit).into_json())
}

/// `0,3,5`.
fn parse_partitions(text: &str) -> Result<Vec<u32>, ApiError> {
    text.split(',').map(|p| p.parse::<u32>()).collect::<Result<_, _>>().map_err(|_| {
        ApiError::bad_request(Code::BadQuery, format!("partitions={text}: expected partition numbers, 0,3,5"))
    })
}

/// The page at `path` (after `after`, at most `limit`, of `partitions`) of the server at
/// `url`, asked by one hop with the caller's credentials.
async fn page_at<T: Listed>(
    app: &Arc<App>,
    url: &str,
    path: &str,
    after: Option<&str>,
    limit: usize,
    partitions: &[u32],
    headers: &HeaderMap,
) -> Result<Page<T>, ApiError> {
    let partitions = partitions.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut query = vec![("limit", limit.to_string()), ("partitions", partitions)];
    if let Some(after) = after {
        query.push(("after", after.to_owned()));
    }
    let mut request = route::client(app).get(format!("{url}{path}")).query(&query);
    for name in [header::AUTHORIZATION, header::COOKIE] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    request = request.header(FORWARDED_BY, app.member().unwrap_or_default());
    let failed = |e: String| {
        let mut error = ApiError::new(StatusCode::BAD_GATEWAY, Code::ForwardFailed, format!("listing at {url}: {e}"));
        error.retry_after_s = Some(1);
        error
    };
    let answer = request.send().await.map_err(|e| failed(e.to_string()))?;
    let status = answer.status();
    let body = answer.bytes().await.map_err(|e| failed(e.to_string()))?;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        return Err(route::unavailable(format!("{url} cannot list its partitions now; retry shortly")));
    }
    if !status.is_success() {
        return Err(failed(format!("{status}: {}", String::from_utf8_lossy(&body))));
    }
    let mut page: serde_json::Value = serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))?;
    let items = serde_json::from_value(page[T::FIELD].take()).map_err(|e| failed(format!("not a page: {e}")))?;
    let next = page["next"].as_str().map(str::to_owned);
    Ok(Page { items, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(id: &str) -> VersionBody {
        VersionBody { id: id.into(), hash: String::new(), seq: 0, offset: None }
    }

    fn ids(page: &Page<VersionBody>) -> Vec<&str> {
        page.items.iter().map(|m| m.id.as_str()).collect()
    }

    #[test]
    fn merged_pages_stop_where_the_first_source_with_more_stopped() {
        // Source a has more after "c"; b is done. "d" of b is past a's boundary: a may hold
        // "c1" still, so "d" waits for the next page.
        let a = Page { items: vec![model("a"), model("c")], next: Some("c".into()) };
        let b = Page { items: vec![model("b"), model("d")], next: None };
        let page = merge(vec![a, b], 10);
        assert_eq!((ids(&page), page.next.as_deref()), (vec!["a", "b", "c"], Some("c")));
        // More than `limit` within the boundary: cut at `limit`, the cursor the last one.
        let a = Page { items: vec![model("a"), model("c")], next: None };
        let b = Page { items: vec![model("b"), model("d")], next: None };
        let page = merge(vec![a, b], 3);
        assert_eq!((ids(&page), page.next.as_deref()), (vec!["a", "b", "c"], Some("c")));
        // All sources done, all fits: no next page.
        let a = Page { items: vec![model("a")], next: None };
        let page = merge(vec![a, Page { items: vec![], next: None }], 3);
        assert_eq!((ids(&page), page.next.as_deref()), (vec!["a"], None));
    }

    #[test]
    fn rejections_merge_in_partition_then_offset_order() {
        let r = |partition, offset| RejectionBody {
            partition,
            offset,
            key: None,
            timestamp_ms: None,
            code: Code::Refused.as_str().into(),
            message: String::new(),
        };
        // "10:1" sorts before "9:5" as text, after it as a position.
        let a = Page { items: vec![r(9, 5)], next: Some("9:5".into()) };
        let b = Page { items: vec![r(2, 7), r(10, 1)], next: None };
        let page = merge(vec![a, b], 10);
        let keys: Vec<(u32, u64)> = page.items.iter().map(|r| (r.partition, r.offset)).collect();
        assert_eq!((keys, page.next.as_deref()), (vec![(2, 7), (9, 5)], Some("9:5")));
    }
}
