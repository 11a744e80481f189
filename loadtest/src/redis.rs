//! Just enough RESP (the Redis protocol) to read `INFO commandstats` before and after a run, so a
//! scenario can say how many Redis commands of each kind its work cost the cluster. One short
//! blocking connection per reading; `AUTH` when the address carries a password.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where Redis is, and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisAddr {
    /// HOST:PORT.
    pub(crate) host_port: String,
    /// `AUTH [user] password`, from a `redis://[user]:password@` address.
    login: Option<(Option<String>, String)>,
}

impl RedisAddr {
    /// `HOST:PORT`, or a `redis://[[user]:password@]HOST[:PORT][/db]` URL (port 6379 by default).
    pub(crate) fn parse(s: &str) -> Result<RedisAddr, String> {
        let s = s.trim();
        let rest = s.strip_prefix("redis://").unwrap_or(s);
        let rest = rest.split('/').next().unwrap_or(rest);
        let (login, host) = match rest.rsplit_once('@') {
            Some((cred, host)) => {
                let (user, pass) = cred.split_once(':').unwrap_or(("", cred));
                let user = (!user.is_empty()).then(|| user.to_string());
                (Some((user, pass.to_string())), host)
            }
            None => (None, rest),
        };
        if host.is_empty() {
            return Err(format!("{s:?} names no Redis host"));
        }
        let host_port = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:6379")
        };
        Ok(RedisAddr { host_port, login })
    }
}

/// Calls per command name (`evalsha`, `sadd`, `client|setname`, ...) from `INFO commandstats`.
pub(crate) type CommandCalls = BTreeMap<String, u64>;

/// One `INFO commandstats` reading.
pub(crate) fn commandstats(addr: &RedisAddr) -> Result<CommandCalls, String> {
    let target = addr
        .host_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve Redis {}: {e}", addr.host_port))?
        .next()
        .ok_or_else(|| format!("Redis {} resolves to nothing", addr.host_port))?;
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .map_err(|e| format!("connect to Redis {}: {e}", addr.host_port))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    if let Some((user, pass)) = &addr.login {
        let mut args = vec!["AUTH"];
        args.extend(user.as_deref());
        args.push(pass);
        match call(&mut s, &mut buf, &args)? {
            Reply::Simple(_) => {}
            other => return Err(format!("Redis AUTH answered {other:?}")),
        }
    }
    match call(&mut s, &mut buf, &["INFO", "commandstats"])? {
        Reply::Bulk(Some(text)) => Ok(parse_commandstats(&String::from_utf8_lossy(&text))),
        other => Err(format!("Redis INFO commandstats answered {other:?}")),
    }
}

/// What the run's commands were: `after - before` per command, less this module's own readings
/// (one `INFO`, and one `AUTH` with a password, made after `before` was read), zeros left out.
pub(crate) fn delta(addr: &RedisAddr, before: &CommandCalls, after: &CommandCalls) -> CommandCalls {
    let mut own = BTreeMap::from([("info", 1u64)]);
    if addr.login.is_some() {
        own.insert("auth", 1);
    }
    after
        .iter()
        .filter_map(|(name, &calls)| {
            let was = before.get(name).copied().unwrap_or(0);
            let mine = own.get(name.as_str()).copied().unwrap_or(0);
            let d = calls.saturating_sub(was).saturating_sub(mine);
            (d > 0).then(|| (name.clone(), d))
        })
        .collect()
}

/// The `calls=` of every `cmdstat_NAME:calls=N,usec=...` line.
pub(crate) fn parse_commandstats(text: &str) -> CommandCalls {
    text.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_ascii_lowercase(), calls))
        })
        .collect()
}

/// A RESP reply, as far as the readings need one.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
}

/// Sends one command and reads its reply.
fn call(s: &mut TcpStream, buf: &mut Vec<u8>, args: &[&str]) -> Result<Reply, String> {
    s.write_all(&encode(args))
        .map_err(|e| format!("write to Redis: {e}"))?;
    read_reply(s, buf)
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply; `buf` keeps what follows it.
fn read_reply<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<Reply, String> {
    let line = read_line(r, buf)?;
    let (kind, rest) = line.split_at(1.min(line.len()));
    let text = String::from_utf8_lossy(rest).into_owned();
    match kind {
        b"+" => Ok(Reply::Simple(text)),
        b"-" => Ok(Reply::Error(text)),
        b":" => text
            .parse()
            .map(Reply::Int)
            .map_err(|_| format!("bad RESP integer {text:?}")),
        b"$" => {
            let len: i64 = text
                .parse()
                .map_err(|_| format!("bad RESP bulk length {text:?}"))?;
            if len < 0 {
                return Ok(Reply::Bulk(None));
            }
            let len = usize::try_from(len).map_err(|e| e.to_string())?;
            fill(r, buf, len + 2)?;
            let body = buf[..len].to_vec();
            buf.drain(..len + 2);
            Ok(Reply::Bulk(Some(body)))
        }
        _ => Err(format!(
            "unexpected RESP reply {:?}",
            String::from_utf8_lossy(&line)
        )),
    }
}

/// The next line without its CRLF.
fn read_line<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    loop {
        if let Some(p) = crate::ws::find(buf, b"\r\n") {
            let line = buf[..p].to_vec();
            buf.drain(..p + 2);
            return Ok(line);
        }
        if buf.len() > 64 * 1024 {
            return Err("RESP line over 64 KiB".into());
        }
        read_more(r, buf)?;
    }
}

/// Reads until `buf` holds at least `n` bytes.
fn fill<R: Read>(r: &mut R, buf: &mut Vec<u8>, n: usize) -> Result<(), String> {
    if n > 64 << 20 {
        return Err(format!("RESP reply of {n} bytes"));
    }
    while buf.len() < n {
        read_more(r, buf)?;
    }
    Ok(())
}

fn read_more<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 8192];
    let n = r
        .read(&mut chunk)
        .map_err(|e| format!("read from Redis: {e}"))?;
    if n == 0 {
        return Err("Redis closed the connection".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "# Commandstats\r\n\
        cmdstat_evalsha:calls=120,usec=900,usec_per_call=7.50,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_publish:calls=7,usec=20,usec_per_call=2.86,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_client|setname:calls=2,usec=1,usec_per_call=0.50\r\n\
        cmdstat_info:calls=3,usec=300,usec_per_call=100.00\r\n\
        cmdstat_broken:usec=1\r\n\
        \r\n";

    #[test]
    fn commandstats_lines_give_calls_per_command() {
        let c = parse_commandstats(STATS);
        assert_eq!(c.get("evalsha"), Some(&120));
        assert_eq!(c.get("publish"), Some(&7));
        assert_eq!(c.get("client|setname"), Some(&2));
        assert_eq!(c.get("broken"), None, "a line without calls is skipped");
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn the_delta_leaves_out_our_own_readings_and_zeros() {
        let addr = RedisAddr::parse("127.0.0.1:6379").unwrap();
        let before = parse_commandstats(STATS);
        let mut after = before.clone();
        *after.entry("evalsha".into()).or_default() += 10;
        *after.entry("info".into()).or_default() += 1;
        after.insert("srem".into(), 4);
        let d = delta(&addr, &before, &after);
        assert_eq!(
            d,
            BTreeMap::from([("evalsha".to_string(), 10), ("srem".to_string(), 4)])
        );
        let with_pass = RedisAddr::parse("redis://:pw@h:1").unwrap();
        after.insert("auth".into(), 1);
        assert!(!delta(&with_pass, &before, &after).contains_key("auth"));
    }

    #[test]
    fn addresses_and_urls() {
        let p = |s| RedisAddr::parse(s).unwrap();
        assert_eq!(p("127.0.0.1:16379").host_port, "127.0.0.1:16379");
        assert_eq!(p("redis://127.0.0.1:16379/0").host_port, "127.0.0.1:16379");
        assert_eq!(p("redis://localhost").host_port, "localhost:6379");
        assert_eq!(
            p("redis://:s3cret@h:7").login,
            Some((None, "s3cret".into()))
        );
        assert_eq!(
            p("redis://bob:s3cret@h:7").login,
            Some((Some("bob".into()), "s3cret".into()))
        );
        assert!(RedisAddr::parse("redis://").is_err());
    }

    #[test]
    fn replies_are_read_back_to_back() {
        let data = b"+OK\r\n-ERR nope\r\n:42\r\n$5\r\nab\r\nc\r\n$-1\r\n$3\r\nab";
        let mut r = &data[..];
        let mut buf = Vec::new();
        assert_eq!(read_reply(&mut r, &mut buf), Ok(Reply::Simple("OK".into())));
        assert_eq!(
            read_reply(&mut r, &mut buf),
            Ok(Reply::Error("ERR nope".into()))
        );
        assert_eq!(read_reply(&mut r, &mut buf), Ok(Reply::Int(42)));
        assert_eq!(
            read_reply(&mut r, &mut buf),
            Ok(Reply::Bulk(Some(b"ab\r\nc".to_vec())))
        );
        assert_eq!(read_reply(&mut r, &mut buf), Ok(Reply::Bulk(None)));
        assert!(read_reply(&mut r, &mut buf).is_err(), "cut short");
        assert_eq!(encode(&["INFO", "x"]), b"*2\r\n$4\r\nINFO\r\n$1\r\nx\r\n");
    }

    #[test]
    fn commandstats_over_a_fake_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = RedisAddr::parse(&format!("redis://:pw@{}", l.local_addr().unwrap())).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let auth = b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n";
            let info = b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n";
            while buf.len() < auth.len() + info.len() {
                let n = c.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() == auth.len() {
                    c.write_all(b"+OK\r\n").unwrap();
                }
            }
            assert_eq!(&buf[..auth.len()], auth);
            assert_eq!(&buf[auth.len()..], info);
            write!(c, "${}\r\n{STATS}\r\n", STATS.len()).unwrap();
        });
        let c = commandstats(&addr).unwrap();
        t.join().unwrap();
        assert_eq!(c.get("evalsha"), Some(&120));
    }
}
