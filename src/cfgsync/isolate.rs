//! Renders of templates whose values could grow without bound (see
//! [`growth`](super::template::growth)) run in child processes under an address-space limit.
//! A template that doubles a string in a loop, or joins a hundred thousand copies of a peer's
//! metadata, fails its own render when the child runs out of memory: that node gets 500 and
//! the server, and every other node, are untouched.
//!
//! Each child (`bootsync render-worker`, this same program) holds one epoch at a time: the
//! policy and the members, sent once, then asked for one node's files (or the shared files)
//! per request. Messages are JSON, each framed by its length. A child that dies or runs past
//! the render deadline is killed and started again at the next render.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;

use super::ArtifactFile;
use super::policy::{CompiledPolicy, Policy, RenderLimits};
use super::template::Scope;

/// The subcommand a child runs as.
pub const WORKER_COMMAND: &str = "render-worker";

/// Default address space of a render process.
pub const DEFAULT_RENDER_MEMORY: u64 = 512 << 20;

/// Largest message either side accepts.
const MAX_FRAME: usize = 256 << 20;

/// Time a render process gets beyond the render deadline before it is killed (the deadline
/// itself is checked inside, on every 64th write).
const GRACE: Duration = Duration::from_secs(2);

/// Where isolated renders run: this program, started as `render-worker`, limited to
/// `memory_bytes` of address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The program to start (the running `bootsync`, or a binary that calls `cli::main`).
    pub program: PathBuf,
    /// The address-space limit of each render process.
    pub memory_bytes: u64,
}

impl Isolation {
    /// Render processes of the running program, or `None` when it cannot be found.
    pub fn this_program(memory_bytes: u64) -> Option<Self> {
        std::env::current_exe().ok().map(|program| Self {
            program,
            memory_bytes,
        })
    }
}

/// One member as a render process gets it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Member {
    pub(super) identifier: String,
    pub(super) ip: IpAddr,
    pub(super) metadata: Value,
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// Holds this epoch from now on.
    Load {
        epoch: u64,
        policy: Box<Policy>,
        limits: RenderLimits,
        members: Vec<Member>,
    },
    /// The files of the member at `index`, or the shared files (`None`).
    Render { index: Option<usize>, budget: usize },
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Loaded,
    Files(Vec<ArtifactFile>),
    Failed(String),
}

/// The `Load` message of an epoch, serialised once and sent to each process that renders it.
pub(super) fn load_message(
    epoch: u64,
    policy: &CompiledPolicy,
    members: Vec<Member>,
) -> Result<Arc<Vec<u8>>, String> {
    let request = Request::Load {
        epoch,
        policy: Box::new(policy.policy().clone()),
        limits: policy.limits(),
        members,
    };
    serde_json::to_vec(&request)
        .map(Arc::new)
        .map_err(|err| format!("encoding the epoch for a render process: {err}"))
}

/// The render processes of one server.
#[derive(Debug)]
pub struct Workers {
    isolation: Isolation,
    /// Processes waiting for work. A render takes one out (or starts one) and puts it back
    /// when it answered, so no two renders ever share a process.
    idle: std::sync::Mutex<Vec<Worker>>,
    /// One permit per process that may exist.
    free: Arc<Semaphore>,
}

#[derive(Debug)]
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    loaded: Option<u64>,
}

impl Workers {
    /// At most `count` render processes, started when first needed.
    pub fn new(isolation: Isolation, count: usize) -> Self {
        Self {
            isolation,
            idle: std::sync::Mutex::default(),
            free: Arc::new(Semaphore::new(count.max(1))),
        }
    }

    /// Renders the member at `index` (or the shared files) of the epoch `load` describes, in
    /// a render process, within `budget` bytes and `deadline`.
    ///
    /// The caller waits for a process; once it has one, the exchange runs in a task of its
    /// own: a caller that goes away then (a node hanging up, a request deadline) leaves it to
    /// finish and put its process back, so hanging up cannot make the server stop and restart
    /// processes and load the whole epoch into each again. A caller that goes away while it
    /// still waits leaves nothing behind.
    pub(super) async fn render(
        self: &Arc<Self>,
        epoch: u64,
        load: Arc<Vec<u8>>,
        index: Option<usize>,
        budget: usize,
        deadline: Duration,
    ) -> Result<Vec<ArtifactFile>, String> {
        let permit = self
            .free
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "the render processes are shut down".to_string())?;
        let workers = self.clone();
        let exchange = tokio::spawn(async move {
            let _permit = permit;
            workers
                .exchange(epoch, &load, Request::Render { index, budget }, deadline)
                .await
        });
        exchange
            .await
            .unwrap_or_else(|err| Err(format!("the render task failed: {err}")))
    }

    /// One exchange with a process, by a caller holding a permit.
    async fn exchange(
        &self,
        epoch: u64,
        load: &[u8],
        request: Request,
        deadline: Duration,
    ) -> Result<Vec<ArtifactFile>, String> {
        // With the permit held, either an idle process exists or fewer than the allowed
        // number are alive: take the one that holds this epoch, else any, else start one.
        let taken = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let holder = idle.iter().position(|w| w.loaded == Some(epoch));
            holder
                .or(idle.len().checked_sub(1))
                .map(|at| idle.swap_remove(at))
        };
        let mut worker = match taken {
            Some(worker) => worker,
            None => self.spawn()?,
        };
        let asked =
            tokio::time::timeout(deadline + GRACE, worker.render(epoch, load, request)).await;
        // A process that failed is stopped and reaped before its permit is given back, so no
        // more than the allowed number are ever alive.
        let answer = match asked {
            Ok(Ok(Response::Files(files))) => Ok(files),
            Ok(Ok(Response::Failed(reason))) => Err(reason),
            Ok(Ok(Response::Loaded)) => {
                worker.stop().await;
                return Err("the render process answered out of turn (it was stopped)".into());
            }
            Ok(Err(_)) => {
                let why = self.why_died(&mut worker).await;
                worker.stop().await;
                return Err(why);
            }
            Err(_) => {
                worker.stop().await;
                return Err("the render passed its deadline (its process was stopped)".into());
            }
        };
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(worker);
        answer
    }

    fn spawn(&self) -> Result<Worker, String> {
        let mut child = Command::new(&self.isolation.program)
            .arg(WORKER_COMMAND)
            .arg("--memory")
            .arg(self.isolation.memory_bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                format!(
                    "cannot start a render process ({}): {err}",
                    self.isolation.program.display()
                )
            })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        Ok(Worker {
            child,
            stdin,
            stdout,
            loaded: None,
        })
    }

    /// Why a render process stopped answering, from how it ended.
    async fn why_died(&self, worker: &mut Worker) -> String {
        let status = tokio::time::timeout(Duration::from_secs(2), worker.child.wait()).await;
        let mib = self.isolation.memory_bytes >> 20;
        match status {
            // An allocation past the limit aborts the process.
            Ok(Ok(status)) if status.signal() == Some(6) => {
                format!("the render ran out of memory (its process may use {mib} MiB)")
            }
            Ok(Ok(status)) => format!("the render process ended: {status}"),
            _ => "the render process stopped answering".to_string(),
        }
    }
}

impl Worker {
    /// Kills the process and reaps it.
    async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    async fn render(
        &mut self,
        epoch: u64,
        load: &[u8],
        request: Request,
    ) -> std::io::Result<Response> {
        if self.loaded != Some(epoch) {
            self.loaded = None;
            write_frame(&mut self.stdin, load).await?;
            match read_frame(&mut self.stdout).await? {
                Response::Loaded => self.loaded = Some(epoch),
                other => return Ok(other),
            }
        }
        let request = serde_json::to_vec(&request).map_err(std::io::Error::other)?;
        write_frame(&mut self.stdin, &request).await?;
        read_frame(&mut self.stdout).await
    }
}

async fn write_frame(to: &mut ChildStdin, message: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(message.len()).map_err(std::io::Error::other)?;
    to.write_all(&len.to_be_bytes()).await?;
    to.write_all(message).await?;
    to.flush().await
}

async fn read_frame(from: &mut ChildStdout) -> std::io::Result<Response> {
    let len = from.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other("an oversized answer"));
    }
    let mut message = vec![0u8; len];
    from.read_exact(&mut message).await?;
    serde_json::from_slice(&message).map_err(std::io::Error::other)
}

/// The render process: limits its own address space, then answers requests on stdin until
/// it closes. Runs as `bootsync render-worker --memory BYTES`.
pub fn worker_main(memory_bytes: u64) -> ExitCode {
    if let Err(err) = rlimit::setrlimit(rlimit::Resource::AS, memory_bytes, memory_bytes) {
        eprintln!("error: render-worker cannot limit its memory: {err}");
        return ExitCode::FAILURE;
    }
    let (mut input, mut output) = (std::io::stdin().lock(), std::io::stdout().lock());
    let mut held: Option<(CompiledPolicy, Scope)> = None;
    loop {
        let message = match read_frame_blocking(&mut input) {
            Ok(Some(message)) => message,
            Ok(None) => return ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: render-worker: {err}");
                return ExitCode::FAILURE;
            }
        };
        let response = match serde_json::from_slice::<Request>(&message) {
            Ok(Request::Load {
                policy,
                limits,
                members,
                ..
            }) => match (*policy).compile_with(limits) {
                Ok(compiled) => {
                    let scope = Scope::new(
                        members
                            .iter()
                            .map(|m| (m.identifier.as_str(), m.ip, &m.metadata)),
                    );
                    held = Some((compiled, scope));
                    Response::Loaded
                }
                Err(problems) => {
                    held = None;
                    Response::Failed(problems.join("; "))
                }
            },
            Ok(Request::Render { index, budget }) => match &held {
                None => Response::Failed("no epoch is loaded".into()),
                Some((policy, scope)) => {
                    let files = match index {
                        Some(index) => policy.render_node(scope, index, budget),
                        None => policy.render_shared(scope),
                    };
                    match files {
                        Ok(files) => Response::Files(files),
                        Err(err) => Response::Failed(err.to_string()),
                    }
                }
            },
            Err(err) => Response::Failed(format!("a request that does not decode: {err}")),
        };
        let written = serde_json::to_vec(&response)
            .map_err(std::io::Error::other)
            .and_then(|answer| {
                output.write_all(&(answer.len() as u32).to_be_bytes())?;
                output.write_all(&answer)?;
                output.flush()
            });
        if let Err(err) = written {
            eprintln!("error: render-worker: {err}");
            return ExitCode::FAILURE;
        }
    }
}

fn read_frame_blocking(input: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other("an oversized request"));
    }
    let mut message = vec![0u8; len];
    input.read_exact(&mut message)?;
    Ok(Some(message))
}
