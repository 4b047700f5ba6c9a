//! The wire under the Redis store's reads: RESP2 over plain TCP, pipelined, parsed in place.
//!
//! A gather asks each node for its share of a tile's rows as one pipeline of `GET`s and reads
//! every reply straight from the socket buffer into the caller's row buffer: no value is
//! allocated per row and no reply is copied twice. A general client (the `redis` crate, which
//! the store keeps for its few control commands) spends most of a gather's client time there,
//! building a command and a reply value per row.
//!
//! What it knows of Redis Cluster: a key's slot (CRC16/XMODEM of the key, or of its `{tag}`,
//! mod 16384), the slot map (`CLUSTER SLOTS`), and the error replies a caller must act on
//! (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `LOADING`, `MASTERDOWN`). Retrying is the
//! caller's business.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The longest reply line (a length, an error text) read before the reply is refused.
const MAX_LINE: usize = 4096;

/// The slot of `key`: CRC16/XMODEM over the key, or over the text between its first `{` and
/// the next `}` when that text is not empty (Redis Cluster's hash tags).
pub fn key_slot(key: &[u8]) -> u16 {
    let mut k = key;
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                k = &key[open + 1..open + 1 + len];
            }
        }
    }
    crc16::State::<crc16::XMODEM>::calculate(k) % SLOTS as u16
}

/// Appends one command (`*N` then each argument as a bulk string) to `buf`.
pub fn push_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    push_header(buf, b'*', args.len());
    for a in args {
        push_header(buf, b'$', a.len());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

fn push_header(buf: &mut Vec<u8>, tag: u8, n: usize) {
    buf.push(tag);
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
    buf.extend_from_slice(b"\r\n");
}

/// The first line of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// `$n`: n bytes follow (then CRLF).
    Bulk(usize),
    /// `$-1` or `*-1`.
    Nil,
    /// `+text`.
    Simple(String),
    /// `-text`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `*n`: n replies follow.
    Array(usize),
}

/// A whole reply, for control commands (`CLUSTER SLOTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A bulk string.
    Bulk(Vec<u8>),
    /// A nil reply.
    Nil,
    /// A simple string.
    Simple(String),
    /// An error reply.
    Error(String),
    /// An integer.
    Int(i64),
    /// An array.
    Array(Vec<Value>),
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// How to log in (from the store's URL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// ACL user, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
}

/// One connection to one node. After any error its replies may be out of step with its
/// requests: the caller drops it.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<Deadlined>,
    line: Vec<u8>,
}

/// The socket's read half with a deadline: a read that would start after it fails with
/// `TimedOut`. The socket's own timeout bounds each read; this bounds how long a reply that
/// trickles in (one byte per read, each within the timeout) can hold a call. Checked once
/// per buffer fill, not per reply.
struct Deadlined {
    stream: TcpStream,
    end: Option<Instant>,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.end.is_some_and(|end| Instant::now() >= end) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the call's deadline passed while a reply was arriving",
            ));
        }
        self.stream.read(buf)
    }
}

impl Conn {
    /// Connects to `addr` (`host:port`) within `timeout`, with `timeout` on every read and
    /// write, and logs in when `auth` has a password.
    pub fn connect(addr: &str, auth: &Auth, timeout: Duration) -> io::Result<Conn> {
        let mut last = None;
        let mut stream = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
        })?;
        let mut c = Conn::over(stream)?;
        c.set_timeout(timeout)?;
        if let Some(pw) = &auth.password {
            let mut cmd = Vec::new();
            match &auth.username {
                Some(u) => push_command(&mut cmd, &[b"AUTH", u.as_bytes(), pw.as_bytes()]),
                None => push_command(&mut cmd, &[b"AUTH", pw.as_bytes()]),
            }
            c.send(&cmd)?;
            match c.head()? {
                Head::Simple(_) => {}
                Head::Error(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("AUTH refused: {e}"),
                    ))
                }
                h => return Err(bad(format!("AUTH answered {h:?}"))),
            }
        }
        Ok(c)
    }

    /// RESP over an open stream (either end: a node reads its clients' commands the same way).
    pub fn over(stream: TcpStream) -> io::Result<Conn> {
        stream.set_nodelay(true)?;
        let reader = BufReader::with_capacity(
            1 << 16,
            Deadlined {
                stream: stream.try_clone()?,
                end: None,
            },
        );
        Ok(Conn {
            stream,
            reader,
            line: Vec::with_capacity(64),
        })
    }

    /// No read starts after `end` (`None`: no deadline).
    pub fn set_deadline(&mut self, end: Option<Instant>) {
        self.reader.get_mut().end = end;
    }

    /// The longest any one read or write may wait.
    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        self.stream.set_read_timeout(t)?;
        self.stream.set_write_timeout(t)
    }

    /// Sends requests (one or many commands).
    pub fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        self.stream.write_all(buf)
    }

    /// The first line of the next reply.
    pub fn head(&mut self) -> io::Result<Head> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            ));
        }
        let l = &self.line;
        if l.len() < 3 || !l.ends_with(b"\r\n") {
            return Err(bad(format!(
                "a reply line of {} bytes without CRLF",
                l.len()
            )));
        }
        let body = &l[1..l.len() - 2];
        let text = || String::from_utf8_lossy(body).into_owned();
        let int = || -> io::Result<i64> {
            std::str::from_utf8(body)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(format!("a reply length {:?}", text())))
        };
        Ok(match l[0] {
            b'$' | b'*' => {
                let n = int()?;
                if n < 0 {
                    Head::Nil
                } else if l[0] == b'$' {
                    Head::Bulk(n as usize)
                } else {
                    Head::Array(n as usize)
                }
            }
            b'+' => Head::Simple(text()),
            b'-' => Head::Error(text()),
            b':' => Head::Int(int()?),
            t => return Err(bad(format!("a reply starting with byte {t:#04x}"))),
        })
    }

    /// The `out.len()` bytes of a bulk reply whose head said that length, and its CRLF.
    pub fn payload(&mut self, out: &mut [u8]) -> io::Result<()> {
        self.reader.read_exact(out)?;
        let mut crlf = [0u8; 2];
        self.reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(bad("a bulk reply not ended by CRLF"));
        }
        Ok(())
    }

    /// Skips a bulk payload of `n` bytes (and its CRLF).
    pub fn skip(&mut self, n: usize) -> io::Result<()> {
        let want = n as u64 + 2;
        let got = io::copy(&mut (&mut self.reader).take(want), &mut io::sink())?;
        if got != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            ));
        }
        Ok(())
    }

    /// A whole reply, nested arrays included (at most `depth` deep, bulk strings at most
    /// `max_bulk` bytes, at most `budget` values in all, a bulk string of n bytes counting as
    /// 1 + n/16 values, so that the bytes too are bounded): for control commands only.
    pub fn value(
        &mut self,
        depth: usize,
        max_bulk: usize,
        budget: &mut usize,
    ) -> io::Result<Value> {
        if *budget == 0 {
            return Err(bad("a reply with too many values"));
        }
        *budget -= 1;
        Ok(match self.head()? {
            Head::Bulk(n) if n <= max_bulk && n / 16 <= *budget => {
                *budget -= n / 16;
                let mut b = vec![0u8; n];
                self.payload(&mut b)?;
                Value::Bulk(b)
            }
            Head::Bulk(n) => return Err(bad(format!("a bulk reply of {n} bytes"))),
            Head::Nil => Value::Nil,
            Head::Simple(s) => Value::Simple(s),
            Head::Error(e) => Value::Error(e),
            Head::Int(i) => Value::Int(i),
            Head::Array(_) if depth == 0 => return Err(bad("arrays nested too deep")),
            Head::Array(n) if n > *budget => return Err(bad(format!("an array of {n} values"))),
            Head::Array(n) => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(depth - 1, max_bulk, budget)?);
                }
                Value::Array(v)
            }
        })
    }
}

/// Which node serves each slot (masters only: the store reads what was written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// `host:port` of each master.
    pub nodes: Vec<String>,
    /// For each slot, its master's index in `nodes`, or `u16::MAX` when no node serves it.
    owner: Vec<u16>,
}

impl SlotMap {
    /// A map that serves no slot (before the first `CLUSTER SLOTS`).
    pub fn empty() -> Self {
        SlotMap {
            nodes: Vec::new(),
            owner: vec![u16::MAX; SLOTS],
        }
    }

    /// The map in a `CLUSTER SLOTS` reply; `asked` (the `host` of the node asked) stands in
    /// for an endpoint the node reports as empty or unknown.
    pub fn from_cluster_slots(v: &Value, asked: &str) -> Result<Self, String> {
        let ranges = match v {
            Value::Array(r) => r,
            // An error reply is an answer (a Redis without cluster mode says so here).
            Value::Error(e) => return Err(format!("answers CLUSTER SLOTS with: {e}")),
            v => return Err(format!("CLUSTER SLOTS answered {v:?}")),
        };
        let mut nodes: Vec<String> = Vec::new();
        let mut owner = vec![u16::MAX; SLOTS];
        for r in ranges {
            let Value::Array(f) = r else {
                return Err(format!("a CLUSTER SLOTS range {r:?}"));
            };
            let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(m))) =
                (f.first(), f.get(1), f.get(2))
            else {
                return Err(format!("a CLUSTER SLOTS range {f:?}"));
            };
            let (Some(host), Some(Value::Int(port))) = (m.first(), m.get(1)) else {
                return Err(format!("a CLUSTER SLOTS master {m:?}"));
            };
            let host = match host {
                Value::Bulk(h) => String::from_utf8_lossy(h).into_owned(),
                Value::Simple(h) => h.clone(),
                _ => String::new(),
            };
            let host = if host.is_empty() || host == "?" {
                asked.to_string()
            } else {
                host
            };
            if !(0..SLOTS as i64).contains(a) || !(0..SLOTS as i64).contains(b) || a > b {
                return Err(format!("a CLUSTER SLOTS range {a}..={b}"));
            }
            // A TCP port is 1..=65535; 0 or a negative one is what a node without a port
            // for this endpoint, or a corrupt reply, would give.
            if !(1..=u16::MAX as i64).contains(port) {
                return Err(format!(
                    "a CLUSTER SLOTS master port {port} for slots {a}..={b} (expected 1 to 65535)"
                ));
            }
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let i = match nodes.iter().position(|n| *n == addr) {
                Some(i) => i,
                None if nodes.len() >= u16::MAX as usize - 1 => {
                    // u16::MAX marks an unserved slot.
                    return Err(format!(
                        "a CLUSTER SLOTS reply of over {} nodes",
                        nodes.len()
                    ));
                }
                None => {
                    nodes.push(addr);
                    nodes.len() - 1
                }
            };
            owner[*a as usize..=*b as usize].fill(i as u16);
        }
        Ok(SlotMap { nodes, owner })
    }

    /// The node serving `slot`, if any.
    pub fn node_of(&self, slot: u16) -> Option<usize> {
        match self.owner.get(slot as usize) {
            Some(&i) if i != u16::MAX => Some(i as usize),
            _ => None,
        }
    }

    /// Slots no node serves.
    pub fn unserved(&self) -> usize {
        self.owner.iter().filter(|&&o| o == u16::MAX).count()
    }
}

/// What an error reply asks of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED slot addr`: the slot lives elsewhere now; refresh the map.
    Moved(String),
    /// `ASK slot addr`: this one key is at `addr` for now; send `ASKING` then the command.
    Ask(String),
    /// `TRYAGAIN`, `CLUSTERDOWN`, `LOADING`, `MASTERDOWN`, `BUSY`, too many clients: the
    /// cluster is changing or busy; retry.
    Retry,
    /// Anything else: the request itself is wrong.
    Fatal,
}

/// A redirect's `host:port` with the host filled in from `replier` (the `host:port` of the
/// node that sent it) where it is empty or `?` (Redis 7 `unknown-endpoint`), as in
/// `CLUSTER SLOTS`.
pub fn redirect_target(to: &str, replier: &str) -> String {
    match to.rsplit_once(':') {
        Some(("" | "?", port)) => {
            let host = replier.rsplit_once(':').map_or(replier, |(h, _)| h);
            format!("{host}:{port}")
        }
        _ => to.to_string(),
    }
}

/// Reads an error reply's text.
pub fn redirect(error: &str) -> Redirect {
    let mut w = error.split(' ');
    match w.next().unwrap_or("") {
        "MOVED" => Redirect::Moved(w.nth(1).unwrap_or("").to_string()),
        "ASK" => Redirect::Ask(w.nth(1).unwrap_or("").to_string()),
        "TRYAGAIN" | "CLUSTERDOWN" | "LOADING" | "MASTERDOWN" | "BUSY" => Redirect::Retry,
        "ERR" if error.starts_with("ERR max number of clients") => Redirect::Retry,
        _ => Redirect::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_spec() {
        // The examples of the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31C3
        );
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn commands_are_resp_arrays() {
        let mut b = Vec::new();
        push_command(&mut b, &[b"GET", b"eg:ab:10"]);
        push_command(&mut b, &[b"ASKING"]);
        assert_eq!(
            b,
            b"*2\r\n$3\r\nGET\r\n$8\r\neg:ab:10\r\n*1\r\n$6\r\nASKING\r\n".to_vec()
        );
    }

    #[test]
    fn error_replies_say_what_to_do() {
        assert_eq!(
            redirect("MOVED 3999 127.0.0.1:6381"),
            Redirect::Moved("127.0.0.1:6381".into())
        );
        assert_eq!(
            redirect("ASK 3999 127.0.0.1:6381"),
            Redirect::Ask("127.0.0.1:6381".into())
        );
        assert_eq!(redirect("CLUSTERDOWN The cluster is down"), Redirect::Retry);
        assert_eq!(
            redirect("BUSY Redis is busy running a script"),
            Redirect::Retry
        );
        assert_eq!(
            redirect("ERR max number of clients reached"),
            Redirect::Retry
        );
        assert_eq!(redirect("ERR unknown command"), Redirect::Fatal);
    }

    #[test]
    fn a_slot_map_from_cluster_slots() {
        let node = |h: &str, p: i64| Value::Array(vec![Value::Bulk(h.into()), Value::Int(p)]);
        let v = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7001)]),
        ]);
        let m = SlotMap::from_cluster_slots(&v, "h").unwrap();
        assert_eq!(m.nodes, vec!["10.0.0.1:7000", "h:7001"]);
        assert_eq!(m.node_of(0), Some(0));
        assert_eq!(m.node_of(5461), Some(1));
        assert_eq!(m.unserved(), 0);
        let bad = Value::Array(vec![Value::Array(vec![
            Value::Int(9),
            Value::Int(3),
            node("h", 1),
        ])]);
        assert!(SlotMap::from_cluster_slots(&bad, "h").is_err());
        let partial = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(99),
            node("h", 1),
        ])]);
        assert_eq!(
            SlotMap::from_cluster_slots(&partial, "h")
                .unwrap()
                .unserved(),
            SLOTS - 100
        );
        for port in [-1, 0, 70000] {
            let v = Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(99),
                node("h", port),
            ])]);
            let e = SlotMap::from_cluster_slots(&v, "h").unwrap_err();
            assert!(e.contains(&format!("port {port}")), "{e}");
        }
    }

    /// A fake node on loopback: answers each connection with `reply` and closes.
    fn fake(reply: &'static [u8]) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut b = [0u8; 256];
                let _ = s.read(&mut b);
                let _ = s.write_all(reply);
            }
        });
        addr
    }

    #[test]
    fn replies_are_parsed_in_place_and_bad_ones_refused() {
        let addr =
            fake(b"$3\r\nabc\r\n$-1\r\n-MOVED 1 h:1\r\n:7\r\n*2\r\n+OK\r\n$0\r\n\r\n$2\r\nxyZZ");
        let mut c = Conn::connect(&addr, &Auth::default(), Duration::from_secs(5)).unwrap();
        c.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
        assert_eq!(c.head().unwrap(), Head::Bulk(3));
        let mut b = [0u8; 3];
        c.payload(&mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(c.head().unwrap(), Head::Nil);
        assert_eq!(c.head().unwrap(), Head::Error("MOVED 1 h:1".into()));
        assert_eq!(c.head().unwrap(), Head::Int(7));
        assert_eq!(
            c.value(2, 16, &mut 3).unwrap(),
            Value::Array(vec![Value::Simple("OK".into()), Value::Bulk(vec![])])
        );
        assert_eq!(c.head().unwrap(), Head::Bulk(2));
        let mut b = [0u8; 2];
        assert!(c.payload(&mut b).is_err(), "a payload without its CRLF");
        assert!(c.head().is_err(), "the closed connection");

        // A reply of more values than the budget allows is refused before it is read.
        let addr = fake(b"*1000000\r\n:1\r\n:1\r\n");
        let mut c = Conn::connect(&addr, &Auth::default(), Duration::from_secs(5)).unwrap();
        c.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
        assert!(c.value(4, 16, &mut 1000).is_err());

        let addr = fake(b"?what\r\n");
        let mut c = Conn::connect(&addr, &Auth::default(), Duration::from_secs(5)).unwrap();
        c.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
        assert!(c.head().is_err());

        let addr = fake(b"$abc\r\n");
        let mut c = Conn::connect(&addr, &Auth::default(), Duration::from_secs(5)).unwrap();
        c.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
        assert!(c.head().is_err(), "a length that is not a number");
    }

    #[test]
    fn a_silent_node_times_out() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        // Accepts and holds the connection open, silent, until the test is over: a reply
        // can only end by the read timeout.
        let hold = std::thread::spawn(move || {
            let s = l.accept();
            let _ = wait.recv();
            drop(s);
        });
        let mut c = Conn::connect(&addr, &Auth::default(), Duration::from_millis(100)).unwrap();
        c.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
        let e = c.head().unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        done.send(()).unwrap();
        hold.join().unwrap();
    }

    /// A reply that trickles in, each byte within the read timeout, still ends at the
    /// deadline (here 300 ms, where the whole reply would take 6 s and each read may wait
    /// 5 s).
    #[test]
    fn a_trickling_reply_ends_at_the_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut b = [0u8; 64];
                let _ = s.read(&mut b);
                let _ = s.write_all(b"$120\r\n");
                for _ in 0..122 {
                    if s.write_all(b"x").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        // A long read timeout: only the deadline can end the reply early.
        let mut c = Conn::connect(&addr, &Auth::default(), Duration::from_secs(5)).unwrap();
        c.set_deadline(Some(Instant::now() + Duration::from_millis(300)));
        let t0 = Instant::now();
        c.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
        assert_eq!(c.head().unwrap(), Head::Bulk(120));
        let mut b = [0u8; 120];
        let e = c.payload(&mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn control_replies_are_bounded_in_bytes_too() {
        // 64 bulk strings of 1 KiB: 64 values, but 64 · (1 + 64) budget units.
        let mut reply = b"*64\r\n".to_vec();
        for _ in 0..64 {
            reply.extend_from_slice(b"$1024\r\n");
            reply.extend(std::iter::repeat_n(b'a', 1024));
            reply.extend_from_slice(b"\r\n");
        }
        let reply: &'static [u8] = Box::leak(reply.into_boxed_slice());
        for (budget, ok) in [(1000, false), (5000, true)] {
            let addr = fake(reply);
            let mut c = Conn::connect(&addr, &Auth::default(), Duration::from_secs(5)).unwrap();
            c.send(b"*1\r\n$4\r\nPING\r\n").unwrap();
            assert_eq!(
                c.value(2, 1024, &mut { budget }).is_ok(),
                ok,
                "budget {budget}"
            );
        }
    }

    #[test]
    fn a_redirect_without_a_host_goes_to_the_node_that_sent_it() {
        assert_eq!(redirect_target(":6381", "10.0.0.5:6379"), "10.0.0.5:6381");
        assert_eq!(redirect_target("?:6381", "[::1]:6379"), "[::1]:6381");
        assert_eq!(redirect_target("h:6381", "10.0.0.5:6379"), "h:6381");
        assert_eq!(redirect_target("[::2]:7000", "h:1"), "[::2]:7000");
    }
}
