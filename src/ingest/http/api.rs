//! Handlers of the public API (`/api/v1/...`): progress writes, resume reads,
//! continue-watching and deletes. Contract: docs/api.md.

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::Request;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::{respond, AppState, Response};
use crate::engine::{ReadResult, ReadSource};
use crate::ingest::auth::Principal;
use crate::ingest::RejectReason;
use crate::model::Key;
use crate::resume::alternative::{self, Summary};
use crate::resume::catalog::{Title, MAX_TITLE_ID_BYTES};
use crate::resume::{self, ContinueItem, Resume};
use std::sync::atomic::Ordering;

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
    /// Where another device was when this position superseded it, when that is recent and
    /// far enough away to ask the viewer ([`crate::resume::alternative::offer`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternative: Option<AlternativeAnswer>,
}

/// `alternative` of `GET /api/v1/stream`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct AlternativeAnswer {
    pub position_seconds: u32,
    /// The device's name, when this node knows it (as `last_device_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub updated_at_ms: u64,
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
    state.ingest.catalog().get(movie_id).ok_or_else(|| {
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
    if p > f64::from(state.ingest.position_limit(title)) {
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
    let now_ms = state.ingest.engine().now_ms();
    let record = state
        .ingest
        .record(key, p as u32, device, body.timestamp_ms, now_ms)
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
    let record = state.ingest.engine().deletion(key);
    state.write(&[record], "http").await?;
    Ok(no_content())
}

/// `GET /api/v1/stream?movie_id=X` → where to resume ([`resume::resume`]). Never fails
/// because of the store.
pub async fn get_stream(
    state: &AppState,
    request: &Request<Incoming>,
) -> Result<Response, ApiError> {
    let principal = authenticate(state, request.headers())?;
    let q = movie_query(request)?;
    let requested = title(state, &q.movie_id)?;
    let answer = resume::resume(
        state.ingest.catalog(),
        state.config.api.completed_ratio,
        principal.account_id,
        principal.profile_id,
        requested,
        |key| state.read(key),
    )
    .await;
    json(&state.answer(principal, &answer))
}

/// `GET /api/v1/continue-watching` → in-progress titles, newest first, one per series
/// ([`resume::continue_watching`]).
pub async fn continue_watching(
    state: &AppState,
    request: &Request<Incoming>,
) -> Result<Response, ApiError> {
    let principal = authenticate(state, request.headers())?;
    let engine = state.ingest.engine();
    let (account_id, profile_id) = (principal.account_id, principal.profile_id);
    let (items, source) = resume::continue_watching(
        state.ingest.catalog(),
        state.config.api.completed_ratio,
        account_id,
        profile_id,
        state.config.api.continue_watching_limit,
        |count| engine.recent_titles(account_id, profile_id, count),
        |key| engine.get(key),
    )
    .await;
    let items = items
        .iter()
        .map(|item| state.continue_entry(principal, item))
        .collect();
    json(&ContinueResponse {
        items,
        source: source_name(source),
    })
}

impl AppState {
    /// A resume read, timed for `playhead_resume_read_duration_seconds`.
    async fn read(&self, key: Key) -> ReadResult {
        let started = std::time::Instant::now();
        let read = self.ingest.engine().get(key).await;
        self.metrics.resume_read_seconds.observe(started.elapsed());
        read
    }

    /// The alternative `answer` offers, if the rule says so; counted in
    /// `playhead_resume_alternatives_offered_total`.
    fn offered_alternative(
        &self,
        principal: Principal,
        answer: &Resume<'_>,
    ) -> Option<AlternativeAnswer> {
        let summary = Summary {
            value: answer.value?,
            alternative: answer.alternative,
        };
        let now_ms = self.ingest.engine().now_ms();
        let offered = alternative::offer(&summary, now_ms, self.config.api.alternative_rule())?;
        self.metrics
            .alternatives_offered
            .fetch_add(1, Ordering::Relaxed);
        Some(AlternativeAnswer {
            position_seconds: offered.position_seconds,
            device: self.devices.name(principal.account_id, offered.device_id),
            updated_at_ms: offered.updated_at_ms,
        })
    }

    fn answer(&self, principal: Principal, answer: &Resume<'_>) -> StreamResponse {
        let title = answer.title;
        StreamResponse {
            movie_id: title.id.clone(),
            stream_url: title.stream_url.clone(),
            resume_position_seconds: answer.position_seconds,
            duration_seconds: title.duration_seconds,
            updated_at_ms: answer.value.map(|v| v.updated_at_ms),
            last_device_id: answer
                .value
                .and_then(|v| self.devices.name(principal.account_id, v.device_id)),
            next_episode_of: answer.next_episode_of.map(|t| t.id.clone()),
            completed: answer.completed,
            source: source_name(answer.source),
            alternative: self.offered_alternative(principal, answer),
        }
    }

    fn continue_entry(&self, principal: Principal, item: &ContinueItem<'_>) -> ContinueEntry {
        ContinueEntry {
            movie_id: item.shown.id.clone(),
            stream_url: item.shown.stream_url.clone(),
            resume_position_seconds: item.position_seconds,
            duration_seconds: item.shown.duration_seconds,
            updated_at_ms: item.value.updated_at_ms,
            series: item.watched.series.as_ref().map(|(s, _)| s.clone()),
            last_device_id: self
                .devices
                .name(principal.account_id, item.value.device_id),
        }
    }

    /// Writes through the engine, mapping refusals to 503 + Retry-After.
    pub async fn write(
        &self,
        records: &[crate::model::Record],
        protocol: &str,
    ) -> Result<(), ApiError> {
        match self.ingest.engine().write(records).await {
            Ok(_) => {
                self.ingest
                    .metrics()
                    .accepted(protocol, records.len() as u64);
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
