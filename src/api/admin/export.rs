//! The admin's CSV downloads: users and ledger events, streamed.

use std::sync::Arc;

use axum::extract::State;
use bytes::Bytes;
use chrono::NaiveDate;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::Deserialize;

use super::super::ApiResult;
use super::super::extract::Query;
use super::super::schema::ErrorBody;
use crate::accounts::directory;
use crate::body::{Body, BoxError};
use crate::error::{ApiError, InvalidCode};
use crate::ledger::reports;
use crate::state::AppState;

/// A cell for CSV: text that a spreadsheet would run as a formula is
/// prefixed with an apostrophe, and a cell is quoted when it holds a comma,
/// a quote, a line break or a semicolon (French Excel splits on `;`).
pub fn csv_cell(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r', ';']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// A CSV download whose body is streamed as `lines` yields rows: the
/// export is never held in memory. `lines` runs on its own task, fed with
/// its own pool handle so the query outlives the handler.
fn csv_response<P, F>(filename: &str, header: &'static str, pool: P, lines: F) -> ApiResult
where
    P: Send + 'static,
    F: for<'a> FnOnce(&'a P) -> BoxStream<'a, Result<String, BoxError>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    tokio::spawn(async move {
        let mut rows = lines(&pool);
        let mut chunk = String::from(header);
        loop {
            match rows.try_next().await {
                Ok(Some(line)) => {
                    chunk.push_str(&line);
                    chunk.push('\n');
                    if chunk.len() > 16 * 1024 {
                        let full = Bytes::from(std::mem::take(&mut chunk));
                        if tx.send(Ok(Frame::data(full))).await.is_err() {
                            return; // the client went away
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        let _ = tx.send(Ok(Frame::data(Bytes::from(chunk)))).await;
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let body: Body = StreamBody::new(stream).boxed_unsync();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(http::header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/export.csv",
    tag = "admin",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Users as CSV, streamed", content_type = "text/csv", body = String),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
    )
)]
pub(super) async fn export_users(State(state): State<Arc<AppState>>) -> ApiResult {
    csv_response(
        "users.csv",
        "id,name,email,plan,status,created_at\n",
        state.reports.clone(),
        |pool| {
            directory::all_users(pool)
                .map_err(BoxError::from)
                .map_ok(|u| {
                    format!(
                        "{},{},{},{},{},{}",
                        csv_cell(&u.id),
                        csv_cell(&u.name),
                        csv_cell(u.email.as_deref().unwrap_or("")),
                        u.plan,
                        u.status,
                        u.created_at.to_rfc3339()
                    )
                })
                .boxed()
        },
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageCsvQuery {
    from: Option<String>,
    to: Option<String>,
}

fn parse_date(field: &str, value: Option<&str>) -> Result<Option<NaiveDate>, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            NaiveDate::parse_from_str(v, "%Y-%m-%d").map_err(|_| {
                ApiError::bad_request(
                    InvalidCode::Query,
                    format!("{field} must be a date like 2026-11-01"),
                )
            })
        })
        .transpose()
}

#[utoipa::path(
    get,
    path = "/usage.csv",
    tag = "admin",
    security(("admin_key" = [])),
    params(
        ("from" = Option<String>, Query, description = "YYYY-MM-DD, default: first of the month"),
        ("to" = Option<String>, Query, description = "YYYY-MM-DD, default: today"),
    ),
    responses(
        (status = 200, description = "Ledger rows as CSV, streamed", content_type = "text/csv", body = String),
        (status = 400, description = "Invalid input; nothing changed", body = ErrorBody),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
    )
)]
pub(super) async fn export_usage(
    State(state): State<Arc<AppState>>,
    Query(q): Query<UsageCsvQuery>,
) -> ApiResult {
    let stamp = state.billing.calendar().now();
    let today = stamp.local_date();
    let from = parse_date("from", q.from.as_deref())?.unwrap_or_else(|| stamp.period_first_day());
    let to = parse_date("to", q.to.as_deref())?.unwrap_or(today);
    if to < from {
        return Err(ApiError::bad_request(
            InvalidCode::Query,
            "to must not be before from",
        ));
    }
    csv_response(
        "usage.csv",
        "event_id,user_id,kind,module,action,amount,monthly_after,bonus_after,request_id,actor,local_day,occurred_at\n",
        state.reports.clone(),
        move |pool| {
            let opt = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
            reports::events_between(pool.clone(), from, to)
                .map_err(BoxError::from)
                .map_ok(move |e| {
                    format!(
                        "{},{},{},{},{},{},{},{},{},{},{},{}",
                        csv_cell(&e.event_id),
                        csv_cell(&e.user_id),
                        e.kind,
                        csv_cell(e.module.as_deref().unwrap_or("")),
                        csv_cell(e.action.as_deref().unwrap_or("")),
                        e.amount,
                        opt(e.monthly_after),
                        opt(e.bonus_after),
                        csv_cell(e.request_id.as_deref().unwrap_or("")),
                        csv_cell(&e.actor),
                        e.local_day,
                        e.occurred_at.to_rfc3339()
                    )
                })
                .boxed()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::csv_cell;

    #[test]
    fn csv_cells_never_become_formulas_or_split_on_semicolons() {
        let table = [
            ("plain", "plain"),
            ("=1+2", "'=1+2"),
            ("+33 6", "'+33 6"),
            ("-2", "'-2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("a;b", "\"a;b\""),
            ("=a;b", "\"'=a;b\""),
            ("say \"hi\", ok", "\"say \"\"hi\"\", ok\""),
        ];
        for (raw, cell) in table {
            assert_eq!(csv_cell(raw), cell, "{raw:?}");
        }
    }
}
