//! `/api/openapi.json`: the OpenAPI 3 document of the whole HTTP API,
//! generated from the `#[utoipa::path]` annotations on the handlers and the
//! types in `schema`, so it cannot drift from the code.

use std::sync::LazyLock;

use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, credits, invoices, user, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "creditgate",
        description = "Billing and credits gateway of the iaFactory platform. Every error \
            answer is `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        user::plans,
        user::credit_costs,
        user::me,
        user::usage,
        user::list_keys,
        user::create_key,
        user::revoke_key,
        credits::check,
        credits::consume,
        credits::refund,
        credits::reset_monthly,
        admin::list_users,
        admin::create_user,
        admin::get_user,
        admin::create_key,
        admin::revoke_key,
        admin::change_plan,
        admin::block,
        admin::unblock,
        admin::grant,
        admin::stats,
        admin::export_users,
        admin::export_usage,
        admin::list_audit,
        webhooks::list_deliveries,
        invoices::user_list,
        invoices::user_pdf,
        invoices::admin_list,
        invoices::admin_pdf,
        webhooks::retry_delivery,
    ),
    modifiers(&Security),
    tags(
        (name = "billing", description = "The caller's own balance and history; public price tables"),
        (name = "credits", description = "Service to service (X-Service-Key)"),
        (name = "admin", description = "Administration (X-Admin-Key)"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, header) in [
            ("admin_key", "X-Admin-Key"),
            ("service_key", "X-Service-Key"),
            ("api_key", "X-API-Key"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(header))),
            );
        }
    }
}

/// Rendered once: the document does not change while the process runs.
pub static JSON: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
});
