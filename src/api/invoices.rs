//! Invoices over HTTP: the caller's own (`/api/billing/invoices`) and, for
//! admins, any user's (`/api/admin/billing/users/{id}/invoices`).

use std::sync::Arc;

use axum::extract::State;
use http::{Response, StatusCode};

use super::extract::{Caller, Segments};
use super::schema::{ErrorBody, InvoiceList, InvoiceSummary};
use super::{ApiResult, ok, parse_user};
use crate::body;
use crate::domain::UserId;
use crate::error::{ApiError, MissingCode};
use crate::invoices::{Invoice, pdf};
use crate::state::AppState;

fn summary(invoice: &Invoice, base: &str) -> InvoiceSummary {
    InvoiceSummary {
        period: invoice.period.clone(),
        number: invoice.number.clone(),
        status: if invoice.is_draft() {
            "draft"
        } else {
            "issued"
        }
        .into(),
        issued_on: invoice.issued_on,
        total_ht_centimes: invoice.total_ht,
        vat_centimes: invoice.vat,
        total_ttc_centimes: invoice.total_ttc,
        pdf: format!("{base}/{}.pdf", invoice.period),
    }
}

/// `base`: the list's own path, which the PDFs hang under.
async fn list(state: &AppState, user: &UserId, base: &str) -> ApiResult {
    let invoices = state.invoices.list(user).await?;
    ok(&InvoiceList {
        invoices: invoices.iter().map(|i| summary(i, base)).collect(),
    })
}

/// `file` is `<period>.pdf`.
async fn pdf(state: &AppState, user: &UserId, file: &str) -> ApiResult {
    let period = file
        .strip_suffix(".pdf")
        .filter(|p| {
            p.len() == 7
                && p.as_bytes()[4] == b'-'
                && p.bytes()
                    .enumerate()
                    .all(|(i, b)| i == 4 || b.is_ascii_digit())
        })
        .ok_or_else(|| {
            ApiError::missing(
                MissingCode::Invoice,
                format!("{file:?} is not an invoice (YYYY-MM.pdf)"),
            )
        })?;
    let invoice = state.invoices.get(user, period).await?;
    let bytes = pdf::render(&invoice).map_err(|e| {
        tracing::error!(error = %e, period, "invoice not rendered");
        ApiError::Internal
    })?;
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/pdf"),
    );
    let name = format!("facture-{period}.pdf");
    if let Ok(v) = http::HeaderValue::from_str(&format!("inline; filename=\"{name}\"")) {
        headers.insert(http::header::CONTENT_DISPOSITION, v);
    }
    // A closed period's invoice never changes; a draft does.
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static(if invoice.is_draft() {
            "no-store"
        } else {
            "private, max-age=86400"
        }),
    );
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/invoices",
    tag = "billing",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The caller's invoices, oldest first: one per closed period (numbered), and the current period's draft. Free periods have none.", body = InvoiceList),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "Invoicing is not configured (invoices_not_configured)", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn user_list(State(state): State<Arc<AppState>>, Caller(id): Caller) -> ApiResult {
    list(&state, &id, "/api/billing/invoices").await
}

#[utoipa::path(
    get,
    path = "/invoices/{file}",
    tag = "billing",
    security(("api_key" = [])),
    params(("file" = String, Path, description = "<period>.pdf, the period as YYYY-MM", pattern = r"^[0-9]{4}-[0-9]{2}\.pdf$")),
    responses(
        (status = 200, description = "The invoice as a PDF, in French", content_type = "application/pdf", body = String),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No invoice for that period (unknown_invoice), or invoicing off", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn user_pdf(
    State(state): State<Arc<AppState>>,
    Caller(id): Caller,
    Segments(file): Segments<String>,
) -> ApiResult {
    pdf(&state, &id, &file).await
}

#[utoipa::path(
    get,
    path = "/users/{id}/invoices",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = String, Path,)),
    responses(
        (status = 200, description = "The user's invoices, as the user sees them", body = InvoiceList),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user, or invoicing off", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn admin_list(
    State(state): State<Arc<AppState>>,
    Segments(id): Segments<String>,
) -> ApiResult {
    let id = parse_user(&id)?;
    list(
        &state,
        &id,
        &format!("/api/admin/billing/users/{id}/invoices"),
    )
    .await
}

#[utoipa::path(
    get,
    path = "/users/{id}/invoices/{file}",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = String, Path,), ("file" = String, Path, description = "<period>.pdf, the period as YYYY-MM", pattern = r"^[0-9]{4}-[0-9]{2}\.pdf$")),
    responses(
        (status = 200, description = "The user's invoice as a PDF", content_type = "application/pdf", body = String),
        (status = 401, description = "Missing or wrong credentials", body = ErrorBody),
        (status = 404, description = "No such user or invoice, or invoicing off", body = ErrorBody),
        (status = 503, description = "Postgres unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn admin_pdf(
    State(state): State<Arc<AppState>>,
    Segments((id, file)): Segments<(String, String)>,
) -> ApiResult {
    pdf(&state, &parse_user(&id)?, &file).await
}
