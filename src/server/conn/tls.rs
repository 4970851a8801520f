//! A listener that accepts TCP and hands out TLS streams, handshaking off the accept path
//! within bounds: a connection is accepted at once (never left in the backlog behind a
//! full set of handshakes), must send its first byte within a moment, and must finish its
//! handshake within a deadline; handshakes in flight are capped per source and in all. A
//! source that opens silent sockets holds at most a few handshake slots, briefly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

use super::gate::Source;

/// Longest a new connection may stay silent before its first byte (a client's hello comes
/// at once).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; past it a new connection is closed at once.
const MAX_HANDSHAKES: usize = 512;
/// Handshakes in flight from one source.
const HANDSHAKES_PER_SOURCE: usize = 8;

/// Handshakes in flight, in all and per source.
#[derive(Debug, Default)]
struct InFlight {
    total: usize,
    sources: HashMap<Source, usize>,
}

/// One handshake's place in [`InFlight`]; released when dropped.
struct Slot {
    in_flight: Arc<Mutex<InFlight>>,
    source: Source,
}

impl Slot {
    fn take(in_flight: &Arc<Mutex<InFlight>>, source: Source) -> Option<Self> {
        let mut counts = in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let mine = counts.sources.get(&source).copied().unwrap_or(0);
        if counts.total >= MAX_HANDSHAKES || mine >= HANDSHAKES_PER_SOURCE {
            return None;
        }
        counts.total += 1;
        *counts.sources.entry(source).or_default() += 1;
        Some(Self {
            in_flight: in_flight.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if let Some(mine) = counts.sources.get_mut(&self.source) {
            *mine -= 1;
            if *mine == 0 {
                counts.sources.remove(&self.source);
            }
        }
    }
}

/// Accepts TCP and hands out TLS streams; handshakes run in their own tasks.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Wraps a bound listener.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let in_flight = Arc::new(Mutex::new(InFlight::default()));
        let task = tokio::spawn(async move {
            // Out of descriptors and the like: back off instead of spinning.
            let mut backoff =
                crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => {
                        backoff.reset();
                        accepted
                    }
                    Err(err) => {
                        let pause = backoff.fail();
                        tracing::warn!(error = %err, retry_in = ?pause, "accept failed");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                };
                let Some(slot) = Slot::take(&in_flight, Source::of(peer)) else {
                    tracing::debug!(%peer, "closing a connection past the handshake slots");
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Some(stream) = handshake(&acceptor, tcp, peer).await {
                        let _ = tx.send((stream, peer)).await;
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor: task,
        })
    }
}

/// The handshake of one connection within its deadlines, or `None` (logged at debug).
async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.peek(&mut first)).await {
        Ok(Ok(1..)) => {}
        Ok(_) => return None,
        Err(_) => {
            tracing::debug!(%peer, "no TLS hello in time");
            return None;
        }
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task only ends when dropped with us; wait for shutdown meanwhile.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
