//! Several "hosts" on this machine, for the high-availability tests
//! (docs/HA.md): each host is a network namespace with its own veth link to a
//! switch — a bridge in a namespace of its own — and its own host name. The
//! namespaces are named after this process and a counter (unique per run and
//! per test), created by [`Lab::new`]/[`Lab::host`] and removed, with every
//! process still running in them, on drop (also when the test panics): no
//! traffic leaves them and nothing is left behind.
//!
//! A host's commands run under `nsenter --net=/run/netns/NS`, which enters
//! only the network namespace: unlike `ip netns exec` it does not give the
//! command a mount namespace of its own, so a FUSE mount made by a host is
//! visible to the test (the stand-in for a SAN LUN or NFS export is simply a
//! directory both hosts reach). `unshare --uts` gives each host its own host
//! name, so a lock holder record names the host it came from.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether network namespaces can be made here (root, iproute2). Without
/// them the test is skipped loudly — or fails when `KMFS_REQUIRE_ALL=1`.
pub fn available() -> bool {
    let probe = format!(
        "kmfsprobe{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        let tools = ["nsenter", "unshare"].iter().all(|t| {
            Command::new(t)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if tools {
            return true;
        }
    }
    super::skip("cannot create a network namespace (needs root, iproute2, nsenter, unshare)");
    false
}

/// Whether `nft` is installed (the blackhole fault needs it).
pub fn nft_available() -> bool {
    let ok = Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        super::skip("nft is missing (apt-get install nftables)");
    }
    ok
}

fn run(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A switch and the hosts linked to it, on 10.77.0.0/24.
pub struct Lab {
    prefix: String,
    switch: String,
    namespaces: Vec<String>,
    next_ip: u8,
}

/// One host: a network namespace with `eth0` on the switch.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub hostname: String,
    pub ip: String,
}

impl Lab {
    pub fn new() -> Lab {
        let prefix = format!(
            "kmfs{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{prefix}sw");
        let mut lab = Lab {
            prefix,
            switch: switch.clone(),
            namespaces: Vec::new(),
            next_ip: 1,
        };
        run(&["ip", "netns", "add", &switch]);
        lab.namespaces.push(switch.clone());
        run(&["ip", "-n", &switch, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &switch, "link", "set", "br0", "up"]);
        run(&["ip", "-n", &switch, "link", "set", "lo", "up"]);
        lab
    }

    /// Adds a host named `label` (namespace `kmfsPIDxN` + label, host name
    /// `label`) with the next address.
    pub fn host(&mut self, label: &str) -> Host {
        let ns = format!("{}{label}", self.prefix);
        let ip = format!("10.77.0.{}", self.next_ip);
        self.next_ip += 1;
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let port = format!("v{}", self.next_ip);
        run(&[
            "ip",
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        run(&[
            "ip",
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ]);
        run(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        Host {
            ns,
            hostname: label.to_string(),
            ip,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            // Processes left in the namespace (a daemon of a failed test)
            // would keep it alive after its name is gone.
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Host {
    /// `PROG` to be run on this host: in its network namespace (not its own
    /// mount namespace) with its host name.
    pub fn command(&self, prog: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .args([
                "unshare",
                "--uts",
                "sh",
                "-c",
                "hostname \"$0\" && exec \"$@\"",
            ])
            .arg(&self.hostname)
            .arg(prog);
        c
    }

    /// `ip ARGS` in this host's namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["ip", "-n", &self.ns];
        v.extend_from_slice(args);
        run(&v);
    }

    /// Takes this host's link down (`ip link set eth0 down`) or up again.
    pub fn link(&self, up: bool) {
        self.ip(&["link", "set", "eth0", if up { "up" } else { "down" }]);
    }

    /// Drops (blackholes, no answer, no reset) every packet arriving at this
    /// host for TCP `port`, with an nft rule; `false` removes it again.
    pub fn blackhole(&self, port: u16, on: bool) {
        let script = if on {
            format!(
                "table inet kmfs_test {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp dport {port} drop\n  }}\n}}\n"
            )
        } else {
            "delete table inet kmfs_test\n".to_string()
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let o: Output = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A userspace TCP proxy in a host's network namespace, for faults that
/// this kernel's missing `netem` cannot make: every chunk the upstream sends
/// back is held for `delay` before it is passed on, or, when `stall` is set,
/// swallowed (the connection stays up, no answer ever arrives: total loss
/// after the TCP handshake, which TCP's own retransmissions would otherwise
/// hide). Requests are passed on unchanged. Stops on drop.
pub struct Proxy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `listen` in `host`'s namespace, forwarding to `upstream`
    /// (reached from that namespace).
    pub fn start(
        host: &Host,
        listen: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
    ) -> Proxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let stop = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let stall = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = format!("/run/netns/{}", host.ns);
        let (s, d, st) = (stop.clone(), delay_ms.clone(), stall.clone());
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap();
            // SAFETY: setns(2) with a valid namespace descriptor; it moves
            // only this thread (and the threads it starts) into the
            // namespace.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let l = std::net::TcpListener::bind(listen).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = std::net::TcpStream::connect(upstream) else {
                            continue;
                        };
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        std::thread::spawn(move || pump(c2, s2, None, None));
                        let (d, st) = (d.clone(), st.clone());
                        std::thread::spawn(move || pump(server, client, Some(d), Some(st)));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        rx.recv().unwrap();
        Proxy {
            stop,
            delay_ms,
            stall,
            thread: Some(thread),
        }
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    delay: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    stall: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stall.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            continue;
        }
        if let Some(d) = &delay {
            std::thread::sleep(std::time::Duration::from_millis(d.load(Ordering::Relaxed)));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Prints a measurement line straight to stderr (not through the test
/// harness's capture): the HA tests' timings and memory show in every run.
pub fn report(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
