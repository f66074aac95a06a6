//! Tests of loading and validating configuration files.

use super::*;

#[test]
fn unknown_key_is_named_with_its_line() {
    let err = Config::from_toml_str("[server]\nhttp_addr = \"127.0.0.1:1\"\nbogus_key = 1\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("bogus_key"), "{err}");
}

#[test]
fn env_is_interpolated_and_escaped() {
    std::env::set_var("TG_TEST_SECRET_X", "a\"b");
    let c = Config::from_toml_str(
        "[server]\nadmin_token = \"${TG_TEST_SECRET_X}\"\n# keys = [\"${NOT_SET_ANYWHERE}\"]\n",
    )
    .unwrap();
    assert_eq!(c.server.admin_token.as_deref(), Some("a\"b"));
}

#[test]
fn missing_env_names_variable_and_line() {
    let err = Config::from_toml_str("[server]\nadmin_token = \"${TG_SURELY_UNSET_VAR}\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 2") && err.contains("TG_SURELY_UNSET_VAR"),
        "{err}"
    );
}

#[test]
fn alias_must_name_configured_provider() {
    let err = Config::from_toml_str("[aliases.fast]\nchain = [\"nope/x\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn a_bad_budget_period_is_refused_at_its_line() {
    let err = Config::from_toml_str(
        "[service_types.default]\nbudget = { limit_usd = 1.0, period = \"yearly\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("\"yearly\" is not a period"), "{err}");
    let c = Config::from_toml_str(
        "[service_types.default]\nbudget = { limit_usd = 1.0, period = \"12h\" }\n",
    )
    .unwrap();
    let budget = c.service_types["default"].budget.as_ref().map(|b| b.period);
    assert_eq!(budget, Some(Period::Every(12 * 3_600_000)));
}

#[test]
fn duplicate_upstream_keys_are_refused() {
    let err = Config::from_toml_str(
        "[providers.o]\nkind = \"openai\"\nbase_url = \"http://x\"\nkeys = [\"k1\", \"k1\"]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("repeats"), "{err}");
    assert!(!err.contains("k1\""), "key must not be echoed: {err}");
}

#[test]
fn provider_kinds_validate_into_their_settings() {
    let c = Config::from_toml_str(
        "[providers.c]\nkind = \"anthropic\"\nkeys = [\"k\"]\nmodel_max_tokens = { big = 8192 }\n\
         [providers.m]\nkind = \"mock\"\ntokens = 3\n",
    )
    .unwrap();
    match &c.providers["c"].settings {
        ProviderSettings::Anthropic(a) => {
            assert_eq!(a.http.base_url, "https://api.anthropic.com");
            assert_eq!(a.anthropic_version, "2023-06-01");
            assert_eq!(a.max_tokens_for("big"), 8192);
            assert_eq!(a.max_tokens_for("other"), 4096);
        }
        _ => panic!("not anthropic"),
    }
    assert!(matches!(&c.providers["m"].settings, ProviderSettings::Mock(m) if m.tokens == 3));
}

#[test]
fn max_idle_connections_defaults_and_is_refused_for_the_mock() {
    let c = Config::from_toml_str(
        "[providers.o]\nkind = \"openai\"\nbase_url = \"http://x\"\n\
         [providers.p]\nkind = \"openai\"\nbase_url = \"http://y\"\nmax_idle_connections = 8\n",
    )
    .unwrap();
    let idle = |name: &str| match &c.providers[name].settings {
        ProviderSettings::Openai(h) => h.max_idle_connections,
        _ => panic!("not openai"),
    };
    assert_eq!(idle("o"), 128);
    assert_eq!(idle("p"), 8);
    let err = Config::from_toml_str("[providers.m]\nkind = \"mock\"\nmax_idle_connections = 4\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`max_idle_connections` applies only"), "{err}");
}

#[test]
fn pool_idle_timeout_defaults_to_90_s_and_is_refused_for_the_mock() {
    let c = Config::from_toml_str(
        "[providers.o]\nkind = \"openai\"\nbase_url = \"http://x\"\n\
         [providers.p]\nkind = \"anthropic\"\npool_idle_timeout_secs = 5\n",
    )
    .unwrap();
    let timeout = |name: &str| match &c.providers[name].settings {
        ProviderSettings::Openai(h) => h.pool_idle_timeout,
        ProviderSettings::Anthropic(a) => a.http.pool_idle_timeout,
        _ => panic!("not an HTTP upstream"),
    };
    assert_eq!(timeout("o"), std::time::Duration::from_secs(90));
    assert_eq!(timeout("p"), std::time::Duration::from_secs(5));
    let err = Config::from_toml_str("[providers.m]\nkind = \"mock\"\npool_idle_timeout_secs = 4\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`pool_idle_timeout_secs` applies only"),
        "{err}"
    );
}

#[test]
fn fields_of_another_kind_are_refused_with_their_line() {
    let err = Config::from_toml_str(
        "[providers.o]\nkind = \"openai\"\nbase_url = \"http://x\"\ntokens = 4\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`tokens` applies only to kind \"mock\""),
        "{err}"
    );
    assert!(err.contains("line "), "{err}");
    let err = Config::from_toml_str("[providers.m]\nkind = \"mock\"\nkeys = [\"k\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`keys`"), "{err}");
    let err = Config::from_toml_str("[providers.o]\nkind = \"openai\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("base_url is required"), "{err}");
}

#[test]
fn max_response_bytes_has_a_default_and_a_floor() {
    let ok = Config::from_toml_str("[providers.o]\nkind = \"openai\"\nbase_url = \"http://x\"\n")
        .unwrap();
    assert_eq!(
        ok.providers["o"].http().map(|h| h.max_response_bytes),
        Some(32 << 20)
    );
    let err = Config::from_toml_str(
        "[providers.o]\nkind = \"openai\"\nbase_url = \"http://x\"\nmax_response_bytes = 10\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("max_response_bytes"), "{err}");
    let err = Config::from_toml_str("[providers.m]\nkind = \"mock\"\nmax_response_bytes = 4096\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_response_bytes"), "{err}");
}

#[test]
fn log_access_is_on_by_default_and_a_typed_switch() {
    assert!(Config::from_toml_str("").unwrap().log.access);
    let off = Config::from_toml_str("[log]\naccess = false\n").unwrap();
    assert!(!off.log.access);
    let err = Config::from_toml_str("[log]\nformat = \"json\"\naccess = \"no\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn telemetry_is_off_by_default_and_its_endpoint_must_be_a_url() {
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c.telemetry.otlp_endpoint, None);
    assert!(!c.telemetry.capture_content);
    assert_eq!(c.telemetry.service_name, "tollgate");
    let on = Config::from_toml_str(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\ncapture_content = true\n",
    )
    .unwrap();
    assert_eq!(
        on.telemetry.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4318")
    );
    assert!(on.telemetry.capture_content);
    let err = Config::from_toml_str("[telemetry]\notlp_endpoint = \"collector:4318\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
    let err = Config::from_toml_str("[telemetry]\notlp_endpont = \"http://x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("otlp_endpont"), "{err}");
}

#[test]
fn max_header_bytes_has_a_default_and_a_floor() {
    assert_eq!(
        Config::from_toml_str("").unwrap().server.max_header_bytes,
        64 << 10
    );
    // Below 8192 the HTTP/1 parser cannot work (hyper would panic): refused at load.
    let err = Config::from_toml_str("[server]\nmax_header_bytes = 4096\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_header_bytes"), "{err}");
}
