//! TLS to PostgreSQL, from the connection string as libpq reads it.
//!
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require` and no
//! `sslrootcert`; operators write libpq's strings. So the string is read
//! here first ([`target`]): `sslmode=require`, `verify-ca` and
//! `verify-full` all mean TLS with the server's certificate verified (chain
//! and host name, as `verify-full`: a connection that is encrypted to
//! whoever answers protects nothing), against `sslrootcert` (PEM) or else
//! the system's CAs; `disable` and `prefer` (the default) mean no TLS, as
//! before. Both `key=value` strings and `postgres://` URLs are read.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::path::PathBuf;
use std::sync::Arc;

/// Whether and how to speak TLS to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Plain (`sslmode` `disable` or `prefer`).
    Off,
    /// TLS, verified against these roots (`sslrootcert`) or the system's.
    Verified(Option<PathBuf>),
}

/// The connection string tokio-postgres can read, and the TLS wanted.
/// Pure: unit-tested below.
pub fn split(url: &str) -> Result<(String, Tls), String> {
    let (mut mode, mut root) = (None::<String>, None::<PathBuf>);
    let rest = if let Some((base, query)) = url.split_once('?').filter(|_| url.contains("://")) {
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.to_owned()),
                Some(("sslrootcert", v)) => root = Some(PathBuf::from(percent_decode(v))),
                _ => kept.push(pair),
            }
        }
        if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) }
    } else if url.contains("://") {
        url.to_owned()
    } else {
        let mut kept = Vec::new();
        for (key, value) in key_values(url)? {
            match key.as_str() {
                "sslmode" => mode = Some(value),
                "sslrootcert" => root = Some(PathBuf::from(value)),
                _ => kept.push(format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))),
            }
        }
        kept.join(" ")
    };
    let tls = match mode.as_deref() {
        None | Some("disable" | "allow" | "prefer") => Tls::Off,
        Some("require" | "verify-ca" | "verify-full") => Tls::Verified(root.clone()),
        Some(other) => return Err(format!("sslmode {other:?}: use disable, prefer, require or verify-full")),
    };
    if tls == Tls::Off && root.is_some() {
        return Err("sslrootcert is set but sslmode does not ask for TLS: add sslmode=verify-full".into());
    }
    Ok((rest, tls))
}

/// `key=value` pairs of a libpq connection string (values may be quoted
/// with `'`, with `\` escaping).
fn key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_owned();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("{key}: unterminated quoted value")),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied().filter(|c| !c.is_whitespace()) {
                value.push(c);
                chars.next();
            }
        }
        if key.is_empty() {
            return Err("a value without a key".into());
        }
        out.push((key, value));
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The rustls connector for [`Tls::Verified`].
pub fn connector(root: Option<&std::path::Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|c| c.collect::<Result<_, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("sslrootcert {}: no certificate in the file", path.display()));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests fail loudly by design.
    use super::*;

    #[test]
    fn libpq_tls_settings_are_read_and_removed_from_both_forms() {
        let (rest, tls) =
            split("host=db.example port=5432 dbname=outpost sslmode=verify-full sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(tls, Tls::Verified(Some("/etc/ca.pem".into())));
        assert_eq!(rest, "host='db.example' port='5432' dbname='outpost'");
        assert!(rest.parse::<tokio_postgres::Config>().is_ok());
        assert_eq!(split("host=/run/postgresql dbname=outpost").unwrap().1, Tls::Off);
        assert_eq!(split("host=db sslmode=require").unwrap().1, Tls::Verified(None));
        assert_eq!(split("host=db password='a b\\'c'").unwrap().0, "host='db' password='a b\\'c'");

        let (rest, tls) = split(
            "postgres://outpost@db.example/outpost?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(tls, Tls::Verified(Some("/etc/ca.pem".into())));
        assert_eq!(rest, "postgres://outpost@db.example/outpost?connect_timeout=3");
        assert_eq!(split("postgres://db/outpost?sslmode=prefer").unwrap(), ("postgres://db/outpost".into(), Tls::Off));

        assert!(split("host=db sslmode=sometimes").unwrap_err().contains("sslmode"));
        assert!(split("host=db sslrootcert=/x").unwrap_err().contains("verify-full"));
        assert!(split("host='db").is_err());
    }
}
