//! A standalone FUSE passthrough server that speaks the kernel protocol
//! itself, over either transport, with one request handler (issue 18,
//! target 2: "evaluate FUSE over io_uring for real"):
//!
//! * `classic`: N threads each `read(2)` a request from /dev/fuse and
//!   `writev(2)` the reply (what fuser and libfuse do), two system calls and
//!   at least one sleep/wake-up per request;
//! * `uring`: the FUSE-over-io_uring transport of Linux 6.14+ (fs/fuse/
//!   dev_uring.c): one queue per possible CPU, each served by a thread
//!   pinned to that CPU with its own SQE128 ring and `--depth` entries
//!   (a 288-byte header buffer + a payload buffer of max_write bytes each),
//!   registered with FUSE_IO_URING_CMD_REGISTER after the INIT reply
//!   accepted FUSE_OVER_IO_URING, and then answered and re-armed in one
//!   FUSE_IO_URING_CMD_COMMIT_AND_FETCH per request, so one
//!   `io_uring_enter(2)` per batch of requests. FORGET and INTERRUPT still
//!   come through /dev/fuse (the kernel sends them there), so one classic
//!   thread stays.
//!
//! Not part of kmfs: a measuring tool for benches/fuse_uring.sh.
//!
//!   fuse_uring_proto --transport classic|uring [--threads N] [--depth D]
//!                    [--max-write BYTES] SOURCE MOUNTPOINT
//!
//! It mounts (as root, with mount(2) and `fd=`), serves until the
//! filesystem is unmounted, then prints one line of counters on stderr:
//! requests per transport, the transport's own system calls, the
//! process's voluntary / involuntary context switches and its CPU time
//! (user + system, microseconds).

mod handler;
mod proto;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use handler::{Fs, Outcome};
use proto::*;

#[derive(Default)]
struct Stats {
    classic_reqs: AtomicU64,
    uring_reqs: AtomicU64,
    /// read + writev on /dev/fuse, io_uring_enter on the rings.
    transport_syscalls: AtomicU64,
}

struct Shared {
    fs: Fs,
    dev: OwnedFd,
    stats: Stats,
    /// Becomes true once the INIT reply has been written.
    init_done: (Mutex<bool>, Condvar),
    max_write: usize,
}

#[derive(Debug)]
struct Args {
    uring: bool,
    threads: usize,
    depth: usize,
    max_write: u32,
    /// Pin each queue's thread to its CPU (libfuse does).
    pin: bool,
    /// Classic: one cloned /dev/fuse descriptor per thread
    /// (FUSE_DEV_IOC_CLONE), as kmfs configures fuser.
    clone_fd: bool,
    /// Ring task-run mode: "defer" (SINGLE_ISSUER|DEFER_TASKRUN, libfuse's
    /// choice), "coop" (COOP_TASKRUN|TASKRUN_FLAG) or "plain".
    taskrun: String,
    source: String,
    mountpoint: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: fuse_uring_proto --transport classic|uring [--threads N] [--depth D] \
         [--max-write BYTES] [--clone-fd] [--no-pin] [--taskrun defer|coop|plain] SOURCE MOUNTPOINT"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        uring: false,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        depth: 8,
        max_write: 128 * 1024,
        pin: true,
        clone_fd: false,
        taskrun: "defer".into(),
        source: String::new(),
        mountpoint: String::new(),
    };
    let mut pos = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--transport" => match val().as_str() {
                "classic" => a.uring = false,
                "uring" => a.uring = true,
                _ => usage(),
            },
            "--threads" => a.threads = val().parse().unwrap_or_else(|_| usage()),
            "--depth" => a.depth = val().parse().unwrap_or_else(|_| usage()),
            "--max-write" => a.max_write = val().parse().unwrap_or_else(|_| usage()),
            "--no-pin" => a.pin = false,
            "--clone-fd" => a.clone_fd = true,
            "--taskrun" => a.taskrun = val(),
            "--bench" => {} // passed by `cargo bench`; ignored
            _ if arg.starts_with('-') => usage(),
            _ => pos.push(arg),
        }
    }
    let [source, mountpoint] = <[String; 2]>::try_from(pos).unwrap_or_else(|_| usage());
    a.source = source;
    a.mountpoint = mountpoint;
    a
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_else(|_| usage())
}

fn mount(dev: RawFd, source: &str, mountpoint: &str) -> std::io::Result<()> {
    let opts =
        format!("fd={dev},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions");
    let (src, mnt, ty, opts) = (
        cstr(source),
        cstr(mountpoint),
        cstr("fuse.fuse_uring_proto"),
        cstr(&opts),
    );
    // SAFETY: all four strings are NUL-terminated and outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            mnt.as_ptr(),
            ty.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A new /dev/fuse descriptor attached to the same connection as `dev`
/// (FUSE_DEV_IOC_CLONE), so each classic thread has its own device queue.
fn clone_dev(dev: RawFd) -> std::io::Result<OwnedFd> {
    const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500; // _IOR(229, 0, u32)
    let path = cstr("/dev/fuse");
    // SAFETY: `path` is NUL-terminated.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let src = dev as u32;
    // SAFETY: the ioctl reads one u32 (the descriptor to clone) from `src`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), FUSE_DEV_IOC_CLONE, &src) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// One classic worker: read a request, handle it, writev the reply.
fn classic_loop(sh: &Shared, fd: RawFd) {
    // Header + the largest op header + max_write of data, as the kernel
    // requires of a read buffer (at least FUSE_MIN_READ_BUFFER = 8 KiB).
    let mut req = vec![0u8; sh.max_write + 4096 + 8192];
    loop {
        // SAFETY: `req` is a writable buffer of `req.len()` bytes.
        let n = unsafe { libc::read(fd, req.as_mut_ptr().cast(), req.len()) };
        sh.stats.transport_syscalls.fetch_add(1, Ordering::Relaxed);
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                _ => return, // ENODEV: unmounted
            }
        }
        let n = n as usize;
        let Some(h) = InHeader::parse(&req[..n]) else {
            continue;
        };
        sh.stats.classic_reqs.fetch_add(1, Ordering::Relaxed);
        let body = &mut req[IN_HEADER..n.max(IN_HEADER)];
        let split = op_header_size(h.opcode).min(body.len());
        let mut op = [0u8; URING_OP_IN];
        op[..split].copy_from_slice(&body[..split]);
        let in_len = n - IN_HEADER - split;
        let buf = &mut req[IN_HEADER + split..];
        let (err, len) = match sh.fs.dispatch(&h, &op[..split], buf, in_len) {
            Outcome::None => continue,
            Outcome::Reply(len) => (0, len),
            Outcome::Error(e) => (-e, 0),
        };
        let hdr = out_header(OUT_HEADER + len, err, h.unique);
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: OUT_HEADER,
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: len,
            },
        ];
        // SAFETY: both iovecs point into live buffers of the stated lengths.
        unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        sh.stats.transport_syscalls.fetch_add(1, Ordering::Relaxed);
        if h.opcode == INIT {
            let (lock, cv) = &sh.init_done;
            if let Ok(mut done) = lock.lock() {
                *done = true;
                cv.notify_all();
            }
        }
    }
}

/// One registered ring entry: the two buffers the kernel writes requests
/// into and reads replies from, and the iovec array REGISTER points at.
struct Ent {
    header: Vec<u8>,
    payload: Vec<u8>,
    iov: [libc::iovec; 2],
}

fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

/// `IORING_OP_URING_CMD` with FUSE_IO_URING_CMD_REGISTER. io-uring 0.7's
/// `UringCmd80` sets `addr` but has no setter for `len`, which the kernel
/// requires to be 2 (the number of iovecs), so it is patched in here.
fn register_sqe(dev: RawFd, ent: &Ent, idx: u64, qid: u16) -> squeue::Entry128 {
    let sqe = opcode::UringCmd80::new(types::Fd(dev), FUSE_IO_URING_CMD_REGISTER)
        .cmd(cmd_req(0, qid))
        .addr(Some(ent.iov.as_ptr() as u64))
        .build()
        .user_data(idx);
    // SAFETY: `squeue::Entry128` is `#[repr(C)]` around the kernel's
    // 128-byte `struct io_uring_sqe` (+ 64 command bytes), plain integers
    // with no invalid bit patterns; `len` is the u32 at byte offset 24.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    // SAFETY: as above: any 128 bytes are a valid `Entry128`.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

fn commit_sqe(dev: RawFd, commit_id: u64, idx: u64, qid: u16) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(dev), FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
        .cmd(cmd_req(commit_id, qid))
        .build()
        .user_data(idx)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET on a valid set with an index below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// One io_uring queue: register `depth` entries, then loop on
/// COMMIT_AND_FETCH. Returns a one-line error when a step fails.
fn uring_queue(sh: &Shared, qid: u16, depth: usize, a: &Args) -> Result<(), String> {
    if a.pin {
        pin_to_cpu(usize::from(qid));
    }
    let mut b = IoUring::<squeue::Entry128, cqueue::Entry>::builder();
    match a.taskrun.as_str() {
        "defer" => b.setup_single_issuer().setup_defer_taskrun(),
        "coop" => b.setup_coop_taskrun().setup_taskrun_flag(),
        _ => &mut b,
    };
    let mut ring = b
        .build((depth * 2) as u32)
        .map_err(|e| format!("io_uring_setup(SQE128) on queue {qid}: {e}"))?;
    let dev = sh.dev.as_raw_fd();
    let mut ents: Vec<Ent> = (0..depth)
        .map(|_| Ent {
            header: vec![0u8; URING_HEADER],
            payload: vec![0u8; sh.max_write],
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
        })
        .collect();
    for e in &mut ents {
        e.iov = [
            libc::iovec {
                iov_base: e.header.as_mut_ptr().cast(),
                iov_len: e.header.len(),
            },
            libc::iovec {
                iov_base: e.payload.as_mut_ptr().cast(),
                iov_len: e.payload.len(),
            },
        ];
    }
    for (i, e) in ents.iter().enumerate() {
        let sqe = register_sqe(dev, e, i as u64, qid);
        // SAFETY: the iovecs and both buffers of `e` live in `ents`, which
        // is neither moved nor dropped while the ring (and kernel) use them.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| "SQ full".to_string())?;
    }
    let mut pending: Vec<(usize, i32)> = Vec::with_capacity(depth);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(format!("io_uring_enter on queue {qid}: {e}")),
        }
        sh.stats.transport_syscalls.fetch_add(1, Ordering::Relaxed);
        pending.clear();
        pending.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(idx, res) in &pending {
            if res < 0 {
                let e = std::io::Error::from_raw_os_error(-res);
                return match -res {
                    libc::ENOTCONN | libc::ECANCELED | libc::ENODEV => Ok(()), // unmounted
                    _ => Err(format!("FUSE_IO_URING_CMD on queue {qid} entry {idx}: {e}")),
                };
            }
            let Some(ent) = ents.get_mut(idx) else {
                return Err(format!("unknown entry {idx}"));
            };
            let Some(h) = InHeader::parse(&ent.header) else {
                continue;
            };
            sh.stats.uring_reqs.fetch_add(1, Ordering::Relaxed);
            let in_len = (u32_at(&ent.header, URING_PAYLOAD_SZ) as usize).min(ent.payload.len());
            let split = op_header_size(h.opcode).min(URING_OP_IN);
            let mut op = [0u8; URING_OP_IN];
            op[..split].copy_from_slice(&ent.header[128..128 + split]);
            let (err, len) = match sh.fs.dispatch(&h, &op[..split], &mut ent.payload, in_len) {
                Outcome::Reply(len) => (0, len),
                Outcome::Error(e) => (-e, 0),
                Outcome::None => (0, 0), // FORGET never comes this way
            };
            ent.header[..OUT_HEADER].copy_from_slice(&out_header(OUT_HEADER + len, err, h.unique));
            ent.header[URING_PAYLOAD_SZ..URING_PAYLOAD_SZ + 4]
                .copy_from_slice(&(len as u32).to_le_bytes());
            let sqe = commit_sqe(dev, h.unique, idx as u64, qid);
            // SAFETY: the entry's buffers stay registered and alive (above).
            unsafe { ring.submission().push(&sqe) }.map_err(|_| "SQ full".to_string())?;
        }
    }
}

fn possible_cpus() -> usize {
    // The kernel makes one queue per *possible* CPU (num_possible_cpus()).
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => Some(b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1),
                    None => r.parse::<usize>().ok().map(|_| 1),
                })
                .sum::<Option<usize>>()
        })
        .unwrap_or(1)
}

fn main() {
    let a = parse_args();
    let path = cstr("/dev/fuse");
    // SAFETY: `path` is NUL-terminated.
    let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        eprintln!("open /dev/fuse: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    // SAFETY: `dev` was just opened and is owned by nobody else.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    let fs = match Fs::new(&a.source, a.max_write, a.uring) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("{}: {e}", a.source);
            std::process::exit(1);
        }
    };
    if let Err(e) = mount(dev.as_raw_fd(), &a.source, &a.mountpoint) {
        eprintln!("mount {}: {e}", a.mountpoint);
        std::process::exit(1);
    }
    let a = Arc::new(a);
    let sh = Arc::new(Shared {
        fs,
        dev,
        stats: Stats::default(),
        init_done: (Mutex::new(false), Condvar::new()),
        max_write: a.max_write as usize,
    });
    let classic_threads = if a.uring { 1 } else { a.threads.max(1) };
    let mut workers = Vec::new();
    for i in 0..classic_threads {
        let sh = sh.clone();
        // The first thread reads the mount's own descriptor (INIT comes
        // there); with --clone-fd the others get clones.
        let own = if a.clone_fd && i > 0 {
            match clone_dev(sh.dev.as_raw_fd()) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    eprintln!("FUSE_DEV_IOC_CLONE: {e}");
                    std::process::exit(1);
                }
            }
        } else {
            None
        };
        workers.push(std::thread::spawn(move || {
            let fd = own.as_ref().map_or(sh.dev.as_raw_fd(), |f| f.as_raw_fd());
            classic_loop(&sh, fd)
        }));
    }
    if a.uring {
        for qid in 0..possible_cpus() {
            let sh = sh.clone();
            let a = a.clone();
            std::thread::spawn(move || {
                {
                    let (lock, cv) = &sh.init_done;
                    let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while !*done {
                        done = cv.wait(done).unwrap_or_else(|e| e.into_inner());
                    }
                }
                if !sh.fs.uring_accepted.load(Ordering::SeqCst) {
                    eprintln!("kernel did not offer FUSE_OVER_IO_URING; classic transport only");
                    return;
                }
                if let Err(e) = uring_queue(&sh, qid as u16, a.depth, &a) {
                    eprintln!("uring: {e}");
                }
            });
        }
    }
    for w in workers {
        let _ = w.join();
    }
    // SAFETY: an all-zero rusage is a valid out-value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = &sh.stats;
    eprintln!(
        "stats transport={} classic_reqs={} uring_reqs={} transport_syscalls={} vcsw={} ivcsw={} cpu_us={}",
        if a.uring { "uring" } else { "classic" },
        s.classic_reqs.load(Ordering::Relaxed),
        s.uring_reqs.load(Ordering::Relaxed),
        s.transport_syscalls.load(Ordering::Relaxed),
        ru.ru_nvcsw,
        ru.ru_nivcsw,
        (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1_000_000
            + ru.ru_utime.tv_usec
            + ru.ru_stime.tv_usec,
    );
}
