//! Who gets a connection slot, and who may hold a request open: counted per source address,
//! so one host (or one IPv6 /64) cannot take what every node needs.
//!
//! A connection starts *unproven*. Unproven connections are capped per source and, all
//! together, below the connection cap, so a quarter of the slots stays free for node and
//! admin traffic. A request carrying a configured token *proves* its connection: it stops
//! counting against its source (many nodes behind one NAT are fine) and may use the reserve.
//!
//! Past those caps a connection gets a *probation* slot, at most a few per source, with a
//! short head deadline and no keep-alive: it may ask `/healthz` or `/readyz`, or anything
//! with a valid token; everything else gets 503. Past that too, it is closed at once. A probe
//! from its own address therefore finds a slot however many connections a few other addresses
//! hold; an outsider with more than 64 addresses churning probation can still crowd it
//! (specs/security.md lists this as open).
//!
//! Held requests (long-polls) from unproven sources are capped per source as well.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Probation slots in all.
const PROBATION: usize = 256;
/// Probation slots one source may hold.
const PROBATION_PER_SOURCE: usize = 4;

/// Where connections come from, as limits count them: an IPv4 address, or an IPv6 /64 (one
/// host's usual allocation; counting single IPv6 addresses would let a host use billions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source of a peer address.
    pub fn of(peer: SocketAddr) -> Self {
        match peer.ip() {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

/// What one source holds now.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    unproven: usize,
    probation: usize,
    holds: usize,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.unproven == 0 && self.probation == 0 && self.holds == 0
    }
}

/// The caps [`Gate`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Unproven connections one source may hold (0: no per-source cap).
    pub per_source: usize,
    /// Requests one unproven source may hold open (long-polls; 0: no per-source cap).
    pub holds_per_source: usize,
}

/// The shared bookkeeping of every connection and held request.
#[derive(Debug)]
pub struct Gate {
    limits: GateLimits,
    /// Every connection with a slot (unproven or proven).
    slots: Arc<Semaphore>,
    /// Unproven connections at most: the rest of `slots` is kept for proven ones.
    unproven_cap: usize,
    probation: Arc<Semaphore>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    unproven: usize,
    sources: HashMap<Source, Held>,
}

impl Gate {
    /// A gate with these caps.
    pub fn new(limits: GateLimits) -> Arc<Self> {
        let max = limits.max_connections.max(1);
        Arc::new(Self {
            limits,
            slots: Arc::new(Semaphore::new(max)),
            unproven_cap: (max - max / 4).max(1),
            probation: Arc::new(Semaphore::new(PROBATION)),
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain counters that no panic leaves half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection from `peer`, or `None`: close it at once.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Arc<Conn>> {
        let source = Source::of(peer);
        let mut state = self.state();
        let held = state.sources.get(&source).copied().unwrap_or_default();
        let per_source = self.limits.per_source;
        let (class, slot) = if (per_source == 0 || held.unproven < per_source)
            && state.unproven < self.unproven_cap
            && let Ok(slot) = self.slots.clone().try_acquire_owned()
        {
            state.unproven += 1;
            state.sources.entry(source).or_default().unproven += 1;
            (Class::Unproven, slot)
        } else if held.probation < PROBATION_PER_SOURCE
            && let Ok(slot) = self.probation.clone().try_acquire_owned()
        {
            state.sources.entry(source).or_default().probation += 1;
            (Class::Probation, slot)
        } else {
            return None;
        };
        Some(Arc::new(Conn {
            gate: self.clone(),
            source,
            class: Mutex::new(class),
            _slot: slot,
        }))
    }

    /// Whether one more request from `source` may be held open (unproven requests only).
    fn hold(self: &Arc<Self>, source: Source) -> Option<Hold> {
        let mut state = self.state();
        let held = state.sources.entry(source).or_default();
        let cap = self.limits.holds_per_source;
        if cap != 0 && held.holds >= cap {
            return None;
        }
        held.holds += 1;
        Some(Hold {
            gate: Some((self.clone(), source)),
        })
    }

    fn release(&self, source: Source, change: impl FnOnce(&mut Held, &mut usize)) {
        let mut state = self.state();
        let State { unproven, sources } = &mut *state;
        if let Some(held) = sources.get_mut(&source) {
            change(held, unproven);
            if held.is_empty() {
                sources.remove(&source);
            }
        }
    }
}

/// The kind of slot a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// No request on it has shown a token yet: counted against its source.
    Unproven,
    /// A request on it showed a valid token.
    Proven,
    /// Past the caps: `/healthz` or `/readyz`, or one request with a token, then closed.
    Probation,
}

/// One accepted connection's place in the [`Gate`]; released when the connection ends.
#[derive(Debug)]
pub struct Conn {
    gate: Arc<Gate>,
    source: Source,
    class: Mutex<Class>,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    fn class(&self) -> std::sync::MutexGuard<'_, Class> {
        self.class.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this connection is on probation (short deadline, one request, no keep-alive).
    pub fn on_probation(&self) -> bool {
        *self.class() == Class::Probation
    }

    /// A request on this connection showed a valid token: the connection stops counting
    /// against its source.
    pub fn prove(&self) {
        let mut class = self.class();
        if *class == Class::Unproven {
            *class = Class::Proven;
            drop(class);
            self.gate.release(self.source, |held, unproven| {
                held.unproven -= 1;
                *unproven -= 1;
            });
        }
    }

    /// A permit to hold one request open: always for a proven request, else within the
    /// source's share; `None` means "answer now, do not hold".
    pub fn hold(&self, proven: bool) -> Option<Hold> {
        if proven {
            return Some(Hold::unlimited());
        }
        self.gate.hold(self.source)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let class = *self.class.get_mut().unwrap_or_else(|e| e.into_inner());
        match class {
            Class::Unproven => self.gate.release(self.source, |held, unproven| {
                held.unproven -= 1;
                *unproven -= 1;
            }),
            Class::Probation => self
                .gate
                .release(self.source, |held, _| held.probation -= 1),
            Class::Proven => {}
        }
    }
}

/// A held request's share of its source; released when dropped.
#[derive(Debug)]
pub struct Hold {
    gate: Option<(Arc<Gate>, Source)>,
}

impl Hold {
    /// A hold counted against no source (a proven request, or a router served elsewhere).
    pub fn unlimited() -> Self {
        Self { gate: None }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some((gate, source)) = self.gate.take() {
            gate.release(source, |held, _| held.holds -= 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_connections: usize, per_source: usize, holds_per_source: usize) -> Arc<Gate> {
        Gate::new(GateLimits {
            max_connections,
            per_source,
            holds_per_source,
        })
    }

    fn peer(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 40000))
    }

    #[test]
    fn a_source_past_its_share_gets_probation_then_nothing_and_others_still_get_slots() {
        let gate = gate(100, 2, 1);
        let held: Vec<_> = (0..2).map(|_| gate.admit(peer(1)).unwrap()).collect();
        assert!(held.iter().all(|c| !c.on_probation()));
        let probation: Vec<_> = (0..PROBATION_PER_SOURCE)
            .map(|_| gate.admit(peer(1)).expect("a probation slot"))
            .collect();
        assert!(probation.iter().all(|c| c.on_probation()));
        assert!(gate.admit(peer(1)).is_none(), "past probation: closed");
        let other = gate
            .admit(peer(2))
            .expect("another source has its own share");
        assert!(!other.on_probation());
        // A token proves the connection: it stops counting, and its source gets a slot back.
        held[0].prove();
        assert!(!gate.admit(peer(1)).unwrap().on_probation());
    }

    #[test]
    fn unproven_connections_leave_a_quarter_of_the_slots_to_proven_ones() {
        let gate = gate(8, 0, 0);
        let unproven: Vec<_> = (1..=6).map(|i| gate.admit(peer(i)).unwrap()).collect();
        assert!(unproven.iter().all(|c| !c.on_probation()));
        let next = gate.admit(peer(7)).unwrap();
        assert!(
            next.on_probation(),
            "three quarters of 8 are unproven already"
        );
        drop(unproven);
        assert!(
            gate.state().sources.len() == 1,
            "released sources are forgotten"
        );
    }

    #[test]
    fn held_requests_are_capped_per_source_and_zero_means_no_cap() {
        let capped = gate(100, 10, 2);
        let conn = capped.admit(peer(1)).unwrap();
        let holds: Vec<_> = (0..2).map(|_| conn.hold(false).unwrap()).collect();
        assert!(
            conn.hold(false).is_none(),
            "a third long-poll is answered at once"
        );
        assert!(
            conn.hold(true).is_some(),
            "a request with a token is always held"
        );
        drop(holds);
        assert!(conn.hold(false).is_some(), "released holds free the share");

        assert_eq!(
            super::super::default_holds_per_source(1),
            1,
            "never 0 (no cap)"
        );
        assert_eq!(super::super::default_holds_per_source(0), 0);
        assert_eq!(super::super::default_holds_per_source(64), 32);

        let uncapped = gate(100, 0, 0);
        let conn = uncapped.admit(peer(1)).unwrap();
        let holds: Vec<_> = (0..50).filter_map(|_| conn.hold(false)).collect();
        assert_eq!(holds.len(), 50);
    }
}
