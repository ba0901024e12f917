//! The integration tests: one test binary (`cargo test --test it`), one
//! module per area, with the shared harnesses in `support/`.
//!
//! All tests of this binary run in one process, in parallel (`--test-threads`).
//! A test that changes or observes machine-wide state (the installed package,
//! `/usr/local/bin/kmfs`, mount(8) and its helpers, ...) takes
//! [`support::exclusive`] first; a test that needs a process-wide setting
//! that cannot be shared (the global `log` logger) or uses up a process-wide
//! resource (thousands of open descriptors) runs in a child process
//! ([`support::in_own_process`]).

mod support;

mod binding;
mod check;
mod cli;
mod cli_kmip;
mod cli_rotation;
mod deploy;
mod e2e_providers;
mod fault_crash;
mod fault_diskfull;
mod fault_outage;
mod fault_rekey;
mod fs_basic;
mod fs_concurrency;
mod fs_fallocate;
mod fs_model;
mod fs_mount;
mod fs_rekey;
mod fs_rotation;
mod fs_rotation_kmip;
mod fuzz_decode;
mod ha;
mod ha_keyservers;
mod hostile;
mod kmip;
mod local_user;
mod lock;
mod logging;
mod many_files;
mod many_volumes;
mod nfs_export;
mod nfs_ganesha;
mod ops;
mod ops_package;
mod pinning;
mod pkcs11;
mod samba;
mod stress;
mod xts_crosscheck;
