//! The `tollgate` binary: `check-config` (naming the bad key and its line) and the admin
//! commands (users and API keys) against a real database, with the keys they make used against a
//! real server on the same database.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Runs the binary with `args`, without any TOLLGATE_* variables of the caller's environment.
fn tollgate(args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOLLGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd.output().unwrap_or_else(|e| panic!("run {BIN}: {e}"))
}

async fn tollgate_async(args: Vec<String>) -> Output {
    blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tollgate(&args)
    })
    .await
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "tollgate {}: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// True when `text` names line `n` ("line 7", "line: 7", ":7:", ...).
fn names_line(text: &str, n: usize) -> bool {
    let lower = text.to_lowercase();
    lower.contains(&format!("line {n}"))
        || lower.contains(&format!("line: {n}"))
        || lower.contains(&format!("line={n}"))
        || lower.contains(&format!(":{n}:"))
}

/// The line (1-based) of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle} not in config"))
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let text = config_toml(&db, "http://127.0.0.1:9/v1", &Opts::default());
    let path = write(dir.path(), "good.toml", &text);
    let out = tollgate(&["check-config", &path]);
    assert!(
        out.status.success(),
        "{}",
        describe(&["check-config", &path], &out)
    );

    // The quick-start example shipped with the project is a good file too.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.toml");
    let out = tollgate(&["check-config", example]);
    assert!(
        out.status.success(),
        "{}",
        describe(&["check-config", example], &out)
    );
}

#[test]
fn check_config_names_an_unknown_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());

    // A misspelt key in [server].
    let good = config_toml(&db, "http://127.0.0.1:9/v1", &Opts::default());
    let bad = good.replacen(
        "shutdown_grace_secs = 2",
        "shutdown_grace_secs = 2\nlisten_adress = \"127.0.0.1:1\"",
        1,
    );
    let line = line_of(&bad, "listen_adress");
    let path = write(dir.path(), "bad-server.toml", &bad);
    let out = tollgate(&["check-config", &path]);
    let all = text_of(&out);
    assert!(
        !out.status.success(),
        "{}",
        describe(&["check-config", &path], &out)
    );
    assert!(all.contains("listen_adress"), "names the key: {all}");
    assert!(names_line(&all, line), "names line {line}: {all}");

    // A misspelt key deep in a provider table, far down the file.
    let bad = good.replacen(
        "[providers.up2]\nkind = \"openai\"",
        "[providers.up2]\nkind = \"openai\"\nbase_ulr = \"http://x\"",
        1,
    );
    let line = line_of(&bad, "base_ulr");
    assert!(line > 30, "the key sits deep in the file (line {line})");
    let path = write(dir.path(), "bad-provider.toml", &bad);
    let out = tollgate(&["check-config", &path]);
    let all = text_of(&out);
    assert!(
        !out.status.success(),
        "{}",
        describe(&["check-config", &path], &out)
    );
    assert!(all.contains("base_ulr"), "names the key: {all}");
    assert!(names_line(&all, line), "names line {line}: {all}");
}

#[test]
fn check_config_rejects_an_inconsistent_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let opts = Opts {
        extra: "[aliases.dangling]\nchain = [\"nosuchprovider/m\"]\n".into(),
        ..Opts::default()
    };
    let text = config_toml(&db, "http://127.0.0.1:9/v1", &opts);
    let path = write(dir.path(), "dangling.toml", &text);
    let out = tollgate(&["check-config", &path]);
    let all = text_of(&out);
    assert!(
        !out.status.success(),
        "{}",
        describe(&["check-config", &path], &out)
    );
    assert!(all.contains("nosuchprovider"), "says what is wrong: {all}");

    let out = tollgate(&["check-config", "/nonexistent/tollgate.toml"]);
    assert!(!out.status.success(), "a missing file fails");
}

#[test]
fn check_config_reports_every_problem_with_file_line_and_dotted_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\
[database]
url = \"sqlite://unused.db\"

[providers.mock]
kind = \"mock\"
tokenz = 5

[providers.up]
kind = \"openai\"
base_url = \"http://127.0.0.1:9/v1\"
total_timeout_ms = \"20ms\"

[aliases.fast]
chain = [\"mokc/m\"]

[aliases.loop]
chain = [\"fast\"]
";
    let path = write(dir.path(), "three.toml", text);
    let args = ["check-config", path.as_str()];
    let out = tollgate(&args);
    let all = text_of(&out);
    assert!(!out.status.success(), "{}", describe(&args, &out));
    // Each problem on its own line, naming the file, its line and its full dotted key.
    let problem = |line: usize, key: &str, what: &str| {
        let found = all.lines().any(|l| {
            l.contains(&path) && names_line(l, line) && l.contains(key) && l.contains(what)
        });
        assert!(
            found,
            "no line with {path}, line {line}, {key}, {what:?}:\n{all}"
        );
    };
    problem(
        line_of(text, "tokenz"),
        "providers.mock.tokenz",
        "did you mean `tokens`?",
    );
    problem(
        line_of(text, "total_timeout_ms"),
        "providers.up.total_timeout_ms",
        "invalid type: string \"20ms\", expected u64",
    );
    problem(
        line_of(text, "mokc/m"),
        "aliases.fast.chain[0]",
        "names provider \"mokc\", which is not configured; did you mean `mock`?",
    );
    problem(
        line_of(text, "[\"fast\"]"),
        "aliases.loop.chain[0]",
        "is an alias",
    );
    assert!(all.contains("4 problems"), "counts them: {all}");
}

/// Runs `tollgate check-config` on `file` with `env` set (and nothing else of TOLLGATE_*).
fn check_with_env(file: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["check-config", file]);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOLLGATE_") || k.ends_with("_API_KEY") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied()).env("RUST_LOG", "warn");
    cmd.output().unwrap_or_else(|e| panic!("run {BIN}: {e}"))
}

#[test]
fn the_example_configs_for_real_upstreams_check_clean() {
    let examples = [
        ("examples/openai.toml", "OPENAI_API_KEY", "aliases.smart"),
        (
            "examples/anthropic.toml",
            "ANTHROPIC_API_KEY",
            "aliases.claude",
        ),
    ];
    for (example, key_var, alias) in examples {
        let file = format!("{}/{example}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&file).expect("read example");
        // What the file promises: keys from the environment, prices, an alias with a fallback.
        assert!(
            text.contains(&format!("${{{key_var}}}")),
            "{example} reads {key_var}"
        );
        assert!(text.contains("[pricing."), "{example} has prices");
        let config = tollgate::config::Config::from_toml_str(
            &text
                .replace(&format!("${{{key_var}}}"), "dummy-upstream-key")
                .replace("${TOLLGATE_ADMIN_TOKEN}", "dummy-admin-token"),
        )
        .unwrap_or_else(|e| panic!("{example}: {e}"));
        let chain = &config.aliases[alias.trim_start_matches("aliases.")].chain;
        assert!(chain.len() >= 2, "{example}: {alias} falls back: {chain:?}");
        assert!(
            chain.iter().all(|m| config.pricing.contains_key(m)),
            "{example}: every chain entry is priced"
        );

        let env = [
            (key_var, "dummy-upstream-key"),
            ("TOLLGATE_ADMIN_TOKEN", "dummy-admin-token"),
        ];
        let out = check_with_env(&file, &env);
        let all = text_of(&out);
        assert!(out.status.success(), "{example}:\n{all}");
        assert!(
            !all.contains("warning"),
            "{example} checks without warnings:\n{all}"
        );

        // Without the key in the environment the file names the variable and its line.
        let out = check_with_env(&file, &env[1..]);
        let all = text_of(&out);
        assert!(!out.status.success(), "{example} without {key_var}:\n{all}");
        assert!(
            all.contains(key_var) && names_line(&all, line_of(&text, &format!("${{{key_var}}}"))),
            "{example} names {key_var} and its line:\n{all}"
        );
    }
}

#[test]
fn the_deploy_configs_check_clean() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    // The ConfigMap's file, as the pods see it (the block under `tollgate.toml: |`).
    let configmap = std::fs::read_to_string(format!("{root}/deploy/kubernetes/configmap.yaml"))
        .expect("configmap.yaml");
    let embedded: String = configmap
        .split_once("tollgate.toml: |\n")
        .expect("the ConfigMap holds tollgate.toml")
        .1
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let configmap_file = write(dir.path(), "configmap-tollgate.toml", &embedded);
    let env = [
        ("TOLLGATE_ADMIN_TOKEN", "dummy-admin-token"),
        ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:1/0"),
        ("OPENAI_API_KEY", "dummy-upstream-key"),
    ];
    let files = [
        (format!("{root}/deploy/tollgate.toml"), false),
        (format!("{root}/deploy/tollgate-replicas.toml"), true),
        (configmap_file, true),
    ];
    for (file, shares_rate_limits) in files {
        let out = check_with_env(&file, &env);
        let all = text_of(&out);
        assert!(out.status.success(), "{file}:\n{all}");
        assert!(!all.contains(": line "), "{file}:\n{all}");
        if shares_rate_limits {
            // The replicas' files share their windows through Redis (the URL comes from the
            // environment, checked after interpolation).
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.contains("backend = \"redis\""), "{file}");
        }
    }
}

/// The first `tg-...` key in `text`.
fn find_key(text: &str) -> Option<String> {
    let start = text.find("tg-")?;
    let key: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    Some(key)
}

/// The key id from `admin key create` output: `"id": N` in JSON, or `id N` / `id: N` / `id=N`.
fn find_id(text: &str) -> Option<i64> {
    for candidate in std::iter::once(text).chain(text.lines()) {
        if let Ok(v) = serde_json::from_str::<Value>(candidate.trim()) {
            if let Some(id) = v.get("id").and_then(Value::as_i64) {
                return Some(id);
            }
        }
    }
    let lower = text.to_lowercase();
    let bytes = lower.as_bytes();
    let mut from = 0;
    while let Some(pos) = lower[from..].find("id") {
        let at = from + pos;
        from = at + 2;
        let before_ok =
            at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if !before_ok {
            continue;
        }
        let rest = &lower[at + 2..];
        let rest = rest.trim_start_matches(|c: char| {
            c == '"' || c == ':' || c == '=' || c == ' ' || c == '\t'
        });
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !digits.is_empty() {
            return digits.parse().ok();
        }
    }
    None
}

#[test]
fn output_parsers_find_key_and_id() {
    assert_eq!(
        find_key("key: tg-AbC_12-x\n").as_deref(),
        Some("tg-AbC_12-x")
    );
    assert_eq!(find_id("{\"id\": 5, \"key\": \"tg-x\"}"), Some(5));
    assert_eq!(
        find_id("created key id 12 (hint tg-ab…)\nkey: tg-abc"),
        Some(12)
    );
    assert_eq!(find_id("user_id=3 id=9"), Some(9));
    assert_eq!(find_id("no number here"), None);
}

async fn admin_keys_work_and_revoke(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let url = db.url.clone();
    let run = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            let out = tollgate_async(args.clone()).await;
            let shown: Vec<&str> = args.iter().map(String::as_str).collect();
            assert!(out.status.success(), "{}", describe(&shown, &out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };

    // As documented: `tollgate admin <what> <verb> ... --database-url URL`.
    let admin = |args: &[&str]| {
        let mut all = vec!["admin"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--database-url", &url]);
        run(&all)
    };

    run(&["migrate", "--database-url", &url]).await;
    let user_out = admin(&["user", "create", "--external-id", "bob"]).await;
    assert!(
        user_out.contains("bob"),
        "user create shows the user: {user_out}"
    );
    let key_out = admin(&["key", "create", "--user", "bob"]).await;
    let key = find_key(&key_out).unwrap_or_else(|| panic!("no tg- key printed: {key_out}"));
    assert!(key.len() >= 20, "a key with some entropy: {key}");
    assert_eq!(
        key_out.matches(key.as_str()).count(),
        1,
        "the key is printed once: {key_out}"
    );
    let key_id = find_id(&key_out).unwrap_or_else(|| panic!("no key id printed: {key_out}"));
    let key_out2 = admin(&["key", "create", "--user", "bob"]).await;
    let listed = admin(&["key", "list", "--user", "bob"]).await;
    assert!(
        listed.contains(&key_id.to_string()),
        "key list shows the key's id: {listed}"
    );
    assert!(
        !listed.contains(&key),
        "key list never shows a key: {listed}"
    );
    assert_ne!(find_key(&key_out2), Some(key.clone()), "every key is new");

    let mut s = TestServer::start_on(
        db,
        Opts {
            auth: "key_cache_ttl_ms = 0".into(),
            ..Opts::default()
        },
    )
    .await;

    // The key works on both protocols, as bob.
    let rid = new_request_id();
    let resp = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-request-id", &rid)
        .json(&chat_body("fast", &rid))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    s.grpc()
        .await
        .complete(grpc_request(
            complete_request("fast", "g"),
            Some(&key),
            None,
        ))
        .await
        .expect("the new key works on gRPC");
    let row = s.ledger_row(&rid).await;
    assert_eq!(
        row.key_id,
        Some(key_id),
        "the ledger names the key: {row:?}"
    );
    let rid_alice = new_request_id();
    assert_eq!(
        s.chat(&chat_body("fast", &rid_alice), Some(&rid_alice))
            .await
            .status(),
        200
    );
    let alice_row = s.ledger_row(&rid_alice).await;
    assert!(row.user_id.is_some());
    assert_ne!(row.user_id, alice_row.user_id, "bob is not alice");

    // Revoked: refused at once (key_cache_ttl_ms = 0).
    let id = key_id.to_string();
    admin(&["key", "revoke", &id]).await;
    let resp = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("fast", "after-revoke"))
        .send()
        .await
        .unwrap();
    expect_http_error(resp, 401, "auth_rejected").await;
    let status = s
        .grpc()
        .await
        .complete(grpc_request(
            complete_request("fast", "g2"),
            Some(&key),
            None,
        ))
        .await
        .expect_err("revoked key");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(grpc_reason(&status), "auth_rejected");
    // The other key of bob's still works.
    let other = find_key(&key_out2).expect("second key");
    let resp = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&other)
        .json(&chat_body("fast", "other"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "revoking one key leaves the others");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_work_and_revoke_sqlite() {
    admin_keys_work_and_revoke(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_work_and_revoke_postgres() {
    admin_keys_work_and_revoke(Backend::Postgres).await;
}

/// `admin usage` reads the ledger as `GET /admin/usage` does (its `--json` is that body), and
/// ids that do not exist fail with a clear message and a non-zero exit, reads included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_usage_and_unknown_ids() {
    const TOKEN: &str = "tg-admin-cli-usage-0123456789";
    let db = TestDb::sqlite();
    let url = db.url.clone();
    let admin = |args: &[&str]| {
        let mut all: Vec<String> = vec!["admin".into()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend(["--database-url".to_string(), url.clone()]);
        async move {
            let out = tollgate_async(all.clone()).await;
            let shown: Vec<&str> = all.iter().map(String::as_str).collect();
            (out.status.success(), text_of(&out), describe(&shown, &out))
        }
    };
    let out = tollgate_async(vec!["migrate".into(), "--database-url".into(), url.clone()]).await;
    assert!(out.status.success(), "{}", text_of(&out));
    let (ok, _, d) = admin(&["user", "create", "--external-id", "dora"]).await;
    assert!(ok, "{d}");
    let (ok, key_out, d) = admin(&["key", "create", "--user", "dora"]).await;
    assert!(ok, "{d}");
    let key = find_key(&key_out).expect("a key");

    let mut s = TestServer::start_on(
        db,
        Opts {
            server: format!("admin_token = \"{TOKEN}\""),
            ..Opts::default()
        },
    )
    .await;
    let rid = new_request_id();
    let resp = s
        .client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-request-id", &rid)
        .json(&chat_body("fast", &rid))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let row = s.ledger_row(&rid).await;

    let json = eventually(Duration::from_secs(10), "usage in the ledger", || async {
        let (ok, out, d) = admin(&["usage", "--user", "dora", "--json"]).await;
        assert!(ok, "{d}");
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {d}"));
        (v["total"]["requests"] == 1).then_some(v)
    })
    .await;
    assert_eq!(json["user_id"], row.user_id.unwrap(), "{json}");
    assert_eq!(json["total"]["cost_micros"], row.cost_micros, "{json}");
    let http: Value = s
        .client
        .get(s.url("/admin/usage?user_id=dora"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json, http, "--json is the HTTP usage body");

    let (ok, table, d) = admin(&["usage", "--user", "dora"]).await;
    assert!(ok, "{d}");
    let model = json["models"][0]["model"].as_str().unwrap();
    let cost = json["total"]["spend_usd"].as_str().unwrap();
    let line_in = |table: &str, first: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(first))
            .unwrap_or_else(|| panic!("no {first} line: {table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let line = |first: &str| line_in(&table, first);
    assert_eq!(line(model)[1], "1", "{table}");
    assert_eq!(line("total")[1], "1", "{table}");
    assert_eq!(line("total").last().unwrap(), cost, "{table}");
    let (ok, out, d) = admin(&["usage", "--user", "dora", "--from", "2100-01-01"]).await;
    assert!(ok, "{d}");
    assert_eq!(line_in(&out, "total")[1], "0", "nothing after 2100: {out}");

    // Unknown ids and bad filters fail, saying so.
    for (args, says) in [
        (vec!["usage", "--user", "nobody"], "not found"),
        (vec!["usage", "--key", "987654"], "key 987654 not found"),
        (vec!["usage", "--from", "yesterday"], "yesterday"),
        (
            vec!["budget", "get", "--scope", "user", "--id", "nobody"],
            "not found",
        ),
        (
            vec!["budget", "get", "--scope", "key", "--id", "987654"],
            "key 987654 not found",
        ),
        (vec!["key", "list", "--user", "nobody"], "not found"),
        (vec!["user", "block", "--user", "nobody"], "not found"),
    ] {
        let (ok, out, d) = admin(&args).await;
        assert!(!ok, "{d}");
        assert!(out.contains(says), "{d}");
        assert!(!out.contains("panicked"), "{d}");
    }
    s.shutdown().await;
}
