//! Trace file readers: Mooncake JSONL and kvalloc's generic JSONL.
//!
//! ## Mooncake JSONL
//! One request per line: `{"timestamp": <ms>, "input_length": <tokens>, "output_length":
//! <tokens>, "hash_ids": [<id>, ...]}` with one id per `block_tokens` (default 512) tokens of
//! the prompt, the last block possibly partial. Timestamps are milliseconds, as numbers or
//! numeric strings, or date-times such as `"2024-05-01 12:00:03.250"` (UTC; seconds).
//!
//! ## Ids of varying token counts
//! Some traces of this shape give each id no fixed number of tokens (`input_length /
//! len(hash_ids)` varies within the file). Read them with [`TokensPerId::Spread`]: each prompt's
//! tokens are spread over its ids by the rule in [`spread`](super::spread), which keeps equal id
//! prefixes equal token prefixes. It applies to every block-id line (`hash_ids`, or the generic
//! format's `block_hashes`); such a line then needs 1 to `input_length` ids. The default,
//! [`TokensPerId::Exact`], checks each line against `block_tokens` and says when it does not fit.
//! The mode is not guessed from the file: a mistyped exact trace should fail, not be spread.
//!
//! ## Generic JSONL
//! One request per line:
//!
//! | field | required | meaning |
//! |---|---|---|
//! | `timestamp` | yes | arrival in **seconds** (number, numeric string or date-time string) |
//! | `tokens` | one of | the prompt's token ids |
//! | `block_hashes` + `prompt_tokens` | one of | one id (integer or string) per `block_tokens` tokens, and the prompt's length |
//! | `output_tokens` | unless `output` | tokens generated |
//! | `output` | no | the output's token ids (with `tokens`): a later prompt can then reuse them |
//! | `session` | no | conversation id (string or integer): a turn waits for the session's previous turn to finish |
//!
//! Timestamps are made relative to the earliest one; lines are replayed in timestamp order
//! (ties in file order). Blank lines are skipped. Any other malformed line is an error naming
//! the file, the line number and the field.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::trace::{Content, Trace, TraceRequest};
use crate::error::{Error, Result};
use crate::hash;

/// Which format a trace file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    /// Mooncake JSONL (`hash_ids`, `input_length`, ...).
    Mooncake,
    /// The generic JSONL described in the module docs.
    Generic,
}

/// Tokens per trace block when a block-id trace does not say (Mooncake's).
pub const DEFAULT_TRACE_BLOCK_TOKENS: u32 = 512;

/// How many tokens a block id of the trace stands for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokensPerId {
    /// `block_tokens` each, the last id of a prompt possibly fewer.
    #[default]
    Exact,
    /// Varying: each prompt's tokens are spread over its ids (see [`spread`](super::spread)).
    Spread,
}

impl TokensPerId {
    /// `"exact"` or `"spread"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(TokensPerId::Exact),
            "spread" => Ok(TokensPerId::Spread),
            other => Err(Error::invalid(
                "tokens_per_id",
                format!("unknown mode {other:?}; expected \"exact\" or \"spread\""),
            )),
        }
    }

    /// The name [`parse`](Self::parse) reads.
    pub fn name(self) -> &'static str {
        match self {
            TokensPerId::Exact => "exact",
            TokensPerId::Spread => "spread",
        }
    }
}

/// How to read a trace file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Tokens per trace block of exact block-id traces (None: 512). Given with
    /// [`TokensPerId::Spread`], an error.
    pub block_tokens: Option<u32>,
    /// What a block id stands for.
    pub tokens_per_id: TokensPerId,
}

impl ReadOptions {
    /// Exact ids of `block_tokens` tokens (None: 512).
    pub fn exact(block_tokens: Option<u32>) -> Self {
        ReadOptions {
            block_tokens,
            tokens_per_id: TokensPerId::Exact,
        }
    }
}

/// Reads a trace file; the format is detected from the first request line (`hash_ids` means
/// Mooncake).
pub fn read_trace(path: &Path, opts: ReadOptions) -> Result<Trace> {
    let text = crate::files::read_text(path)
        .map_err(|e| Error::invalid("trace", format!("cannot read {}: {e}", path.display())))?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    parse_trace(&text, &name, opts)
}

/// Parses trace text (see [`read_trace`]); `name` labels errors and reports.
pub fn parse_trace(text: &str, name: &str, opts: ReadOptions) -> Result<Trace> {
    let spread = opts.tokens_per_id == TokensPerId::Spread;
    if spread && opts.block_tokens.is_some() {
        return Err(Error::invalid(
            "trace_block_tokens",
            "applies to exact traces; a spread trace's ids have no fixed token count",
        ));
    }
    let block_tokens = opts.block_tokens.unwrap_or(DEFAULT_TRACE_BLOCK_TOKENS);
    if block_tokens == 0 {
        return Err(Error::invalid("trace_block_tokens", "must be positive"));
    }
    let format = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| {
            if l.contains("\"hash_ids\"") {
                TraceFormat::Mooncake
            } else {
                TraceFormat::Generic
            }
        })
        .unwrap_or(TraceFormat::Generic);
    let mut p = Parser {
        name,
        block_tokens,
        spread,
        format,
        trace: Trace {
            name: name.to_string(),
            block_tokens,
            ..Trace::default()
        },
        sessions: HashMap::new(),
    };
    for (i, line) in text.lines().enumerate() {
        if !line.trim().is_empty() {
            p.line(i + 1, line)?;
        }
    }
    let mut trace = p.trace;
    if trace.requests.is_empty() {
        return Err(Error::invalid("trace", format!("{name}: no requests")));
    }
    let t0 = trace
        .requests
        .iter()
        .map(|r| r.arrival)
        .fold(f64::INFINITY, f64::min);
    for r in &mut trace.requests {
        r.arrival -= t0;
    }
    // Stable: ties keep file order.
    trace
        .requests
        .sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    if spread {
        // In arrival order: an id's count is fixed where it first appears.
        trace.spread = Some(super::spread::spread(&mut trace));
        trace.block_tokens = 0;
    }
    trace.validate()?;
    Ok(trace)
}

struct Parser<'a> {
    name: &'a str,
    block_tokens: u32,
    /// Block-id lines are spread (checked for 1 to `prompt` ids), not exact.
    spread: bool,
    format: TraceFormat,
    trace: Trace,
    sessions: HashMap<String, u64>,
}

impl Parser<'_> {
    fn err(&self, line: usize, field: &str, message: impl std::fmt::Display) -> Error {
        Error::invalid(
            "trace",
            format!("{} line {line}, field `{field}`: {message}", self.name),
        )
    }

    fn line(&mut self, n: usize, text: &str) -> Result<()> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| self.err(n, "(line)", format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| self.err(n, "(line)", "not a JSON object"))?;
        let get = |f: &str| obj.get(f).filter(|v| !v.is_null());
        let req = match self.format {
            TraceFormat::Mooncake => {
                let ts = get("timestamp").ok_or_else(|| self.err(n, "timestamp", "missing"))?;
                let (t, is_datetime) = self.timestamp(n, ts)?;
                let prompt = self.count(n, "input_length", get("input_length"), true)?;
                let output = self.count(n, "output_length", get("output_length"), false)?;
                let ids = self.ids(n, "hash_ids", get("hash_ids"))?;
                self.check_blocks(n, "hash_ids", ids.len(), prompt)?;
                TraceRequest {
                    arrival: if is_datetime { t } else { t / 1000.0 },
                    session: None,
                    prompt_tokens: prompt,
                    output_tokens: output,
                    content: Content::Blocks(ids),
                }
            }
            TraceFormat::Generic => self.generic(n, &get)?,
        };
        self.trace.requests.push(req);
        Ok(())
    }

    fn generic<'v>(
        &mut self,
        n: usize,
        get: &dyn Fn(&str) -> Option<&'v Value>,
    ) -> Result<TraceRequest> {
        let ts = get("timestamp").ok_or_else(|| self.err(n, "timestamp", "missing"))?;
        let (arrival, _) = self.timestamp(n, ts)?;
        let session = match get("session") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(x)) if x.is_u64() || x.is_i64() => Some(x.to_string()),
            Some(_) => return Err(self.err(n, "session", "expected a string or an integer")),
        };
        let session = session.map(|s| {
            let next = self.sessions.len() as u64;
            *self.sessions.entry(s).or_insert(next)
        });
        let output_ids = match get("output") {
            None => None,
            Some(v) => Some(self.token_ids(n, "output", v)?),
        };
        let output_tokens = match (get("output_tokens"), &output_ids) {
            (Some(v), _) => self.count(n, "output_tokens", Some(v), false)?,
            (None, Some(ids)) => ids.len() as u64,
            (None, None) => return Err(self.err(n, "output_tokens", "missing")),
        };
        let (prompt_tokens, content) = match (get("tokens"), get("block_hashes")) {
            (Some(_), Some(_)) => {
                return Err(self.err(n, "tokens", "give `tokens` or `block_hashes`, not both"))
            }
            (None, None) => {
                return Err(self.err(n, "tokens", "missing (give `tokens` or `block_hashes`)"))
            }
            (Some(t), None) => {
                let mut stream = self.token_ids(n, "tokens", t)?;
                if stream.is_empty() {
                    return Err(self.err(n, "tokens", "the prompt is empty"));
                }
                let p = stream.len() as u64;
                if let Some(out) = output_ids {
                    if out.len() as u64 != output_tokens {
                        return Err(self.err(
                            n,
                            "output",
                            format!("{} ids but output_tokens is {output_tokens}", out.len()),
                        ));
                    }
                    stream.extend(out);
                }
                self.trace.streams.push(stream);
                (p, Content::Stream(self.trace.streams.len() as u32 - 1))
            }
            (None, Some(h)) => {
                if output_ids.is_some() {
                    return Err(self.err(n, "output", "output ids need a `tokens` prompt"));
                }
                let p = self.count(n, "prompt_tokens", get("prompt_tokens"), true)?;
                let ids = self.ids(n, "block_hashes", Some(h))?;
                self.check_blocks(n, "block_hashes", ids.len(), p)?;
                (p, Content::Blocks(ids))
            }
        };
        Ok(TraceRequest {
            arrival,
            session,
            prompt_tokens,
            output_tokens,
            content,
        })
    }

    /// A timestamp and whether it was a date-time (already in seconds).
    fn timestamp(&self, n: usize, v: &Value) -> Result<(f64, bool)> {
        let bad = || {
            self.err(
                n,
                "timestamp",
                format!("expected a number, a numeric string or a date-time, got {v}"),
            )
        };
        let (t, dt) = match v {
            Value::Number(x) => (x.as_f64().ok_or_else(bad)?, false),
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(x) => (x, false),
                Err(_) => (parse_datetime(s.trim()).ok_or_else(bad)?, true),
            },
            _ => return Err(bad()),
        };
        if !t.is_finite() {
            return Err(bad());
        }
        Ok((t, dt))
    }

    fn count(&self, n: usize, field: &str, v: Option<&Value>, positive: bool) -> Result<u64> {
        let v = v.ok_or_else(|| self.err(n, field, "missing"))?;
        let x = v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .ok_or_else(|| {
                self.err(
                    n,
                    field,
                    format!("expected a non-negative integer, got {v}"),
                )
            })?;
        if positive && x == 0 {
            return Err(self.err(n, field, "must be positive"));
        }
        Ok(x)
    }

    fn ids(&self, n: usize, field: &str, v: Option<&Value>) -> Result<Vec<u64>> {
        let arr = v
            .ok_or_else(|| self.err(n, field, "missing"))?
            .as_array()
            .ok_or_else(|| self.err(n, field, "expected an array of block ids"))?;
        arr.iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::Number(k) if k.is_u64() => Ok(k.as_u64().expect("u64")),
                Value::Number(k) if k.is_i64() => Ok(k.as_i64().expect("i64") as u64),
                Value::String(s) => Ok(hash::digest(s.as_bytes())),
                _ => Err(self.err(
                    n,
                    &format!("{field}[{i}]"),
                    format!("expected an integer or a string, got {x}"),
                )),
            })
            .collect()
    }

    fn token_ids(&self, n: usize, field: &str, v: &Value) -> Result<Vec<i64>> {
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(n, field, "expected an array of token ids"))?;
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_i64().ok_or_else(|| {
                    self.err(
                        n,
                        &format!("{field}[{i}]"),
                        format!("expected an integer, got {x}"),
                    )
                })
            })
            .collect()
    }

    fn check_blocks(&self, n: usize, field: &str, ids: usize, prompt: u64) -> Result<()> {
        if self.spread {
            return match ids as u64 {
                0 => Err(self.err(n, field, format!("no ids for a {prompt}-token prompt"))),
                k if k > prompt => Err(self.err(
                    n,
                    field,
                    format!(
                        "{k} ids for a {prompt}-token prompt: each id covers at least one token"
                    ),
                )),
                _ => Ok(()),
            };
        }
        let t = u64::from(self.block_tokens);
        let (whole, all) = (prompt / t, prompt.div_ceil(t));
        if (ids as u64) < whole || ids as u64 > all {
            return Err(self.err(
                n,
                field,
                format!(
                    "{ids} ids for a {prompt}-token prompt; blocks of {t} tokens need {whole} \
                     or {all} (is --trace-block-tokens right? ids of varying token counts need \
                     --trace-tokens-per-id spread)"
                ),
            ));
        }
        Ok(())
    }
}

/// Seconds since 1970-01-01 for `YYYY-MM-DD[T ]HH:MM:SS[.frac][Z]` (UTC), else None.
fn parse_datetime(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let s = s.strip_suffix("+00:00").unwrap_or(s);
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || !(0.0..61.0).contains(&ss)
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3_600 + mm * 60) as f64 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mooncake_lines_and_string_timestamps() {
        let text = r#"{"timestamp": 1500, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}

{"timestamp": "1000", "input_length": 512, "output_length": 0, "hash_ids": [1]}
"#;
        let t = parse_trace(text, "m.jsonl", ReadOptions::default()).unwrap();
        assert_eq!(t.requests.len(), 2);
        // Sorted by time and relative to the first: ms -> s.
        assert_eq!(t.requests[0].arrival, 0.0);
        assert_eq!(t.requests[1].arrival, 0.5);
        assert_eq!(t.requests[1].content, Content::Blocks(vec![1, 2]));
        let dt = r#"{"timestamp": "2024-05-01 12:00:03.5", "input_length": 10, "output_length": 1, "hash_ids": ["a"]}
{"timestamp": "2024-05-01T12:00:01Z", "input_length": 10, "output_length": 1, "hash_ids": ["b"]}"#;
        let t = parse_trace(dt, "d.jsonl", ReadOptions::default()).unwrap();
        assert_eq!(t.requests[1].arrival, 2.5);
    }

    #[test]
    fn spread_lines_fit_any_ratio_and_bad_ones_name_the_line() {
        let spread = ReadOptions {
            block_tokens: None,
            tokens_per_id: TokensPerId::Spread,
        };
        // 6 and 106 tokens per id in one file: exact at 512 refuses it.
        let text = r#"{"timestamp": 0, "input_length": 18, "output_length": 1, "hash_ids": [1, 2, 3]}
{"timestamp": 1, "input_length": 212, "output_length": 1, "hash_ids": [1, 4]}"#;
        let e = parse_trace(text, "v.jsonl", ReadOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("--trace-tokens-per-id spread"),
            "{e}"
        );
        let t = parse_trace(text, "v.jsonl", spread).unwrap();
        assert_eq!(t.block_tokens, 0);
        let st = t.spread.unwrap();
        assert_eq!((st.min_tokens_per_id, st.max_tokens_per_id), (6.0, 106.0));
        let Content::Spans(s) = &t.requests[1].content else {
            panic!("{:?}", t.requests[1].content)
        };
        assert_eq!((s[0].id, s[0].tokens, s[1].tokens), (1, 6, 206));
        let bad = [
            (r#""input_length": 10, "hash_ids": []"#, "no ids"),
            (
                r#""input_length": 2, "hash_ids": [1, 2, 3]"#,
                "at least one token",
            ),
            (r#""input_length": 0, "hash_ids": [1]"#, "`input_length`"),
            (
                r#""input_length": 10, "hash_ids": [1, null]"#,
                "`hash_ids[1]`",
            ),
        ];
        for (fields, what) in bad {
            let line = format!(r#"{{"timestamp": 0, "output_length": 1, {fields}}}"#);
            let e = parse_trace(&format!("{text}\n{line}"), "v.jsonl", spread)
                .unwrap_err()
                .to_string();
            assert!(e.contains("v.jsonl line 3") && e.contains(what), "{e}");
        }
        let both = ReadOptions {
            block_tokens: Some(16),
            ..spread
        };
        assert!(parse_trace(text, "v.jsonl", both)
            .unwrap_err()
            .to_string()
            .contains("exact traces"));
        // The generic format's block hashes are spread the same way.
        let g = r#"{"timestamp": 0, "block_hashes": ["a", "b"], "prompt_tokens": 31, "output_tokens": 1}"#;
        let t = parse_trace(g, "g.jsonl", spread).unwrap();
        let Content::Spans(s) = &t.requests[0].content else {
            panic!("{:?}", t.requests[0].content)
        };
        assert_eq!((s[0].tokens, s[1].tokens), (16, 15));
        assert_eq!(TokensPerId::parse("spread").unwrap(), TokensPerId::Spread);
        assert!(TokensPerId::parse("auto").is_err());
    }

    #[test]
    fn datetime_matches_known_epochs() {
        assert_eq!(parse_datetime("1970-01-01 00:00:00"), Some(0.0));
        assert_eq!(parse_datetime("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        assert_eq!(parse_datetime("2024-13-01 00:00:00"), None);
        assert_eq!(parse_datetime("yesterday"), None);
    }

    #[test]
    fn generic_lines() {
        let text = r#"{"timestamp": 0, "session": "a", "tokens": [1, 2, 3], "output": [4, 5]}
{"timestamp": 2.5, "session": "a", "tokens": [1, 2, 3, 4, 5, 6], "output_tokens": 3}
{"timestamp": 3, "block_hashes": ["x", 9], "prompt_tokens": 20, "output_tokens": 1}"#;
        let t = parse_trace(text, "g.jsonl", ReadOptions::exact(Some(16))).unwrap();
        assert_eq!(t.requests.len(), 3);
        let r0 = &t.requests[0];
        assert_eq!(
            (r0.prompt_tokens, r0.output_tokens, r0.session),
            (3, 2, Some(0))
        );
        assert_eq!(t.output_token_ids(r0), Some(&[4i64, 5][..]));
        assert_eq!(t.output_token_ids(&t.requests[1]), None);
        assert_eq!(t.requests[1].session, Some(0));
        assert!(matches!(t.requests[2].content, Content::Blocks(ref v) if v.len() == 2));
    }

    fn error_of(text: &str) -> String {
        parse_trace(text, "bad.jsonl", ReadOptions::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn malformed_lines_name_file_line_and_field() {
        let ok = r#"{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}"#;
        let cases = [
            (
                r#"{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, "x", 2.5]}"#,
                "`hash_ids[2]`",
            ),
            (
                r#"{"timestamp": 0, "input_length": -3, "output_length": 1, "hash_ids": [1]}"#,
                "`input_length`",
            ),
            (
                r#"{"timestamp": 0, "input_length": 10, "hash_ids": [1]}"#,
                "`output_length`",
            ),
            (
                r#"{"timestamp": "soon", "input_length": 10, "output_length": 1, "hash_ids": [1]}"#,
                "`timestamp`",
            ),
            (
                r#"{"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [1]}"#,
                "`hash_ids`",
            ),
            (
                r#"{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": 5}"#,
                "`hash_ids`",
            ),
            (r#"{"timestamp": 0, "input_length": 10,"#, "`(line)`"),
            ("[1, 2]", "`(line)`"),
        ];
        for (bad, field) in cases {
            let e = error_of(&format!("{ok}\n\n{bad}\n"));
            assert!(e.contains("bad.jsonl line 3") && e.contains(field), "{e}");
        }
        let generic = [
            (
                r#"{"timestamp": 0, "tokens": [1, "a"], "output_tokens": 1}"#,
                "`tokens[1]`",
            ),
            (r#"{"timestamp": 0, "output_tokens": 1}"#, "`tokens`"),
            (r#"{"tokens": [1], "output_tokens": 1}"#, "`timestamp`"),
            (r#"{"timestamp": 0, "tokens": [1]}"#, "`output_tokens`"),
            (
                r#"{"timestamp": 0, "tokens": [1], "output_tokens": 1, "session": [1]}"#,
                "`session`",
            ),
            (
                r#"{"timestamp": 0, "block_hashes": [1], "output_tokens": 1}"#,
                "`prompt_tokens`",
            ),
        ];
        for (bad, field) in generic {
            let e = error_of(bad);
            assert!(e.contains("bad.jsonl line 1") && e.contains(field), "{e}");
        }
        assert!(
            read_trace(Path::new("/nonexistent/t.jsonl"), ReadOptions::default())
                .unwrap_err()
                .to_string()
                .contains("cannot read")
        );
    }
}
