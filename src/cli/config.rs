//! `bootsync config get|put|delete|list|watch`: the config store from a shell.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;

use super::{EXIT_OK, EXIT_USAGE};
use crate::api::Token;
use crate::api::config::PublicEvent;
use crate::client::ApiClient;
use crate::servers::{BuildClient, ServerList, Servers};
use crate::store::{Batch, ChangeEvent, Key, Precondition};

/// Where the servers are and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Base URL of the bootsync server, or several sharing one store (`A,B,C`), tried in
    /// that order; a name with several addresses is several servers.
    #[arg(long, default_value = "http://127.0.0.1:4400", env = "BOOTSYNC_SERVER", value_parser = ServerList::parse)]
    pub server: ServerList,
    /// File holding the admin token.
    #[arg(long, env = "BOOTSYNC_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// PEM file of a CA to trust for an `https://` server, beside the system's roots.
    #[arg(long, env = "BOOTSYNC_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl Remote {
    /// A client of the servers with the admin token, if one was given.
    pub(crate) async fn client(&self) -> anyhow::Result<ApiClient> {
        let token = self
            .admin_token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?;
        let roots = self.ca_certs()?;
        let build: BuildClient = Arc::new(move |b| crate::tls::http_client(&roots, b));
        let servers = Servers::resolve(&self.server, build).await?;
        Ok(ApiClient::with_servers(servers).with_admin_token(token))
    }

    /// The extra CA certificates to trust (none without `--ca-cert`).
    pub(crate) fn ca_certs(&self) -> anyhow::Result<Vec<reqwest::Certificate>> {
        Ok(match &self.ca_cert {
            Some(path) => crate::tls::load_ca(path)?,
            None => Vec::new(),
        })
    }
}

/// Config store operations against a server.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print one entry (value and revisions) as JSON.
    Get {
        #[command(flatten)]
        entry: EntryArgs,
    },
    /// Store one JSON value (`-` reads it from stdin).
    Put {
        #[command(flatten)]
        entry: EntryArgs,
        /// The value as JSON, or `-` for stdin.
        value: String,
        /// Only if the key was last modified at this revision.
        #[arg(long, conflicts_with = "if_absent")]
        if_revision: Option<u64>,
        /// Only if the key does not exist yet.
        #[arg(long)]
        if_absent: bool,
    },
    /// Delete one key.
    Delete {
        #[command(flatten)]
        entry: EntryArgs,
    },
    /// List namespaces, a namespace's types and keys, or one type's entries.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Namespace (all namespaces when absent).
        namespace: Option<String>,
        /// Type.
        #[arg(value_name = "TYPE")]
        kind: Option<String>,
    },
    /// Print changes as JSON lines until interrupted.
    Watch {
        #[command(flatten)]
        remote: Remote,
        /// Start after this revision (default: now).
        #[arg(long)]
        from: Option<u64>,
        /// Full events including reserved namespaces (needs the admin token).
        #[arg(long)]
        internal: bool,
    },
}

/// The server and the address of one entry.
#[derive(Debug, Args)]
pub struct EntryArgs {
    #[command(flatten)]
    remote: Remote,
    /// Namespace.
    namespace: String,
    /// Type.
    #[arg(value_name = "TYPE")]
    kind: String,
    /// Key.
    key: String,
}

impl EntryArgs {
    fn key(&self) -> Key {
        Key::new(&self.namespace, &self.kind, &self.key)
    }
}

fn print(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(super) async fn run(command: ConfigCommand) -> anyhow::Result<u8> {
    match command {
        ConfigCommand::Get { entry } => {
            let key = entry.key();
            match entry.remote.client().await?.get(&key).await? {
                Some(body) => print(&body)?,
                None => anyhow::bail!("no value at {key}"),
            }
        }
        ConfigCommand::Put {
            entry,
            value,
            if_revision,
            if_absent,
        } => {
            let text = if value == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the value from stdin")?;
                text
            } else {
                value
            };
            let value: Value = match serde_json::from_str(&text) {
                Ok(value) => value,
                Err(err) => {
                    eprintln!(
                        "error: the value is not valid JSON: {err} (quote strings: '\"text\"')"
                    );
                    return Ok(EXIT_USAGE);
                }
            };
            let key = entry.key();
            let mut batch = Batch::new();
            if if_absent {
                batch = batch.check(key.clone(), Precondition::Absent);
            } else if let Some(revision) = if_revision {
                batch = batch.check(key.clone(), Precondition::ModRevision(revision));
            }
            let revision = entry
                .remote
                .client()
                .await?
                .apply(&batch.put(key, value))
                .await?;
            print(&serde_json::json!({ "revision": revision }))?;
        }
        ConfigCommand::Delete { entry } => {
            let revision = entry.remote.client().await?.delete(&entry.key()).await?;
            print(&serde_json::json!({ "revision": revision }))?;
        }
        ConfigCommand::List {
            remote,
            namespace,
            kind,
        } => {
            let client = remote.client().await?;
            match (namespace, kind) {
                (None, _) => print(&client.namespaces().await?.1)?,
                (Some(ns), None) => print(&client.namespace(&ns).await?.values())?,
                (Some(ns), Some(kind)) => {
                    let listing = client.list(&ns, &kind).await?;
                    let values: std::collections::BTreeMap<_, _> = listing
                        .entries
                        .into_iter()
                        .map(|(k, e)| (k, e.value))
                        .collect();
                    print(&values)?;
                }
            }
        }
        ConfigCommand::Watch {
            remote,
            from,
            internal,
        } => watch(remote.client().await?, from, internal).await?,
    }
    Ok(EXIT_OK)
}

async fn watch(client: ApiClient, from: Option<u64>, internal: bool) -> anyhow::Result<()> {
    let mut from = match from {
        Some(from) => from,
        None => client.namespaces().await?.0,
    };
    let shutdown = crate::shutdown::on_signals();
    let wait = Duration::from_secs(30);
    loop {
        let line = async {
            if internal {
                let body = client.changes::<ChangeEvent>(from, wait, true).await?;
                for event in &body.events {
                    println!("{}", serde_json::to_string(event)?);
                }
                Ok::<_, anyhow::Error>(body.revision)
            } else {
                let body = client.changes::<PublicEvent>(from, wait, false).await?;
                for event in &body.events {
                    println!("{}", serde_json::to_string(event)?);
                }
                Ok(body.revision)
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = line => from = next?.max(from),
        }
    }
}
