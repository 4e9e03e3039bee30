//! `--web-config FILE`: TLS and basic authentication for `/metrics`, in the
//! Prometheus exporter-toolkit's web configuration format, so the file an
//! exporter already uses works here too:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt      # PEM; relative paths are from the file's directory
//!   key_file: server.key
//!   min_version: TLS12         # or TLS13 (default TLS12)
//! basic_auth_users:
//!   prometheus: $2y$10$...     # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! What exporter-toolkit has and this does not (client certificates, cipher
//! and curve choices, `http_server_config`) is refused with one line rather
//! than ignored.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// The file as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    http_server_config: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    cipher_suites: Option<serde_norway::Value>,
    curve_preferences: Option<serde_norway::Value>,
    prefer_server_cipher_suites: Option<bool>,
}

/// A loaded web configuration.
pub struct WebConfig {
    /// TLS, when `tls_server_config` is there.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// User name → bcrypt hash; empty: no authentication.
    users: BTreeMap<String, String>,
    /// `Authorization` header values already verified (bcrypt is slow on
    /// purpose: a scrape every few seconds must not pay it each time).
    verified: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig").field("tls", &self.tls.is_some()).field("users", &self.users.keys()).finish()
    }
}

/// Verified credentials kept (beyond it the set starts over).
const MAX_VERIFIED: usize = 64;

impl WebConfig {
    /// Reads and checks `path`: every error is one line that names the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--web-config {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| anyhow!("--web-config {}: {}", path.display(), format!("{e:#}").replace('\n', " ")))
    }

    /// Parses a web configuration; relative paths are from `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Self> {
        let file: File = if text.trim().is_empty() { File::default() } else { serde_norway::from_str(text)? };
        if file.http_server_config.is_some() {
            bail!("http_server_config is not supported (headers and HTTP/2 settings)");
        }
        let users = file.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if !is_bcrypt(hash) {
                bail!("basic_auth_users.{user}: not a bcrypt hash ($2a$, $2b$ or $2y$, 60 characters)");
            }
            if user.contains(':') {
                bail!("basic_auth_users.{user}: a user name cannot hold ':'");
            }
        }
        let tls = file.tls_server_config.map(|t| tls_config(t, dir)).transpose()?;
        Ok(Self { tls, users, verified: Mutex::new(HashSet::new()) })
    }

    /// Whether requests must carry a user and password.
    pub fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether an `Authorization` header value names a user whose
    /// password matches its hash. Runs bcrypt on a blocking thread.
    pub async fn authorized(self: &Arc<Self>, header: Option<&str>) -> bool {
        let Some(header) = header else { return false };
        if self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(header) {
            return true;
        }
        let Some((user, password)) = basic_credentials(header) else { return false };
        let Some(hash) = self.users.get(&user).cloned() else { return false };
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false)).await.unwrap_or(false);
        if ok {
            let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(header.to_string());
        }
        ok
    }
}

fn is_bcrypt(hash: &str) -> bool {
    hash.len() == 60 && ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p))
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(header: &str) -> Option<(String, String)> {
    use base64::Engine;
    let encoded = header.strip_prefix("Basic ").or_else(|| header.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn tls_config(t: TlsFile, dir: &Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    if t.client_auth_type.as_deref().is_some_and(|a| a != "NoClientCert") || t.client_ca_file.is_some() {
        bail!("tls_server_config: client certificates (client_auth_type, client_ca_file) are not supported");
    }
    if t.cipher_suites.is_some() || t.curve_preferences.is_some() || t.prefer_server_cipher_suites.is_some() || t.max_version.is_some() {
        bail!("tls_server_config: cipher_suites, curve_preferences, prefer_server_cipher_suites and max_version are not supported (rustls' safe defaults are used)");
    }
    let path = |p: Option<PathBuf>, what: &str| -> Result<PathBuf> {
        let p = p.ok_or_else(|| anyhow!("tls_server_config: {what} is required"))?;
        Ok(if p.is_relative() { dir.join(p) } else { p })
    };
    let (cert_file, key_file) = (path(t.cert_file, "cert_file")?, path(t.key_file, "key_file")?);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| anyhow!("cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        bail!("cert_file {}: no certificate in it", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| anyhow!("key_file {}: {e}", key_file.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(v) => bail!("tls_server_config.min_version: {v} is not supported (TLS12 or TLS13)"),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow!("cert_file and key_file do not make a certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_it_does_not_do_in_one_line() {
        let dir = Path::new("/nonexistent");
        for (text, says) in [
            ("basic_auth_users:\n  a: plain\n", "not a bcrypt hash"),
            ("http_server_config:\n  http2: false\n", "http_server_config"),
            ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n", "client certificates"),
            ("tls_server_config:\n  key_file: b\n", "cert_file is required"),
            ("tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n", "/nonexistent/c.pem"),
            ("tls_srever_config: {}\n", "unknown field"),
        ] {
            let e = format!("{:#}", WebConfig::parse(text, dir).unwrap_err());
            assert!(e.contains(says), "{text}: {e}");
        }
        assert!(!WebConfig::parse("", dir).unwrap().requires_auth());
    }

    #[tokio::test]
    async fn basic_auth_checks_the_bcrypt_hash_and_remembers() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let web = Arc::new(WebConfig::parse(&format!("basic_auth_users:\n  prom: '{hash}'\n"), Path::new(".")).unwrap());
        assert!(web.requires_auth());
        use base64::Engine;
        let header = |u: &str, p: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")));
        assert!(web.authorized(Some(&header("prom", "s3cret"))).await);
        assert!(web.verified.lock().unwrap().contains(&header("prom", "s3cret")));
        assert!(!web.authorized(Some(&header("prom", "wrong"))).await);
        assert!(!web.authorized(Some(&header("other", "s3cret"))).await);
        assert!(!web.authorized(Some("Bearer x")).await);
        assert!(!web.authorized(None).await);
    }
}
