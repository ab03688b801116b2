//! The peer's console output, written by a thread of its own.
//!
//! Why not write where the node decides a line: the node decides under the peer's one
//! lock, and a write to stdout blocks when nobody reads it (a terminal paused with
//! Ctrl-S, a pipe into a pager that is not scrolled). Blocked under the lock, the whole
//! peer would stop: no link's messages handled, no join answered, and the other members'
//! outboxes to it filling until they cut their links. Here the node only queues its
//! lines, in the order it decided them, and the printer thread writes them.
//!
//! Not an [`Outbox`](crate::outbox::Outbox): that drains into a socket, and a full one
//! closes its connection. An output has nothing to close, so a full queue drops lines
//! instead, and says so.
//!
//! The queue is bounded in bytes ([`OUTPUT_QUEUE`]), and what it holds is charged to the
//! peer's client memory budget (`--max-client-memory`) with its links' queues and read
//! buffers. Past the bound, or when the budget refuses the charge (the output holds the
//! most), a line is not queued but counted, and once there is room again a `[NOT SHOWN] N
//! line(s): the output was not being read` line takes the place of those lost, so the
//! output says where it has a gap. When a link holds more, the budget closes that link
//! instead: it is dialled again and its lines resent, while a line not shown is gone. When
//! the output holds the most as a link needs room, the budget closes the output's account:
//! nothing more is queued until what it held is written, and then it starts afresh.

use crate::budget::{Account, Budget, Charge};
use crate::group::Group;
use crate::log_info;
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of lines waiting for the output, at most: 2,000 lines of the longest text, so a
/// burst that an output read a little slowly falls behind by is kept whole (a test sends
/// a thousand of them at once to a peer whose output a test reads), and only an output
/// not read at all loses lines.
pub const OUTPUT_QUEUE: usize = 32 << 20;

/// What a queued line costs beyond its bytes: the string's header and allocation, the
/// channel's slot.
const PER_LINE: usize = 64;

/// One thing for the printer thread to write.
enum Item {
    Line(String),
    /// This many lines were not queued here.
    NotShown(u64),
}

impl Item {
    fn cost(&self) -> usize {
        match self {
            Item::Line(line) => line.len() + 1 + PER_LINE,
            Item::NotShown(_) => PER_LINE,
        }
    }
}

/// The node's side of the output: queues lines for the printer thread. Its owner
/// serialises the calls (the peer calls it under its lock), which is what orders the
/// lines.
pub(super) struct Printer {
    /// Each item with its charge to the budget, given back once it is written.
    lines: Sender<(Item, Option<Charge>)>,
    /// Bytes queued and not yet written, [`Item::cost`] each.
    queued: Arc<AtomicUsize>,
    /// Lines not queued since the last `[NOT SHOWN]` was.
    not_shown: u64,
    limit: usize,
    /// The output's share of the peer's client memory budget (none: not charged).
    account: Option<Account>,
    /// The budget and the account's label, for a fresh account once the budget closed
    /// this one (the output held the most when a link needed room).
    budget: Option<(Budget, String)>,
}

impl Printer {
    /// Starts the printer thread in `group`, writing to `output`, queueing at most `limit`
    /// bytes, each charged to `budget` (on an account labelled `label`) until written.
    /// Dropping the `Printer` lets the thread write what is queued and end.
    pub(super) fn start(
        output: Box<dyn Write + Send>,
        limit: usize,
        budget: Option<(&Budget, &str)>,
        group: &Group,
    ) -> io::Result<Printer> {
        let account = budget.map(|(b, label)| b.account(label, None));
        let budget = budget.map(|(b, label)| (b.clone(), label.to_owned()));
        let (lines, queue) = unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let written = Arc::clone(&queued);
        group
            .spawn("peer-output", move || write_out(output, &queue, &written))
            .map_err(io::Error::other)?;
        Ok(Printer {
            lines,
            queued,
            not_shown: 0,
            limit,
            account,
            budget,
        })
    }

    /// Queues `line`, or counts it as not shown when the queue is full.
    pub(super) fn print(&mut self, line: String) {
        if self.not_shown > 0 && self.push(Item::NotShown(self.not_shown)) {
            self.not_shown = 0;
        }
        if self.not_shown > 0 || !self.push(Item::Line(line)) {
            if self.not_shown == 0 {
                log_info!(
                    "peer: the output is not being read (its queue, or the client memory \
                     budget, is full); lines are dropped until it is"
                );
            }
            self.not_shown += 1;
        }
    }

    /// Queues `item` if it fits, and the budget covers it.
    fn push(&mut self, item: Item) -> bool {
        let cost = item.cost();
        let queued = self.queued.load(Ordering::Acquire);
        if queued + cost > self.limit {
            return false;
        }
        // Closed by the budget (it held the most when a link needed room): nothing more is
        // queued until what it held is written, then it starts afresh on a new account.
        if self.account.as_ref().is_some_and(Account::is_evicted) {
            if queued > 0 {
                return false;
            }
            self.account = self
                .budget
                .as_ref()
                .map(|(b, label)| b.account(label, None));
        }
        // Charged without waiting for evicted links' bytes to come back: the caller holds
        // the peer's lock.
        let charge = match self.account.as_ref().map(|a| a.charge_now(cost)) {
            None => None,
            Some(Ok(charge)) => Some(charge),
            Some(Err(_)) => return false,
        };
        self.queued.fetch_add(cost, Ordering::AcqRel);
        if self.lines.send((item, charge)).is_err() {
            // The thread has ended (its output failed): nothing will be written.
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }
}

/// The printer thread: writes each item as it comes, flushing whenever the queue is
/// empty; ends when the [`Printer`] is dropped and everything is written, or when the
/// output fails.
fn write_out(
    mut output: Box<dyn Write + Send>,
    queue: &Receiver<(Item, Option<Charge>)>,
    queued: &AtomicUsize,
) {
    // An item's charge is given back when it is dropped, once it is written.
    for (item, _charge) in queue {
        let cost = item.cost();
        let result = match &item {
            Item::Line(line) => writeln!(output, "{line}"),
            Item::NotShown(n) => writeln!(
                output,
                "[NOT SHOWN] {n} line(s): the output was not being read"
            ),
        };
        let result = result.and_then(|()| {
            if queue.is_empty() {
                output.flush()
            } else {
                Ok(())
            }
        });
        queued.fetch_sub(cost, Ordering::AcqRel);
        if let Err(e) = result {
            log_info!("peer: cannot write the output ({e}); nothing more is printed");
            return;
        }
    }
    let _ = output.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    /// An output that blocks every write until it is opened, and keeps what it got.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<(bool, String)>, Condvar)>);

    impl Gate {
        fn open(&self) {
            self.0 .0.lock().unwrap().0 = true;
            self.0 .1.notify_all();
        }

        fn text(&self) -> String {
            self.0 .0.lock().unwrap().1.clone()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, opened) = &*self.0;
            let mut st = lock.lock().unwrap();
            while !st.0 {
                st = opened.wait(st).unwrap();
            }
            st.1.push_str(&String::from_utf8_lossy(buf));
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_costs_lines_past_the_bound_and_says_where() {
        let gate = Gate::default();
        let group = Group::new("test");
        // Room for three lines of 10 bytes.
        let mut printer =
            Printer::start(Box::new(gate.clone()), 3 * (11 + PER_LINE), None, &group).unwrap();
        // A line counts against the bound until it is written, and the thread blocks
        // writing the first: three lines fill the queue and the next five find it full.
        // None of this waits.
        for i in 0..8 {
            printer.print(format!("line {i:05}"));
        }
        assert_eq!(printer.not_shown, 5);
        gate.open();
        // Once the queue has room, the gap is marked before the next line.
        crate::testing::eventually("the queue drains", || {
            printer.queued.load(Ordering::Acquire) == 0
        });
        printer.print("line 00008".into());
        drop(printer);
        assert!(group.join(Duration::from_secs(10)).stragglers.is_empty());
        assert_eq!(
            gate.text(),
            "line 00000\nline 00001\nline 00002\n\
             [NOT SHOWN] 5 line(s): the output was not being read\nline 00008\n"
        );
    }

    /// The queue is charged to the budget: past it lines are not shown, as past the
    /// queue's own bound, and what was queued is given back as it is written.
    #[test]
    fn a_blocked_output_holds_at_most_the_budget_and_gives_it_back() {
        let gate = Gate::default();
        let group = Group::new("test");
        let budget = Budget::new("test", 4 * (11 + PER_LINE));
        let charged = Some((&budget, "test: the output"));
        let mut printer =
            Printer::start(Box::new(gate.clone()), OUTPUT_QUEUE, charged, &group).unwrap();
        for i in 0..10 {
            printer.print(format!("line {i:05}"));
        }
        // Four lines fit the budget; the queue's own bound is far away.
        assert_eq!(printer.not_shown, 6);
        assert_eq!(budget.held(), 4 * (11 + PER_LINE));
        assert_eq!(budget.refusals(), 6);
        gate.open();
        crate::testing::eventually("the charges come back", || budget.held() == 0);
        printer.print("line 00010".into());
        drop(printer);
        assert!(group.join(Duration::from_secs(10)).stragglers.is_empty());
        assert_eq!(budget.held(), 0);
        assert_eq!(
            gate.text(),
            "line 00000\nline 00001\nline 00002\nline 00003\n\
             [NOT SHOWN] 6 line(s): the output was not being read\nline 00010\n"
        );
    }

    /// An output the budget closed (it held the most when a link needed room) queues
    /// nothing while what it held waits, then shows lines again, the gap marked.
    #[test]
    fn an_output_closed_by_the_budget_shows_lines_again_once_its_queue_is_written() {
        let gate = Gate::default();
        let group = Group::new("test");
        let line_cost = 11 + PER_LINE;
        let budget = Budget::new("test", 4 * line_cost);
        let charged = Some((&budget, "test: the output"));
        let mut printer =
            Printer::start(Box::new(gate.clone()), OUTPUT_QUEUE, charged, &group).unwrap();
        for i in 0..3 {
            printer.print(format!("line {i:05}"));
        }
        let link = budget.account("test: a link", None);
        let _held = link.charge(2 * line_cost).unwrap();
        assert_eq!(budget.evictions(), 1, "the output held the most");
        printer.print("line 00003".into());
        assert_eq!(printer.not_shown, 1);
        gate.open();
        crate::testing::eventually("the queue is written", || {
            printer.queued.load(Ordering::Acquire) == 0
        });
        printer.print("line 00004".into());
        drop(printer);
        assert!(group.join(Duration::from_secs(10)).stragglers.is_empty());
        assert_eq!(
            gate.text(),
            "line 00000\nline 00001\nline 00002\n\
             [NOT SHOWN] 1 line(s): the output was not being read\nline 00004\n"
        );
    }

    #[test]
    fn lines_are_written_in_order_and_all_of_them_before_the_thread_ends() {
        let gate = Gate::default();
        gate.open();
        let group = Group::new("test");
        let mut printer =
            Printer::start(Box::new(gate.clone()), OUTPUT_QUEUE, None, &group).unwrap();
        let lines: Vec<String> = (0..1000).map(|i| format!("[a] {i}")).collect();
        for line in &lines {
            printer.print(line.clone());
        }
        drop(printer);
        assert!(group.join(Duration::from_secs(10)).stragglers.is_empty());
        assert_eq!(gate.text(), lines.join("\n") + "\n");
    }
}
