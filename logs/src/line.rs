//! One log line of a known source as (time, level, message), and a window's lines in time
//! order.
//!
//! The sources are those the shop writes (`testbed/`): redis' log, the nginx and Apache access
//! logs (`ip [time] "request" status ...`), their error logs and the PHP app's error log. A
//! line is parsed by its file's name; a line that does not parse keeps its whole text as the
//! message, with no time, at info level (nothing is dropped).
//!
//! An access line's message is `METHOD path STATUS` with the status named (`OK`,
//! `BadGateway`, `GatewayTimeout`, ...): the status is what tells a failure, and a number
//! would be masked as a parameter by the template miner.

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

/// Where a line comes from, by its file's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// redis' log (`pid:role dd Mon yyyy hh:mm:ss.mmm L message`).
    Redis,
    /// An nginx or Apache access log.
    Access,
    /// nginx's error log (`yyyy/mm/dd hh:mm:ss [level] pid#tid: message`).
    NginxError,
    /// Apache's error log (`[Www Mon dd hh:mm:ss.us yyyy] [module:level] ... message`).
    ApacheError,
    /// The PHP app's error log (`[dd-Mon-yyyy hh:mm:ss UTC] message`).
    Php,
    /// Anything else.
    Other,
}

impl Source {
    /// The source of a log file by its name.
    pub fn of_file(name: &str) -> Source {
        let n = name.to_ascii_lowercase();
        if n.contains("access") {
            Source::Access
        } else if n.starts_with("redis") {
            Source::Redis
        } else if n.starts_with("php") {
            Source::Php
        } else if n.contains("nginx") && n.contains("error") {
            Source::NginxError
        } else if (n.contains("apache") || n.contains("httpd")) && n.contains("error") {
            Source::ApacheError
        } else {
            Source::Other
        }
    }

    /// All sources, in a fixed order (features one-hot encode them in this order).
    pub const ALL: [Source; 6] =
        [Source::Redis, Source::Access, Source::NginxError, Source::ApacheError, Source::Php, Source::Other];
}

/// Severity, coarse enough to be comparable across sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Debug, verbose, info, notice; access lines with a 1xx-3xx status.
    Info,
    /// Warnings; access lines with a 4xx status (redis logs at warning level when it starts).
    Warning,
    /// Error or worse; access lines with a 5xx status; every PHP error-log line.
    Error,
}

/// One parsed line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The file it came from (`redis.log`, `nginx-access.log`, ...).
    pub file: String,
    /// Its source, from the file's name.
    pub source: Source,
    /// When it was written, Unix ms (`None`: no timestamp found).
    pub unix_ms: Option<i64>,
    /// Its severity.
    pub level: Level,
    /// The message without the header (time, pid, level).
    pub message: String,
    /// The line as written.
    pub raw: String,
}

/// A line with each run of digits replaced by one `0` (timestamps, pids, ports, ids): the
/// cheap template that compares lines across runs without a miner.
pub fn mask_digits(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_digits = false;
    for ch in line.chars() {
        if ch.is_ascii_digit() {
            if !in_digits {
                out.push('0');
            }
            in_digits = true;
        } else {
            out.push(ch);
            in_digits = false;
        }
    }
    out
}

/// Parses one line of `file`.
pub fn parse(file: &str, raw: &str) -> LogLine {
    let source = Source::of_file(file);
    let parsed = match source {
        Source::Redis => redis(raw),
        Source::Access => access(raw),
        Source::NginxError => nginx_error(raw),
        Source::ApacheError => apache_error(raw),
        Source::Php => php(raw),
        Source::Other => None,
    };
    let (unix_ms, level, message) = parsed.unwrap_or((None, Level::Info, raw.trim().to_string()));
    LogLine { file: file.to_string(), source, unix_ms, level, message, raw: raw.to_string() }
}

/// The non-blank lines of `(file, text)` excerpts, merged in time order. Lines without a time
/// stay after the line before them in their file (a stable merge).
pub fn lines_of(logs: &[(String, String)]) -> Vec<LogLine> {
    let mut out: Vec<(i64, usize, LogLine)> = Vec::new();
    for (file, text) in logs {
        let mut last = i64::MIN;
        for raw in text.lines().filter(|l| !l.trim().is_empty()) {
            let line = parse(file, raw);
            last = line.unix_ms.unwrap_or(last);
            out.push((last, out.len(), line));
        }
    }
    out.sort_by_key(|(t, i, _)| (*t, *i));
    out.into_iter().map(|(_, _, l)| l).collect()
}

type Parsed = (Option<i64>, Level, String);

fn time(text: &str, format: &str) -> Option<i64> {
    NaiveDateTime::parse_from_str(text, format).ok().map(|t| t.and_utc().timestamp_millis())
}

/// `8520:C 29 Nov 2026 01:25:37.346 # message`; `.` debug, `-` verbose, `*` notice, `#`
/// warning.
fn redis(raw: &str) -> Option<Parsed> {
    let mut it = raw.splitn(7, ' ');
    let _pid_role = it.next()?;
    let stamp = [it.next()?, it.next()?, it.next()?, it.next()?].join(" ");
    let level = match it.next()? {
        "#" => Level::Warning,
        "." | "-" | "*" => Level::Info,
        _ => return None,
    };
    Some((time(&stamp, "%d %b %Y %H:%M:%S%.3f"), level, it.next().unwrap_or("").trim().to_string()))
}

/// `ip [29/Nov/2026:01:24:56 +0000] "GET /path HTTP/1.1" 200 53 ...`.
fn access(raw: &str) -> Option<Parsed> {
    let open = raw.find('[')?;
    let close = open + raw[open..].find(']')?;
    let stamp = raw[open + 1..close].split(' ').next()?;
    let rest = &raw[close + 1..];
    let q1 = rest.find('"')?;
    let q2 = q1 + 1 + rest[q1 + 1..].find('"')?;
    let mut req = rest[q1 + 1..q2].split_whitespace();
    let (method, path) = (req.next().unwrap_or("-"), req.next().unwrap_or("-"));
    let status: u16 = rest[q2 + 1..].split_whitespace().next()?.parse().ok()?;
    let level = match status {
        500.. => Level::Error,
        400..=499 => Level::Warning,
        _ => Level::Info,
    };
    Some((time(stamp, "%d/%b/%Y:%H:%M:%S"), level, format!("{method} {path} {}", status_name(status))))
}

/// A status as a word, so that the template keeps it.
pub fn status_name(status: u16) -> String {
    match status {
        200 => "OK".into(),
        201..=299 => "Success".into(),
        300..=399 => "Redirect".into(),
        400 => "BadRequest".into(),
        404 => "NotFound".into(),
        499 => "ClientClosed".into(),
        500 => "InternalServerError".into(),
        502 => "BadGateway".into(),
        503 => "ServiceUnavailable".into(),
        504 => "GatewayTimeout".into(),
        s => format!("Status{}xx", s / 100),
    }
}

fn level_word(word: &str) -> Level {
    match word {
        "error" | "crit" | "alert" | "emerg" => Level::Error,
        "warn" => Level::Warning,
        _ => Level::Info,
    }
}

/// `2026/11/29 01:25:36 [error] 123#0: *5 message`.
fn nginx_error(raw: &str) -> Option<Parsed> {
    let stamp = raw.get(..19)?;
    let rest = raw.get(20..)?;
    let close = rest.find(']')?;
    let level = level_word(rest.get(1..close)?);
    let msg = rest[close + 1..].trim();
    let msg = msg.split_once(": ").map(|(_, m)| m).unwrap_or(msg);
    Some((time(stamp, "%Y/%m/%d %H:%M:%S"), level, msg.trim().to_string()))
}

/// `[Sun Nov 29 01:25:36.123456 2026] [proxy_fcgi:error] [pid 1:tid 2] [client ...] message`.
fn apache_error(raw: &str) -> Option<Parsed> {
    let close = raw.find(']')?;
    let stamp = raw.get(1..close)?;
    let rest = &raw[close + 1..];
    let lo = rest.find('[')?;
    let lc = lo + rest[lo..].find(']')?;
    let level = level_word(rest[lo + 1..lc].rsplit(':').next()?);
    let mut msg = rest[lc + 1..].trim();
    while msg.starts_with('[') {
        msg = msg.find(']').map(|i| msg[i + 1..].trim()).unwrap_or("");
    }
    Some((time(stamp, "%a %b %d %H:%M:%S%.6f %Y"), level, msg.to_string()))
}

/// `[29-Nov-2026 01:25:37 UTC] message`: the app writes only failures there.
fn php(raw: &str) -> Option<Parsed> {
    let close = raw.find(']')?;
    let stamp = raw.get(1..close)?.trim_end_matches(" UTC");
    Some((time(stamp, "%d-%b-%Y %H:%M:%S"), Level::Error, raw[close + 1..].trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_parses_time_level_and_message() {
        let l = parse("redis.log", "8520:C 29 Nov 2026 01:25:37.346 # Configuration loaded");
        assert_eq!((l.source, l.level, l.message.as_str()), (Source::Redis, Level::Warning, "Configuration loaded"));
        assert_eq!(l.unix_ms, Some(1_795_915_537_346));
        let l = parse(
            "nginx-access.log",
            r#"127.0.0.1 [29/Nov/2026:01:24:56 +0000] "GET /shop.php?op=find&id=23 HTTP/1.1" 502 0 0.502 127.0.0.1:21081"#,
        );
        assert_eq!((l.level, l.message.as_str()), (Level::Error, "GET /shop.php?op=find&id=23 BadGateway"));
        assert_eq!(l.unix_ms, Some(1_795_915_496_000));
        let l = parse("php-error.log", "[29-Nov-2026 01:25:37 UTC] shop: Connection refused");
        assert_eq!(
            (l.level, l.message.as_str(), l.unix_ms),
            (Level::Error, "shop: Connection refused", Some(1_795_915_537_000))
        );
        let l =
            parse("nginx-error.log", "2026/11/29 01:25:36 [error] 77#0: *5 connect() failed (111: Connection refused)");
        assert_eq!((l.level, l.message.as_str()), (Level::Error, "*5 connect() failed (111: Connection refused)"));
        assert_eq!(l.unix_ms, Some(1_795_915_536_000));
        let l = parse(
            "apache0-error.log",
            "[Sun Nov 29 01:25:36.123456 2026] [proxy_fcgi:error] [pid 9:tid 10] [client 127.0.0.1:5] AH01071: Got error 'x'",
        );
        assert_eq!((l.level, l.message.as_str()), (Level::Error, "AH01071: Got error 'x'"));
        assert_eq!(l.unix_ms, Some(1_795_915_536_123));
        let l = parse("redis.log", "garbage");
        assert_eq!((l.unix_ms, l.level, l.message.as_str()), (None, Level::Info, "garbage"));
    }

    #[test]
    fn lines_merge_in_time_order() {
        let logs = vec![
            ("php-error.log".to_string(), "[29-Nov-2026 01:25:38 UTC] b\n\n".to_string()),
            ("redis.log".to_string(), "1:C 29 Nov 2026 01:25:37.000 # a\nno time\n".to_string()),
        ];
        let m: Vec<String> = lines_of(&logs).into_iter().map(|l| l.message).collect();
        assert_eq!(m, ["a", "no time", "b"]);
    }
}
