//! `--web-config` on a real trace: TLS with a certificate this test makes
//! (openssl CLI, self-signed for 127.0.0.1) and basic auth with a bcrypt
//! hash. Without credentials 401, with a wrong password 401, with the right
//! ones 200 and the metrics; plain HTTP to the TLS port gets no metrics. A
//! file with a mistake is one line before anything is attached. Root needed.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::{mpsc, Arc},
    thread,
    time::Duration,
};

use base64::Engine;
use common::{prom::*, *};

/// A self-signed certificate and key for 127.0.0.1 in `dir`.
fn make_certificate(dir: &Path) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=leaktrace-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "keyUsage=digitalSignature", "-addext", "extendedKeyUsage=serverAuth"])
        .output()
        .expect("openssl (installed by `cargo xtask setup`)");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
}

/// `GET /metrics` over TLS trusting only `cert.pem`; `auth`: user and password.
/// Returns the status line and the body.
fn https_get(addr: &str, dir: &Path, auth: Option<(&str, &str)>) -> (String, String) {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let auth = auth
        .map(|(u, p)| format!("Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))))
        .unwrap_or_default();
    write!(tls, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

#[test]
fn tls_and_basic_auth_from_an_exporter_toolkit_web_config() {
    let dir = TempDir::new("web-config");
    make_certificate(&dir.0);
    let hash = bcrypt::hash("scrape-me", 6).unwrap();
    // Relative paths are from the file's directory, as in exporter-toolkit.
    std::fs::write(
        dir.0.join("web.yml"),
        format!("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\nbasic_auth_users:\n  prometheus: '{hash}'\n"),
    )
    .unwrap();
    let web = dir.0.join("web.yml").display().to_string();
    let target = start("conn_leak", &["--no-leak"]);
    let pid = target.pid().to_string();
    let mut child = Command::new(leaktrace())
        .args(["attach", "--pid", &pid, "--interval", "1s", "--for", "30s", "--json", "--listen", "127.0.0.1:0", "--web-config", &web])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _tracer = Proc { name: "leaktrace", child };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("serving metrics at ").nth(1) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(30)).expect("leaktrace never said where it serves");
    let addr = url.strip_prefix("https://").and_then(|u| u.strip_suffix("/metrics")).unwrap_or_else(|| panic!("not https: {url}")).to_string();

    let (head, _) = https_get(&addr, &dir.0, None);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(head.to_ascii_lowercase().contains("www-authenticate: basic"), "{head}");
    let (head, _) = https_get(&addr, &dir.0, Some(("prometheus", "wrong")));
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let (head, body) = https_get(&addr, &dir.0, Some(("prometheus", "scrape-me")));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("leaktrace_up") && body.contains("leaktrace_build_info"), "{body}");
    // Again (the verified credentials are remembered): still 200.
    assert!(https_get(&addr, &dir.0, Some(("prometheus", "scrape-me"))).0.starts_with("HTTP/1.1 200"));
    // Plain HTTP to the TLS port: no metrics.
    let plain = http_get_status(&addr, "/metrics");
    assert!(!matches!(plain, Ok((200, _))), "plain HTTP got metrics: {plain:?}");
    drop(target);
}

#[test]
fn a_wrong_web_config_is_one_line_before_attaching() {
    let dir = TempDir::new("web-config-bad");
    let target = start("conn_leak", &["--no-leak"]);
    let pid = target.pid().to_string();
    for (text, says) in [
        ("basic_auth_users:\n  prometheus: secret\n", "not a bcrypt hash"),
        ("tls_server_config:\n  cert_file: missing.pem\n  key_file: key.pem\n", "missing.pem"),
        ("basic_auth_user:\n  a: b\n", "unknown field"),
    ] {
        std::fs::write(dir.0.join("web.yml"), text).unwrap();
        let web = dir.0.join("web.yml").display().to_string();
        let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "5s", "--listen", "127.0.0.1:0", "--web-config", &web]);
        assert_eq!(run.status, 1, "{text}: {}", run.stderr);
        let line = error_line(&run);
        assert!(line.contains("--web-config") && line.contains(says), "{text}: {line}");
    }
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "1s", "--web-config", "/x.yml"]);
    assert_eq!(run.status, 2, "{}", run.stderr);
    drop(target);
}
