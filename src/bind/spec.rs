//! The `--bind` values: [`BindSpec`], parsed without side effects at
//! config time (nothing is resolved, bound or opened), and shown back in
//! the same form it was given (`Display` round-trips through `parse`).

use std::os::fd::RawFd;
use std::path::PathBuf;

/// Port used when a bind spec names a host without a port (gunicorn's default).
pub const DEFAULT_PORT: u16 = 8000;

/// One `--bind` value, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindSpec {
    /// A TCP address; the host may be a name resolved at bind time.
    Tcp {
        /// IP literal or host name.
        host: String,
        /// Port; 0 asks the kernel for a free one.
        port: u16,
    },
    /// A unix stream socket at a path.
    Unix(PathBuf),
    /// An already-open listening socket inherited as this fd.
    Fd(RawFd),
}

impl BindSpec {
    /// Parses `HOST:PORT`, `:PORT`, `[V6]:PORT`, `tcp://…`, `unix:PATH`, `fd://N`.
    /// The error is only the reason; the caller names the flag and value.
    pub fn parse(text: &str) -> std::result::Result<BindSpec, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty address".into());
        }
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/app.sock".into());
            }
            // sun_path holds 108 bytes including the terminating NUL.
            if path.len() > 107 {
                return Err(format!(
                    "unix socket path is {} bytes long; the limit is 107",
                    path.len()
                ));
            }
            return Ok(BindSpec::Unix(PathBuf::from(path)));
        }
        if let Some(n) = text.strip_prefix("fd://") {
            let fd: RawFd = n
                .parse()
                .map_err(|_| format!("'{n}' is not a file descriptor number"))?;
            if fd < 3 {
                return Err(format!("fd {fd} is stdin, stdout or stderr, not a socket"));
            }
            return Ok(BindSpec::Fd(fd));
        }
        let rest = text.strip_prefix("tcp://").unwrap_or(text);
        if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| "missing ']' after the IPv6 address".to_string())?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("'{host}' is not an IPv6 address"))?;
            let port = match after {
                "" => DEFAULT_PORT,
                p => parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("unexpected '{p}' after ']'"))?,
                )?,
            };
            return Ok(BindSpec::Tcp {
                host: host.to_string(),
                port,
            });
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => {
                if host.contains(':') {
                    return Err("an IPv6 address must be in brackets, e.g. [::1]:8000".into());
                }
                (host, parse_port(port)?)
            }
            None => (rest, DEFAULT_PORT),
        };
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(format!("'{host}' is not a host name or IP address"));
        }
        Ok(BindSpec::Tcp {
            host: host.to_string(),
            port,
        })
    }

    /// The name this socket gets in `LISTEN_FDNAMES` (no `:`, printable ASCII).
    pub fn fd_name(&self) -> String {
        let raw = match self {
            BindSpec::Tcp { host, port } => format!("tcp-{host}-{port}"),
            BindSpec::Unix(p) => format!("unix-{}", p.display()),
            BindSpec::Fd(n) => format!("fd-{n}"),
        };
        let name: String = raw
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != ':' {
                    c
                } else {
                    '_'
                }
            })
            .take(255)
            .collect();
        name
    }
}

impl std::fmt::Display for BindSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindSpec::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            // "unix:80" would read back as a socket file named 80.
            BindSpec::Tcp { host, port } if host == "unix" => write!(f, "tcp://{host}:{port}"),
            BindSpec::Tcp { host, port } => write!(f, "{host}:{port}"),
            // parse() drops one leading "//" (unix://PATH), so a path that
            // starts with "//" is written with it to read back unchanged.
            BindSpec::Unix(p) if p.as_os_str().as_encoded_bytes().starts_with(b"//") => {
                write!(f, "unix://{}", p.display())
            }
            BindSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            BindSpec::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

fn parse_port(text: &str) -> std::result::Result<u16, String> {
    match text.parse::<u32>() {
        Ok(p) if p <= 65535 => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range (0-65535)")),
        Err(_) => Err(format!("'{text}' is not a port number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> BindSpec {
        BindSpec::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_every_documented_form() {
        let table: &[(&str, BindSpec)] = &[
            ("127.0.0.1:8000", tcp("127.0.0.1", 8000)),
            (":9000", tcp("0.0.0.0", 9000)),
            ("0.0.0.0:0", tcp("0.0.0.0", 0)),
            ("[::1]:8080", tcp("::1", 8080)),
            ("[::]:80", tcp("::", 80)),
            ("localhost:5000", tcp("localhost", 5000)),
            ("tcp://10.0.0.1:81", tcp("10.0.0.1", 81)),
            ("example.org", tcp("example.org", 8000)),
            ("unix:/run/app.sock", BindSpec::Unix("/run/app.sock".into())),
            ("unix:rel.sock", BindSpec::Unix("rel.sock".into())),
            ("fd://3", BindSpec::Fd(3)),
        ];
        for (text, want) in table {
            assert_eq!(BindSpec::parse(text).as_ref(), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_forms_with_a_reason() {
        let table: &[(&str, &str)] = &[
            ("", "empty"),
            (":65536", "out of range"),
            ("127.0.0.1:http", "not a port"),
            ("::1:80", "brackets"),
            ("[::1", "missing ']'"),
            ("[zz]:80", "not an IPv6"),
            ("unix:", "needs a path"),
            ("fd://x", "not a file descriptor"),
            ("fd://1", "stdin, stdout or stderr"),
            ("a b:80", "not a host"),
        ];
        for (text, want) in table {
            let err = BindSpec::parse(text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn fd_names_have_no_colons() {
        assert_eq!(tcp("::1", 80).fd_name(), "tcp-__1-80");
        assert_eq!(tcp("127.0.0.1", 80).fd_name(), "tcp-127.0.0.1-80");
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "127.0.0.1:80",
            "[::1]:80",
            "unix:/x.sock",
            "fd://4",
            "tcp://unix:80",
            "unix:////x.sock",
        ] {
            let spec = BindSpec::parse(text).expect("parses");
            assert_eq!(spec.to_string(), text);
            assert_eq!(BindSpec::parse(&spec.to_string()), Ok(spec));
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Text shaped like a bind spec, so that many cases parse.
    fn spec_like() -> impl Strategy<Value = String> {
        let host = prop_oneof![
            Just(String::new()),
            "[a-z0-9.:_\\[\\]/ -]{0,12}",
            Just("unix".to_string()),
            Just("fd".to_string()),
            Just("tcp".to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| format!("[{a}]")),
        ];
        let port = prop_oneof![
            Just(String::new()),
            (0u32..70000).prop_map(|p| format!(":{p}"))
        ];
        let prefix = prop_oneof![
            Just(""),
            Just("tcp://"),
            Just("unix:"),
            Just("unix://"),
            Just("fd://")
        ];
        (prefix, host, port).prop_map(|(pre, h, p)| format!("{pre}{h}{p}"))
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(512))]

        #[test]
        fn parse_never_panics(text in any::<String>()) {
            let _ = BindSpec::parse(&text);
        }

        #[test]
        fn what_parses_prints_back_to_the_same_spec(text in prop_oneof![spec_like(), any::<String>()]) {
            if let Ok(spec) = BindSpec::parse(&text) {
                let shown = spec.to_string();
                prop_assert_eq!(BindSpec::parse(&shown), Ok(spec), "{:?} shown as {:?}", text, shown);
            }
        }
    }
}
