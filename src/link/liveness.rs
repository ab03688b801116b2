//! Dead-peer detection and redial: [`Liveness`] and [`redial`], re-exported by `link`.

use super::{Backoff, Timeouts};
use crate::log_info;
use crate::outbox::{Bytes, OutboxConfig};
use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

/// The framework's default dead-peer bound: a link silent this long is dead.
pub const DEAD_PEER: Duration = Duration::from_secs(3);

/// How often a wait between dials checks that the peer is still wanted.
const WANTED_POLL: Duration = Duration::from_millis(20);

/// A link's dead-peer bound and the heartbeat that keeps a quiet link alive within it: with
/// [`redial`], the two halves of a link that heals by itself.
///
/// - [`Liveness`]: a bound (default [`DEAD_PEER`], 3 s; servers take `--link-timeout SECS`)
///   within which a silent peer is declared dead. Each end's writer sends a heartbeat frame
///   whenever it has sent nothing for a third of the bound ([`Liveness::outbox`]), and each
///   end's reader gives up after the bound without a frame ([`Liveness::timeouts`] sets
///   [`Timeouts::idle`]; the reader loop then ends in [`End::Lost`](crate::link::End::Lost) with a
///   timeout). Two heartbeats may be lost or late before a live peer is taken for dead.
/// - [`redial`]: the supervisor loop of one configured or known peer: dial, serve the link
///   until it ends, wait [`Backoff::next_delay`] (at most [`MAX_RETRY`](crate::link::MAX_RETRY)),
///   dial again, for as long as the service still wants the peer. The wait is cut short as
///   soon as the peer is no longer wanted, so a server shutting down joins these threads
///   promptly.
///
/// ```
/// use switchboard::link::{self, Backoff, Liveness};
/// use std::cell::Cell;
/// use std::time::Duration;
///
/// let liveness = Liveness::new(Duration::from_millis(900));
/// assert_eq!(liveness.heartbeat_interval(), Duration::from_millis(300));
///
/// // A peer refused twice, then up once, then no longer wanted.
/// let tries = Cell::new(0);
/// let mut served = Vec::new();
/// let mut backoff = Backoff::seeded(Duration::from_millis(1), Duration::from_millis(4), 1);
/// let report = link::redial(
///     "demo",
///     &mut backoff,
///     || tries.get() < 3,
///     || {
///         tries.set(tries.get() + 1);
///         if tries.get() < 3 { Err("refused") } else { Ok(tries.get()) }
///     },
///     |link| served.push(link),
/// );
/// assert_eq!(served, [3]);
/// assert_eq!((report.attempts, report.links), (3, 1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A peer that sends nothing, heartbeats included, for this long is dead.
    pub bound: Duration,
}

impl Default for Liveness {
    /// [`DEAD_PEER`].
    fn default() -> Self {
        Liveness { bound: DEAD_PEER }
    }
}

impl Liveness {
    /// A bound of `bound` (at least 3 ms, so the heartbeat interval is not zero).
    pub fn new(bound: Duration) -> Liveness {
        Liveness {
            bound: bound.max(Duration::from_millis(3)),
        }
    }

    /// How long a writer may stay silent before it sends a heartbeat: a third of the bound.
    pub fn heartbeat_interval(&self) -> Duration {
        self.bound / 3
    }

    /// `base` with reads bounded by the dead-peer bound ([`Timeouts::idle`]), and connect and
    /// handshake no longer than it: a peer that does not answer within the bound is as dead
    /// as one that stops talking.
    pub fn timeouts(&self, base: Timeouts) -> Timeouts {
        Timeouts {
            connect: base.connect.min(self.bound),
            handshake: base.handshake.min(self.bound),
            write: base.write,
            idle: Some(self.bound),
        }
    }

    /// `config` with `frame` as its heartbeat, sent after every [`Self::heartbeat_interval`]
    /// without other traffic.
    pub fn outbox(&self, config: OutboxConfig, frame: Bytes) -> OutboxConfig {
        config.heartbeat(self.heartbeat_interval(), frame)
    }
}

/// What a [`redial`] loop did, when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redials {
    /// Dials tried.
    pub attempts: u64,
    /// Links that came up (and were served).
    pub links: u64,
}

/// The supervisor loop of one peer (example: [`Liveness`]'s docs): while `wanted()`,
/// `dial()`; a link that comes up resets `backoff` and is given to `serve`, which returns
/// when the link ends; after a failed dial or an ended link, waits `backoff.next_delay()`
/// (returning early once `wanted()` is false) and dials again.
///
/// `name` prefixes the log lines: the first failure after a link (or at the start) is
/// logged, repeats of it are not, and a link that comes back after failures says so. A
/// dial that finds the peer must not be dialled again (it left, or restarted as someone
/// else) makes `wanted()` false, and the loop ends.
pub fn redial<L, E: Display>(
    name: &str,
    backoff: &mut Backoff,
    mut wanted: impl FnMut() -> bool,
    mut dial: impl FnMut() -> Result<L, E>,
    mut serve: impl FnMut(L),
) -> Redials {
    let mut report = Redials::default();
    let mut failing_since: Option<(Instant, u64)> = None;
    while wanted() {
        report.attempts += 1;
        match dial() {
            Ok(link) => {
                if let Some((since, failures)) = failing_since.take() {
                    log_info!(
                        "{name}: linked again after {failures} failed dials in {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                }
                backoff.reset();
                report.links += 1;
                serve(link);
            }
            Err(e) => match &mut failing_since {
                Some((_, failures)) => *failures += 1,
                None => {
                    log_info!("{name}: cannot link: {e}; redialling");
                    failing_since = Some((Instant::now(), 1));
                }
            },
        }
        let until = Instant::now() + backoff.next_delay();
        while wanted() {
            let now = Instant::now();
            if now >= until {
                break;
            }
            thread::sleep((until - now).min(WANTED_POLL));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn the_bound_sets_the_heartbeat_and_caps_every_wait() {
        let l = Liveness::new(Duration::from_secs(3));
        assert_eq!(l.heartbeat_interval(), Duration::from_secs(1));
        let t = l.timeouts(Timeouts::uniform(Duration::from_secs(10)));
        assert_eq!(t.idle, Some(Duration::from_secs(3)));
        assert_eq!(t.connect, Duration::from_secs(3));
        assert_eq!(t.handshake, Duration::from_secs(3));
        assert_eq!(
            t.write,
            Duration::from_secs(10),
            "writes are not the bound's"
        );
        assert_eq!(Liveness::default().bound, DEAD_PEER);
        assert!(!Liveness::new(Duration::ZERO).heartbeat_interval().is_zero());
        let config = l.outbox(OutboxConfig::new("t", 4), Bytes::from(&b"beat\n"[..]));
        assert_eq!(config.heartbeat.unwrap().0, Duration::from_secs(1));
    }

    /// Over a real socket: an acceptor reading with the bound's timeouts, a dialer writing
    /// nothing for three bounds, with and without the heartbeat.
    #[test]
    fn a_heartbeat_keeps_a_quiet_link_alive_past_the_bound_and_silence_ends_it() {
        use crate::framing::{FrameReader, Framing};
        use crate::link::{accept, End, SharedStream, Verdict};
        use crate::outbox::Outbox;
        use std::net::{TcpListener, TcpStream};
        use std::ops::ControlFlow;
        use std::sync::Arc;

        // A bound long enough that a loaded test machine does not starve a heartbeat of it.
        let liveness = Liveness::new(Duration::from_millis(900));
        for beating in [true, false] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let acceptor = thread::spawn(move || {
                let stream = Arc::new(listener.accept().unwrap().0);
                let reader = FrameReader::new(SharedStream(Arc::clone(&stream)), Framing::Line);
                let timeouts = liveness.timeouts(Timeouts::uniform(Duration::from_secs(5)));
                let welcome = Verdict::Welcome(b"ok\n".to_vec());
                let mut link = accept(&stream, reader, &timeouts, welcome)
                    .unwrap()
                    .unwrap();
                let mut beats = 0;
                let end = link.read_frames("t", |_| {
                    beats += 1;
                    ControlFlow::<()>::Continue(())
                });
                let timed_out = matches!(end, End::Lost(e) if e.is_timeout());
                (beats, timed_out)
            });
            let client = Arc::new(TcpStream::connect(addr).unwrap());
            let mut config = OutboxConfig::new("t", 4);
            if beating {
                config = liveness.outbox(config, Bytes::from(&b"heartbeat\n"[..]));
            }
            let (outbox, writer) = Outbox::new(client, config);
            let writer = thread::spawn(move || writer.run());
            thread::sleep(liveness.bound * 3);
            drop(outbox);
            writer.join().unwrap();
            let (beats, timed_out) = acceptor.join().unwrap();
            if beating {
                assert!(!timed_out, "a beating link outlived three bounds");
                assert!(beats >= 6, "{beats} heartbeats in three bounds");
            } else {
                assert!(timed_out && beats == 0, "a silent link dies at the bound");
            }
        }
    }

    #[test]
    fn redial_waits_at_most_the_cap_and_stops_as_soon_as_unwanted() {
        // Never up: every wait is within the cap, and the loop ends when unwanted.
        let started = Instant::now();
        let tries = Cell::new(0u32);
        let mut backoff = Backoff::seeded(Duration::from_millis(5), Duration::from_millis(40), 3);
        let report = redial(
            "t",
            &mut backoff,
            || tries.get() < 6,
            || {
                tries.set(tries.get() + 1);
                Err::<(), _>("refused")
            },
            |()| unreachable!("never up"),
        );
        assert_eq!(
            report,
            Redials {
                attempts: 6,
                links: 0
            }
        );
        assert!(started.elapsed() < Duration::from_secs(2));

        // A long wait is cut short once the peer is no longer wanted.
        let started = Instant::now();
        let deadline = started + Duration::from_millis(100);
        let mut backoff = Backoff::seeded(Duration::from_secs(60), Duration::from_secs(60), 3);
        let report = redial(
            "t",
            &mut backoff,
            || Instant::now() < deadline,
            || Err::<(), _>("refused"),
            |()| {},
        );
        assert_eq!(report.attempts, 1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the 30-60 s wait was cut short"
        );
    }

    #[test]
    fn a_link_that_comes_up_resets_the_backoff() {
        // Up at the 4th try, then failing again: the wait after the link is the first one.
        let tries = Cell::new(0u32);
        let mut backoff = Backoff::seeded(Duration::from_millis(1), Duration::from_secs(60), 5);
        let mut served = 0;
        redial(
            "t",
            &mut backoff,
            || tries.get() < 4,
            || {
                tries.set(tries.get() + 1);
                if tries.get() == 4 {
                    Ok(())
                } else {
                    Err("refused")
                }
            },
            |()| served += 1,
        );
        assert_eq!(served, 1);
        // Reset at the link, then one next_delay for the wait after it: the bound doubled once.
        assert!(backoff.next_delay() <= Duration::from_millis(4));
    }
}
