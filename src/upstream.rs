//! Upstreams: where a version's requests go and the pooled client that takes them there.
//!
//! Owns: the upstream address forms of SPEC section 9 (`host:port`,
//! `https://host:port`, `h2c://host:port`), and the keep-alive connection
//! pool shared by every version. Does not own: choosing a version (`routing`)
//! or an upstream within it (`table::Version::pick`), nor turning failures
//! into responses (`proxy::error`).

use std::fmt;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;

/// How an upstream is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `host:port`: HTTP/1.1 over TCP.
    Http1,
    /// `h2c://host:port`: HTTP/2 with prior knowledge, no TLS.
    H2c,
    /// `https://host:port`: TLS, HTTP/2 or HTTP/1.1 by ALPN.
    Https,
}

/// One upstream address, as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamAddr {
    pub protocol: Protocol,
    pub authority: Authority,
}

impl UpstreamAddr {
    /// Parses `host:port`, `h2c://host:port` or `https://host:port`.
    pub fn parse(text: &str) -> Result<UpstreamAddr, String> {
        let (protocol, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (Protocol::Https, rest)
        } else if let Some(rest) = text.strip_prefix("h2c://") {
            (Protocol::H2c, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (Protocol::Http1, rest)
        } else if text.contains("://") {
            return Err(format!(
                "{text:?}: only \"host:port\", \"http://\", \"h2c://\" and \"https://\" upstreams are supported"
            ));
        } else {
            (Protocol::Http1, text)
        };
        let authority: Authority = rest
            .parse()
            .map_err(|_| format!("{text:?} is not an address such as \"127.0.0.1:9001\""))?;
        if authority.port_u16().is_none() || authority.host().is_empty() || rest.contains('@') {
            return Err(format!(
                "{text:?} needs a host and a port, such as \"127.0.0.1:9001\""
            ));
        }
        Ok(UpstreamAddr {
            protocol,
            authority,
        })
    }

    /// The scheme the pooled client connects with.
    #[must_use]
    pub fn scheme(&self) -> Scheme {
        match self.protocol {
            Protocol::Https => Scheme::HTTPS,
            Protocol::Http1 | Protocol::H2c => Scheme::HTTP,
        }
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Http1 => write!(f, "{}", self.authority),
            Protocol::H2c => write!(f, "h2c://{}", self.authority),
            Protocol::Https => write!(f, "https://{}", self.authority),
        }
    }
}

impl serde::Serialize for UpstreamAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for UpstreamAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        UpstreamAddr::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The pooled HTTP/1.1 client every proxied request goes through.
pub type UpstreamClient = Client<HttpConnector, Incoming>;

/// Builds the pooled client: kept-alive connections, `TCP_NODELAY`, the
/// connect timeout, and idle connections closed after `idle_timeout`.
#[must_use]
pub fn client(config: &UpstreamConfig) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.idle_timeout)
        .pool_max_idle_per_host(config.max_idle_per_host)
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_forms() {
        let a = UpstreamAddr::parse("127.0.0.1:9001").unwrap();
        assert_eq!(
            (a.protocol, a.to_string().as_str()),
            (Protocol::Http1, "127.0.0.1:9001")
        );
        assert_eq!(
            UpstreamAddr::parse("h2c://agent:80").unwrap().protocol,
            Protocol::H2c
        );
        assert_eq!(
            UpstreamAddr::parse("https://agent:443").unwrap().protocol,
            Protocol::Https
        );
        for bad in ["agent", "ftp://agent:21", "", ":80", "u@agent:80"] {
            assert!(UpstreamAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
