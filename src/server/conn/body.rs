//! Request bodies within bounds: every body byte buffered anywhere in the server is counted
//! against one budget, and a body must keep arriving (each piece within the body timeout) at
//! a minimum average rate, within a whole-request deadline. A body past any of these ends
//! its request with a clear error, and its bytes go back to the budget.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Why a body was cut off.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// The bytes already held for other requests' bodies fill the budget.
    #[error(
        "the server holds {budget} bytes of request bodies already (its budget); retry shortly"
    )]
    Busy {
        /// The budget, in bytes.
        budget: usize,
    },
    /// The body stopped, or came too slowly.
    #[error(
        "the request body came too slowly: {received} bytes in {elapsed:?} (the server needs the next piece within {piece:?}, {rate} bytes/s on average after that, and the whole request within {whole:?})"
    )]
    TooSlow {
        /// Bytes received.
        received: u64,
        /// Time since the body started.
        elapsed: Duration,
        /// The body timeout.
        piece: Duration,
        /// The minimum average rate.
        rate: u64,
        /// The whole-request deadline.
        whole: Duration,
    },
}

/// What every body is held to; one per server.
#[derive(Debug, Clone)]
pub struct BodyRules {
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    /// Longest wait for the next piece; also the grace before the rate counts.
    pub piece_timeout: Duration,
    /// Bytes per second, on average, after the grace.
    pub min_rate: u64,
    /// From the request's head to its last body byte.
    pub request_deadline: Duration,
}

impl BodyRules {
    /// Rules with a budget of `budget_bytes` for all bodies together.
    pub fn new(
        budget_bytes: usize,
        piece_timeout: Duration,
        min_rate: u64,
        request_deadline: Duration,
    ) -> Self {
        // A semaphore counts at most `usize::MAX >> 3` permits.
        let budget_bytes = budget_bytes.clamp(1, usize::MAX >> 3);
        Self {
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            piece_timeout,
            min_rate: min_rate.max(1),
            request_deadline,
        }
    }

    /// Bytes held by bodies now.
    pub fn held(&self) -> usize {
        self.budget_bytes - self.budget.available_permits()
    }

    /// `body`, held to these rules from now on, and whether it was read to its end (a
    /// connection whose request body was left unread cannot be used again).
    pub fn guard(&self, body: Body) -> (Body, Arc<AtomicBool>) {
        let now = Instant::now();
        let ended = Arc::new(AtomicBool::new(http_body::Body::is_end_stream(&body)));
        let guarded = Body::new(Guarded {
            inner: body,
            rules: self.clone(),
            held: None,
            received: 0,
            started: now,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + self.piece_timeout)),
            ended: ended.clone(),
        });
        (guarded, ended)
    }
}

struct Guarded {
    inner: Body,
    rules: BodyRules,
    held: Option<OwnedSemaphorePermit>,
    received: u64,
    started: Instant,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    ended: Arc<AtomicBool>,
}

impl Guarded {
    /// When the body fails if nothing more comes: the next piece is due, the average rate
    /// falls below the minimum, or the whole request is out of time.
    fn due(&self) -> Instant {
        let rules = &self.rules;
        let earned = Duration::from_secs_f64(self.received as f64 / rules.min_rate as f64);
        (self.last + rules.piece_timeout)
            .min(self.started + rules.piece_timeout + earned)
            .min(self.started + rules.request_deadline)
    }

    fn too_slow(&self) -> BodyError {
        BodyError::TooSlow {
            received: self.received,
            elapsed: self.started.elapsed(),
            piece: self.rules.piece_timeout,
            rate: self.rules.min_rate,
            whole: self.rules.request_deadline,
        }
    }

    fn take(&mut self, bytes: usize) -> Result<(), BodyError> {
        let busy = || BodyError::Busy {
            budget: self.rules.budget_bytes,
        };
        let count = u32::try_from(bytes).map_err(|_| busy())?;
        let permit = self
            .rules
            .budget
            .clone()
            .try_acquire_many_owned(count)
            .map_err(|_| busy())?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Ok(())
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(err) = this.take(data.len()) {
                        return Poll::Ready(Some(Err(axum::Error::new(err))));
                    }
                    this.received += data.len() as u64;
                    this.last = Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.ended.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                let due = this.due();
                if this.timer.deadline() != due {
                    this.timer.as_mut().reset(due);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(axum::Error::new(this.too_slow()))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The [`BodyError`] behind a failed body read, if that is what failed it.
pub fn body_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<BodyError>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    use super::*;

    fn rules(budget: usize) -> BodyRules {
        BodyRules::new(
            budget,
            Duration::from_secs(2),
            1000,
            Duration::from_secs(30),
        )
    }

    /// A body fed from a channel, as a slow client sends it.
    fn fed() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let stream = tokio_stream_of(rx).map(Ok::<_, std::io::Error>);
        (tx, Body::from_stream(stream))
    }

    fn tokio_stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> impl futures_util::Stream<Item = Bytes> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn bytes_count_against_the_budget_until_the_body_is_dropped() {
        let rules = rules(100);
        let (tx, body) = fed();
        let (mut first, _) = rules.guard(body);
        tx.send(Bytes::from(vec![b'x'; 60])).await.unwrap();
        first.frame().await.unwrap().unwrap();
        assert_eq!(rules.held(), 60);
        let (tx2, body2) = fed();
        let (mut second, _) = rules.guard(body2);
        tx2.send(Bytes::from(vec![b'y'; 60])).await.unwrap();
        let err = second.frame().await.unwrap().unwrap_err();
        assert_eq!(
            body_error(&err),
            Some(&BodyError::Busy { budget: 100 }),
            "{err}"
        );
        drop(first);
        assert_eq!(rules.held(), 0, "a dropped body gives its bytes back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_or_trickles_is_cut_off() {
        let rules = rules(1 << 20);
        let (_tx, body) = fed();
        let (mut silent, _) = rules.guard(body);
        let err = silent.frame().await.unwrap().unwrap_err();
        assert!(
            matches!(
                body_error(&err),
                Some(BodyError::TooSlow { received: 0, .. })
            ),
            "{err}"
        );

        // One byte every second: each piece is on time, the average is far below 1000/s.
        let (tx, body) = fed();
        let (mut trickle, _) = rules.guard(body);
        let feeder = tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if tx.send(Bytes::from_static(b"x")).await.is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        let failed = loop {
            match trickle.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => break err,
                None => panic!("the trickle was taken whole"),
            }
        };
        assert!(matches!(
            body_error(&failed),
            Some(BodyError::TooSlow { .. })
        ));
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_body_passes() {
        let rules = rules(1 << 20);
        let (tx, body) = fed();
        let (guarded, ended) = rules.guard(body);
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                tx.send(Bytes::from(vec![b'x'; 2000])).await.unwrap();
            }
        });
        let collected = guarded.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), 20_000);
        assert!(ended.load(Ordering::Relaxed), "read to its end");
    }
}
