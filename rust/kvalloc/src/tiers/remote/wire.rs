//! RESP on the wire: commands appended to one buffer, and the pipelined round trip bounded by
//! the call's deadline.

use std::io::Write;
use std::time::{Duration, Instant};

use redis::Value;

use super::Failure;

/// Appends one RESP command (an array of bulk strings).
pub(super) fn push_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    write!(buf, "*{}\r\n", args.len()).expect("vec write");
    for a in args {
        write!(buf, "${}\r\n", a.len()).expect("vec write");
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

/// `SET key (header ++ payload)`: the value is written in place, with no joined copy.
pub(super) fn push_set(buf: &mut Vec<u8>, key: &[u8], header: &[u8], payload: &[u8]) {
    buf.reserve(key.len() + header.len() + payload.len() + 64);
    write!(buf, "*3\r\n$3\r\nSET\r\n${}\r\n", key.len()).expect("vec write");
    buf.extend_from_slice(key);
    write!(buf, "\r\n${}\r\n", header.len() + payload.len()).expect("vec write");
    buf.extend_from_slice(header);
    buf.extend_from_slice(payload);
    buf.extend_from_slice(b"\r\n");
}

/// `GETRANGE key start end` for `len` bytes from `start` (`end` is inclusive).
pub(super) fn push_getrange(buf: &mut Vec<u8>, key: &str, start: usize, len: usize) {
    let (s, e) = (start.to_string(), (start + len.max(1) - 1).to_string());
    push_command(
        buf,
        &[b"GETRANGE", key.as_bytes(), s.as_bytes(), e.as_bytes()],
    );
}

/// Sends `n` commands and reads their replies, one at a time, stopping at the first failure.
/// Each wait on the socket is bounded by the time left until `deadline` (the read timeout is
/// lowered whenever what is left falls below half of it: a setsockopt per halving, not per
/// reply), so a hung server holds the call at most about 1.5 deadlines, and no reply is waited
/// for once the deadline has passed. (A server that keeps taking a large pipeline's bytes
/// slowly can stretch its write: each write, not the sum, is bounded.)
pub(super) fn round_trip(
    conn: &mut redis::Connection,
    commands: &[u8],
    n: usize,
    deadline: Instant,
) -> Result<Vec<Value>, Failure> {
    let mut wait = time_left(deadline).ok_or_else(Failure::late)?;
    conn.set_write_timeout(Some(wait))?;
    conn.set_read_timeout(Some(wait))?;
    conn.send_packed_command(commands)?;
    let mut replies = Vec::with_capacity(n);
    while replies.len() < n {
        if !replies.is_empty() {
            let Some(left) = time_left(deadline) else {
                return Err(Failure {
                    why: format!("{} of {n} replies in time", replies.len()),
                    timed_out: true,
                    clean: false,
                });
            };
            if left < wait / 2 {
                wait = left;
                conn.set_read_timeout(Some(wait))?;
            }
        }
        replies.push(conn.recv_response()?);
    }
    Ok(replies)
}

/// Time until `deadline`, if any.
pub(super) fn time_left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}
