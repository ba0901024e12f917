//! Test harness: a throw-away PKI made with the `openssl` CLI and real PyKMIP
//! servers (`/usr/bin/pykmip-server`, Debian python3-pykmip) on 127.0.0.1.
//!
//! Facts this relies on (see shared/notes/KEY-SERVERS.md): the server speaks TLS
//! 1.2 only with ECDSA-GCM suites, so every certificate here is EC P-256; it is
//! ready only once its log says "Starting connection service"; SIGKILL of the
//! main PID orphans helper processes, so each server runs in its own process
//! group and the whole group is killed on drop.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SERVER_BIN: &str = "/usr/bin/pykmip-server";
pub const PYTHON: &str = "/usr/bin/python3";

/// Whether PyKMIP is installed; if not, the test is skipped ([`super::skip`]).
pub fn available() -> bool {
    if Path::new(SERVER_BIN).exists() && Path::new(PYTHON).exists() {
        return true;
    }
    super::skip(&format!(
        "{SERVER_BIN} is missing (apt-get install python3-pykmip)"
    ));
    false
}

const OPENSSL_CNF: &str = r#"
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[server_wrong_name]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:kmip.example.invalid,IP:127.0.0.9
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
[client_no_eku]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
[client_server_eku]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
"#;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate and its private key (mode 0600).
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The test PKI: two CAs and certificates issued by them.
#[derive(Debug)]
pub struct Pki {
    pub ca: PathBuf,
    /// A CA that signed nothing the servers use.
    pub other_ca: PathBuf,
    /// Server certificate for IP 127.0.0.1.
    pub server: CertKey,
    /// Server certificate for another name and IP.
    pub server_wrong_name: CertKey,
    /// Client certificate CN=kmfs-test with clientAuth.
    pub client: CertKey,
    /// Client certificate with another CN (another owner on PyKMIP).
    pub client_other_cn: CertKey,
    /// Client certificate without any extended key usage extension.
    pub client_no_eku: CertKey,
    /// Client certificate whose extended key usage is serverAuth only.
    pub client_server_eku: CertKey,
    /// Server certificate for 127.0.0.1 that has expired.
    pub server_expired: CertKey,
    /// Client certificate that has expired.
    pub client_expired: CertKey,
    /// Client certificate signed by `other_ca`.
    pub client_other_ca: CertKey,
}

fn key(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.key"));
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&p));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn ca(dir: &Path, cnf: &Path, name: &str) -> (PathBuf, PathBuf) {
    let k = key(dir, name);
    let c = dir.join(format!("{name}.pem"));
    run(Command::new("openssl")
        .args(["req", "-new", "-x509", "-days", "30", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-key")
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .arg("-config")
        .arg(cnf)
        .args(["-extensions", "v3_ca"]));
    (c, k)
}

/// A new key and a certificate request for `cn`: (key, request, the path
/// the certificate is to be written to).
fn request(dir: &Path, cnf: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf, PathBuf) {
    let k = key(dir, name);
    let csr = dir.join(format!("{name}.csr"));
    let c = dir.join(format!("{name}.pem"));
    run(Command::new("openssl")
        .args(["req", "-new", "-subj"])
        .arg(format!("/CN={cn}"))
        .arg("-key")
        .arg(&k)
        .arg("-out")
        .arg(&csr)
        .arg("-config")
        .arg(cnf));
    (k, csr, c)
}

fn leaf(
    dir: &Path,
    cnf: &Path,
    ca: &(PathBuf, PathBuf),
    name: &str,
    cn: &str,
    ext: &str,
) -> CertKey {
    let (k, csr, c) = request(dir, cnf, name, cn);
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "30", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca.0)
        .arg("-CAkey")
        .arg(&ca.1)
        .args(["-set_serial"])
        .arg(format!(
            "{}",
            1000 + name.len() * 7 + name.bytes().map(usize::from).sum::<usize>()
        ))
        .arg("-out")
        .arg(&c)
        .arg("-extfile")
        .arg(cnf)
        .args(["-extensions", ext]));
    CertKey { cert: c, key: k }
}

/// A certificate from `ca` that expired long ago (valid 2020-01-01 to 2020-01-02).
fn expired_leaf(
    dir: &Path,
    cnf: &Path,
    ca: &(PathBuf, PathBuf),
    name: &str,
    cn: &str,
    ext: &str,
) -> CertKey {
    let (k, csr, c) = request(dir, cnf, name, cn);
    let db = dir.join(format!("{name}-ca"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("index.txt"), "").unwrap();
    std::fs::write(db.join("serial"), "4000\n").unwrap();
    let ca_cnf = db.join("ca.cnf");
    std::fs::write(
        &ca_cnf,
        format!(
            "[ca]\ndefault_ca = t\n[t]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n",
            d = db.display()
        ),
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["ca", "-batch", "-notext", "-config"])
        .arg(&ca_cnf)
        .arg("-cert")
        .arg(&ca.0)
        .arg("-keyfile")
        .arg(&ca.1)
        .arg("-in")
        .arg(&csr)
        .arg("-out")
        .arg(&c)
        .args([
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
            "-extfile",
        ])
        .arg(cnf)
        .args(["-extensions", ext]));
    CertKey { cert: c, key: k }
}

impl Pki {
    /// Generates the whole PKI under `dir` (a private directory).
    pub fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let cnf = dir.join("openssl.cnf");
        std::fs::write(&cnf, OPENSSL_CNF).unwrap();
        let main = ca(dir, &cnf, "kmfs-test-ca");
        let other = ca(dir, &cnf, "kmfs-other-ca");
        Pki {
            server: leaf(dir, &cnf, &main, "server", "kmip-server", "server"),
            server_wrong_name: leaf(
                dir,
                &cnf,
                &main,
                "server-wrong-name",
                "kmip-elsewhere",
                "server_wrong_name",
            ),
            client: leaf(dir, &cnf, &main, "client", "kmfs-test", "client"),
            client_other_cn: leaf(
                dir,
                &cnf,
                &main,
                "client-other-cn",
                "someone-else",
                "client",
            ),
            client_no_eku: leaf(
                dir,
                &cnf,
                &main,
                "client-no-eku",
                "kmfs-test",
                "client_no_eku",
            ),
            client_server_eku: leaf(
                dir,
                &cnf,
                &main,
                "client-server-eku",
                "kmfs-test",
                "client_server_eku",
            ),
            server_expired: expired_leaf(
                dir,
                &cnf,
                &main,
                "server-expired",
                "kmip-server",
                "server",
            ),
            client_expired: expired_leaf(dir, &cnf, &main, "client-expired", "kmfs-test", "client"),
            client_other_ca: leaf(dir, &cnf, &other, "client-other-ca", "kmfs-test", "client"),
            ca: main.0,
            other_ca: other.0,
        }
    }

    /// A `[[kmip.server]]` section for a server `name` on 127.0.0.1:`port`,
    /// trusting [`Pki::ca`] and presenting [`Pki::client`].
    pub fn toml_server(&self, name: &str, port: u16) -> String {
        format!(
            "[[kmip.server]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            self.ca.display(),
            self.client.cert.display(),
            self.client.key.display()
        )
    }
}

/// A running PyKMIP server in its own process group; killed on drop.
pub struct PykmipServer {
    pub port: u16,
    child: Child,
    stopped: bool,
}

use super::free_port;

/// A 127.0.0.1 port with nothing listening on it (for "server down" tests).
pub fn closed_port() -> u16 {
    free_port()
}

impl PykmipServer {
    /// Starts a server with `cert` on a free port, storing keys in `database`
    /// (two servers given the same file share their keys). `dir` receives the
    /// config and log.
    pub fn start(pki: &Pki, cert: &CertKey, database: &Path, dir: &Path) -> PykmipServer {
        std::fs::create_dir_all(dir).unwrap();
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        for attempt in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("server-{port}.conf"));
            let log = dir.join(format!("server-{port}.log"));
            std::fs::write(
                &conf,
                format!(
                    "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={}\nkey_path={}\nca_path={}\nauth_suite=TLS1.2\nenable_tls_client_auth=True\npolicy_path={}\ndatabase_path={}\nlogging_level=DEBUG\n",
                    cert.cert.display(),
                    cert.key.display(),
                    pki.ca.display(),
                    policies.display(),
                    database.display()
                ),
            )
            .unwrap();
            let child = Command::new(PYTHON)
                .arg(SERVER_BIN)
                .arg("-f")
                .arg(&conf)
                .arg("-l")
                .arg(&log)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("cannot start pykmip-server");
            let mut server = PykmipServer {
                port,
                child,
                stopped: false,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Starting connection service") {
                    return server;
                }
                if text.contains("Address already in use") {
                    break; // port raced away: drop this server, try another port
                }
                if let Ok(Some(status)) = server.child.try_wait() {
                    panic!(
                        "pykmip-server exited ({status}) during start-up; log {}:\n{text}",
                        log.display()
                    );
                }
                if Instant::now() > deadline {
                    panic!(
                        "pykmip-server did not start within 30 s; log {}:\n{text}",
                        log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("pykmip port {port} was taken (attempt {attempt}); retrying");
        }
        panic!("could not start pykmip-server on a free port");
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, sig);
    }

    /// Freezes the server (SIGSTOP): TCP connects still succeed, nothing answers.
    pub fn hang(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        self.stopped = true;
    }

    /// Undoes [`PykmipServer::hang`].
    pub fn resume(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.stopped = false;
    }
}

impl Drop for PykmipServer {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
