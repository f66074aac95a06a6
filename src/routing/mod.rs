//! Routing: which upstream targets a requested model name stands for. A name is either
//! `provider/model` or an alias with an ordered fallback chain.

pub mod health;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::error::{Reason, Rejection};
use crate::metrics::{unknown_label, Label};
use crate::providers::Provider;

use health::{HealthRegistry, HealthSettings, ProviderHealth};

/// A configured provider and the models it admits.
pub struct ProviderEntry {
    pub name: String,
    /// `name` as a metrics label.
    pub label: Label,
    /// The label of a model this provider serves that is not configured: `name/unknown`.
    pub unknown_model: Label,
    pub client: Arc<dyn Provider>,
    /// `None`: any model name is passed to the upstream.
    pub models: Option<HashSet<String>>,
    pub health: Arc<ProviderHealth>,
}

/// One place a request can be sent.
#[derive(Clone)]
pub struct Target {
    pub provider: Arc<ProviderEntry>,
    /// The model name the upstream knows.
    pub model: String,
    /// `provider/model`, as reported to callers and written to the ledger.
    pub resolved: String,
    /// The success-side metrics label: `resolved` when configured, else `provider/unknown`,
    /// because a provider without a model list passes any name through.
    pub label: Label,
}

/// The targets for one request, in the order to try them.
pub struct Route {
    pub alias: Option<String>,
    pub targets: Vec<Target>,
}

/// What providers are built with: the shared clock and the key-pool observer.
#[derive(Clone)]
pub struct ProviderDeps {
    pub clock: crate::clock::Clock,
    pub observer: Arc<dyn crate::providers::KeyPoolObserver>,
    pub health: Arc<HealthRegistry>,
}

struct QuietHealth;

impl health::HealthListener for QuietHealth {
    fn health_changed(&self, _: &str, _: bool) {}
}

impl ProviderDeps {
    /// A system clock and observers that ignore everything (for tests and tools).
    pub fn detached() -> Self {
        let clock = crate::clock::Clock::system();
        Self {
            health: Arc::new(HealthRegistry::new(clock.clone(), Arc::new(QuietHealth))),
            clock,
            observer: Arc::new(crate::providers::key_pool::NoObserver),
        }
    }
}

/// An alias as configured.
pub struct Alias {
    pub description: String,
    pub chain: Vec<String>,
}

/// Resolves model names; built from one configuration and swapped whole on reload.
pub struct Router {
    providers: HashMap<String, Arc<ProviderEntry>>,
    aliases: BTreeMap<String, Alias>,
    /// Names that may appear as a `model` label: aliases, chain entries, priced and listed models.
    known: HashSet<Label>,
    /// The route of every alias and configured model, made once: resolving a configured name
    /// is one lookup and a reference count, not a target list and two names copied a request.
    routes: HashMap<String, Arc<Route>>,
    /// Routes made on first use for the models of providers that pass any name through (no
    /// `models` list), up to [`MAX_PASSED_THROUGH`] names, so that a flood of made-up names
    /// cannot grow it.
    passed_through: RwLock<HashMap<String, Arc<Route>>>,
}

/// Names of passed-through models whose routes are kept; past it a route is made a request.
const MAX_PASSED_THROUGH: usize = 1024;

impl Router {
    /// Builds providers and aliases from a validated configuration.
    pub fn from_config(config: &Config, deps: &ProviderDeps) -> Result<Router, String> {
        let mut providers = HashMap::new();
        let mut known = HashSet::new();
        let settings = HealthSettings {
            failure_threshold: config.routing.unhealthy_after_failures,
            backoff: std::time::Duration::from_secs(config.routing.unhealthy_backoff_secs),
            max_backoff: std::time::Duration::from_secs(config.routing.unhealthy_backoff_max_secs),
        };
        let names: Vec<&str> = config.providers.keys().map(String::as_str).collect();
        deps.health.retain(&names);
        for (name, p) in &config.providers {
            let client =
                crate::providers::from_config(name, p, deps.clock.clone(), deps.observer.clone())?;
            let models = p
                .models
                .as_ref()
                .map(|m| m.iter().cloned().collect::<HashSet<_>>());
            for m in p.models.iter().flatten() {
                known.insert(Label::from(format!("{name}/{m}")));
            }
            providers.insert(
                name.clone(),
                Arc::new(ProviderEntry {
                    name: name.clone(),
                    label: Label::from(name.as_str()),
                    unknown_model: Label::from(format!("{name}/unknown")),
                    client,
                    models,
                    health: deps.health.provider(name, &settings),
                }),
            );
        }
        let mut aliases = BTreeMap::new();
        for (name, a) in &config.aliases {
            known.insert(Label::from(name.as_str()));
            known.extend(a.chain.iter().map(|c| Label::from(c.as_str())));
            aliases.insert(
                name.clone(),
                Alias {
                    description: a.description.clone(),
                    chain: a.chain.clone(),
                },
            );
        }
        known.extend(config.pricing.keys().map(|k| Label::from(k.as_str())));
        let mut router = Router {
            providers,
            aliases,
            known,
            routes: HashMap::new(),
            passed_through: RwLock::default(),
        };
        let mut routes = HashMap::new();
        for name in router.known.iter().filter(|n| n.contains('/')) {
            if let Some(t) = router.target(name) {
                let route = Route {
                    alias: None,
                    targets: vec![t],
                };
                routes.insert(name.to_string(), Arc::new(route));
            }
        }
        // After the models: a name that is both resolves as the alias, as `resolve` does.
        for (name, alias) in &router.aliases {
            routes.insert(name.clone(), Arc::new(router.alias_route(name, alias)));
        }
        router.routes = routes;
        Ok(router)
    }

    /// The targets for a requested name, or `model_not_found`.
    pub fn resolve(&self, requested: &str) -> Result<Arc<Route>, Rejection> {
        if let Some(route) = self.routes.get(requested) {
            return Ok(route.clone());
        }
        // Every alias and configured model is in `routes`: this is a model of a provider that
        // passes any name through, or no model at all.
        let kept = self
            .passed_through
            .read()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(route) = kept.get(requested) {
            return Ok(route.clone());
        }
        drop(kept);
        let route = Arc::new(self.passed_through_route(requested)?);
        let mut kept = self
            .passed_through
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if kept.len() < MAX_PASSED_THROUGH {
            kept.insert(requested.to_string(), route.clone());
        }
        Ok(route)
    }

    fn passed_through_route(&self, requested: &str) -> Result<Route, Rejection> {
        match self.target(requested) {
            Some(t) => Ok(Route {
                alias: None,
                targets: vec![t],
            }),
            None => Err(Rejection::new(
                Reason::ModelNotFound,
                format!(
                    "the model `{}` does not exist or is not served here",
                    truncate(requested, 200)
                ),
            )
            .with_param("model")),
        }
    }

    fn alias_route(&self, name: &str, alias: &Alias) -> Route {
        Route {
            alias: Some(name.to_string()),
            targets: alias
                .chain
                .iter()
                .filter_map(|entry| self.target(entry))
                .collect(),
        }
    }

    fn target(&self, name: &str) -> Option<Target> {
        let (provider, model) = name.split_once('/')?;
        let entry = self.providers.get(provider)?;
        if model.is_empty() || entry.models.as_ref().is_some_and(|m| !m.contains(model)) {
            return None;
        }
        let label = self
            .known
            .get(name)
            .cloned()
            .unwrap_or_else(|| entry.unknown_model.clone());
        Some(Target {
            provider: entry.clone(),
            model: model.to_string(),
            resolved: name.to_string(),
            label,
        })
    }

    /// The `model` label for a requested name: itself if configured, else `unknown`.
    pub fn label(&self, requested: &str) -> Label {
        self.known
            .get(requested)
            .cloned()
            .unwrap_or_else(unknown_label)
    }

    /// Providers by name.
    pub fn providers(&self) -> impl Iterator<Item = &Arc<ProviderEntry>> {
        self.providers.values()
    }

    /// Carries upstream key states over from the router this one replaces.
    pub fn inherit(&self, old: &Router) {
        for (name, p) in &self.providers {
            if let (Some(new), Some(old)) = (
                p.client.key_pool(),
                old.providers.get(name).and_then(|o| o.client.key_pool()),
            ) {
                new.inherit(old);
            }
        }
    }

    /// Aliases with their descriptions and chains, by name.
    pub fn aliases(&self) -> &BTreeMap<String, Alias> {
        &self.aliases
    }

    /// Concrete models named anywhere in the configuration, sorted.
    pub fn listed_models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .known
            .iter()
            .filter(|m| m.contains('/') && self.target(m).is_some())
            .map(|m| m.to_string())
            .collect();
        models.sort();
        models
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Whether a service type's model list admits a requested name (`*`, exact, or `provider/*`).
pub fn model_allowed(allowed: &[String], requested: &str) -> bool {
    allowed.iter().any(|a| {
        a == "*"
            || a == requested
            || a.strip_suffix("/*")
                .is_some_and(|p| requested.split_once('/').is_some_and(|(rp, _)| rp == p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists() {
        let a = vec!["fast".to_string(), "openai/*".to_string()];
        assert!(model_allowed(&a, "fast"));
        assert!(model_allowed(&a, "openai/gpt-4o"));
        assert!(!model_allowed(&a, "mock/echo"));
        assert!(model_allowed(&["*".to_string()], "x"));
    }

    #[test]
    fn resolves_and_labels() {
        let c = Config::from_toml_str(
            "[providers.m]\nkind = \"mock\"\n[aliases.fast]\nchain = [\"m/a\", \"m/b\"]\n",
        )
        .unwrap();
        let r = Router::from_config(&c, &ProviderDeps::detached()).unwrap();
        let route = r.resolve("fast").unwrap();
        assert_eq!(
            route
                .targets
                .iter()
                .map(|t| t.resolved.as_str())
                .collect::<Vec<_>>(),
            ["m/a", "m/b"]
        );
        assert_eq!(r.resolve("m/zzz").unwrap().targets[0].model, "zzz");
        assert!(matches!(
            r.resolve("nope/x"),
            Err(e) if e.reason == Reason::ModelNotFound
        ));
        assert_eq!(&*r.label("m/zzz"), "unknown");
        assert_eq!(&*r.label("m/a"), "m/a");
    }

    #[test]
    fn routes_are_made_once() {
        let c = Config::from_toml_str(
            "[providers.m]\nkind = \"mock\"\n[aliases.fast]\nchain = [\"m/a\", \"m/b\"]\n",
        )
        .unwrap();
        let r = Router::from_config(&c, &ProviderDeps::detached()).unwrap();
        for name in ["fast", "m/a", "m/passed-through"] {
            let (first, again) = (r.resolve(name).unwrap(), r.resolve(name).unwrap());
            assert!(Arc::ptr_eq(&first, &again), "{name} was routed anew");
        }
        // Past the cap a made-up name still resolves, on a route of its own each time.
        for i in 0..MAX_PASSED_THROUGH {
            r.resolve(&format!("m/model-{i}")).unwrap();
        }
        let (first, again) = (r.resolve("m/late").unwrap(), r.resolve("m/late").unwrap());
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(first.targets[0].resolved, "m/late");
        assert!(r.passed_through.read().unwrap().len() <= MAX_PASSED_THROUGH);
        assert!(r.resolve("nope/x").is_err());
    }
}
