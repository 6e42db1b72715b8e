//! TLS settings: the listener's certificate and the roots `https://` upstreams are checked against.
//!
//! Owns: reading the PEM certificate chain and private key of `[listen.tls]`
//! into a rustls server config (TLS 1.2 and 1.3, ALPN from `listen.tls.alpn`,
//! with `http/1.0` served beside `http/1.1`),
//! swapping in a new pair on reload while a bad pair leaves the old one
//! serving ([`ServerTls`]), and the client config for `https://` upstreams:
//! the system's roots, or only those of `upstream.ca_file`, whose own
//! certificates an upstream may present ([`client_config`]).
//! Every error names the config key and the file. Does not own: the
//! handshake on accepted connections (`proxy::listener`), connecting to
//! upstreams (`upstream`), or when a reload happens (`serve`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why a certificate, key or CA file cannot be used, named by its config
/// key (`listen.tls.cert: cannot read /etc/cohort/cert.pem: ...`).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {kind}")]
pub struct TlsError {
    /// `listen.tls.cert`, `listen.tls.key`, `listen.tls` (the pair) or `upstream.ca_file`.
    pub key: &'static str,
    pub kind: TlsErrorKind,
}

/// What is wrong with the file. Every variant names it.
#[derive(Debug, thiserror::Error)]
pub enum TlsErrorKind {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error(
        "{} holds an encrypted private key, and there is nowhere to give its passphrase: decrypt it (openssl pkey -in KEY -out PLAIN-KEY)",
        path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error("{} is not valid PEM: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    #[error(
        "the key in {} cannot serve the certificate in {}: {source}",
        key.display(),
        cert.display()
    )]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: Box<rustls::Error>,
    },
    #[error("its certificates cannot check upstreams' certificates: {source}")]
    Verifier {
        source: Box<rustls::client::VerifierBuilderError>,
    },
    #[error("{} holds a certificate that cannot be a trust root: {source}", path.display())]
    Root {
        path: PathBuf,
        source: Box<rustls::Error>,
    },
}

/// The listener's TLS server config, replaceable while connections are open.
///
/// Each handshake takes the config current when it starts; a connection
/// keeps the certificate it was served with until it closes.
#[derive(Debug)]
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<ServerConfig>,
}

impl ServerTls {
    /// Reads the certificate chain and key named by `config`.
    pub fn load(config: &TlsConfig) -> Result<ServerTls, TlsError> {
        let alpn: Vec<Vec<u8>> = config.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let current = server_config(&config.cert, &config.key, &alpn)?;
        Ok(ServerTls {
            cert: config.cert.clone(),
            key: config.key.clone(),
            alpn,
            current: ArcSwap::from_pointee(current),
        })
    }

    /// Every reason the files named by `config` cannot serve, as `load`
    /// would meet them, but both files' problems at once: for `cohort check`.
    #[must_use]
    pub fn check(config: &TlsConfig) -> Vec<TlsError> {
        let unreadable: Vec<TlsError> = [
            read_certs(&config.cert).err().map(|kind| TlsError {
                key: "listen.tls.cert",
                kind,
            }),
            read_key(&config.key).err().map(|kind| TlsError {
                key: "listen.tls.key",
                kind,
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !unreadable.is_empty() {
            return unreadable;
        }
        ServerTls::load(config).err().into_iter().collect()
    }

    /// Reads the certificate and key files again and serves new handshakes
    /// with them. On error the old pair keeps serving.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert, &self.key, &self.alpn)?;
        self.current.store(Arc::new(config));
        Ok(())
    }

    /// An acceptor for one handshake, with the current certificate.
    #[must_use]
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

/// The client config for `https://` upstreams: ALPN `h2` then `http/1.1`,
/// and as roots the certificates in `ca_file` if set, else the system's.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut named = Vec::new();
    match ca_file {
        Some(path) => {
            let error = |kind| TlsError {
                key: "upstream.ca_file",
                kind,
            };
            for cert in read_certs(path).map_err(error)? {
                roots.add(cert.clone()).map_err(|source| {
                    error(TlsErrorKind::Root {
                        path: path.to_owned(),
                        source: Box::new(source),
                    })
                })?;
                named.push(cert);
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "skipping unreadable system root certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "loaded the system root certificates");
        }
    }
    let builder = ClientConfig::builder();
    let mut config = if named.is_empty() {
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        let webpki = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(builder.crypto_provider()),
        )
        .build()
        .map_err(|source| TlsError {
            key: "upstream.ca_file",
            kind: TlsErrorKind::Verifier {
                source: Box::new(source),
            },
        })?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NamedInCaFile { webpki, named }))
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The usual check of an upstream's certificate against `upstream.ca_file`,
/// which also takes a certificate that is itself in that file and marked
/// as a CA, as a self-signed one made by `openssl req -x509` is by default:
/// the operator named that very certificate, and nginx and curl take it.
/// WebPKI refuses a CA as a server's certificate (`CaUsedAsEndEntity`), and
/// that refusal alone is overruled. Such a certificate must still name the
/// upstream; it is in its validity period, which WebPKI checks before it
/// looks at what kind of certificate it is; its extended key usage, which
/// WebPKI checks after, is not checked.
#[derive(Debug)]
struct NamedInCaFile {
    webpki: Arc<WebPkiServerVerifier>,
    /// The certificates of `upstream.ca_file`, as they are in it.
    named: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for NamedInCaFile {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verified {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)))
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) && self.named.iter().any(|named| named == end_entity) =>
            {
                let parsed = ParsedCertificate::try_from(end_entity)?;
                verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            verified => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn server_config(cert: &Path, key: &Path, alpn: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let chain = read_certs(cert).map_err(|kind| TlsError {
        key: "listen.tls.cert",
        kind,
    })?;
    let private_key = read_key(key).map_err(|kind| TlsError {
        key: "listen.tls.key",
        kind,
    })?;
    // Also checks that the key belongs to the first certificate.
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError {
            key: "listen.tls",
            kind: TlsErrorKind::Pair {
                cert: cert.to_owned(),
                key: key.to_owned(),
                source: Box::new(source),
            },
        })?;
    config.alpn_protocols = alpn.to_vec();
    // A client that offers only `http/1.0` speaks HTTP/1.x too: served,
    // as nginx serves it, rather than refused the handshake.
    if alpn.iter().any(|p| p == b"http/1.1") {
        config.alpn_protocols.push(b"http/1.0".to_vec());
    }
    Ok(config)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsErrorKind> {
    crate::files::read_file(path, crate::files::Pipes::Refused).map_err(|source| {
        TlsErrorKind::Read {
            path: path.to_owned(),
            source,
        }
    })
}

/// Every certificate in the PEM file at `path`, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsErrorKind> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsErrorKind::Pem {
            path: path.to_owned(),
            detail: error.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsErrorKind::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path`.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsErrorKind> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| match error {
        // PKCS#8's encrypted form, or OpenSSL's legacy one.
        _ if [
            &b"ENCRYPTED PRIVATE KEY-----"[..],
            b"Proc-Type: 4,ENCRYPTED",
        ]
        .iter()
        .any(|marker| pem.windows(marker.len()).any(|w| w == *marker)) =>
        {
            TlsErrorKind::EncryptedKey {
                path: path.to_owned(),
            }
        }
        rustls::pki_types::pem::Error::NoItemsFound => TlsErrorKind::NoKey {
            path: path.to_owned(),
        },
        other => TlsErrorKind::Pem {
            path: path.to_owned(),
            detail: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn a_bad_pair_is_refused_by_name_and_the_old_one_stays() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let (cert, key) = write_pair(dir, "a");
        let (other_cert, _) = write_pair(dir, "b");
        let config = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            alpn: vec!["h2".into(), "http/1.1".into()],
        };
        let tls = ServerTls::load(&config).unwrap();
        let before = tls.current.load_full();
        assert_eq!(
            before.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()]
        );

        // A certificate whose key is elsewhere.
        std::fs::copy(&other_cert, &cert).unwrap();
        let error = tls.reload().unwrap_err();
        assert!(matches!(error.kind, TlsErrorKind::Pair { .. }), "{error}");
        assert!(error.to_string().starts_with("listen.tls: "), "{error}");
        assert!(
            error.to_string().contains(&*cert.to_string_lossy()),
            "{error}"
        );
        assert!(Arc::ptr_eq(&before, &tls.current.load_full()));

        // An encrypted key, which there is no passphrase to open.
        std::fs::write(
            &key,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = tls.reload().unwrap_err();
        assert!(
            matches!(error.kind, TlsErrorKind::EncryptedKey { .. }),
            "{error}"
        );
        assert!(error.to_string().starts_with("listen.tls.key: "), "{error}");

        // Garbage where the key was.
        std::fs::write(&key, "not a key").unwrap();
        let error = tls.reload().unwrap_err();
        assert!(matches!(error.kind, TlsErrorKind::NoKey { .. }), "{error}");
        assert!(error.to_string().starts_with("listen.tls.key: "), "{error}");
        assert!(
            error.to_string().contains(&*key.to_string_lossy()),
            "{error}"
        );

        // A missing file.
        std::fs::remove_file(&cert).unwrap();
        let error = tls.reload().unwrap_err();
        assert!(matches!(error.kind, TlsErrorKind::Read { .. }), "{error}");
        assert!(
            error.to_string().starts_with(&format!(
                "listen.tls.cert: cannot read {}: ",
                cert.display()
            )),
            "{error}"
        );
        assert!(Arc::ptr_eq(&before, &tls.current.load_full()));

        // A good pair again is taken.
        let (good_cert, good_key) = write_pair(dir, "c");
        std::fs::copy(&good_cert, &cert).unwrap();
        std::fs::copy(&good_key, &key).unwrap();
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &tls.current.load_full()));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "nothing here").unwrap();
        let error = client_config(Some(&path)).unwrap_err();
        assert!(
            matches!(error.kind, TlsErrorKind::NoCertificate { .. }),
            "{error}"
        );
        assert!(
            error.to_string().starts_with("upstream.ca_file: "),
            "{error}"
        );
        let (cert, _) = write_pair(dir, "root");
        let config = client_config(Some(&cert)).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
