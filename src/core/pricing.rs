//! Prices and costs. Prices are configured in USD per million tokens; they are turned into
//! integer pico-dollars per token once, when a configuration is loaded, and every cost after
//! that is integer arithmetic in micro-dollars (rounded up once per request), never floats.

use std::collections::HashMap;

use crate::config::{Config, UnpricedPolicy};
use crate::providers::Usage;
use crate::short_text::ShortText;

/// Pico-dollars in a micro-dollar.
const PICO_PER_MICRO: u128 = 1_000_000;

/// One model's price, in pico-dollars per token (= USD per million tokens x 10^6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input_pico: u64,
    pub output_pico: u64,
    /// Input tokens the upstream reports as served from its prompt cache.
    pub cached_input_pico: u64,
    /// The most output tokens one request to this model can produce (caps the reservation).
    pub max_output_tokens: Option<u64>,
}

impl Price {
    /// The cost of `usage` in micro-dollars, rounded up.
    pub fn cost_micros(&self, usage: &Usage) -> i64 {
        let cached = usage.cached_prompt_tokens.min(usage.prompt_tokens);
        let fresh = usage.prompt_tokens - cached;
        let pico = u128::from(fresh) * u128::from(self.input_pico)
            + u128::from(cached) * u128::from(self.cached_input_pico)
            + u128::from(usage.completion_tokens) * u128::from(self.output_pico);
        pico_to_micros(pico)
    }
}

fn pico_to_micros(pico: u128) -> i64 {
    pico.div_ceil(PICO_PER_MICRO).min(i64::MAX as u128) as i64
}

/// USD per million tokens as pico-dollars per token (exact to six decimals).
pub fn usd_per_mtok_to_pico(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// USD as micro-dollars (a configuration or admin value; exact to six decimals).
pub fn usd_to_micros(usd: f64) -> i64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round().min(i64::MAX as f64) as i64
    } else {
        0
    }
}

/// Micro-dollars as a decimal USD string with six decimals (`"0.100000"`), never through floats.
pub fn micros_to_usd(micros: i64) -> String {
    Usd(micros).to_string()
}

/// Micro-dollars written as [`micros_to_usd`] writes them, in place.
#[derive(Debug, Clone, Copy)]
pub struct Usd(pub i64);

impl Usd {
    /// The amount with six decimals, `-` before a negative one (what `Display` writes).
    pub fn text(self) -> ShortText {
        let mut t = ShortText::default();
        if self.0 < 0 {
            t.push_str("-");
        }
        let m = self.0.unsigned_abs();
        t.push_u64(m / 1_000_000, 0);
        t.push_str(".");
        t.push_u64(m % 1_000_000, 6);
        t
    }
}

impl std::fmt::Display for Usd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// How many output tokens a request may produce, for its maximum cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputCap {
    /// None: an embeddings request is priced on its input alone.
    Nothing,
    /// The caller's `max_tokens`, capped by each model's `max_output_tokens` (see
    /// [`Pricing::max_output_tokens`]).
    UpTo(Option<u64>),
}

/// Why a model cannot be given a maximum cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpriced(pub String);

/// The price table of one configuration.
#[derive(Debug, Clone)]
pub struct Pricing {
    prices: HashMap<String, Price>,
    policy: UnpricedPolicy,
    default_max_output_tokens: u64,
}

impl Pricing {
    /// Builds the table from `[pricing."provider/model"]` and `[pricing_policy]`.
    pub fn from_config(config: &Config) -> Pricing {
        let prices = config
            .pricing
            .iter()
            .map(|(model, p)| {
                let input = usd_per_mtok_to_pico(p.input_usd_per_mtok);
                let price = Price {
                    input_pico: input,
                    output_pico: usd_per_mtok_to_pico(p.output_usd_per_mtok),
                    cached_input_pico: p
                        .cached_input_usd_per_mtok
                        .map(usd_per_mtok_to_pico)
                        .unwrap_or(input),
                    max_output_tokens: p.max_output_tokens,
                };
                (model.clone(), price)
            })
            .collect();
        Pricing {
            prices,
            policy: config.pricing_policy.unpriced,
            default_max_output_tokens: config.pricing_policy.default_max_output_tokens,
        }
    }

    /// A model's price, if configured.
    pub fn price(&self, resolved: &str) -> Option<&Price> {
        self.prices.get(resolved)
    }

    /// Whether requests to `resolved` are refused for want of a price.
    pub fn refuses(&self, resolved: &str) -> bool {
        self.policy == UnpricedPolicy::Refuse && !self.prices.contains_key(resolved)
    }

    /// The actual cost of a request in micro-dollars; an unpriced model is free.
    pub fn cost_micros(&self, resolved: &str, usage: &Usage) -> i64 {
        self.prices
            .get(resolved)
            .map(|p| p.cost_micros(usage))
            .unwrap_or(0)
    }

    /// The most output tokens a request to `resolved` can produce: the caller's `max_tokens`,
    /// capped by the model's `max_output_tokens`; with neither, `default_max_output_tokens`.
    pub fn max_output_tokens(&self, resolved: &str, requested: Option<u64>) -> u64 {
        let cap = self.prices.get(resolved).and_then(|p| p.max_output_tokens);
        match (requested, cap) {
            (Some(r), Some(c)) => r.min(c),
            (Some(r), None) => r,
            (None, Some(c)) => c,
            (None, None) => self.default_max_output_tokens,
        }
    }

    /// The most a request can cost on any of `targets`: estimated prompt tokens plus its output
    /// cap, at each target's price. `Err` names a target that is refused for want of a price.
    pub fn max_cost_micros<'a>(
        &self,
        targets: impl IntoIterator<Item = &'a str>,
        prompt_tokens: u64,
        output: OutputCap,
    ) -> Result<i64, Unpriced> {
        let mut max = 0;
        for resolved in targets {
            if self.refuses(resolved) {
                return Err(Unpriced(resolved.to_string()));
            }
            let Some(price) = self.prices.get(resolved) else {
                continue;
            };
            let usage = Usage {
                prompt_tokens,
                completion_tokens: match output {
                    OutputCap::Nothing => 0,
                    OutputCap::UpTo(max_tokens) => self.max_output_tokens(resolved, max_tokens),
                },
                cached_prompt_tokens: 0,
                cache_creation_tokens: 0,
            };
            max = max.max(price.cost_micros(&usage));
        }
        Ok(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_are_written_with_six_decimals() {
        for micros in [
            0,
            1,
            -1,
            999_999,
            1_000_000,
            -1_500_000,
            123_456_789,
            i64::MAX,
            i64::MIN,
        ] {
            let sign = if micros < 0 { "-" } else { "" };
            let m = micros.unsigned_abs();
            let want = format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000);
            assert_eq!(Usd(micros).text(), want.as_str());
            assert_eq!(Usd(micros).to_string(), want);
        }
    }

    fn usage(p: u64, c: u64, cached: u64) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cached_prompt_tokens: cached,
            cache_creation_tokens: 0,
        }
    }

    #[test]
    fn integer_costs_round_up_once() {
        let p = Price {
            input_pico: usd_per_mtok_to_pico(0.15),
            output_pico: usd_per_mtok_to_pico(0.60),
            cached_input_pico: usd_per_mtok_to_pico(0.075),
            max_output_tokens: None,
        };
        assert_eq!(p.input_pico, 150_000);
        // 1000 * 0.15 + 1000 * 0.6 = 750 micro-dollars exactly.
        assert_eq!(p.cost_micros(&usage(1000, 1000, 0)), 750);
        // 7 * 0.15 = 1.05 -> 2 (rounded up once, not per part).
        assert_eq!(p.cost_micros(&usage(7, 0, 0)), 2);
        // 1000 prompt tokens of which 400 cached: 600 * 0.15 + 400 * 0.075 = 120.
        assert_eq!(p.cost_micros(&usage(1000, 0, 400)), 120);
        let test = Price {
            input_pico: usd_per_mtok_to_pico(1000.0),
            output_pico: usd_per_mtok_to_pico(2000.0),
            cached_input_pico: usd_per_mtok_to_pico(1000.0),
            max_output_tokens: None,
        };
        assert_eq!(test.cost_micros(&usage(11, 7, 0)), 25_000);
    }

    #[test]
    fn usd_strings() {
        assert_eq!(micros_to_usd(100_000), "0.100000");
        assert_eq!(micros_to_usd(12_345_678), "12.345678");
        assert_eq!(micros_to_usd(-5), "-0.000005");
        assert_eq!(usd_to_micros(0.1), 100_000);
        assert_eq!(usd_to_micros(0.025), 25_000);
    }

    #[test]
    fn max_cost_takes_the_dearest_target_and_refuses_unpriced() {
        let mut config = Config::default();
        config.pricing.insert(
            "a/cheap".into(),
            crate::config::PricingConfig {
                input_usd_per_mtok: 1.0,
                output_usd_per_mtok: 2.0,
                cached_input_usd_per_mtok: None,
                max_output_tokens: Some(100),
            },
        );
        config.pricing.insert(
            "a/dear".into(),
            crate::config::PricingConfig {
                input_usd_per_mtok: 10.0,
                output_usd_per_mtok: 20.0,
                cached_input_usd_per_mtok: None,
                max_output_tokens: None,
            },
        );
        let pricing = Pricing::from_config(&config);
        // cheap: 10 * 1 + 100 (model cap) * 2 = 210; dear: 10 * 10 + 500 * 20 = 10100.
        assert_eq!(
            pricing.max_cost_micros(["a/cheap"], 10, OutputCap::UpTo(Some(500))),
            Ok(210)
        );
        // Embeddings: input only, 10 * 10 at the dearest.
        assert_eq!(
            pricing.max_cost_micros(["a/cheap", "a/dear"], 10, OutputCap::Nothing),
            Ok(100)
        );
        assert_eq!(
            pricing.max_cost_micros(
                ["a/cheap", "a/dear", "a/free"],
                10,
                OutputCap::UpTo(Some(500))
            ),
            Ok(10_100)
        );
        config.pricing_policy.unpriced = UnpricedPolicy::Refuse;
        let pricing = Pricing::from_config(&config);
        assert_eq!(
            pricing.max_cost_micros(["a/cheap", "a/free"], 10, OutputCap::UpTo(Some(500))),
            Err(Unpriced("a/free".into()))
        );
    }
}
