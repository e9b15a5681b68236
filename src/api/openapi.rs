//! `/api/openapi.json`: the OpenAPI 3 document of the whole HTTP API. Its
//! paths come from the routes themselves (utoipa-axum, see
//! [`super::router`]), each described by the `#[utoipa::path]` annotation
//! on its handler, and its schemas from the types in `schema`, so it
//! cannot drift from the code.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::catalog::Catalog;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "creditgate",
        description = "Billing and credits gateway of the iaFactory platform. Every error \
            answer is `{\"error\": {\"code\", \"message\"}}`."
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

/// Request fields that name a plan or a module, by schema: this
/// deployment's ids are the only values they accept.
const PLAN_FIELDS: [(&str, &str); 2] = [("CreateUserBody", "plan"), ("PlanBody", "plan")];
const MODULE_FIELDS: [(&str, &str); 2] = [("CheckBody", "module"), ("ConsumeBody", "module")];

/// The document for this deployment: the code's, with the configured plan
/// and module ids listed as each such field's `enum`, so a client (and a
/// generated test) knows which values are accepted rather than only their
/// shape.
pub fn document(doc: utoipa::openapi::OpenApi, catalog: &Catalog) -> String {
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    let plans: Vec<serde_json::Value> = catalog
        .plans()
        .iter()
        .map(|p| p.id.as_str().into())
        .collect();
    let modules: Vec<serde_json::Value> = catalog
        .modules()
        .iter()
        .map(|m| m.id.as_str().into())
        .collect();
    for (fields, ids) in [(&PLAN_FIELDS, &plans), (&MODULE_FIELDS, &modules)] {
        for (schema, field) in fields {
            let pointer = format!("/components/schemas/{schema}/properties/{field}");
            if let Some(property) = doc.pointer_mut(&pointer).and_then(|p| p.as_object_mut()) {
                property.insert("enum".into(), serde_json::Value::Array(ids.clone()));
            }
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
