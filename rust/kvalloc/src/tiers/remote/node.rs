//! One server's connection: opened on demand under the call's deadline, dropped after any
//! transport failure, and re-attempted with a doubling back-off (see the module docs of
//! `remote`). A single-server store has one node; a cluster store one per primary it has
//! learned of.

use std::time::{Duration, Instant};

use redis::Value;

use super::wire::{round_trip, time_left};
use super::{Failure, Hello};

/// The back-off settings (from the store's config).
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

pub(super) struct Node {
    /// `host:port`, as `CLUSTER SLOTS` and redirections name it.
    pub addr: String,
    client: redis::Client,
    conn: Option<redis::Connection>,
    /// No connection attempt before this instant (set after a failure).
    retry_at: Option<Instant>,
    /// Why the last connection failed, for the next `Unavailable` message.
    last_failure: String,
    /// Consecutive failures since the last reply (sets the back-off).
    failures: u32,
}

impl Node {
    pub fn new(addr: String, client: redis::Client) -> Node {
        Node {
            addr,
            client,
            conn: None,
            retry_at: None,
            last_failure: String::new(),
            failures: 0,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Opens and authenticates a connection if there is none, within `deadline`. Does not look
    /// at the back-off (see [`exchange`](Self::exchange)).
    pub fn connect_now(&mut self, hello: &Hello, deadline: Instant) -> Result<(), Failure> {
        if self.conn.is_some() {
            return Ok(());
        }
        let left = time_left(deadline).ok_or_else(Failure::late)?;
        let mut conn = self.client.get_connection_with_timeout(left)?;
        if hello.len() > 0 {
            let replies = round_trip(&mut conn, &hello.commands, hello.len(), deadline)?;
            if let Some(why) = hello.refusal(&replies) {
                return Err(Failure::new(why));
            }
        }
        self.conn = Some(conn);
        Ok(())
    }

    /// One connection attempt (at open): a failure only schedules the next one.
    pub fn try_connect(&mut self, hello: &Hello, deadline: Instant, backoff: Backoff) {
        if let Err(f) = self.connect_now(hello, deadline) {
            self.schedule_retry(f.why, backoff);
        }
    }

    /// Sends the `n` commands of `commands` and returns their replies (server errors as
    /// `Value::ServerError`), connecting first if the back-off allows. A transport failure or
    /// the deadline drops the connection and schedules the next attempt; within the back-off
    /// nothing is attempted (a clean failure).
    pub fn exchange(
        &mut self,
        hello: &Hello,
        commands: &[u8],
        n: usize,
        deadline: Instant,
        backoff: Backoff,
    ) -> Result<Vec<Value>, Failure> {
        if self.conn.is_none() {
            if let Some(at) = self.retry_at.filter(|&at| Instant::now() < at) {
                return Err(Failure {
                    why: format!(
                        "not connected ({}); next attempt in {} ms",
                        self.last_failure,
                        (at - Instant::now()).as_millis()
                    ),
                    timed_out: false,
                    clean: true,
                });
            }
            if let Err(f) = self.connect_now(hello, deadline) {
                return Err(self.failed(f, backoff));
            }
        }
        let conn = self.conn.as_mut().expect("connected above");
        match round_trip(conn, commands, n, deadline) {
            Ok(values) => {
                self.failures = 0;
                self.retry_at = None;
                Ok(values)
            }
            Err(f) => Err(self.failed(f, backoff)),
        }
    }

    /// Unless nothing was sent (or attempted), drops the connection (its stream state is
    /// unknown: a late reply must not answer the next command) and schedules the next attempt.
    fn failed(&mut self, f: Failure, backoff: Backoff) -> Failure {
        if !f.clean {
            self.conn = None;
            self.schedule_retry(f.why.clone(), backoff);
        }
        f
    }

    /// No attempt before `first * 2^(failures - 1)` (capped at `max`) from now.
    fn schedule_retry(&mut self, why: String, backoff: Backoff) {
        let wait = backoff
            .first
            .saturating_mul(1 << self.failures.min(16))
            .min(backoff.max.max(backoff.first));
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + wait);
        self.last_failure = why;
    }
}
