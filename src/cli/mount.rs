//! `kmfs mount`: unlock a volume and serve it with FUSE.
//!
//! Without `-f` the command forks *before* anything else happens; the child
//! unlocks the volume, mounts, and only when the mount is live tells the
//! parent (through a pipe) to exit 0. Any failure before that is sent to the
//! parent, which prints it and exits with its code, so `mount -t fuse.kmfs`
//! returns only when the mount is ready or has failed. SIGTERM, SIGINT and
//! SIGHUP unmount cleanly; so do `fusermount3 -u` and `umount`.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use super::{CliError, KeySource};
use crate::control::ControlServer;
use crate::daemon::VolumeControl;
use crate::exitcode;
use crate::fs::stats::IoStats;
use crate::fs::{FsOptions, KmfsFs};
use crate::logging::{LogLevel, LoggingConfig};
use crate::volume::lock::VolumeLock;

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub keys: KeySource,
    /// Stay in the foreground.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Mount options, comma-separated (config=FILE, keyfile=PATH, allow_other, ro, ...).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    pub backing_dir: PathBuf,
    pub mountpoint: PathBuf,
}

/// Parsed `-o` options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub config: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub allow_other: bool,
    pub read_only: bool,
    pub log_level: Option<LogLevel>,
    pub fsname: Option<String>,
    /// `None`: the default subtype `kmfs`; `Some("")`: no subtype.
    pub subtype: Option<String>,
    /// `dev`: device nodes in the volume may be opened. Off by default
    /// (`nodev`): the backing store is not trusted to hold device nodes.
    pub dev: bool,
    /// `suid`: set-user/group-id bits take effect. Off by default (`nosuid`).
    pub suid: bool,
    pub noexec: bool,
    pub noatime: bool,
    /// `no_writeback`: no kernel writeback cache (every write(2) reaches the
    /// daemon before it returns).
    pub no_writeback: bool,
    /// `insecure_backing`: serve a backing directory that users other than
    /// root can enter or change (refused by default, docs/SECURITY.md).
    pub insecure_backing: bool,
    /// `lock_wait=SECONDS`: wait this long for the volume's writer lock
    /// (a takeover after fencing, while an NFS lease still holds it) instead
    /// of failing after a few seconds. Never breaks the lock (docs/HA.md).
    pub lock_wait: Option<u64>,
}

/// Options mount(8)/fstab pass that concern the mount helper or the kernel's
/// defaults, accepted and ignored.
const TOLERATED: &[&str] = &[
    "_netdev",
    "nofail",
    "noauto",
    "auto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "exec",
    "atime",
    "relatime",
    "norelatime",
    "strictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "async",
    "defaults",
    "default_permissions",
    "rw",
];

fn usage(msg: impl Into<String>) -> CliError {
    CliError::other(exitcode::USAGE, msg)
}

/// Parses the `-o` option strings (each may hold several, comma-separated).
pub fn parse_options(opts: &[String]) -> Result<MountOptions, CliError> {
    let mut m = MountOptions::default();
    for o in opts.iter().flat_map(|s| s.split(',')) {
        let o = o.trim();
        if o.is_empty() {
            continue;
        }
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o, None),
        };
        match (k, v) {
            ("config", Some(v)) if !v.is_empty() => m.config = Some(PathBuf::from(v)),
            ("keyfile", Some(v)) if !v.is_empty() => m.keyfile = Some(PathBuf::from(v)),
            ("log_level", Some(v)) => {
                m.log_level = Some(v.parse().map_err(|e| usage(format!("-o log_level: {e}")))?)
            }
            ("fsname", Some(v)) => m.fsname = Some(v.to_string()),
            ("subtype", Some(v)) => m.subtype = Some(v.to_string()),
            ("allow_other", None) => m.allow_other = true,
            ("ro", None) => m.read_only = true,
            ("rw", None) => m.read_only = false,
            ("nodev", None) => m.dev = false,
            ("nosuid", None) => m.suid = false,
            ("dev", None) => m.dev = true,
            ("suid", None) => m.suid = true,
            ("noexec", None) => m.noexec = true,
            ("noatime", None) => m.noatime = true,
            ("no_writeback", None) => m.no_writeback = true,
            ("insecure_backing", None) => m.insecure_backing = true,
            ("lock_wait", Some(v)) => {
                m.lock_wait = Some(v.parse::<u64>().ok().filter(|s| *s <= 86_400).ok_or_else(
                    || {
                        usage(format!(
                            "-o lock_wait={v}: give whole seconds, at most 86400"
                        ))
                    },
                )?)
            }
            (k, _) if k.starts_with("x-systemd.") || k.starts_with("x-") => {}
            ("comment", Some(_)) => {}
            (k, None) if TOLERATED.contains(&k) => {}
            _ => {
                return Err(usage(format!(
                    "unknown or malformed mount option {o:?} (known: config=FILE, keyfile=PATH, allow_other, default_permissions, ro, rw, log_level=LEVEL, fsname=NAME, subtype=NAME, lock_wait=SECONDS, nodev/dev, nosuid/suid, noexec, noatime and the usual fstab options)"
                )));
            }
        }
    }
    Ok(m)
}

fn mount_err(msg: impl Into<String>) -> CliError {
    CliError::other(exitcode::MOUNT, msg)
}

pub fn run(a: MountArgs) -> Result<(), CliError> {
    let opts = parse_options(&a.options)?;
    let mut keys = a.keys.clone();
    if keys.config.is_none() && keys.keyfile.is_none() {
        keys.config = opts.config.clone();
        if keys.config.is_none() {
            keys.keyfile = opts.keyfile.clone();
        }
    } else if opts.config.is_some() || opts.keyfile.is_some() {
        return Err(usage(
            "give the key source once: either --config/--keyfile or -o config=/keyfile=",
        ));
    }
    if keys.config.is_some() && keys.keyfile.is_some() {
        return Err(usage("config= and keyfile= exclude each other"));
    }
    let backing = std::fs::canonicalize(&a.backing_dir).map_err(|e| {
        CliError::other(
            exitcode::BACKING_DIR,
            format!("backing directory {}: {e}", a.backing_dir.display()),
        )
    })?;
    if !backing.is_dir() {
        return Err(CliError::other(
            exitcode::BACKING_DIR,
            format!("backing directory {} is not a directory", backing.display()),
        ));
    }
    if opts.insecure_backing {
        log::warn!(
            "op=mount path={} result=warn msg=\"insecure_backing: the backing directory's permissions are not checked\"",
            backing.display()
        );
    } else {
        crate::credfile::check_backing_dir(&backing)
            .map_err(|e| CliError::other(exitcode::BACKING_DIR, e.to_string()))?;
    }
    let mountpoint = std::fs::canonicalize(&a.mountpoint)
        .map_err(|e| mount_err(format!("mountpoint {}: {e}", a.mountpoint.display())))?;
    if !mountpoint.is_dir() {
        return Err(mount_err(format!(
            "mountpoint {} is not a directory",
            mountpoint.display()
        )));
    }
    if mountpoint.starts_with(&backing) {
        return Err(mount_err(format!(
            "mountpoint {} lies inside the backing directory {}",
            mountpoint.display(),
            backing.display()
        )));
    }
    let plan = Plan {
        keys,
        opts,
        backing,
        mountpoint,
        foreground: a.foreground,
    };
    if plan.foreground {
        return serve(&plan, None);
    }
    daemonize(plan)
}

struct Plan {
    keys: KeySource,
    opts: MountOptions,
    backing: PathBuf,
    mountpoint: PathBuf,
    foreground: bool,
}

/// Reports to the parent of a daemonising mount: a 4-byte exit code, then the
/// message.
struct Notify(OwnedFd);

impl Notify {
    fn send(self, code: i32, msg: &str) {
        let mut f = std::fs::File::from(self.0);
        let mut b = code.to_le_bytes().to_vec();
        b.extend_from_slice(msg.as_bytes());
        let _ = f.write_all(&b);
    }
}

fn daemonize(plan: Plan) -> Result<(), CliError> {
    let (r, w) = nix::unistd::pipe().map_err(|e| mount_err(format!("pipe: {e}")))?;
    // SAFETY: the process is still single-threaded here (no mount, logger or
    // thread pool has started yet), so the child may continue running Rust code.
    match unsafe { nix::unistd::fork() }.map_err(|e| mount_err(format!("fork: {e}")))? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut f = std::fs::File::from(r);
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            if buf.len() >= 4 {
                let code = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                if code == 0 {
                    return Ok(());
                }
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(CliError::other(
                    code,
                    String::from_utf8_lossy(&buf[4..]).into_owned(),
                ));
            }
            let status = nix::sys::wait::waitpid(child, None);
            Err(mount_err(format!(
                "the mount daemon exited before the mount was ready ({status:?})"
            )))
        }
        nix::unistd::ForkResult::Child => {
            drop(r);
            let _ = nix::unistd::setsid();
            let notify = Notify(w);
            match serve(&plan, Some(notify)) {
                Ok(()) => std::process::exit(0),
                // The error went to the parent (see serve); exit quietly.
                Err(e) => std::process::exit(e.exit_code()),
            }
        }
    }
}

fn block_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
    set
}

fn redirect_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors with a valid source.
            unsafe {
                libc::dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

/// Unlocks, mounts and serves until unmounted. With `notify`, failures before
/// the mount is live are sent to the waiting parent instead of printed.
fn serve(plan: &Plan, notify: Option<Notify>) -> Result<(), CliError> {
    let mut notify = notify;
    let result = serve_inner(plan, &mut notify);
    if let (Err(e), Some(n)) = (&result, notify.take()) {
        n.send(e.exit_code(), &e.to_string());
    }
    result
}

fn serve_inner(plan: &Plan, notify: &mut Option<Notify>) -> Result<(), CliError> {
    let sigs = block_signals();
    crate::crypto::keys::harden_process()
        .map_err(|e| CliError::other(exitcode::OTHER, format!("cannot disable core dumps: {e}")))?;
    // Logging first (with the -o overrides), so that the key provider's own
    // operations are logged and audited; KeySource::open then finds it set up.
    let pre_cfg = match &plan.keys.config {
        Some(c) => Some(crate::config::VolumeConfig::load(c)?),
        None => None,
    };
    let mut log_cfg = match &pre_cfg {
        Some(c) => c.log.clone(),
        None => LoggingConfig::default(),
    };
    if let Some(l) = plan.opts.log_level {
        log_cfg.level = l;
    }
    if plan.foreground {
        log_cfg.stderr = true;
    }
    let name = pre_cfg
        .as_ref()
        .map(|c| c.volume_name())
        .unwrap_or_else(|| plan.backing.display().to_string());
    match crate::logging::init(&log_cfg, &name) {
        Ok(()) | Err(crate::logging::LoggingError::AlreadyInitialized) => {}
        Err(e) => {
            return Err(CliError::other(
                exitcode::CONFIG,
                format!("cannot set up logging: {e}"),
            ));
        }
    }
    // One writer per volume, for the daemon's whole life (held by this
    // process, which is the daemon after the fork): a second mount, here or
    // on another host of shared storage, stops here — before rekey recovery
    // or anything else touches the volume.
    // `-o lock_wait=S` waits for a holder that is being fenced; it never
    // breaks a held lock.
    let wait = std::time::Duration::from_secs(plan.opts.lock_wait.unwrap_or(0));
    // A takeover (the previous writer ended without letting go) is logged
    // by the lock, naming that writer.
    let _lock = VolumeLock::acquire_wait(&plan.backing, "mount", wait).inspect_err(|e| {
        log::error!(
            "op=mount path={} result=error error=\"{e}\"",
            plan.backing.display()
        );
    })?;
    let (cfg, provider) = plan.keys.open(Some(&plan.backing))?;
    let allow_other = plan.opts.allow_other || cfg.as_ref().is_some_and(|c| c.mount.allow_other);
    let read_only = plan.opts.read_only || cfg.as_ref().is_some_and(|c| c.mount.read_only);
    let vol = match super::open_volume(&plan.backing, cfg.as_ref(), provider.as_ref()) {
        Ok(v) => v,
        Err(e) => {
            log::error!(
                "op=mount path={} result=error error=\"{e}\"",
                plan.backing.display()
            );
            return Err(e);
        }
    };
    // The daemon's control side (status, online rotation) keeps the volume and
    // the provider; the filesystem gets only the derived keys.
    let view = Arc::new(vol.view());
    let stats = Arc::new(IoStats::default());
    let mountpoint =
        std::fs::canonicalize(&plan.mountpoint).unwrap_or_else(|_| plan.mountpoint.clone());
    // A rekey interrupted by a crash may have left one file half
    // re-encrypted: finish it before anything can read it.
    if let Some(p) = crate::rekey::recover(&plan.backing, &vol.keys, &crate::rekey::Offline)
        .map_err(|e| CliError::other(exitcode::BACKING_DIR, format!("rekey recovery: {e}")))?
    {
        log::info!("op=rekey_recover path={} result=ok", p.display());
    }
    let control = Arc::new(VolumeControl::new(
        vol,
        provider,
        mountpoint,
        stats.clone(),
        read_only,
    ));
    let _control = ControlServer::start(view.id_hex(), control.clone()).map_err(|e| {
        CliError::other(
            match e {
                crate::control::ControlError::AlreadyServed(_) => exitcode::MOUNT,
                _ => exitcode::CONTROL,
            },
            e.to_string(),
        )
    })?;
    let vol = view;
    raise_fd_limit();
    // New entries get exactly the mode the caller asked for (see fs::create_mode).
    // SAFETY: umask only changes this process's file creation mask.
    unsafe {
        libc::umask(0);
    }
    let notifier_slot = Arc::new(std::sync::OnceLock::new());
    let fs = KmfsFs::new(
        vol.clone(),
        FsOptions {
            read_only,
            stats,
            no_writeback: plan.opts.no_writeback,
            noatime: plan.opts.noatime,
            notifier: notifier_slot.clone(),
            ..FsOptions::default()
        },
    )
    .map_err(|e| {
        CliError::other(
            exitcode::BACKING_DIR,
            format!("backing directory {}: {e}", plan.backing.display()),
        )
    })?;
    let gate = fs.rekey_gate();
    let config = fuse_config(plan, allow_other, read_only);
    let mut session = fuser::Session::new(fs, &plan.mountpoint, &config).map_err(|e| {
        log::error!(
            "op=mount volume={} mountpoint={} result=error error=\"{e}\"",
            vol.id_hex(),
            plan.mountpoint.display()
        );
        mount_err(format!(
            "cannot mount on {}: {e}",
            plan.mountpoint.display()
        ))
    })?;
    log::info!(
        "op=mount volume={} backing={} mountpoint={} ro={} allow_other={} result=ok",
        vol.id_hex(),
        plan.backing.display(),
        plan.mountpoint.display(),
        read_only,
        allow_other
    );
    let _ = notifier_slot.set(session.notifier());
    if let Err(e) = control.attach(gate) {
        log::error!("op=rekey_resume result=fail error=\"{e}\"");
    }
    spawn_signal_thread(sigs, session.unmount_callable(), plan.mountpoint.clone());
    crate::logging::start_configured_anchors();
    if let Some(n) = notify.take() {
        n.send(0, "");
        let _ = std::env::set_current_dir("/");
        redirect_stdio();
    }
    let r = session.run();
    control.stop_rekey();
    log::info!(
        "op=unmount volume={} mountpoint={} result={}",
        vol.id_hex(),
        plan.mountpoint.display(),
        if r.is_ok() { "ok" } else { "error" }
    );
    crate::logging::anchor("unmount");
    r.map_err(|e| mount_err(format!("FUSE session ended with an error: {e}")))
}

/// Files clients hold open are one descriptor each, and the inode table's
/// descriptor cache is sized from the limit (fs/inode.rs): the daemon raises
/// its soft limit to the hard limit it was given (`LimitNOFILE=` in the
/// unit, `ulimit -Hn` in a shell), and no further — the hard limit is the
/// operator's decision.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn fuse_config(plan: &Plan, allow_other: bool, read_only: bool) -> fuser::Config {
    use fuser::MountOption as M;
    let mut mo = vec![
        M::FSName(
            plan.opts
                .fsname
                .clone()
                .unwrap_or_else(|| plan.backing.display().to_string()),
        ),
        M::DefaultPermissions,
    ];
    // The subtype goes to the kernel as a mount option (fuser would keep
    // `Subtype` for fusermount only), so the mount table says `fuse.kmfs`, the
    // type fstab and `mount -t` use, and `findmnt -t fuse.kmfs` finds it.
    match plan.opts.subtype.as_deref() {
        None => mo.push(M::CUSTOM("subtype=kmfs".into())),
        Some("") => {}
        Some(s) => mo.push(M::CUSTOM(format!("subtype={s}"))),
    }
    if read_only {
        mo.push(M::RO);
    }
    // nodev and nosuid unless asked otherwise: modes, set-id bits and device
    // numbers come from the backing store, which is not trusted to grant
    // privileges (docs/SECURITY.md).
    mo.push(if plan.opts.dev { M::Dev } else { M::NoDev });
    mo.push(if plan.opts.suid { M::Suid } else { M::NoSuid });
    if plan.opts.noexec {
        mo.push(M::NoExec);
    }
    if plan.opts.noatime {
        mo.push(M::NoAtime);
    }
    let mut c = fuser::Config::default();
    c.mount_options = mo;
    c.acl = if allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    c.n_threads = Some((cpus * 2).clamp(4, 16));
    // One /dev/fuse descriptor per worker thread (FUSE_DEV_IOC_CLONE): the
    // threads do not contend on one device queue lock.
    c.clone_fd = true;
    c
}

/// Unmounts on SIGTERM/SIGINT/SIGHUP (signals are blocked in every thread and
/// taken here with sigwait). A busy mount is detached lazily.
fn spawn_signal_thread(
    sigs: nix::sys::signal::SigSet,
    mut unmounter: fuser::SessionUnmounter,
    mountpoint: PathBuf,
) {
    let _ = std::thread::Builder::new()
        .name("kmfs-signals".into())
        .spawn(move || {
            if let Ok(sig) = sigs.wait() {
                log::info!(
                    "op=signal signal={sig:?} mountpoint={} action=unmount",
                    mountpoint.display()
                );
                if let Err(e) = unmounter.unmount() {
                    log::warn!(
                        "op=unmount mountpoint={} error=\"{e}\" action=lazy_unmount",
                        mountpoint.display()
                    );
                    let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        });
}

/// Whether `path` is a mountpoint listed in /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.replace("\\040", " ") == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<MountOptions, CliError> {
        parse_options(&[s.to_string()])
    }

    #[test]
    fn options_parse_and_unknown_ones_are_refused() {
        let m = p("config=/etc/kmfs/v.toml,allow_other,ro,_netdev,nofail,x-systemd.automount,noatime,log_level=debug").unwrap();
        assert_eq!(m.config, Some(PathBuf::from("/etc/kmfs/v.toml")));
        assert!(m.allow_other && m.read_only && m.noatime);
        assert_eq!(m.log_level, Some(LogLevel::Debug));
        let m =
            p("keyfile=/k,rw,default_permissions,dev,suid,exec,relatime,user,users,auto,noauto")
                .unwrap();
        assert_eq!(m.keyfile, Some(PathBuf::from("/k")));
        assert!(!m.read_only);
        let e = p("allow_other,bogus").unwrap_err();
        assert!(e.to_string().contains("\"bogus\""), "{e}");
        assert_eq!(e.exit_code(), exitcode::USAGE);
        assert!(p("log_level=loud").is_err());
        assert!(p("config=").is_err());
        assert!(p("ro=1").is_err());
        assert_eq!(p("subtype=").unwrap().subtype, Some(String::new()));
        assert_eq!(p("lock_wait=120").unwrap().lock_wait, Some(120));
        assert!(p("lock_wait=").is_err());
        assert!(p("lock_wait=-1").is_err());
        assert!(p("lock_wait=1e9").is_err());
    }
}
