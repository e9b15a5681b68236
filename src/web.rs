//! The user and admin panels (`/billing/`, `/billing/admin.html`): static
//! files embedded in the binary at build time, so the gateway serves them
//! with no other server, no CDN and no network. A strict Content-Security-
//! Policy keeps every request the pages make on this origin.

use http::{HeaderValue, Method, Response, StatusCode, header};

use crate::body::{self, Body};
use crate::error::ApiError;

struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

const ASSETS: &[Asset] = &[
    Asset {
        path: "/billing/",
        content_type: HTML,
        bytes: include_bytes!("../web/billing/index.html"),
    },
    Asset {
        path: "/billing/index.html",
        content_type: HTML,
        bytes: include_bytes!("../web/billing/index.html"),
    },
    Asset {
        path: "/billing/admin.html",
        content_type: HTML,
        bytes: include_bytes!("../web/billing/admin.html"),
    },
    Asset {
        path: "/billing/assets/app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../web/billing/app.css"),
    },
    Asset {
        path: "/billing/assets/i18n.js",
        content_type: JS,
        bytes: include_bytes!("../web/billing/i18n.js"),
    },
    Asset {
        path: "/billing/assets/common.js",
        content_type: JS,
        bytes: include_bytes!("../web/billing/common.js"),
    },
    Asset {
        path: "/billing/assets/user.js",
        content_type: JS,
        bytes: include_bytes!("../web/billing/user.js"),
    },
    Asset {
        path: "/billing/assets/admin.js",
        content_type: JS,
        bytes: include_bytes!("../web/billing/admin.js"),
    },
    // Chart.js 4.6.1 from npm, vendored with its licence (MIT).
    Asset {
        path: "/billing/assets/chart.umd.min.js",
        content_type: JS,
        bytes: include_bytes!("../web/vendor/chart-4.6.1.umd.min.js"),
    },
    Asset {
        path: "/billing/assets/chart.js-LICENSE.md",
        content_type: "text/markdown; charset=utf-8",
        bytes: include_bytes!("../web/vendor/chart.js-LICENSE.md"),
    },
];

const CSP: &str = "default-src 'self'; script-src 'self'; connect-src 'self'; \
    img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; object-src 'none'; \
    base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Answers `/billing` and everything under it; `None` for other paths.
pub fn serve(method: &Method, path: &str) -> Option<Response<Body>> {
    if path != "/billing" && !path.starts_with("/billing/") {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        return Some(ApiError::MethodNotAllowed.into_response());
    }
    if path == "/billing" {
        let mut r = Response::new(body::full(""));
        *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/billing/"));
        return Some(r);
    }
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return Some(ApiError::NotFound.into_response());
    };
    let mut r = Response::new(body::full(asset.bytes));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_assets_are_embedded_with_a_strict_policy() {
        for asset in ASSETS {
            let r = serve(&Method::GET, asset.path).expect("served");
            assert_eq!(r.status(), 200, "{}", asset.path);
            assert!(!asset.bytes.is_empty());
            assert!(
                r.headers()[header::CONTENT_SECURITY_POLICY]
                    .to_str()
                    .is_ok_and(|v| v.contains("connect-src 'self'"))
            );
        }
        assert_eq!(
            serve(&Method::GET, "/billing").map(|r| r.status().as_u16()),
            Some(308)
        );
        assert_eq!(
            serve(&Method::GET, "/billing/nope.js").map(|r| r.status().as_u16()),
            Some(404)
        );
        assert_eq!(
            serve(&Method::POST, "/billing/").map(|r| r.status().as_u16()),
            Some(405)
        );
        assert!(serve(&Method::GET, "/rag/x").is_none());
    }

    #[test]
    fn pages_load_nothing_from_other_origins() {
        for asset in ASSETS.iter().filter(|a| a.content_type == HTML) {
            let text = String::from_utf8_lossy(asset.bytes);
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{}",
                asset.path
            );
        }
    }
}
