//! Valkey/Redis Cluster: the seed-list URL, key slots (CRC16 with hash tags), the `CLUSTER
//! SLOTS` reply, and the `MOVED`/`ASK` redirections.
//!
//! The store routes commands itself rather than through the redis crate's sync
//! `ClusterConnection` (its `cluster` feature), which does not fit the tier's fault model: one
//! node's failure fails the whole pipeline (the healthy nodes' replies are dropped), a
//! timed-out connection is kept and its late reply read as the next command's, a slot refresh
//! stops at the first node that fails to answer, and retries sleep past the call's deadline.
//! What routing needs is small (a slot map, CRC16, two redirections) and is here, on the
//! store's own per-node connections, deadlines and back-off. No dependency is added.

use std::ops::Range;

use redis::Value;

/// Slots of a cluster (fixed by the protocol).
pub(super) const SLOTS: usize = 16384;

/// The URL schemes of a cluster's seed list (TLS where the base scheme has it).
const CLUSTER_SCHEMES: [(&str, &str); 4] = [
    ("redis+cluster://", "redis://"),
    ("valkey+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
    ("valkeys+cluster://", "rediss://"),
];

/// The seeds of a cluster URL, each as a single-server URL (`redis://[userinfo@]host:port`),
/// or None when `url` is not a cluster URL. A cluster has one database: a path other than
/// `/` or `/0` is refused, as are query strings and fragments (no single-server options
/// apply across nodes).
pub(super) fn seed_urls(url: &str) -> Option<Result<Vec<String>, String>> {
    let lower = url.to_ascii_lowercase();
    let (scheme, base) = CLUSTER_SCHEMES.iter().find(|(s, _)| lower.starts_with(s))?;
    Some(parse_seeds(&url[scheme.len()..], base))
}

fn parse_seeds(rest: &str, base: &str) -> Result<Vec<String>, String> {
    if rest.contains(['?', '#']) {
        return Err("a cluster URL takes no query or fragment".into());
    }
    let (userinfo, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let (hosts, path) = hosts.split_at(hosts.find('/').unwrap_or(hosts.len()));
    if !matches!(path, "" | "/" | "/0") {
        return Err(format!("a cluster has database 0 only, not {path:?}"));
    }
    let seeds: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{base}{userinfo}{h}"))
        .collect();
    if seeds.is_empty() {
        return Err("no seed node (host:port,host:port,...)".into());
    }
    Ok(seeds)
}

/// The slot of a key: CRC16 (XMODEM) of its hash tag, mod 16384. The tag is the part between
/// the first `{` and the next `}` when that is non-empty, else the whole key (the cluster
/// specification's rule).
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    (crc16(tagged.unwrap_or(key)) as usize % SLOTS) as u16
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), as the cluster specification defines.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

const CRC16_TABLE: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

/// One owner range of a `CLUSTER SLOTS` reply: slots `first..=last` served by `host:port`
/// (the primary; replicas are not read from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub addr: String,
}

/// Parses a `CLUSTER SLOTS` reply (RESP2). A node that reports no usable endpoint (an empty
/// host or `?`) is reached at `seed_host`, the host the reply came from.
pub(super) fn parse_slots(reply: Value, seed_host: &str) -> Result<Vec<SlotRange>, String> {
    let Value::Array(ranges) = reply else {
        return Err(format!("unexpected CLUSTER SLOTS reply {reply:?}"));
    };
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let parsed = match r {
            Value::Array(items) if items.len() >= 3 => match (&items[0], &items[1], &items[2]) {
                (Value::Int(a), Value::Int(b), Value::Array(node)) if node.len() >= 2 => {
                    let host = match &node[0] {
                        Value::BulkString(h) => String::from_utf8_lossy(h).into_owned(),
                        Value::SimpleString(h) => h.clone(),
                        _ => String::new(),
                    };
                    let host = if host.is_empty() || host == "?" {
                        seed_host.to_string()
                    } else {
                        host
                    };
                    match (&node[1], u16::try_from(*a), u16::try_from(*b)) {
                        (Value::Int(port), Ok(first), Ok(last))
                            if first <= last && usize::from(last) < SLOTS =>
                        {
                            Some(SlotRange {
                                first,
                                last,
                                addr: join_addr(&host, *port),
                            })
                        }
                        _ => None,
                    }
                }
                _ => None,
            },
            _ => None,
        };
        out.push(parsed.ok_or("malformed CLUSTER SLOTS entry")?);
    }
    Ok(out)
}

/// `host:port`, with an IPv6 host in brackets (as in URLs).
pub(super) fn join_addr(host: &str, port: i64) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A cluster's redirection of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Redirect {
    /// `ASK`: this command only, preceded by `ASKING` (a slot being migrated); `MOVED`: the
    /// slot has a new owner.
    pub ask: bool,
    pub slot: u16,
    pub addr: String,
}

impl Redirect {
    /// The redirection a reply asks for, if it is `MOVED slot host:port` or `ASK slot
    /// host:port`.
    pub fn of(reply: &Value) -> Option<Redirect> {
        let Value::ServerError(e) = reply else {
            return None;
        };
        let ask = match e.code() {
            "MOVED" => false,
            "ASK" => true,
            _ => return None,
        };
        let mut parts = e.details()?.split_whitespace();
        let slot = parts
            .next()?
            .parse()
            .ok()
            .filter(|&s| usize::from(s) < SLOTS)?;
        let addr = parts.next()?.to_string();
        Some(Redirect { ask, slot, addr })
    }
}

/// The byte ranges of the commands in a buffer of RESP commands (arrays of bulk strings, as
/// `wire` writes them). Used only to resend a redirected command.
pub(super) fn split_commands(buf: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    let number = |at: &mut usize| -> usize {
        let start = *at + 1; // past '*' or '$'
        let end = start + buf[start..].iter().position(|&b| b == b'\r').expect("CRLF");
        *at = end + 2;
        std::str::from_utf8(&buf[start..end])
            .expect("ascii")
            .parse()
            .expect("a length")
    };
    while at < buf.len() {
        let start = at;
        let args = number(&mut at);
        for _ in 0..args {
            let len = number(&mut at);
            at += len + 2;
        }
        out.push(start..at);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_specification() {
        // The specification's test vector and examples.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}")); // empty tag: whole key
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), slot_of(b"bar"));
    }

    #[test]
    fn cluster_urls() {
        assert!(seed_urls("redis://h:1").is_none());
        assert_eq!(
            seed_urls("redis+cluster://u:p@a:1,b:2/").unwrap().unwrap(),
            ["redis://u:p@a:1", "redis://u:p@b:2"]
        );
        assert_eq!(
            seed_urls("valkeys+cluster://a:1").unwrap().unwrap(),
            ["rediss://a:1"]
        );
        assert!(seed_urls("redis+cluster://a:1/2").unwrap().is_err());
        assert!(seed_urls("redis+cluster://").unwrap().is_err());
        assert!(seed_urls("redis+cluster://a:1?x=1").unwrap().is_err());
    }

    #[test]
    fn redirects_and_command_boundaries() {
        let moved = redis::parse_redis_value(b"-MOVED 3999 127.0.0.1:7002\r\n").unwrap();
        assert_eq!(
            Redirect::of(&moved),
            Some(Redirect {
                ask: false,
                slot: 3999,
                addr: "127.0.0.1:7002".into()
            })
        );
        assert_eq!(Redirect::of(&Value::Okay), None);
        let mut b = Vec::new();
        super::super::wire::push_command(&mut b, &[b"GET", b"k"]);
        let first = b.len();
        super::super::wire::push_set(&mut b, b"key", b"h\r\n", b"*3\r\n");
        assert_eq!(split_commands(&b), [0..first, first..b.len()]);
    }
}
