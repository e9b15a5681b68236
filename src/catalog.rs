//! What the deployment sells: plans, modules, their costs and upstreams, as
//! validated from the configuration. Read-only after start; shared by the
//! proxy (routing, pricing) and the metering scripts (plan rules as ARGV).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{ActionId, Credits, ModuleId, PlanId};

#[derive(Debug)]
pub struct Module {
    pub id: ModuleId,
    /// Path prefix without trailing slash, e.g. `/rag` or `/api/v1`.
    pub prefix: String,
    pub upstream: http::Uri,
    pub cost: Credits,
    pub actions: BTreeMap<ActionId, Credits>,
    pub refund_on_5xx: bool,
    pub refund_on_failure: bool,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub strip_prefix: bool,
    /// What users read instead of the id (`Recherche documentaire`).
    pub label: String,
    /// One line on what the service does; empty when not configured.
    pub description: String,
}

impl Module {
    /// The price of one call, with the per-action override when one matches.
    pub fn cost_of(&self, action: Option<&ActionId>) -> Credits {
        action
            .and_then(|a| self.actions.get(a))
            .copied()
            .unwrap_or(self.cost)
    }
}

#[derive(Debug)]
pub struct Plan {
    pub id: PlanId,
    pub name: String,
    pub monthly_credits: Credits,
    /// `None` is unlimited.
    pub daily_limit: Option<Credits>,
    pub price_dzd: i64,
    pub modules: Vec<ModuleId>,
    pub rate_limit: Option<RateLimit>,
    pub features: Vec<String>,
}

/// A plan's rate limit, per account and shared by every instance: GCRA
/// (as redis-cell), `burst` calls at once, then one every
/// `60 s / per_minute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
}

impl RateLimit {
    /// The window in which a spent burst comes back whole, in whole
    /// seconds (rounded up): the `w` of the `RateLimit-Policy` header.
    pub fn window_secs(&self) -> u64 {
        (u64::from(self.burst) * 60).div_ceil(u64::from(self.per_minute.max(1)))
    }
}

#[derive(Debug)]
pub struct Catalog {
    /// Shared so a proxied request can own its module while it settles,
    /// even after the client has gone.
    modules: Vec<Arc<Module>>,
    plans: Vec<Plan>,
    /// Routing table: prefixes sorted longest first, so `/api/v1` wins over
    /// a hypothetical `/api`.
    routes: Vec<(String, usize)>,
    /// ARGV[1] of charge.lua, built once: `;free:20:100:-1:0;pro:500:2000:600:100;`.
    plan_table_arg: String,
    /// ARGV[5] of charge.lua per module (same index as `modules`).
    allowed_plans_arg: Vec<String>,
}

impl Catalog {
    /// Plans are kept cheapest first (then by allowance, then id): the
    /// order every listing shows them in, as a price table reads.
    pub fn new(modules: Vec<Module>, mut plans: Vec<Plan>) -> Self {
        plans.sort_by(|a, b| {
            (a.price_dzd, a.monthly_credits.get(), a.id.as_str()).cmp(&(
                b.price_dzd,
                b.monthly_credits.get(),
                b.id.as_str(),
            ))
        });
        let mut routes: Vec<(String, usize)> = modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.prefix.clone(), i))
            .collect();
        routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        let mut plan_table_arg = String::from(";");
        for p in &plans {
            let limit = p.daily_limit.map_or(-1, Credits::get);
            let (rpm, burst) = p
                .rate_limit
                .map_or((-1, 0), |r| (i64::from(r.per_minute), r.burst));
            plan_table_arg.push_str(&format!(
                "{}:{}:{}:{}:{};",
                p.id, limit, p.monthly_credits, rpm, burst
            ));
        }
        let allowed_plans_arg = modules
            .iter()
            .map(|m| {
                let mut s = String::from(",");
                for p in plans.iter().filter(|p| p.modules.contains(&m.id)) {
                    s.push_str(p.id.as_str());
                    s.push(',');
                }
                s
            })
            .collect();
        Self {
            modules: modules.into_iter().map(Arc::new).collect(),
            plans,
            routes,
            plan_table_arg,
            allowed_plans_arg,
        }
    }

    /// The module whose prefix owns `path`, matching whole segments only
    /// (`/rag` owns `/rag` and `/rag/x`, not `/ragx`).
    pub fn route(&self, path: &str) -> Option<&Arc<Module>> {
        self.routes.iter().find_map(|(prefix, i)| {
            let rest = path.strip_prefix(prefix.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then(|| &self.modules[*i])
        })
    }

    pub fn module(&self, id: &str) -> Option<&Module> {
        self.modules
            .iter()
            .find(|m| m.id.as_str() == id)
            .map(|m| &**m)
    }

    pub fn modules(&self) -> &[Arc<Module>] {
        &self.modules
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id.as_str() == id)
    }

    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    pub fn plan_table_arg(&self) -> &str {
        &self.plan_table_arg
    }

    pub fn allowed_plans_arg(&self, module: &ModuleId) -> &str {
        self.modules
            .iter()
            .position(|m| &m.id == module)
            .map_or(",", |i| self.allowed_plans_arg[i].as_str())
    }
}
