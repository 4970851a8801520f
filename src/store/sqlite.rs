//! The embedded SQLite backend: one file in WAL mode, concurrent writers group-committed.
//!
//! One writer thread owns the write connection. `apply` queues its batch and waits; the writer
//! drains whatever is queued, runs every batch inside its own SAVEPOINT of one transaction
//! (so a batch whose precondition fails rolls back alone), commits once — one fsync for the
//! whole group — and only then publishes the events and acknowledges each batch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::oneshot;

use super::memory::check_precondition;
use super::{
    Batch, Change, ChangeEvent, ChangeHub, Entry, Error, Key, Limits, Listing, NamespaceTree, Op,
    Revision, Store, Watch, WatchFilter, validate_namespace, validate_type,
};

/// Schema version written into `meta`; a file with another version is refused.
const SCHEMA_VERSION: i64 = 1;
/// Most batches committed in one transaction.
const MAX_GROUP: usize = 512;
/// Batches of change history kept for watchers by default.
pub const DEFAULT_HISTORY: u64 = 10_000;

/// Tuning of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Size and count limits on writes.
    pub limits: Limits,
    /// How many committed batches of change history to keep for watchers.
    pub history: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            history: DEFAULT_HISTORY,
        }
    }
}

type Reply = oneshot::Sender<Result<Revision, Error>>;

enum Command {
    Apply(Batch, Reply),
    Close(oneshot::Sender<Result<(), Error>>),
}

/// A store in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    /// Held for the store's lifetime: one process per file, because revisions are assigned in
    /// this process's writer thread.
    _lock: std::fs::File,
    writer: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
    hub: Arc<ChangeHub>,
    limits: Limits,
}

debug_fields!(SqliteStore { path });

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |err| Error::backend(context, err)
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, Error> {
    let conn = Connection::open_with_flags(path, flags).map_err(|err| {
        Error::Unavailable(format!("cannot open sqlite file {}: {err}", path.display()))
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql("setting the busy timeout"))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| {
                Error::Unavailable(format!(
                    "cannot create directory {} for the sqlite store: {err}",
                    parent.display()
                ))
            })?;
        }
        let lock = lock_file(&path)?;
        let writer = open_connection(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power loss, and a
        // write is acknowledged only once it is durable. Group commit pays for the fsync.
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = OFF;
                 CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS entries (
                     namespace TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL,
                     value TEXT NOT NULL, create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL,
                     PRIMARY KEY (namespace, type, key)) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS changes (
                     revision INTEGER NOT NULL, position INTEGER NOT NULL,
                     namespace TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL, value TEXT,
                     PRIMARY KEY (revision, position)) WITHOUT ROWID;
                 INSERT OR IGNORE INTO meta VALUES ('schema', 1), ('revision', 0), ('compacted', 0);",
            )
            .map_err(sql("creating the schema"))?;
        let schema = meta(&writer, "schema")?;
        if schema as i64 != SCHEMA_VERSION {
            return Err(Error::Unavailable(format!(
                "sqlite file {} has schema version {schema}, this bootsync reads {SCHEMA_VERSION}",
                path.display()
            )));
        }
        let revision = meta(&writer, "revision")?;
        let compacted = meta(&writer, "compacted")?;
        let hub = Arc::new(ChangeHub::new(options.history as usize, compacted));
        for event in load_history(&writer, compacted)? {
            hub.publish(event);
        }

        let reader = open_connection(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let (tx, rx) = mpsc::channel();
        let mut worker = Writer {
            conn: writer,
            revision,
            compacted,
            history: options.history.max(1),
            hub: hub.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("bootsync-sqlite-writer".into())
            .spawn(move || worker.serve(rx))
            .map_err(|err| Error::backend("starting the writer thread", err))?;
        Ok(Self {
            path,
            _lock: lock,
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            reader: Arc::new(Mutex::new(reader)),
            hub,
            limits: options.limits,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = reader.lock().expect("sqlite reader lock poisoned");
            // One read transaction, so the revision and the rows agree.
            let tx = conn.transaction().map_err(sql("starting a read"))?;
            let out = f(&tx)?;
            tx.finish().map_err(sql("finishing a read"))?;
            Ok(out)
        })
        .await
        .map_err(|err| Error::backend("running a read", err))?
    }

    fn sender(&self) -> Result<mpsc::Sender<Command>, Error> {
        self.writer
            .lock()
            .expect("sqlite writer lock poisoned")
            .clone()
            .ok_or_else(|| Error::Unavailable("the sqlite store is closed".into()))
    }
}

/// Takes an exclusive lock on `<path>.lock`; a second process gets a clear error instead of
/// assigning revisions of its own to the same file.
fn lock_file(path: &Path) -> Result<std::fs::File, Error> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|err| {
            Error::Unavailable(format!(
                "cannot open lock file {}: {err}",
                lock_path.display()
            ))
        })?;
    if file.try_lock().is_err() {
        return Err(Error::Unavailable(format!(
            "sqlite store {} is in use by another process (lock {} is held); \
             use one server per file, or etcd to share a store",
            path.display(),
            lock_path.display()
        )));
    }
    Ok(file)
}

fn meta(conn: &Connection, name: &str) -> Result<u64, Error> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as u64)
    .map_err(sql("reading metadata"))
}

fn parse_value(text: &str) -> Result<Value, Error> {
    serde_json::from_str(text).map_err(|err| Error::backend("decoding a stored value", err))
}

fn load_history(conn: &Connection, compacted: Revision) -> Result<Vec<ChangeEvent>, Error> {
    let mut stmt = conn
        .prepare("SELECT revision, namespace, type, key, value FROM changes WHERE revision > ?1 ORDER BY revision, position")
        .map_err(sql("reading the change log"))?;
    let rows = stmt
        .query_map([compacted as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })
        .map_err(sql("reading the change log"))?;
    let mut events: Vec<ChangeEvent> = Vec::new();
    for row in rows {
        let (revision, ns, ty, key, value) = row.map_err(sql("reading the change log"))?;
        let revision = revision as u64;
        let change = Change {
            key: Key::new(ns, ty, key),
            value: value.as_deref().map(parse_value).transpose()?,
        };
        match events.last_mut() {
            Some(last) if last.revision == revision => last.changes.push(change),
            _ => events.push(ChangeEvent {
                revision,
                changes: vec![change],
            }),
        }
    }
    Ok(events)
}

fn current_mod_revision(conn: &Connection, key: &Key) -> Result<Option<Revision>, Error> {
    conn.query_row(
        "SELECT mod_revision FROM entries WHERE namespace = ?1 AND type = ?2 AND key = ?3",
        params![key.namespace, key.kind, key.key],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.map(|r| r as u64))
    .map_err(sql("checking a precondition"))
}

struct Writer {
    conn: Connection,
    revision: Revision,
    compacted: Revision,
    history: u64,
    hub: Arc<ChangeHub>,
}

impl Writer {
    fn serve(&mut self, rx: mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut group = Vec::new();
            let mut close = None;
            match first {
                Command::Apply(batch, reply) => group.push((batch, reply)),
                Command::Close(done) => close = Some(done),
            }
            // Everything already queued joins this group and shares its one fsync.
            while close.is_none() && group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(Command::Apply(batch, reply)) => group.push((batch, reply)),
                    Ok(Command::Close(done)) => close = Some(done),
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.commit_group(group);
            }
            if let Some(done) = close {
                let result = self
                    .conn
                    .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                    .map_err(sql("checkpointing the WAL on close"));
                let _ = done.send(result);
                return;
            }
        }
    }

    fn commit_group(&mut self, group: Vec<(Batch, Reply)>) {
        let start_revision = self.revision;
        match self.try_group(group) {
            Ok((events, replies)) => {
                for event in events {
                    self.hub.publish(event);
                }
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
            }
            Err((err, replies)) => {
                self.revision = start_revision;
                let _ = self.conn.execute_batch("ROLLBACK");
                let message = err.to_string();
                tracing::error!(error = %message, "sqlite group commit failed");
                for reply in replies {
                    let _ =
                        reply.send(Err(Error::Unavailable(format!("commit failed: {message}"))));
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_group(
        &mut self,
        group: Vec<(Batch, Reply)>,
    ) -> Result<(Vec<ChangeEvent>, Vec<(Reply, Result<Revision, Error>)>), (Error, Vec<Reply>)>
    {
        if let Err(err) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            return Err((
                Error::backend("beginning a transaction", err),
                group.into_iter().map(|(_, r)| r).collect(),
            ));
        }
        let mut events = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut fatal = None;
        for (batch, reply) in group {
            if fatal.is_some() {
                replies.push((reply, Err(Error::Unavailable("commit abandoned".into()))));
                continue;
            }
            match self.apply_one(batch) {
                Ok(event) => {
                    replies.push((reply, Ok(event.revision)));
                    events.push(event);
                }
                Err(err @ Error::Conflict { .. }) => replies.push((reply, Err(err))),
                Err(err) => {
                    fatal = Some(err);
                    replies.push((reply, Err(Error::Unavailable("commit abandoned".into()))));
                }
            }
        }
        let result = match fatal {
            Some(err) => Err(err),
            None => self.finish_group(),
        };
        match result {
            Ok(()) => Ok((events, replies)),
            Err(err) => Err((err, replies.into_iter().map(|(r, _)| r).collect())),
        }
    }

    fn finish_group(&mut self) -> Result<(), Error> {
        let keep_after = self.revision.saturating_sub(self.history);
        if keep_after > self.compacted {
            self.conn
                .execute(
                    "DELETE FROM changes WHERE revision <= ?1",
                    [keep_after as i64],
                )
                .map_err(sql("pruning the change log"))?;
            self.conn
                .execute(
                    "UPDATE meta SET value = ?1 WHERE name = 'compacted'",
                    [keep_after as i64],
                )
                .map_err(sql("recording compaction"))?;
            self.compacted = keep_after;
        }
        self.conn
            .execute(
                "UPDATE meta SET value = ?1 WHERE name = 'revision'",
                [self.revision as i64],
            )
            .map_err(sql("recording the revision"))?;
        self.conn.execute_batch("COMMIT").map_err(sql("committing"))
    }

    /// Applies one batch inside a savepoint; a failed precondition rolls back only it.
    fn apply_one(&mut self, batch: Batch) -> Result<ChangeEvent, Error> {
        self.conn
            .execute_batch("SAVEPOINT batch")
            .map_err(sql("opening a savepoint"))?;
        match self.apply_inner(batch) {
            Ok(event) => {
                self.conn
                    .execute_batch("RELEASE batch")
                    .map_err(sql("releasing a savepoint"))?;
                self.revision = event.revision;
                Ok(event)
            }
            Err(err) => {
                self.conn
                    .execute_batch("ROLLBACK TO batch; RELEASE batch")
                    .map_err(sql("rolling back a savepoint"))?;
                Err(err)
            }
        }
    }

    fn apply_inner(&mut self, batch: Batch) -> Result<ChangeEvent, Error> {
        for check in &batch.checks {
            let current = current_mod_revision(&self.conn, &check.key)?;
            check_precondition(&check.key, check.expect, current)?;
        }
        let revision = self.revision + 1;
        let mut changes = Vec::with_capacity(batch.ops.len());
        let mut upsert = self
            .conn
            .prepare_cached(
                "INSERT INTO entries (namespace, type, key, value, create_revision, mod_revision)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (namespace, type, key) DO UPDATE SET value = excluded.value, mod_revision = excluded.mod_revision",
            )
            .map_err(sql("preparing a put"))?;
        let mut remove = self
            .conn
            .prepare_cached("DELETE FROM entries WHERE namespace = ?1 AND type = ?2 AND key = ?3")
            .map_err(sql("preparing a delete"))?;
        let mut log = self
            .conn
            .prepare_cached("INSERT INTO changes (revision, position, namespace, type, key, value) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .map_err(sql("preparing the change log"))?;
        for (position, op) in batch.ops.into_iter().enumerate() {
            let (key, value) = match op {
                Op::Put { key, value } => (key, Some(value)),
                Op::Delete { key } => (key, None),
            };
            let text = value.as_ref().map(|v| v.to_string());
            match &text {
                Some(text) => upsert
                    .execute(params![
                        key.namespace,
                        key.kind,
                        key.key,
                        text,
                        revision as i64
                    ])
                    .map_err(sql("writing a value"))?,
                None => remove
                    .execute(params![key.namespace, key.kind, key.key])
                    .map_err(sql("deleting a value"))?,
            };
            log.execute(params![
                revision as i64,
                position as i64,
                key.namespace,
                key.kind,
                key.key,
                text
            ])
            .map_err(sql("appending to the change log"))?;
            changes.push(Change { key, value });
        }
        Ok(ChangeEvent { revision, changes })
    }
}

fn read_entries(
    conn: &Connection,
    sql_text: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<(String, String, Entry)>, Error> {
    let mut stmt = conn
        .prepare_cached(sql_text)
        .map_err(sql("preparing a read"))?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(sql("reading entries"))?;
    let mut out = Vec::new();
    for row in rows {
        let (ty, key, value, create, modified) = row.map_err(sql("reading entries"))?;
        out.push((
            ty,
            key,
            Entry {
                value: parse_value(&value)?,
                create_revision: create as u64,
                mod_revision: modified as u64,
            },
        ));
    }
    Ok(out)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn revision(&self) -> Result<Revision, Error> {
        self.read(|conn| meta(conn, "revision")).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Entry>, Error> {
        key.validate()?;
        let key = key.clone();
        self.read(move |conn| {
            let rows = read_entries(
                conn,
                "SELECT type, key, value, create_revision, mod_revision FROM entries WHERE namespace = ?1 AND type = ?2 AND key = ?3",
                &[&key.namespace, &key.kind, &key.key],
            )?;
            Ok(rows.into_iter().next().map(|(_, _, e)| e))
        })
        .await
    }

    async fn list(&self, namespace: &str, kind: &str) -> Result<Listing, Error> {
        validate_namespace(namespace)?;
        validate_type(kind)?;
        let (ns, ty) = (namespace.to_string(), kind.to_string());
        self.read(move |conn| {
            let revision = meta(conn, "revision")?;
            let rows = read_entries(
                conn,
                "SELECT type, key, value, create_revision, mod_revision FROM entries WHERE namespace = ?1 AND type = ?2",
                &[&ns, &ty],
            )?;
            Ok(Listing { revision, entries: rows.into_iter().map(|(_, k, e)| (k, e)).collect() })
        })
        .await
    }

    async fn namespace(&self, namespace: &str) -> Result<NamespaceTree, Error> {
        validate_namespace(namespace)?;
        let ns = namespace.to_string();
        self.read(move |conn| {
            let revision = meta(conn, "revision")?;
            let rows = read_entries(
                conn,
                "SELECT type, key, value, create_revision, mod_revision FROM entries WHERE namespace = ?1",
                &[&ns],
            )?;
            let mut types: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
            for (ty, key, entry) in rows {
                types.entry(ty).or_default().insert(key, entry);
            }
            Ok(NamespaceTree { revision, types })
        })
        .await
    }

    async fn namespaces(&self) -> Result<Vec<String>, Error> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT DISTINCT namespace FROM entries ORDER BY namespace")
                .map_err(sql("listing namespaces"))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(sql("listing namespaces"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(sql("listing namespaces"))
        })
        .await
    }

    async fn apply(&self, batch: Batch) -> Result<Revision, Error> {
        batch.validate(&self.limits)?;
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Command::Apply(batch, tx))
            .map_err(|_| Error::Unavailable("the sqlite writer has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the sqlite writer stopped before answering".into()))?
    }

    async fn watch(&self, from: Revision, filter: WatchFilter) -> Result<Watch, Error> {
        self.hub.watch(from, filter)
    }

    async fn close(&self) -> Result<(), Error> {
        let Some(sender) = self
            .writer
            .lock()
            .expect("sqlite writer lock poisoned")
            .take()
        else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        if sender.send(Command::Close(tx)).is_err() {
            return Ok(());
        }
        let result = rx.await.unwrap_or(Ok(()));
        let thread = self
            .thread
            .lock()
            .expect("sqlite thread lock poisoned")
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Dropping the sender ends the writer loop after the queued batches.
        if let Ok(mut writer) = self.writer.lock() {
            writer.take();
        }
    }
}
