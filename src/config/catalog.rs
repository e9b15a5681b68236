//! The plan and module catalog built from `[plans]` and `[modules]`:
//! prices, prefixes, upstreams, plan limits, each checked against the
//! others (a plan naming an unknown module is refused here).

use std::collections::BTreeMap;

use super::raw::*;
use super::validate::{credits, positive_ms};
use super::{ConfigError, invalid};
use crate::catalog::{Catalog, Module, Plan, RateLimit};
use crate::domain::{ActionId, ModuleId, PlanId};

pub(super) fn build_catalog(
    modules: &BTreeMap<String, ModuleSettings>,
    plans: &BTreeMap<String, PlanSettings>,
    defaults: &UpstreamSettings,
) -> Result<Catalog, ConfigError> {
    if modules.is_empty() {
        return Err(invalid("modules", "at least one module is required"));
    }
    if plans.is_empty() {
        return Err(invalid("plans", "at least one plan is required"));
    }
    let mut built_modules = Vec::new();
    let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
    for (id, m) in modules {
        let key = |field: &str| format!("modules.{id}.{field}");
        let module_id = ModuleId::parse(id).map_err(|e| invalid(format!("modules.{id}"), e.why))?;
        let prefix = m.prefix.trim_end_matches('/').to_owned();
        if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains(['?', '#', ' ']) {
            return Err(invalid(
                key("prefix"),
                format!("{:?} must be a path like /rag", m.prefix),
            ));
        }
        for reserved in ["/api/billing", "/api/admin", "/api/credits", "/billing"] {
            if prefix == reserved || prefix.starts_with(&format!("{reserved}/")) {
                return Err(invalid(
                    key("prefix"),
                    format!("{prefix} is reserved for creditgate's own API"),
                ));
            }
        }
        if matches!(
            prefix.as_str(),
            "/healthz" | "/readyz" | "/metrics" | "/api"
        ) {
            return Err(invalid(
                key("prefix"),
                format!("{prefix} is reserved for creditgate's own API"),
            ));
        }
        if let Some(other) = prefixes.insert(prefix.clone(), id.clone()) {
            return Err(invalid(
                key("prefix"),
                format!("duplicate prefix {prefix}, also used by module {other}"),
            ));
        }
        let upstream: http::Uri = m
            .upstream
            .parse()
            .map_err(|_| invalid(key("upstream"), format!("{:?} is not a URL", m.upstream)))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(invalid(
                key("upstream"),
                format!("{:?} must be an http://host:port URL", m.upstream),
            ));
        }
        if upstream.query().is_some() {
            return Err(invalid(key("upstream"), "must not contain a query"));
        }
        let cost = credits(&key("cost"), m.cost)?;
        let mut actions = BTreeMap::new();
        for (action, c) in &m.actions {
            let action_key = format!("modules.{id}.actions.{action}");
            let action_id = ActionId::parse(action).map_err(|e| invalid(&action_key, e.why))?;
            actions.insert(action_id, credits(&action_key, *c)?);
        }
        let timeout = positive_ms(
            &key("timeout_ms"),
            m.timeout_ms.unwrap_or(defaults.timeout_ms),
        )?;
        let connect_timeout = positive_ms(
            &key("connect_timeout_ms"),
            m.connect_timeout_ms.unwrap_or(defaults.connect_timeout_ms),
        )?;
        built_modules.push(Module {
            id: module_id,
            prefix,
            upstream,
            cost,
            actions,
            refund_on_5xx: m.refund_on_5xx,
            refund_on_failure: m.refund_on_failure,
            timeout,
            connect_timeout,
            strip_prefix: m.strip_prefix,
            label: m
                .label
                .clone()
                .filter(|l| !l.trim().is_empty())
                .unwrap_or_else(|| id.clone()),
            description: m.description.clone(),
        });
    }
    let mut built_plans = Vec::new();
    for (id, p) in plans {
        let key = |field: &str| format!("plans.{id}.{field}");
        let plan_id = PlanId::parse(id).map_err(|e| invalid(format!("plans.{id}"), e.why))?;
        if p.name.trim().is_empty() {
            return Err(invalid(key("name"), "must not be empty"));
        }
        let monthly = credits(&key("monthly_credits"), p.monthly_credits)?;
        let daily_limit = match p.daily_limit {
            None => None,
            Some(n) if n <= 0 => {
                return Err(invalid(
                    key("daily_limit"),
                    "must be positive (omit it for unlimited)",
                ));
            }
            Some(n) => Some(credits(&key("daily_limit"), n)?),
        };
        if p.price_dzd < 0 {
            return Err(invalid(key("price_dzd"), "must not be negative"));
        }
        let mut plan_modules = Vec::new();
        for (i, m) in p.modules.iter().enumerate() {
            let Some(module) = built_modules.iter().find(|x| x.id.as_str() == m) else {
                return Err(invalid(
                    format!("plans.{id}.modules[{i}]"),
                    format!("unknown module {m:?}"),
                ));
            };
            if !plan_modules.contains(&module.id) {
                plan_modules.push(module.id.clone());
            }
        }
        if p.rate_limit_per_minute == Some(0) {
            return Err(invalid(
                key("rate_limit_per_minute"),
                "must be positive (omit it for no limit)",
            ));
        }
        // charge.lua counts the limit in whole microseconds: an interval
        // under 10 µs would be distorted by its rounding (by up to 5 %).
        if p.rate_limit_per_minute > Some(MAX_RATE_PER_MINUTE) {
            return Err(invalid(
                key("rate_limit_per_minute"),
                format!("at most {MAX_RATE_PER_MINUTE} (omit it for no limit)"),
            ));
        }
        let rate_limit = match (p.rate_limit_per_minute, p.rate_limit_burst) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(
                    key("rate_limit_burst"),
                    "needs rate_limit_per_minute",
                ));
            }
            (Some(_), Some(0)) => {
                return Err(invalid(key("rate_limit_burst"), "must be at least 1"));
            }
            (Some(per_minute), burst) => Some(RateLimit {
                per_minute,
                burst: burst.unwrap_or_else(|| per_minute.div_ceil(6)),
            }),
        };
        built_plans.push(Plan {
            id: plan_id,
            name: p.name.clone(),
            monthly_credits: monthly,
            daily_limit,
            price_dzd: p.price_dzd,
            modules: plan_modules,
            rate_limit,
            features: p.features.clone(),
        });
    }
    Ok(Catalog::new(built_modules, built_plans))
}
