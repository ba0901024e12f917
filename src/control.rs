//! The control socket of a mounted volume: how `kmfs status` and
//! `kmfs rotate-kek` talk to the running daemon.
//!
//! One Unix stream socket per volume at `/run/kmfs/<volume id>.sock` (directory
//! 0700, socket 0600, both root's; `KMFS_RUNTIME_DIR` overrides the directory).
//! Only root (or the daemon's own user) may talk to it: the peer's credentials
//! are checked with SO_PEERCRED on every connection. Protocol: one JSON request
//! line, one JSON response line, then the connection closes:
//!
//! ```text
//! → {"cmd":"status"}
//! ← {"ok":true,"result":{...}}
//! → {"cmd":"rotate_kek","new_key":null,"revoke_old":false}
//! ← {"ok":false,"error":"rotation failed at step ...","code":12}
//! ```
//!
//! A failure carries `code`, the exit code of its class ([`crate::exitcode`]),
//! so an online command exits with the same code as the offline one would for
//! the same cause (an unreachable key server is 12 either way).
//!
//! A malformed request gets an error response and never affects the mount.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rotation::RotateRequest;

/// Default directory for control sockets.
pub const RUNTIME_DIR: &str = "/run/kmfs";
const MAX_REQUEST: u64 = 64 * 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    RotateKek {
        #[serde(default)]
        new_key: Option<String>,
        #[serde(default)]
        revoke_old: bool,
        #[serde(default)]
        new_keyfile: Option<PathBuf>,
    },
    /// Start a rekey (or change the running one's throttle).
    Rekey {
        #[serde(default)]
        rate_mb: Option<f64>,
        #[serde(default)]
        cpu: Option<u8>,
    },
    RekeyStatus,
    RekeyPause,
    RekeyResume,
}

/// What a rekey request asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RekeyAction {
    Start(crate::rekey::Throttle),
    Status,
    Pause,
    Resume,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With `error`: the exit code of the failure's class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
}

impl Response {
    fn ok(v: serde_json::Value) -> Response {
        Response {
            ok: true,
            result: Some(v),
            error: None,
            code: None,
        }
    }

    fn fail(f: Failure) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(f.msg),
            code: Some(f.code),
        }
    }
}

/// A failed control request: the one-line message and the exit code of its
/// class ([`crate::exitcode`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub code: i32,
    pub msg: String,
}

impl Failure {
    pub fn new(code: i32, msg: impl Into<String>) -> Failure {
        Failure {
            code,
            msg: msg.into(),
        }
    }
}

/// A bare message is a failure of no particular class.
impl From<String> for Failure {
    fn from(msg: String) -> Failure {
        Failure::new(crate::exitcode::OTHER, msg)
    }
}

impl From<&str> for Failure {
    fn from(msg: &str) -> Failure {
        Failure::new(crate::exitcode::OTHER, msg)
    }
}

/// What the daemon does for control requests.
pub trait ControlHandler: Send + Sync {
    fn status(&self) -> serde_json::Value;
    fn rotate(&self, req: &RotateRequest) -> Result<serde_json::Value, Failure>;
    fn rekey(&self, action: RekeyAction) -> Result<serde_json::Value, Failure>;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no kmfs daemon is serving volume {id} (no control socket at {path})")]
    NotRunning { id: String, path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("control socket {path}: malformed answer from the daemon")]
    BadAnswer { path: PathBuf },
    /// The daemon answered with a failure; `code` is its class's exit code.
    #[error("{msg}")]
    Refused { msg: String, code: i32 },
    #[error("volume {0} is already mounted by another kmfs daemon")]
    AlreadyServed(String),
}

/// The runtime directory (env override for unprivileged development).
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("KMFS_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUNTIME_DIR))
}

/// The control socket path of a volume.
pub fn socket_path(volume_id_hex: &str) -> PathBuf {
    runtime_dir().join(format!("{volume_id_hex}.sock"))
}

/// A running control server; dropping it stops serving and removes the socket.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn peer_allowed(stream: &UnixStream) -> Result<u32, String> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials)
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(cred.uid())
    } else {
        Err(format!(
            "permission denied: uid {} may not control this volume",
            cred.uid()
        ))
    }
}

fn answer(stream: &mut UnixStream, r: &Response) {
    if let Ok(mut line) = serde_json::to_vec(r) {
        line.push(b'\n');
        let _ = stream.write_all(&line);
    }
}

fn handle(mut stream: UnixStream, handler: &dyn ControlHandler) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let uid = match peer_allowed(&stream) {
        Ok(u) => u,
        Err(e) => {
            log::warn!("op=control result=fail error={e:?}");
            answer(
                &mut stream,
                &Response::fail(Failure::new(crate::exitcode::CONTROL, e)),
            );
            return;
        }
    };
    let mut line = String::new();
    let read = match stream.try_clone() {
        Ok(s) => BufReader::new(s.take(MAX_REQUEST)).read_line(&mut line),
        Err(e) => Err(e),
    };
    let resp = match read.map_err(|e| e.to_string()).and_then(|_| {
        serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("malformed request: {e}"))
    }) {
        Err(e) => Response::fail(Failure::new(crate::exitcode::USAGE, e)),
        Ok(Request::Status) => Response::ok(handler.status()),
        Ok(req) => {
            let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_default();
            let _actor = crate::audit::acting_as(uid, &name);
            let r = match req {
                Request::Status => Ok(handler.status()),
                Request::RotateKek {
                    new_key,
                    revoke_old,
                    new_keyfile,
                } => handler.rotate(&RotateRequest {
                    new_key,
                    revoke_old,
                    new_keyfile,
                }),
                Request::Rekey { rate_mb, cpu } => {
                    handler.rekey(RekeyAction::Start(crate::rekey::Throttle { rate_mb, cpu }))
                }
                Request::RekeyStatus => handler.rekey(RekeyAction::Status),
                Request::RekeyPause => handler.rekey(RekeyAction::Pause),
                Request::RekeyResume => handler.rekey(RekeyAction::Resume),
            };
            match r {
                Ok(v) => Response::ok(v),
                Err(f) => Response::fail(f),
            }
        }
    };
    answer(&mut stream, &resp);
}

impl ControlServer {
    /// Binds the socket for volume `id` and serves requests on a thread.
    pub fn start(
        id: &str,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<ControlServer, ControlError> {
        let path = socket_path(id);
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let io_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| ControlError::Io { path: p, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        if path.exists() {
            wait_for_previous_daemon(id)?;
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        let listener = UnixListener::bind(&path).map_err(io_err(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(&path))?;
        listener.set_nonblocking(true).map_err(io_err(&path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kmfs-control".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            handle(s, handler.as_ref());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
            .map_err(io_err(&path))?;
        Ok(ControlServer {
            path,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Unlink first, while the listener still answers: once it is closed, a
        // new daemon for the same volume (remount right after umount) takes
        // the socket as stale and binds its own at this path, which a later
        // unlink here would delete.
        let _ = std::fs::remove_file(&self.path);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `path` is a mountpoint now (per /proc/self/mountinfo).
fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().any(|l| l.split(' ').nth(4) == Some(path)))
        .unwrap_or(false)
}

/// A socket for volume `id` exists. If a daemon answers on it and its mount is
/// live, the volume is already served. If its mount is gone, that daemon is
/// shutting down (an unmount just happened): wait, bounded, for it to leave.
fn wait_for_previous_daemon(id: &str) -> Result<(), ControlError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match request(id, &Request::Status, Duration::from_secs(2)) {
            Ok(st) => {
                let live = st["mountpoint"].as_str().is_some_and(is_mountpoint);
                if live || std::time::Instant::now() >= deadline {
                    return Err(ControlError::AlreadyServed(id.to_string()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Nobody answers: a stale socket of a daemon that died.
            Err(_) => return Ok(()),
        }
    }
}

/// Sends one request to the daemon serving volume `id`.
pub fn request(
    id: &str,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ControlError> {
    let path = socket_path(id);
    let io_err = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning {
                id: id.to_string(),
                path: path.clone(),
            });
        }
        Err(e) => return Err(io_err(e)),
    };
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    s.write_all(&line).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(s.take(16 << 20))
        .read_line(&mut answer)
        .map_err(io_err)?;
    let resp: Response = serde_json::from_str(answer.trim())
        .map_err(|_| ControlError::BadAnswer { path: path.clone() })?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Refused {
            msg: resp.error.unwrap_or_else(|| "unknown error".into()),
            // An older daemon sends no class.
            code: resp.code.unwrap_or(crate::exitcode::OTHER),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fake {
        rotations: Mutex<u32>,
    }

    impl ControlHandler for Fake {
        fn status(&self) -> serde_json::Value {
            serde_json::json!({"volume_id": "abc", "mountpoint": "/", "rotations": *self.rotations.lock().unwrap()})
        }
        fn rotate(&self, req: &RotateRequest) -> Result<serde_json::Value, Failure> {
            if req.new_key.as_deref() == Some("bad") {
                return Err(Failure::new(12, "no such key"));
            }
            *self.rotations.lock().unwrap() += 1;
            Ok(serde_json::json!({"done": true}))
        }
        fn rekey(&self, action: RekeyAction) -> Result<serde_json::Value, Failure> {
            Ok(serde_json::json!({"action": format!("{action:?}")}))
        }
    }

    // One test: KMFS_RUNTIME_DIR is process-global.
    #[test]
    fn status_rotate_malformed_and_double_serve() {
        let d = tempfile::tempdir().unwrap();
        // SAFETY: set_var races only with other threads reading the environment;
        // no other test in this binary reads KMFS_RUNTIME_DIR.
        unsafe { std::env::set_var("KMFS_RUNTIME_DIR", d.path()) };
        let h = Arc::new(Fake {
            rotations: Mutex::new(0),
        });
        let srv = ControlServer::start("v1", h.clone()).unwrap();
        let mode = std::fs::metadata(srv.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let t = Duration::from_secs(5);
        assert_eq!(request("v1", &Request::Status, t).unwrap()["rotations"], 0);
        let r = Request::RotateKek {
            new_key: None,
            revoke_old: false,
            new_keyfile: None,
        };
        assert_eq!(request("v1", &r, t).unwrap()["done"], true);
        let bad = Request::RotateKek {
            new_key: Some("bad".into()),
            revoke_old: false,
            new_keyfile: None,
        };
        assert!(
            matches!(request("v1", &bad, t), Err(ControlError::Refused { msg, code: 12 }) if msg == "no such key")
        );

        // Garbage, an unknown command and an over-long line get errors; the
        // server keeps serving.
        for junk in [
            &b"not json\n"[..],
            b"{\"cmd\":\"format_disk\"}\n",
            &[b'x'; 70_000][..],
        ] {
            let mut s = UnixStream::connect(srv.path()).unwrap();
            let _ = s.write_all(junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            assert!(out.contains("\"ok\":false"), "{out}");
        }
        assert_eq!(request("v1", &Request::Status, t).unwrap()["rotations"], 1);
        let r = request(
            "v1",
            &Request::Rekey {
                rate_mb: Some(5.0),
                cpu: None,
            },
            t,
        )
        .unwrap();
        assert!(
            r["action"].as_str().unwrap().contains("rate_mb: Some(5.0)"),
            "{r}"
        );
        let r = request("v1", &Request::RekeyPause, t).unwrap();
        assert_eq!(r["action"], "Pause");

        // A second daemon for the same volume is refused.
        assert!(matches!(
            ControlServer::start("v1", h.clone()),
            Err(ControlError::AlreadyServed(_))
        ));
        let p = srv.path().to_path_buf();
        drop(srv);
        assert!(!p.exists());
        assert!(matches!(
            request("v1", &Request::Status, t),
            Err(ControlError::NotRunning { .. })
        ));
    }
}
