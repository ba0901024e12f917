//! Outside servers a test starts for itself (smbd, ganesha.nfsd): whether
//! their tools are installed, and waiting until one listens.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The tools of `tools` that are not on the PATH.
pub fn missing<'a>(tools: &[&'a str]) -> Vec<&'a str> {
    tools.iter().copied().filter(|t| !have(t)).collect()
}

/// Waits up to 20 s until something listens on 127.0.0.1:`port`; panics
/// with `logs()` if the server `child` (called `name`) exits first or the
/// time runs out.
pub fn wait_listening(name: &str, port: u16, child: &mut Child, logs: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{name} exited with {st}:\n{}", logs());
        }
        assert!(
            Instant::now() < deadline,
            "{name} not listening on port {port} after 20 s:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
