//! Reporting content: `POST /rooms/{roomId}/report/{eventId}` and, since spec v1.13,
//! `POST /rooms/{roomId}/report`. Reports are stored for the server's admins
//! ([`crate::storage::ReportStore`]).

use actix_web::web;
use ruma::api::client::room::{report_content, report_room};
use serde_json::Value;

use crate::{
    auth::{ratelimit::Action, tokens},
    error::{Error, Result},
    rooms::{self, visibility::ReadRules},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::{ReportRecord, now_ms},
};

/// Longest `reason`, in bytes.
const MAX_REASON_BYTES: usize = 4096;

pub(super) fn routes(router: &mut Router) {
    router.add(report_event).add(report_room);
}

fn check_reason(reason: &str) -> Result<()> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(Error::invalid_param(format!("reason longer than {MAX_REASON_BYTES} bytes")));
    }
    Ok(())
}

/// The optional `score` of an event report: an integer from -100 (most offensive) to 0. ruma
/// dropped the field when the spec deprecated it, but clients still send it, so it is read from
/// the body and checked (`M_INVALID_PARAM`, as Synapse).
fn score(raw_body: &[u8]) -> Result<Option<i64>> {
    if raw_body.is_empty() {
        return Ok(None);
    }
    let body: serde_json::Map<String, Value> =
        serde_json::from_slice(raw_body).map_err(|_| Error::bad_json("the body must be a JSON object"))?;
    match body.get("score") {
        None | Some(Value::Null) => Ok(None),
        Some(score) => match score.as_i64() {
            Some(score) if (-100..=0).contains(&score) => Ok(Some(score)),
            _ => Err(Error::invalid_param("score must be an integer from -100 to 0")),
        },
    }
}

/// POST /_matrix/client/v3/rooms/{roomId}/report/{eventId}
///
/// Only an event the reporter may read can be reported: one they may not, like one that does
/// not exist, is `M_NOT_FOUND`, so a report cannot tell which events exist.
async fn report_event(
    state: web::Data<AppState>,
    request: Ruma<report_content::v3::Request>,
) -> Result<report_content::v3::Response> {
    let body = &request.body;
    let reporter = &request.sender.user_id;
    state.limiter.check_user(Action::RoomEvent, &request.sender).await?;
    let reason = body.reason.as_deref();
    if let Some(reason) = reason {
        check_reason(reason)?;
    }
    let score = score(&request.raw_body)?;
    let not_found = || Error::not_found("no such event, or you cannot see it");
    rooms::room_version(&state, &body.room_id).await.map_err(|_| not_found())?;
    let rules = ReadRules::load(&state, &body.room_id, reporter).await?;
    let upto = state.readable().await?;
    state
        .store
        .get_event(body.event_id.as_str())
        .await?
        .filter(|e| e.room_id == body.room_id.as_str() && e.stream_ordering <= upto && rules.may_see(e))
        .ok_or_else(not_found)?;
    let report = ReportRecord {
        report_id: tokens::random_token(12),
        room_id: body.room_id.to_string(),
        event_id: Some(body.event_id.to_string()),
        reporter: reporter.to_string(),
        reason: reason.map(str::to_owned),
        score,
        received_ts: now_ms(),
    };
    state.store.add_report(&report).await?;
    tracing::info!(room_id = %body.room_id, event_id = %body.event_id, %reporter, "event reported");
    Ok(report_content::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/report
///
/// Anyone may report a room this server knows, member or not (they may have found it in the
/// directory).
async fn report_room(
    state: web::Data<AppState>,
    request: Ruma<report_room::v3::Request>,
) -> Result<report_room::v3::Response> {
    let body = &request.body;
    let reporter = &request.sender.user_id;
    state.limiter.check_user(Action::RoomEvent, &request.sender).await?;
    check_reason(&body.reason)?;
    rooms::room_version(&state, &body.room_id).await?;
    let report = ReportRecord {
        report_id: tokens::random_token(12),
        room_id: body.room_id.to_string(),
        event_id: None,
        reporter: reporter.to_string(),
        reason: Some(body.reason.clone()),
        score: None,
        received_ts: now_ms(),
    };
    state.store.add_report(&report).await?;
    tracing::info!(room_id = %body.room_id, %reporter, "room reported");
    Ok(report_room::v3::Response::new())
}
