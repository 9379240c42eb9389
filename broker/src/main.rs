//! The `broker` binary: CLI -> config -> telemetry -> run until SIGINT/SIGTERM; or, with the
//! `passwd` subcommand, manage a password file and exit; with `token`, make an API token; with
//! `restore`, restore a backup of the broker state.

mod passwd;
mod restore;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use broker::config::Config;

/// Heartwire MQTT broker.
///
/// Configuration: built-in defaults, then the TOML file given with --config, then environment
/// variables named BROKER_<SECTION>__<KEY> (e.g. BROKER_MQTT__LISTEN=0.0.0.0:1883).
/// Run with --print-config to see every key and its effective value. Unknown keys in the file
/// are an error; BROKER_* variables that name no key (such as the BROKER_PORT and
/// BROKER_SERVICE_HOST that Kubernetes sets for a Service named broker) are ignored with one
/// warning. Renamed keys (mqtt.write_timeout, bridge.write_timeout) still work under their old
/// names, with a warning. A configuration error exits with code 2.
///
/// Listeners: MQTT over TCP (mqtt.listen), and when set MQTT over TLS (mqtt.tls.listen, with
/// mqtt.tls.cert_file and mqtt.tls.key_file), over WebSocket (mqtt.ws.listen) and over
/// WebSocket over TLS (mqtt.wss.listen); HTTP (http.listen). A listener other machines can
/// reach needs authentication: for MQTT auth.password_file, auth.jwt.*, auth.database or
/// required client certificates (or auth.allow_anonymous = true), for HTTP
/// http.api_tokens_file (or http.allow_anonymous = true). auth.acl_file limits what each client
/// may read and write (Mosquitto's ACL format). SIGHUP (and POST /api/v1/admin/reload) re-reads
/// the TLS certificate files, the password file, the JWT key, the ACL file and the API tokens
/// file; a file that cannot be used at start exits with code 1. SIGINT and SIGTERM shut down
/// gracefully.
///
/// `broker passwd` manages a password file (Mosquitto's format) and exits; see
/// `broker passwd --help`. `broker token NAME ROLE` makes an API token; see
/// `broker token --help`. `broker restore BACKUP` restores a backup of the broker state (made
/// with POST /api/v1/admin/state/backup); see `broker restore --help`.
#[derive(Debug, Parser)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// A subcommand instead of running the broker.
    #[command(subcommand)]
    command: Option<Command>,
}

/// What the binary does instead of running the broker.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Add, change or delete users of a password file, as mosquitto_passwd does.
    ///
    /// `broker passwd [-c] FILE USER` asks for the password twice, without echo, when standard
    /// input is a terminal; otherwise it reads one line from standard input. `-b FILE USER
    /// PASSWORD` takes it from the command line. `-D FILE USER` deletes the user (an error if
    /// there is none). `--bulk FILE` reads `user:password` lines from standard input and adds
    /// or replaces each (a malformed line stops everything, naming its line, and nothing is
    /// written). `-c` starts from an empty file. New and changed users are stored as argon2id,
    /// which Mosquitto cannot read (keep a file Mosquitto-compatible by managing it with
    /// mosquitto_passwd), or with `--scram` as SCRAM-SHA-256 verifiers, which also let the user
    /// log in with MQTT 5 enhanced authentication; other lines are kept as they are. The file is replaced atomically,
    /// with mode 0600. Errors name the file and line, and exit with code 1.
    Passwd(passwd::PasswdArgs),
    /// Make a new API token and the line of http.api_tokens_file that lets it in.
    ///
    /// Prints the token (32 random bytes, URL-safe base64) on the first line of standard output
    /// and `NAME ROLE SHA256HEX` on the second: add that line to the tokens file and reload
    /// (SIGHUP or POST /api/v1/admin/reload). The file holds only the token's SHA-256, so the
    /// token is shown only now. ROLE is `read` (every endpoint but the admin ones) or `admin`.
    /// A bad name or role exits with code 1.
    Token(token::TokenArgs),
    /// Restore a backup of the broker state into an empty state directory.
    ///
    /// BACKUP is a file written by POST /api/v1/admin/state/backup or every
    /// persistence.backup_interval (retained messages and persistent sessions with their
    /// queues, consistent as of the moment it began). With the broker
    /// stopped, move the state directory (persistence.dir) away, run `broker restore BACKUP
    /// --dir DIR`, and start the broker: it loads the restored state. A directory that already
    /// holds state, or a backup that does not read whole, exits with code 1 and writes nothing.
    Restore(restore::RestoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Passwd(args)) => {
            return match passwd::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("broker passwd: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Token(args)) => {
            return match token::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("broker token: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Restore(args)) => {
            return match restore::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("broker restore: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    let loaded = match Config::load_reporting(cli.config.as_deref(), std::env::vars()) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("broker: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let config = loaded.config;
    let ignored = loaded.ignored_env.join(", ");
    if cli.print_config {
        if !ignored.is_empty() {
            eprintln!(
                "broker: ignoring environment variables that name no configuration key: {ignored}"
            );
        }
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    broker::telemetry::init(&config.log);
    if !ignored.is_empty() {
        tracing::warn!(
            variables = %ignored,
            "Ignoring environment variables that name no configuration key \
             (keys are BROKER_<SECTION>__<KEY>, see --print-config)."
        );
    }
    for old in &loaded.renamed {
        if let Some((_, new)) = broker::config::RENAMED.iter().find(|(o, _)| o == old) {
            tracing::warn!(
                old = *old,
                new = *new,
                "Configuration key renamed: the old name still works, but use the new one."
            );
        }
    }
    // Every connection is a file descriptor: use all the process may have.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "Open-file limit."),
        Err(error) => tracing::warn!(%error, "Cannot raise the open-file limit."),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Look for socket events every 8 task polls instead of tokio's 61: while one client
        // keeps a worker busy (a huge SUBSCRIBE, a retained delivery, a flood), others' packets
        // are noticed after 8 of its turns, not 61 (bench/retained-subscribe.sh, broker on one
        // core: bystander p99 4.5 ms instead of 46 ms; fan-in throughput unchanged).
        .event_interval(8)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("broker: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        match broker::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "Broker failed.");
                eprintln!("broker: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
async fn on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot listen for SIGTERM.");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received; shutting down."),
        _ = term => tracing::info!("SIGTERM received; shutting down."),
    }
    shutdown.cancel();
}
