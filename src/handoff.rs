//! A bounded `crossbeam-channel` queue between two pipeline stages whose consumer, once the
//! queue is empty, yields once and then sleeps, instead of spinning.
//!
//! `crossbeam_channel::Receiver::recv` spins (about 130 rounds of `spin_loop`) and then
//! yields four times before it parks. That suits a consumer with a core of its own. A
//! pipeline stage on a machine with fewer cores than runnable threads (two cores shared
//! by readers, stages and, in a benchmark, the clients) burns that spinning on a core
//! that the thread it waits for needs. Measured on `echo-server --mode pipeline` at 16
//! connections (2 vCPUs, `echo-bench`, four rounds each): crossbeam's `recv` 71–93 k
//! messages/s; sleep at once 73–88 k; one yield and then sleep 82–93 k; three yields
//! 82–94 k; 200 spins first 66–82 k. A profile of the crossbeam version had the stage threads
//! spending 14% of the server's CPU in `recv`'s spin loop and `sched_yield`.
//!
//! The queue itself, its bounds and its blocking `send` are crossbeam's. What this adds
//! is a doorbell: the consumer says it is going to sleep, checks the queue once more and
//! parks; a producer that has just sent rings only when the consumer said so (one
//! atomic load otherwise). A `SeqCst` fence on each side, between its write and its
//! check, keeps a wake-up from being lost (each side sees the other's write, or its own
//! check catches up). Every producer handle rings as it is dropped, so a sleeping consumer
//! also learns when the last one is gone.

use crossbeam_channel::{Receiver, Sender, TryIter, TryRecvError};
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, Thread};
use std::time::Instant;

/// Why [`HandoffReceiver::recv_deadline`] returned without an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The deadline passed.
    Timeout,
    /// The queue is empty and every sender is gone.
    Disconnected,
}

/// The consumer's side of the doorbell.
#[derive(Debug, Default)]
struct Bell {
    /// Set by the consumer before its last look at the queue, cleared by whoever wakes it.
    sleeping: AtomicBool,
    /// The thread that receives, recorded before it first sleeps (again, if the receiver
    /// has moved to another thread since).
    consumer: Mutex<Option<Thread>>,
}

impl Bell {
    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            let consumer = self.consumer.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(t) = &*consumer {
                t.unpark();
            }
        }
    }
}

/// A bounded queue of `cap` items (at least one); see the module docs.
///
/// ```
/// use switchboard::handoff;
///
/// let (tx, rx) = handoff::bounded(2);
/// let consumer = std::thread::spawn(move || {
///     // `for` ends once the queue is empty and every sender is gone.
///     (&rx).into_iter().map(|n: u64| n * n).sum::<u64>()
/// });
/// for n in 1..=10 {
///     tx.send(n).unwrap(); // waits while two items are queued
/// }
/// drop(tx);
/// assert_eq!(consumer.join().unwrap(), 385);
/// ```
///
/// A capacity of 0 is taken as 1: crossbeam's zero-capacity channel is a rendezvous whose
/// `send` returns only once a receiver has taken the item, and a receiver asleep on the
/// doorbell would never be rung.
pub fn bounded<T>(cap: usize) -> (HandoffSender<T>, HandoffReceiver<T>) {
    let (tx, rx) = crossbeam_channel::bounded(cap.max(1));
    let bell = Arc::new(Bell::default());
    (
        HandoffSender {
            tx: Some(tx),
            bell: Arc::clone(&bell),
        },
        HandoffReceiver {
            rx,
            bell,
            one_thread: PhantomData,
        },
    )
}

/// The producing end: cloneable, like crossbeam's.
pub struct HandoffSender<T> {
    /// `None` only inside `drop`, which lets go of it before ringing.
    tx: Option<Sender<T>>,
    bell: Arc<Bell>,
}

impl<T> fmt::Debug for HandoffSender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandoffSender")
            .field("tx", &self.tx)
            .finish()
    }
}

impl<T> fmt::Debug for HandoffReceiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandoffReceiver")
            .field("rx", &self.rx)
            .finish()
    }
}

impl<T> Clone for HandoffSender<T> {
    fn clone(&self) -> Self {
        HandoffSender {
            tx: self.tx.clone(),
            bell: Arc::clone(&self.bell),
        }
    }
}

impl<T> HandoffSender<T> {
    /// Sends `item`, waiting while the queue is full, and wakes the consumer if it sleeps.
    ///
    /// # Errors
    /// The item back when the receiver is gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        let Some(tx) = &self.tx else {
            return Err(item);
        };
        tx.send(item).map_err(|e| e.into_inner())?;
        self.bell.ring();
        Ok(())
    }
}

impl<T> Drop for HandoffSender<T> {
    fn drop(&mut self) {
        // The consumer may be asleep waiting for the disconnection. Let go of the queue
        // first, then ring: ringing first would let it look, find the queue still
        // connected, and sleep through the disconnection (a spare wake-up costs one check).
        drop(self.tx.take());
        self.bell.ring();
    }
}

/// The consuming end. It can move to another thread but not be shared (`!Sync`): the
/// doorbell wakes one thread, the one that went to sleep.
pub struct HandoffReceiver<T> {
    rx: Receiver<T>,
    bell: Arc<Bell>,
    one_thread: PhantomData<Cell<()>>,
}

impl<T> HandoffReceiver<T> {
    /// The next item, waiting (yield once, then sleep) while the queue is empty; `None`
    /// once the queue is empty and every sender is gone.
    pub fn recv(&self) -> Option<T> {
        self.recv_until(None).ok()
    }

    /// As [`recv`](HandoffReceiver::recv), but waiting no later than `deadline`.
    ///
    /// # Errors
    /// [`Waited::Timeout`] at the deadline, [`Waited::Disconnected`] once the queue is empty
    /// and every sender is gone.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, Waited> {
        self.recv_until(Some(deadline))
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Result<T, Waited> {
        match self.rx.try_recv() {
            Ok(item) => return Ok(item),
            Err(TryRecvError::Disconnected) => return Err(Waited::Disconnected),
            Err(TryRecvError::Empty) => {}
        }
        // Another runnable thread (often the producer) gets the core first.
        thread::yield_now();
        {
            let mut consumer = self
                .bell
                .consumer
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let me = thread::current();
            if consumer.as_ref().map(Thread::id) != Some(me.id()) {
                *consumer = Some(me);
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(item) => return Ok(item),
                Err(TryRecvError::Disconnected) => return Err(Waited::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            self.bell.sleeping.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            match self.rx.try_recv() {
                Ok(item) => {
                    self.bell.sleeping.store(false, Ordering::Relaxed);
                    return Ok(item);
                }
                Err(TryRecvError::Disconnected) => return Err(Waited::Disconnected),
                // A ring after the fence unparks this thread, before or during `park`.
                // `park` may also return for nothing (a spare token, or spuriously): the
                // flag is cleared so no producer rings for a consumer that is awake.
                Err(TryRecvError::Empty) => {
                    match deadline {
                        None => thread::park(),
                        Some(deadline) => {
                            let left = deadline.saturating_duration_since(Instant::now());
                            if left.is_zero() {
                                self.bell.sleeping.store(false, Ordering::Relaxed);
                                return Err(Waited::Timeout);
                            }
                            thread::park_timeout(left);
                        }
                    }
                    self.bell.sleeping.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    /// The items queued now, without waiting.
    pub fn try_iter(&self) -> TryIter<'_, T> {
        self.rx.try_iter()
    }
}

impl<T> Iterator for &HandoffReceiver<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        self.recv()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs `f` on its own thread and fails the test if it takes over 30 s: a lost
    /// wake-up shows up as a failure, not as a test run that never ends.
    fn within<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread::spawn(move || tx.send(f()).unwrap());
        rx.recv_timeout(Duration::from_secs(30))
            .expect("stuck: a wake-up was lost")
    }

    #[test]
    fn items_arrive_in_order_then_the_end() {
        let got = within(|| {
            let (tx, rx) = bounded(4);
            let producer = thread::spawn(move || {
                for i in 0..10_000u32 {
                    tx.send(i).unwrap();
                }
            });
            let got: Vec<u32> = (&rx).collect();
            producer.join().unwrap();
            got
        });
        assert_eq!(got, (0..10_000).collect::<Vec<_>>());
    }

    #[test]
    fn no_wake_up_is_lost_between_a_sleeping_consumer_and_many_producers() {
        // Each item is sent when the consumer is most likely asleep or falling asleep; a
        // lost wake-up leaves it parked, the producers blocked on the one-slot queue, and
        // `within` fails.
        let sum = within(|| {
            let (tx, rx) = bounded::<u64>(1);
            let consumer = thread::spawn(move || (&rx).sum::<u64>());
            let producers: Vec<_> = (0..4u64)
                .map(|p| {
                    let tx = tx.clone();
                    thread::spawn(move || {
                        for i in 0..2_000 {
                            if i % 64 == 0 {
                                thread::sleep(Duration::from_micros(50));
                            }
                            tx.send(p * 10_000 + i).unwrap();
                        }
                    })
                })
                .collect();
            drop(tx);
            for p in producers {
                p.join().unwrap();
            }
            consumer.join().unwrap()
        });
        let expected: u64 = (0..4u64)
            .map(|p| (0..2_000).map(|i| p * 10_000 + i).sum::<u64>())
            .sum();
        assert_eq!(sum, expected);
    }

    #[test]
    fn a_sleeping_consumer_learns_that_the_last_sender_is_gone() {
        let (tx, rx) = bounded::<()>(8);
        let consumer = thread::spawn(move || within(move || rx.recv().is_none()));
        thread::sleep(Duration::from_millis(50));
        drop(tx);
        assert!(consumer.join().unwrap());
    }

    #[test]
    fn a_full_queue_holds_the_producer_until_the_consumer_takes_one() {
        let (tx, rx) = bounded(1);
        tx.send(1).unwrap();
        let producer = thread::spawn(move || tx.send(2).is_ok());
        thread::sleep(Duration::from_millis(20));
        assert!(!producer.is_finished(), "send on a full queue must wait");
        assert_eq!(rx.recv(), Some(1));
        assert!(producer.join().unwrap());
        assert_eq!(rx.recv(), Some(2));
        assert_eq!(rx.recv(), None);
    }

    #[test]
    fn a_capacity_of_zero_still_wakes_a_sleeping_consumer() {
        let (tx, rx) = bounded::<u32>(0);
        let consumer = thread::spawn(move || within(move || rx.recv()));
        thread::sleep(Duration::from_millis(50));
        tx.send(7).unwrap();
        assert_eq!(consumer.join().unwrap(), Some(7));
    }

    #[test]
    fn a_receiver_moved_to_another_thread_is_woken_there() {
        let (tx, rx) = bounded::<u32>(4);
        let first = thread::spawn(move || {
            let got = rx.recv();
            (got, rx)
        });
        thread::sleep(Duration::from_millis(50));
        tx.send(1).unwrap();
        let (got, rx) = first.join().unwrap();
        assert_eq!(got, Some(1));
        let second = thread::spawn(move || within(move || rx.recv()));
        thread::sleep(Duration::from_millis(50));
        tx.send(2).unwrap();
        assert_eq!(second.join().unwrap(), Some(2));
    }
}
