//! Reading a request's sticky key.
//!
//! Owns: the key sources (`header:NAME`, `cookie:NAME`, `query:NAME`), the
//! search for the first non-empty one, the fallback cookie, the override
//! header and fresh fallback ids. Does not own: hashing the key (`bucket`) or
//! deciding the cohort (`routing::decide`).

use std::borrow::Cow;

use http::header::COOKIE;
use http::{HeaderMap, HeaderName, Uri};
use percent_encoding::percent_decode;

use super::Cohort;

/// Where a sticky key may be read from, as written in `routing.sticky_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(HeaderName),
    Cookie(String),
    Query(String),
}

impl KeySource {
    /// Parses `header:NAME`, `cookie:NAME` or `query:NAME`.
    pub fn parse(text: &str) -> Result<KeySource, String> {
        let invalid =
            || format!("{text:?} is not one of \"header:NAME\", \"cookie:NAME\", \"query:NAME\"");
        let (kind, name) = text.split_once(':').ok_or_else(invalid)?;
        if name.is_empty() {
            return Err(invalid());
        }
        match kind {
            "header" => HeaderName::from_bytes(name.as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("{text:?}: {name:?} is not a valid header name")),
            "cookie" if is_cookie_name(name) => Ok(KeySource::Cookie(name.to_owned())),
            "cookie" => Err(format!("{text:?}: {name:?} is not a valid cookie name")),
            "query" => Ok(KeySource::Query(name.to_owned())),
            _ => Err(invalid()),
        }
    }

    /// The value this source finds in a request, if it is there and non-empty.
    #[must_use]
    pub fn find<'a>(&self, headers: &'a HeaderMap, uri: &'a Uri) -> Option<Cow<'a, [u8]>> {
        let value = match self {
            KeySource::Header(name) => headers.get(name).map(|v| Cow::Borrowed(v.as_bytes())),
            KeySource::Cookie(name) => cookie(headers, name).map(Cow::Borrowed),
            KeySource::Query(name) => query_value(uri.query()?, name),
        };
        value.filter(|v| !v.is_empty())
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Header(name) => write!(f, "header:{name}"),
            KeySource::Cookie(name) => write!(f, "cookie:{name}"),
            KeySource::Query(name) => write!(f, "query:{name}"),
        }
    }
}

/// The request's sticky key: the first non-empty configured source, then the
/// fallback cookie `cookie_name`, which is always tried last.
#[must_use]
pub fn extract<'a>(
    headers: &'a HeaderMap,
    uri: &'a Uri,
    sources: &[KeySource],
    cookie_name: &str,
) -> Option<Cow<'a, [u8]>> {
    sources
        .iter()
        .find_map(|source| source.find(headers, uri))
        .or_else(|| {
            cookie(headers, cookie_name)
                .filter(|v| !v.is_empty())
                .map(Cow::Borrowed)
        })
}

/// The cohort forced by the override header (`stable` or `canary`), if any.
#[must_use]
pub fn forced_cohort(headers: &HeaderMap, override_header: Option<&HeaderName>) -> Option<Cohort> {
    let value = headers.get(override_header?)?.as_bytes();
    if value.eq_ignore_ascii_case(b"canary") {
        Some(Cohort::Canary)
    } else if value.eq_ignore_ascii_case(b"stable") {
        Some(Cohort::Stable)
    } else {
        None
    }
}

/// A fresh random 128-bit id, in hex, for a client that brought no key.
#[must_use]
pub fn fresh_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The value of cookie `name` among all `Cookie` headers (RFC 6265 syntax).
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (n, v) = (&pair[..eq], &pair[eq + 1..]);
            (n.trim_ascii() == name.as_bytes()).then(|| {
                let v = v.trim_ascii();
                v.strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v)
            })
        })
}

/// Whether `name` can name a cookie: an HTTP token (RFC 6265 section 4.1.1).
#[must_use]
pub fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The value of the first parameter `name` in `query` (the part of a URI
/// after `?`), decoded as a form is (`+` a space, `%XX` a byte) to bytes,
/// none of them read as UTF-8: the key `%E9` is the byte 0xE9, which the
/// SPEC's hash is computed over, as for a header's.
#[must_use]
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, [u8]>> {
    query.as_bytes().split(|&b| b == b'&').find_map(|pair| {
        let (n, v) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &b""[..]),
        };
        (form_decoded(n).as_ref() == name.as_bytes()).then(|| form_decoded(v))
    })
}

/// `application/x-www-form-urlencoded` bytes, decoded.
fn form_decoded(encoded: &[u8]) -> Cow<'_, [u8]> {
    if encoded.contains(&b'+') {
        let spaced: Vec<u8> = encoded
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        Cow::Owned(percent_decode(&spaced).collect())
    } else {
        percent_decode(encoded).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn first_non_empty_source_wins_and_fallback_cookie_is_last() {
        let sources = [
            KeySource::parse("header:x-user-id").unwrap(),
            KeySource::parse("cookie:session").unwrap(),
            KeySource::parse("query:user").unwrap(),
        ];
        let uri: Uri = "/chat?user=al%40ice&x=1".parse().unwrap();
        let h = headers(&[
            ("x-user-id", ""),
            ("cookie", "a=1; session=\"s-1\"; cohort_id=f"),
        ]);
        assert_eq!(
            extract(&h, &uri, &sources, "cohort_id").as_deref(),
            Some(&b"s-1"[..])
        );
        let h = headers(&[("cookie", "cohort_id=f")]);
        assert_eq!(
            extract(&h, &uri, &sources, "cohort_id").as_deref(),
            Some(&b"al@ice"[..])
        );
        let plain: Uri = "/".parse().unwrap();
        assert_eq!(
            extract(&h, &plain, &sources, "cohort_id").as_deref(),
            Some(&b"f"[..])
        );
        assert_eq!(
            extract(&HeaderMap::new(), &plain, &sources, "cohort_id"),
            None
        );
    }

    #[test]
    fn a_query_key_is_decoded_to_its_own_bytes() {
        let user = |query| query_value(query, "user");
        // Not UTF-8: two users stay two keys.
        assert_eq!(user("user=ren%E9&x=1").as_deref(), Some(&b"ren\xe9"[..]));
        assert_eq!(user("user=ren%E8").as_deref(), Some(&b"ren\xe8"[..]));
        assert_eq!(user("a=1&user=a+b%2Bc").as_deref(), Some(&b"a b+c"[..]));
        assert_eq!(user("us%65r=x&user=y").as_deref(), Some(&b"x"[..]));
        assert_eq!(user("user").as_deref(), Some(&b""[..]));
        assert_eq!(user("users=1&&=2"), None);
    }

    #[test]
    fn bad_sources_are_refused() {
        assert!(KeySource::parse("body:user").is_err());
        assert!(KeySource::parse("header:").is_err());
        assert!(KeySource::parse("header:bad header").is_err());
    }

    #[test]
    fn override_header() {
        let name = HeaderName::from_static("x-cohort");
        let h = headers(&[("x-cohort", "Canary")]);
        assert_eq!(forced_cohort(&h, Some(&name)), Some(Cohort::Canary));
        assert_eq!(forced_cohort(&h, None), None);
        let h = headers(&[("x-cohort", "blue")]);
        assert_eq!(forced_cohort(&h, Some(&name)), None);
    }
}
