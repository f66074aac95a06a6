//! The command line: `serve`, `migrate`, `check-config`, `openapi` and `admin` commands.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, LogFormat, Overrides};
use crate::core::admin::Admin;
use crate::core::ConfigSource;
use crate::server::{RunningServer, ServeOptions, StopSignal};
use crate::store::Store;

/// tollgate: an LLM gateway.
#[derive(Parser, Debug)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the configuration comes from, and what overrides it. Global, so that `admin`
/// commands take them after the subcommand too.
#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// The configuration file (TOML).
    #[arg(long, short, env = "TOLLGATE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Overrides `server.http_addr`.
    #[arg(long, global = true)]
    pub http_addr: Option<SocketAddr>,
    /// Overrides `server.grpc_addr`.
    #[arg(long, global = true)]
    pub grpc_addr: Option<SocketAddr>,
    /// Overrides `database.url`.
    #[arg(long, global = true)]
    pub database_url: Option<String>,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve HTTP and gRPC.
    Serve(ConfigArgs),
    /// Run database migrations and exit.
    Migrate(ConfigArgs),
    /// Validate a configuration file; names the bad key and its line.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the OpenAPI 3.1 document of the HTTP API (what `GET /openapi.json` serves).
    Openapi,
    /// Manage users and API keys.
    Admin {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

/// Admin commands.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// API keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Budgets and rate limits of users and API keys.
    Budget {
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// Spend and tokens per resolved model from the usage ledger (what `GET /admin/usage`
    /// answers).
    Usage(UsageArgs),
}

/// The filters of `admin usage`; each narrows the report.
#[derive(Args, Debug)]
pub struct UsageArgs {
    /// A user (id or external id).
    #[arg(long)]
    pub user: Option<String>,
    /// An API key id.
    #[arg(long)]
    pub key: Option<i64>,
    /// A resolved model (`provider/model`).
    #[arg(long)]
    pub model: Option<String>,
    /// Requests that started at or after: unix ms, YYYY-MM-DD or RFC 3339 UTC.
    #[arg(long)]
    pub from: Option<String>,
    /// Requests that started before: unix ms, YYYY-MM-DD or RFC 3339 UTC.
    #[arg(long)]
    pub to: Option<String>,
    /// Print the JSON of `GET /admin/usage` instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Budget commands.
#[derive(Subcommand, Debug)]
pub enum BudgetCommand {
    /// Set a user's or an API key's own budget and rate limits (replaces what it had; without
    /// --limit-usd a user falls back to its service type's default budget).
    Set {
        /// `user` or `key`.
        #[arg(long, value_parser = ["user", "key"])]
        scope: String,
        /// The user (id or external id) or the key id.
        #[arg(long)]
        id: String,
        /// Spending limit in USD per period.
        #[arg(long)]
        limit_usd: Option<f64>,
        /// daily, weekly, monthly (calendar, UTC), total, or a duration such as 12h.
        #[arg(long)]
        period: Option<String>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute.
        #[arg(long)]
        tpm: Option<u64>,
    },
    /// Show a user's or an API key's budget (current period) and rate limits.
    Get {
        /// `user` or `key`.
        #[arg(long, value_parser = ["user", "key"])]
        scope: String,
        /// The user (id or external id) or the key id.
        #[arg(long)]
        id: String,
    },
}

/// User commands.
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user.
    Create {
        #[arg(long)]
        external_id: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Block a user (id or external id); their requests fail with `blocked`.
    Block {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a user's block.
    Unblock {
        #[arg(long)]
        user: String,
    },
    /// List users in id order.
    List {
        #[arg(long, default_value_t = 0)]
        after_id: i64,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

/// Key commands.
#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create a key for a user (id or external id); the key is printed once.
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List a user's keys (hints only).
    List {
        #[arg(long)]
        user: String,
    },
    /// Revoke a key by id.
    Revoke {
        /// The key id.
        id: i64,
    },
}

/// A failed command: a message for the terminal.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

fn err(e: impl std::fmt::Display) -> CliError {
    CliError(e.to_string())
}

/// A configuration error naming the file on every line: each problem is printed to stderr on
/// its own line; the error returned says how many there were.
fn config_error(path: &std::path::Path, e: ConfigError) -> CliError {
    let file = path.display();
    match e {
        ConfigError::Problems(problems) => {
            for p in &problems {
                eprintln!("{file}: {p}");
            }
            let n = problems.len();
            CliError(format!(
                "{file}: {n} problem{}",
                if n == 1 { "" } else { "s" }
            ))
        }
        e => CliError(format!("{file}: {e}")),
    }
}

/// Loads the configuration: file (or defaults), then environment, then flags.
pub fn load_config(args: &ConfigArgs) -> Result<Config, CliError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| config_error(path, e))?,
        None => Config::default(),
    };
    config.apply(&overrides(args)?);
    config.validate().map_err(err)?;
    Ok(config)
}

/// Environment, then flags.
fn overrides(args: &ConfigArgs) -> Result<Overrides, CliError> {
    let flags = Overrides {
        http_addr: args.http_addr,
        grpc_addr: args.grpc_addr,
        database_url: args.database_url.clone(),
        admin_token: None,
    };
    Ok(Overrides::from_env().map_err(err)?.merge(flags))
}

/// Sets up logging from the configuration; `TOLLGATE_LOG` overrides the level filter.
pub fn init_logging(config: &Config) {
    let filter = std::env::var("TOLLGATE_LOG").unwrap_or_else(|_| config.log.level.clone());
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Stage spans (auth, policy, upstream) log their durations when they close, at debug.
    let verbose = filter.contains("debug") || filter.contains("trace");
    let span_events = if verbose {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    let builder = tracing_subscriber::fmt()
        .with_span_events(span_events)
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn admin_store(config: &Config) -> Result<Admin, CliError> {
    let store = Store::connect(&config.database.url, 2, crate::clock::Clock::system())
        .await
        .map_err(err)?;
    if config.database.run_migrations {
        store.migrate().await.map_err(err)?;
    }
    Ok(Admin::new(store))
}

/// Runs a command to completion.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_config(&args)?;
            init_logging(&config);
            for w in config.warnings() {
                tracing::warn!("configuration: {w}");
            }
            let source = args.config.clone().map(|path| ConfigSource {
                path,
                overrides: overrides(&args).unwrap_or_default(),
            });
            let options = ServeOptions {
                clock: crate::clock::Clock::system(),
                source,
            };
            // Listening for the stop signals before the server serves: see `StopSignal`.
            let stop = StopSignal::listen()
                .map_err(|e| err(format!("cannot listen for SIGTERM and ctrl-c: {e}")))?;
            let server = RunningServer::start_with(config, options)
                .await
                .map_err(err)?;
            server.run_until_signal(stop).await;
            Ok(())
        }
        Command::Migrate(args) => {
            let config = load_config(&args)?;
            let store = Store::connect(&config.database.url, 1, crate::clock::Clock::system())
                .await
                .map_err(err)?;
            store.migrate().await.map_err(err)?;
            println!("migrations applied ({})", store.backend());
            Ok(())
        }
        Command::CheckConfig { file } => {
            let config = Config::load(&file).map_err(|e| config_error(&file, e))?;
            for w in config.warnings() {
                eprintln!("warning: {}: {w}", file.display());
            }
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Openapi => {
            let doc = serde_json::to_string_pretty(crate::http::openapi_document()).map_err(err)?;
            println!("{doc}");
            Ok(())
        }
        Command::Admin { config, command } => {
            let config = load_config(&config)?;
            let admin = admin_store(&config).await?;
            run_admin(&admin, command).await
        }
    }
}

/// A scope's id from the command line: a user by id or external id, a key by id.
async fn budget_subject(admin: &Admin, scope: &str, id: &str) -> Result<i64, CliError> {
    if scope == "user" {
        Ok(admin.find_user(id).await.map_err(err)?.id)
    } else {
        id.parse()
            .map_err(|_| CliError(format!("key id {id:?} is not a number")))
    }
}

async fn run_budget(admin: &Admin, command: BudgetCommand) -> Result<(), CliError> {
    use crate::core::policy::budget::{self, BudgetUpdate, ScopeKind};
    use crate::core::pricing::micros_to_usd;
    let view = match command {
        BudgetCommand::Set {
            scope,
            id,
            limit_usd,
            period,
            rpm,
            tpm,
        } => {
            let subject = budget_subject(admin, &scope, &id).await?;
            let update =
                BudgetUpdate::parse(&scope, subject, limit_usd, period.as_deref(), rpm, tpm)
                    .map_err(CliError)?;
            admin.set_budget(&update).await.map_err(err)?
        }
        BudgetCommand::Get { scope, id } => {
            let subject = budget_subject(admin, &scope, &id).await?;
            let scope = ScopeKind::parse(&scope).map_err(CliError)?;
            admin.get_budget(scope, subject).await.map_err(err)?
        }
    };
    let usd = |m: Option<i64>| m.map(micros_to_usd).unwrap_or_else(|| "-".into());
    println!("{} {}", view.scope.as_str(), view.id);
    match (&view.period, view.explicit) {
        (Some(p), explicit) => {
            println!(
                "budget: ${} {p}{}",
                usd(view.limit_micros),
                if explicit {
                    ""
                } else {
                    " (service type default, as last applied)"
                }
            );
            println!(
                "period: {} .. {}",
                view.period_start.map(budget::rfc3339).unwrap_or_default(),
                view.reset_at
                    .map(budget::rfc3339)
                    .unwrap_or_else(|| "never".into())
            );
            println!(
                "spent: ${}  reserved: ${}  leased: ${}  remaining: ${}",
                micros_to_usd(view.spent_micros),
                micros_to_usd(view.reserved_micros),
                micros_to_usd(view.leased_micros),
                usd(view.remaining_micros)
            );
        }
        (None, _) => println!("budget: none of its own"),
    }
    let per_min = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    println!("rpm: {}  tpm: {}", per_min(view.rpm), per_min(view.tpm));
    Ok(())
}

/// `admin usage`: the report as a table (one line per model and a total) or as JSON.
async fn run_usage(admin: &Admin, args: UsageArgs) -> Result<(), CliError> {
    use crate::core::policy::parse_time;
    use crate::core::pricing::micros_to_usd;
    let time = |t: &Option<String>| t.as_deref().map(parse_time).transpose().map_err(CliError);
    let user_id = match &args.user {
        Some(u) => Some(admin.find_user(u).await.map_err(err)?.id),
        None => None,
    };
    let filter = crate::store::UsageFilter {
        user_id,
        key_id: args.key,
        model: args.model.clone(),
        from: time(&args.from)?,
        to: time(&args.to)?,
    };
    let report = admin.query_usage(&filter).await.map_err(err)?;
    if args.json {
        let json = crate::http::usage_json(&filter, &report);
        println!("{}", serde_json::to_string_pretty(&json).map_err(err)?);
        return Ok(());
    }
    let width = report
        .models
        .iter()
        .map(|m| m.model.len())
        .chain([5])
        .max()
        .unwrap_or(5);
    println!(
        "{:<width$}  {:>10}  {:>14}  {:>18}  {:>14}",
        "model", "requests", "prompt_tokens", "completion_tokens", "spend_usd"
    );
    let total = &report.total;
    let rows = report
        .models
        .iter()
        .map(|m| {
            (
                m.model.as_str(),
                m.requests,
                m.prompt_tokens,
                m.completion_tokens,
                m.cost_micros,
            )
        })
        .chain([(
            "total",
            total.requests,
            total.prompt_tokens,
            total.completion_tokens,
            total.cost_micros,
        )]);
    for (model, requests, prompt, completion, cost) in rows {
        println!(
            "{model:<width$}  {requests:>10}  {prompt:>14}  {completion:>18}  {:>14}",
            micros_to_usd(cost)
        );
    }
    Ok(())
}

async fn run_admin(admin: &Admin, command: AdminCommand) -> Result<(), CliError> {
    match command {
        AdminCommand::Budget { command } => return run_budget(admin, command).await,
        AdminCommand::Usage(args) => return run_usage(admin, args).await,
        AdminCommand::User {
            command: UserCommand::Create { external_id, name },
        } => {
            let u = admin
                .create_user(&external_id, name.as_deref())
                .await
                .map_err(err)?;
            println!("user {} created (external_id {})", u.id, u.external_id);
        }
        AdminCommand::User {
            command: UserCommand::Block { user, reason },
        } => {
            let u = admin.find_user(&user).await.map_err(err)?;
            let u = admin.block_user(u.id, &reason).await.map_err(err)?;
            println!(
                "user {} blocked: {}",
                u.id,
                u.blocked_reason.unwrap_or_default()
            );
        }
        AdminCommand::User {
            command: UserCommand::Unblock { user },
        } => {
            let u = admin.find_user(&user).await.map_err(err)?;
            let u = admin.unblock_user(u.id).await.map_err(err)?;
            println!("user {} unblocked", u.id);
        }
        AdminCommand::User {
            command: UserCommand::List { after_id, limit },
        } => {
            for u in admin.list_users(after_id, limit).await.map_err(err)? {
                let state = if u.blocked { "blocked" } else { "active" };
                println!("{}\t{}\t{}\t{}", u.id, u.external_id, u.auth_method, state);
            }
        }
        AdminCommand::Key {
            command: KeyCommand::Create { user, name },
        } => {
            let u = admin.find_user(&user).await.map_err(err)?;
            let created = admin
                .create_key(u.id, name.as_deref(), None)
                .await
                .map_err(err)?;
            println!("key id: {}", created.record.id);
            println!("key: {}", created.key);
            println!("(shown once: store it now)");
        }
        AdminCommand::Key {
            command: KeyCommand::List { user },
        } => {
            let u = admin.find_user(&user).await.map_err(err)?;
            for k in admin.list_keys(u.id).await.map_err(err)? {
                let state = if k.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{}\t{}\t{}\t{}",
                    k.id,
                    k.hint,
                    state,
                    k.name.unwrap_or_default()
                );
            }
        }
        AdminCommand::Key {
            command: KeyCommand::Revoke { id },
        } => {
            let k = admin.revoke_key(id).await.map_err(err)?;
            println!("key {} ({}) revoked", k.id, k.hint);
        }
    }
    Ok(())
}
