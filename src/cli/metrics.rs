//! `kmfs status --openmetrics` / `--prometheus`: the counters of mounted
//! volumes (from each daemon's `status` answer) in the OpenMetrics 1.0 text
//! format, or in the Prometheus 0.0.4 text format that node_exporter's
//! textfile collector reads. Metric names follow the Prometheus conventions:
//! base units, `_total` for counters, one `volume` label (the volume id)
//! on every sample, `server` for key-server counters.

use std::fmt::Write;

/// Which text format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text`): counter families
    /// are named without `_total`, and the exposition ends with `# EOF`.
    OpenMetrics,
    /// Prometheus text 0.0.4 (node_exporter's textfile collector).
    Prometheus,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

struct Family {
    /// Name without `_total`.
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

/// Escapes a label value (backslash, double quote, line feed).
fn label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Renders the status answers of the mounted volumes.
pub fn render(volumes: &[serde_json::Value], format: Format) -> String {
    use Kind::{Counter, Gauge};
    let mut fams: Vec<Family> = Vec::new();
    let mut add = |name: &'static str, kind: Kind, help: &'static str| {
        fams.push(Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        });
        fams.len() - 1
    };
    let info = add(
        "kmfs_volume_info",
        Gauge,
        "A mounted kmfs volume (value 1), with its mountpoint, backing directory and key provider.",
    );
    let up = add(
        "kmfs_daemon_uptime_seconds",
        Gauge,
        "Seconds since the volume was mounted.",
    );
    let reads = add("kmfs_reads", Counter, "Read requests served.");
    let writes = add("kmfs_writes", Counter, "Write requests served.");
    let rbytes = add("kmfs_read_bytes", Counter, "Bytes read by users.");
    let wbytes = add("kmfs_written_bytes", Counter, "Bytes written by users.");
    let errors = add(
        "kmfs_io_errors",
        Counter,
        "Requests answered with an I/O or authentication error.",
    );
    let kek = add(
        "kmfs_kek_version",
        Gauge,
        "Version of the key-encryption key the header names.",
    );
    let rotations = add(
        "kmfs_kek_rotations",
        Counter,
        "KEK rotations recorded in the volume header.",
    );
    let last_rot = add(
        "kmfs_last_rotation_timestamp_seconds",
        Gauge,
        "Time of the last KEK rotation (Unix seconds; 0 if none).",
    );
    let rk_active = add(
        "kmfs_rekey_in_progress",
        Gauge,
        "1 while a data-key rekey runs or is paused.",
    );
    let rk_done = add(
        "kmfs_rekey_files_done",
        Gauge,
        "Files re-encrypted by the current or last rekey.",
    );
    let rk_total = add(
        "kmfs_rekey_files",
        Gauge,
        "Files the current or last rekey has to re-encrypt.",
    );
    let rk_bytes = add(
        "kmfs_rekey_done_bytes",
        Gauge,
        "Bytes re-encrypted by the current or last rekey.",
    );
    let ks_conn = add(
        "kmfs_keyserver_connects",
        Counter,
        "Connections to a key server (KMIP) since the mount.",
    );
    let ks_conn_fail = add(
        "kmfs_keyserver_connect_failures",
        Counter,
        "Failed connections to a key server since the mount.",
    );
    let ks_ops = add(
        "kmfs_keyserver_operations",
        Counter,
        "Key-manager operations (create, wrap, unwrap, ...) since the mount.",
    );
    let ks_fail = add(
        "kmfs_keyserver_operation_failures",
        Counter,
        "Failed key-manager operations since the mount.",
    );

    for v in volumes {
        let id = v["volume_id"].as_str().unwrap_or("unknown").to_string();
        let vol = || vec![("volume", id.clone())];
        let mut push = |f: usize, labels: Vec<(&'static str, String)>, x: f64| {
            fams[f].samples.push((labels, x));
        };
        let mut l = vol();
        l.push(("mountpoint", v["mountpoint"].as_str().unwrap_or("").into()));
        l.push((
            "backing_dir",
            v["backing_dir"].as_str().unwrap_or("").into(),
        ));
        l.push(("provider", v["provider"].as_str().unwrap_or("").into()));
        push(info, l, 1.0);
        push(up, vol(), num(&v["uptime_seconds"]));
        let io = &v["io"];
        push(reads, vol(), num(&io["reads"]));
        push(writes, vol(), num(&io["writes"]));
        push(rbytes, vol(), num(&io["bytes_read"]));
        push(wbytes, vol(), num(&io["bytes_written"]));
        push(errors, vol(), num(&io["errors"]));
        push(kek, vol(), num(&v["kek"]["version"]));
        push(rotations, vol(), num(&v["rotations"]));
        push(last_rot, vol(), num(&v["last_rotation"]));
        let rk = &v["rekey"];
        let phase = rk["phase"].as_str().unwrap_or("idle");
        let active = !matches!(phase, "idle" | "done" | "stopped");
        push(rk_active, vol(), if active { 1.0 } else { 0.0 });
        push(rk_done, vol(), num(&rk["files_done"]));
        push(rk_total, vol(), num(&rk["files_total"]));
        push(rk_bytes, vol(), num(&rk["bytes_done"]));
        if let Some(servers) = v["key_server_counters"].as_object() {
            for (name, c) in servers {
                let sl = || vec![("volume", id.clone()), ("server", name.clone())];
                push(ks_conn, sl(), num(&c["connects"]));
                push(ks_conn_fail, sl(), num(&c["connect_failures"]));
                push(ks_ops, sl(), num(&c["operations"]));
                push(ks_fail, sl(), num(&c["operation_failures"]));
            }
        }
    }

    let mut out = String::new();
    for f in &fams {
        if f.samples.is_empty() {
            continue;
        }
        let sample = match f.kind {
            Kind::Counter => format!("{}_total", f.name),
            Kind::Gauge => f.name.to_string(),
        };
        let family = match (format, f.kind) {
            (Format::OpenMetrics, _) => f.name,
            (Format::Prometheus, _) => sample.as_str(),
        };
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# TYPE {family} {kind}");
        let _ = writeln!(out, "# HELP {family} {}", f.help);
        for (labels, x) in &f.samples {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
                .collect();
            let _ = writeln!(out, "{sample}{{{}}} {x}", l.join(","));
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> serde_json::Value {
        serde_json::json!({
            "volume_id": "ab12",
            "mountpoint": "/srv/pl\"ain",
            "backing_dir": "/srv/cipher",
            "provider": "kmip",
            "uptime_seconds": 42,
            "io": {"reads": 3, "writes": 4, "bytes_read": 4096, "bytes_written": 100, "errors": 0},
            "kek": {"version": 2},
            "rotations": 1,
            "last_rotation": 1_700_000_000u64,
            "rekey": {"phase": "running", "files_done": 5, "files_total": 9, "bytes_done": 7},
            "key_server_counters": {"km1": {"connects": 2, "connect_failures": 1, "operations": 3, "operation_failures": 0}},
        })
    }

    #[test]
    fn openmetrics_names_units_labels_and_eof() {
        let t = render(&[status()], Format::OpenMetrics);
        assert!(t.contains("# TYPE kmfs_read_bytes counter\n"), "{t}");
        assert!(
            t.contains("kmfs_read_bytes_total{volume=\"ab12\"} 4096\n"),
            "{t}"
        );
        assert!(
            t.contains("kmfs_keyserver_connect_failures_total{volume=\"ab12\",server=\"km1\"} 1\n")
        );
        assert!(t.contains("kmfs_rekey_in_progress{volume=\"ab12\"} 1\n"));
        assert!(t.contains("kmfs_last_rotation_timestamp_seconds{volume=\"ab12\"} 1700000000\n"));
        assert!(t.contains("mountpoint=\"/srv/pl\\\"ain\""), "{t}");
        assert!(t.ends_with("# EOF\n"));
        // Every sample line is NAME{labels} VALUE.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (name, rest) = l.split_once('{').unwrap();
            assert!(name.starts_with("kmfs_"), "{l}");
            let value = rest.rsplit_once("} ").unwrap().1;
            value.parse::<f64>().unwrap();
        }
    }

    #[test]
    fn prometheus_types_name_the_samples() {
        let t = render(&[status()], Format::Prometheus);
        assert!(t.contains("# TYPE kmfs_reads_total counter\n"), "{t}");
        assert!(t.contains("\nkmfs_reads_total{volume=\"ab12\"} 3\n"), "{t}");
        assert!(!t.contains("# EOF"));
        let none = render(&[], Format::OpenMetrics);
        assert_eq!(none, "# EOF\n");
    }
}
