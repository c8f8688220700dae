//! Handlers of the public API (`/api/v1/...`): progress writes, resume reads,
//! continue-watching and deletes. Contract: docs/api.md.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::Request;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::{respond, AppState, Response};
use crate::auth::Principal;
use crate::catalog::{Title, MAX_TITLE_ID_BYTES};
use crate::engine::{ProfileTitles, ReadResult, ReadSource, RejectReason};
use crate::model::{Key, Value};

/// Body of `POST /api/v1/stream/progress`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressBody {
    pub movie_id: String,
    pub position_seconds: f64,
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub timestamp_ms: Option<u64>,
}

/// `?movie_id=` of the read and delete routes.
#[derive(Debug, Deserialize)]
pub struct MovieQuery {
    pub movie_id: String,
}

/// Answer of `GET /api/v1/stream`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct StreamResponse {
    pub movie_id: String,
    pub stream_url: String,
    pub resume_position_seconds: u32,
    pub duration_seconds: u32,
    /// When the saved position was reported (absent when nothing is saved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at_ms: Option<u64>,
    /// The device that reported it, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_device_id: Option<String>,
    /// Set when the requested title was completed and this is the episode after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_episode_of: Option<String>,
    /// The requested title was watched past the completion threshold.
    pub completed: bool,
    /// `memory`, `store`, or `degraded` (the store could not answer in time: position 0).
    pub source: &'static str,
}

/// One entry of `GET /api/v1/continue-watching`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ContinueEntry {
    pub movie_id: String,
    pub stream_url: String,
    pub resume_position_seconds: u32,
    pub duration_seconds: u32,
    pub updated_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_device_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ContinueResponse {
    pub items: Vec<ContinueEntry>,
    pub source: &'static str,
}

fn source_name(s: ReadSource) -> &'static str {
    match s {
        ReadSource::Memory => "memory",
        ReadSource::Store => "store",
        ReadSource::Degraded => "degraded",
    }
}

fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let value = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the Authorization header is not valid text",
            )
        })?),
    };
    state
        .verifier
        .verify_header(value)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))
}

fn title<'a>(state: &'a AppState, movie_id: &str) -> Result<&'a Title, ApiError> {
    if movie_id.is_empty() || movie_id.len() > MAX_TITLE_ID_BYTES {
        return Err(ApiError::bad_request(
            "invalid_movie_id",
            format!("movie_id must be 1 to {MAX_TITLE_ID_BYTES} bytes"),
        ));
    }
    state.catalog.get(movie_id).ok_or_else(|| {
        ApiError::not_found(
            "unknown_movie",
            format!("no title `{movie_id}` in the catalog"),
        )
    })
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON with `Content-Type: application/json`",
        ))
    }
}

/// The whole body, refused with 413 as soon as it is known to exceed `limit` bytes (from
/// `Content-Length` before any of it is read, else as chunks arrive: `Limited`). A body
/// that arrives in one piece (the usual heartbeat) is taken without a copy.
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(
            "bad_body",
            format!("reading the body failed: {e}"),
        )),
    }
}

fn parse_body(bytes: &[u8]) -> Result<ProgressBody, ApiError> {
    // The fast path parses directly; only a failure is parsed again to name the field.
    if let Ok(body) = serde_json::from_slice(bytes) {
        return Ok(body);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::unprocessable(
                "invalid_field",
                if path == "." {
                    format!("invalid body: {inner}")
                } else {
                    format!("field `{path}`: {inner}")
                },
            ),
            _ => ApiError::bad_request("malformed_json", format!("malformed JSON: {inner}")),
        }
    })
}

/// `POST /api/v1/stream/progress` → 204 once the heartbeat is in the coalescer and the log.
pub async fn post_progress(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response, ApiError> {
    let principal = authenticate(state, request.headers())?;
    require_json(request.headers())?;
    let bytes = read_body(request.into_body(), state.config.http.max_body_bytes).await?;
    let body = parse_body(&bytes)?;
    let title = title(state, &body.movie_id)?;
    let api = &state.config.api;
    let p = body.position_seconds;
    if !p.is_finite() || p < 0.0 {
        return Err(ApiError::unprocessable(
            "invalid_position",
            "position_seconds must be a finite number >= 0",
        ));
    }
    let limit = title
        .duration_seconds
        .saturating_add(api.position_allowance_seconds);
    if p > f64::from(limit) {
        return Err(ApiError::unprocessable(
            "position_out_of_range",
            format!(
                "position_seconds {p} is beyond the end of `{}` ({} s, allowance {} s)",
                title.id, title.duration_seconds, api.position_allowance_seconds
            ),
        ));
    }
    let device = match &body.device_id {
        None => 0,
        Some(name) => {
            if name.is_empty()
                || name.len() > api.max_device_id_bytes
                || name.chars().any(char::is_control)
            {
                return Err(ApiError::unprocessable(
                    "invalid_device_id",
                    format!(
                        "device_id must be 1 to {} bytes of printable text",
                        api.max_device_id_bytes
                    ),
                ));
            }
            state.devices.remember(principal.account_id, name)
        }
    };
    let key = Key::new(principal.account_id, principal.profile_id, title.title_id);
    let record = state
        .engine
        .heartbeat(key, p as u32, device, body.timestamp_ms)
        .map_err(|e| match e {
            RejectReason::TooOld => ApiError::unprocessable(
                "timestamp_too_old",
                "timestamp_ms is older than the retention period",
            ),
            RejectReason::ReservedPosition => {
                ApiError::unprocessable("invalid_position", "position_seconds is out of range")
            }
        })?;
    state.write(&[record], "http").await?;
    Ok(no_content())
}

/// `204 No Content`.
fn no_content() -> Response {
    let mut r = Response::default();
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The `movie_id` of the query string (`?movie_id=X`, percent-decoded).
fn movie_query<B>(request: &Request<B>) -> Result<MovieQuery, ApiError> {
    serde_urlencoded::from_str(request.uri().query().unwrap_or("")).map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("Failed to deserialize query string: {e}"),
        )
    })
}

/// `body` as JSON, `200 OK`.
fn json<T: Serialize>(body: &T) -> Result<Response, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("encoding the answer failed: {e}"),
        )
    })?;
    Ok(respond(StatusCode::OK, "application/json", bytes.into()))
}

/// `DELETE /api/v1/stream/progress?movie_id=X` → 204; a tombstone, so an in-flight older
/// heartbeat cannot bring the title back.
pub async fn delete_progress(
    state: &AppState,
    request: &Request<Incoming>,
) -> Result<Response, ApiError> {
    let principal = authenticate(state, request.headers())?;
    let q = movie_query(request)?;
    let title = title(state, &q.movie_id)?;
    let key = Key::new(principal.account_id, principal.profile_id, title.title_id);
    let record = state.engine.deletion(key);
    state.write(&[record], "http").await?;
    Ok(no_content())
}

/// `GET /api/v1/stream?movie_id=X` → where to resume. Never fails because of the store.
pub async fn get_stream(
    state: &AppState,
    request: &Request<Incoming>,
) -> Result<Response, ApiError> {
    let principal = authenticate(state, request.headers())?;
    let q = movie_query(request)?;
    let requested = title(state, &q.movie_id)?;
    let key = Key::new(
        principal.account_id,
        principal.profile_id,
        requested.title_id,
    );
    let read = state.read(key).await;
    let completed = read
        .value
        .is_some_and(|v| state.is_completed(v.position_seconds, requested));
    if completed {
        if let Some(next) = state.catalog.next_episode(requested) {
            let next_key = Key::new(principal.account_id, principal.profile_id, next.title_id);
            let next_read = state.read(next_key).await;
            let mut response = state.answer(principal, next, next_read);
            response.next_episode_of = Some(requested.id.clone());
            response.completed = true;
            return json(&response);
        }
    }
    json(&state.answer(principal, requested, read))
}

/// `GET /api/v1/continue-watching` → in-progress titles, newest first, one per series.
///
/// The list is what sorting *all* of the profile's titles by recency and filtering them
/// gives. It is computed from the profile's most recent titles: first `8 × limit` of them
/// (completed films, deletions and older episodes of a series are dropped, so more than
/// `limit` are read); when those leave fewer than `limit` items and the profile has more
/// titles, from 4 times as many, until the list is full or the profile exhausted. The
/// sorted prefix is exact ([`crate::engine::Engine::recent_titles`]) and each item depends
/// only on the titles before it, so the first `limit` items of a prefix are the first
/// `limit` of the whole.
pub async fn continue_watching(
    state: &AppState,
    request: &Request<Incoming>,
) -> Result<Response, ApiError> {
    let principal = authenticate(state, request.headers())?;
    let limit = state.config.api.continue_watching_limit;
    let mut count = limit.saturating_mul(8);
    loop {
        let recent = state
            .engine
            .recent_titles(principal.account_id, principal.profile_id, count)
            .await;
        let items = continue_items(state, principal, &recent, limit).await;
        if items.len() == limit || recent.complete {
            return json(&ContinueResponse {
                items,
                source: source_name(recent.source),
            });
        }
        count = count.saturating_mul(4);
    }
}

/// The continue-watching items `recent` yields, at most `limit`: newest first, one per
/// series (its most recent episode), completed films left out, a completed episode replaced
/// by the next one at that one's own saved position.
async fn continue_items(
    state: &AppState,
    principal: Principal,
    recent: &ProfileTitles,
    limit: usize,
) -> Vec<ContinueEntry> {
    let by_title: HashMap<u64, Value> = recent
        .titles
        .iter()
        .map(|e| (e.title_id, e.value))
        .collect();
    let mut seen_series: HashSet<&str> = HashSet::new();
    let mut items = Vec::new();
    for entry in &recent.titles {
        let Some(title) = state.catalog.by_title_id(entry.title_id) else {
            continue;
        };
        let value = entry.value;
        if let Some((series, _)) = &title.series {
            if !seen_series.insert(series.as_str()) {
                continue;
            }
        }
        let (shown, position) = if state.is_completed(value.position_seconds, title) {
            // A finished episode: offer the next one, at its own saved position.
            let Some(next) = state.catalog.next_episode(title) else {
                continue;
            };
            // Listed: its exact value. Not listed in a complete listing: nothing saved.
            // Otherwise it is older than the listed part: read it on its own.
            let saved = match by_title.get(&next.title_id) {
                Some(v) => Some(*v),
                None if recent.complete => None,
                None => {
                    let key = Key::new(principal.account_id, principal.profile_id, next.title_id);
                    state.engine.get(key).await.value
                }
            };
            let position = saved
                .map(|v| v.position_seconds)
                .filter(|&p| !state.is_completed(p, next))
                .unwrap_or(0);
            (next, position)
        } else {
            (title, value.position_seconds)
        };
        items.push(ContinueEntry {
            movie_id: shown.id.clone(),
            stream_url: shown.stream_url.clone(),
            resume_position_seconds: position,
            duration_seconds: shown.duration_seconds,
            updated_at_ms: value.updated_at_ms,
            series: title.series.as_ref().map(|(s, _)| s.clone()),
            last_device_id: state.devices.name(principal.account_id, value.device_id),
        });
        if items.len() == limit {
            break;
        }
    }
    items
}

impl AppState {
    /// True when `position_seconds` is at or past the completion threshold of `title`.
    pub fn is_completed(&self, position_seconds: u32, title: &Title) -> bool {
        f64::from(position_seconds)
            >= self.config.api.completed_ratio * f64::from(title.duration_seconds)
    }

    async fn read(&self, key: Key) -> ReadResult {
        let started = std::time::Instant::now();
        let read = self.engine.get(key).await;
        self.metrics.resume_read_seconds.observe(started.elapsed());
        read
    }

    fn answer(&self, principal: Principal, title: &Title, read: ReadResult) -> StreamResponse {
        let completed = read
            .value
            .is_some_and(|v| self.is_completed(v.position_seconds, title));
        let position = match read.value {
            Some(v) if !completed => v.position_seconds,
            _ => 0,
        };
        StreamResponse {
            movie_id: title.id.clone(),
            stream_url: title.stream_url.clone(),
            resume_position_seconds: position,
            duration_seconds: title.duration_seconds,
            updated_at_ms: read.value.map(|v| v.updated_at_ms),
            last_device_id: read
                .value
                .and_then(|v| self.devices.name(principal.account_id, v.device_id)),
            next_episode_of: None,
            completed,
            source: source_name(read.source),
        }
    }

    /// Writes through the engine, mapping refusals to 503 + Retry-After.
    pub async fn write(
        &self,
        records: &[crate::model::Record],
        protocol: &str,
    ) -> Result<(), ApiError> {
        match self.engine.write(records).await {
            Ok(_) => {
                self.metrics.accepted(protocol, records.len() as u64);
                Ok(())
            }
            Err(e) => Err(ApiError::unavailable(
                e.to_string(),
                self.config.http.retry_after_seconds,
            )),
        }
    }
}

/// Unknown routes.
pub fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

/// Known route, wrong method; `allow` lists the methods it takes.
pub fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError {
        allow: Some(allow),
        ..ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    }
}
