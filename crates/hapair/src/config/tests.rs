use super::*;

const MINIMAL: &str = r#"
[cluster]
name = "demo"

[[node]]
name = "n1"
address = "10.77.0.1"

[[node]]
name = "n2"
address = "10.77.0.2"

[replication]
dirs = ["/srv/app/data"]

[vip]
address = "10.77.0.100/24"
interface = "eth0"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/hapair/hapair.toml"), text)
}

/// Replaces the first occurrence of `from` in MINIMAL (which must exist).
fn with(from: &str, to: &str) -> String {
    assert!(MINIMAL.contains(from), "{from:?} not in the minimal config");
    MINIMAL.replacen(from, to, 1)
}

fn err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in text"));
    text[..at].matches('\n').count() + 1
}

#[test]
fn the_smallest_useful_config_gets_the_documented_defaults() {
    let c = parse(MINIMAL).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.cluster, "demo");
    assert_eq!(c.tls_dir, PathBuf::from("/etc/hapair/tls"));
    assert_eq!(c.mode, Mode::Sync);
    assert_eq!((c.hb_interval_ms, c.hb_timeout_ms), (200, 3000));
    assert_eq!(
        (c.repl_port, c.hb_port),
        (DEFAULT_REPL_PORT, DEFAULT_HB_PORT)
    );
    assert!(c.auto_failover && c.preferred.is_none() && c.witness.is_none());
    assert_eq!(c.restart_budget, 3);
    let (me, peer) = c.pair("n2").unwrap_or_else(|| panic!("n2 is a node"));
    assert_eq!(me.name, "n2");
    assert_eq!(peer.name, "n1");
    assert_eq!(me.heartbeat, vec!["10.77.0.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(me.dirs, vec![PathBuf::from("/srv/app/data")]);
    assert_eq!(me.state_dir, PathBuf::from("/var/lib/hapair/demo/n2"));
    assert!(c.pair("n3").is_none());
}

#[test]
fn a_full_config_is_read_field_by_field() {
    let text = r#"
[cluster]
name = "bank"
tls_dir = "certs"
state_dir = "/var/lib/hapair-bank"

[[node]]
name = "alpha"
address = "10.1.0.1"
heartbeat = ["10.1.0.1", "10.2.0.1"]
interface = "ens3"
dirs = ["/tmp/alpha/db", "/tmp/alpha/files"]
state_dir = "/tmp/alpha/state"

[[node]]
name = "beta"
address = "10.1.0.2"
heartbeat = ["10.1.0.2", "10.2.0.2"]

[replication]
dirs = ["/srv/db", "/srv/files"]
mode = "strict"
port = 7800
timeout_ms = 2000
max_lag_ms = 50

[heartbeat]
interval_ms = 50
timeout_ms = 300
port = 7801

[vip]
address = "10.1.0.100/24"
interface = "eth1"

[witness]
address = "10.1.0.3:7802"
name = "arbiter"

[app]
start = "exec /usr/bin/app --serve"
stop = "/usr/bin/app --stop"
stop_timeout_ms = 2000

[[check]]
kind = "tcp"
address = "127.0.0.1:8080"
interval_ms = 500
failures = 2

[[check]]
kind = "process"

[[check]]
kind = "command"
command = "test -e /run/app.ok"

[failover]
auto = false
preferred = "alpha"
restart_budget = 5
restart_window_ms = 60000
"#;
    let c =
        Config::parse(Path::new("/etc/hapair/bank.toml"), text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.tls_dir, PathBuf::from("/etc/hapair/certs"));
    assert_eq!(c.dirs, vec!["/srv/db", "/srv/files"]);
    assert_eq!(c.mode, Mode::Strict);
    assert_eq!((c.repl_port, c.hb_port), (7800, 7801));
    assert_eq!((c.hb_interval_ms, c.hb_timeout_ms), (50, 300));
    let (a, b) = c.pair("alpha").unwrap_or_else(|| panic!("alpha"));
    assert_eq!(a.heartbeat.len(), 2);
    assert_eq!(a.interface.as_deref(), Some("ens3"));
    assert_eq!(a.dirs[1], PathBuf::from("/tmp/alpha/files"));
    assert_eq!(a.state_dir, PathBuf::from("/tmp/alpha/state"));
    assert_eq!(b.dirs[0], PathBuf::from("/srv/db"));
    assert_eq!(b.state_dir, PathBuf::from("/var/lib/hapair-bank/beta"));
    let w = c.witness.as_ref().unwrap_or_else(|| panic!("witness"));
    assert_eq!(w.name, "arbiter");
    assert_eq!(w.address, "10.1.0.3:7802".parse::<SocketAddr>().unwrap());
    assert_eq!(c.checks.len(), 3);
    assert_eq!(c.checks[0].failures, 2);
    assert_eq!(c.checks[1].kind, CheckKind::Process { name: None });
    assert!(!c.auto_failover);
    assert_eq!(c.preferred.as_deref(), Some("alpha"));
    assert_eq!(c.restart_budget, 5);
}

#[test]
fn errors_name_the_line_the_field_and_a_fix() {
    // (edit of the minimal config, the text on the faulty line, field, words of the message)
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        (
            "address = \"10.77.0.2\"",
            "address = \"10.77.0.x\"",
            "10.77.0.x",
            "node[1].address",
            "not an IP address",
        ),
        (
            "address = \"10.77.0.2\"",
            "address = \"10.77.0.1\"",
            "address = \"10.77.0.1\"\n\n[replication]",
            "node[1].address",
            "both nodes",
        ),
        (
            "name = \"n2\"",
            "name = \"n1\"",
            "name = \"n1\"\naddress = \"10.77.0.2\"",
            "node[1].name",
            "both nodes are named",
        ),
        (
            "name = \"n2\"",
            "name = \"n 2\"",
            "n 2",
            "node[1].name",
            "may only contain",
        ),
        (
            "dirs = [\"/srv/app/data\"]",
            "dirs = [\"srv/app\"]",
            "srv/app",
            "replication.dirs[0]",
            "not an absolute path",
        ),
        (
            "dirs = [\"/srv/app/data\"]",
            "dirs = [\"/srv/a\", \"/srv/a/b\"]",
            "/srv/a/b",
            "replication.dirs[1]",
            "overlaps",
        ),
        (
            "dirs = [\"/srv/app/data\"]",
            "dirs = []",
            "dirs = []",
            "replication.dirs",
            "0 directories",
        ),
        (
            "dirs = [\"/srv/app/data\"]",
            "dirs = [\"/srv/app/data\"]\nmode = \"fast\"",
            "fast",
            "replication.mode",
            "unknown mode",
        ),
        (
            "address = \"10.77.0.100/24\"",
            "address = \"10.77.0.100\"",
            "10.77.0.100\"",
            "vip.address",
            "VIP",
        ),
        (
            "interface = \"eth0\"",
            "interface = \"eth0/x\"",
            "eth0/x",
            "vip.interface",
            "not a network interface",
        ),
        (
            "name = \"demo\"",
            "name = \"demo\"\nstate_dir = \"/srv/app/data/state\"",
            "name = \"demo\"",
            "node[0].state_dir",
            "inside the replicated directory",
        ),
    ];
    for (from, to, at, field, words) in cases {
        let text = with(from, to);
        let e = err(&text);
        assert_eq!(e.field, *field, "{to}: {e}");
        assert_eq!(e.line, line_of(&text, at), "{to}: {e}");
        assert!(e.message.contains(words), "{to}: {e}");
        assert!(!e.fix.is_empty(), "{to}: no fix in {e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!(
                "/etc/hapair/hapair.toml:{}: field `{field}`",
                e.line
            )),
            "{shown}"
        );
    }
}

#[test]
fn heartbeat_and_witness_and_checker_errors() {
    let text = format!("{MINIMAL}\n[heartbeat]\ninterval_ms = 500\ntimeout_ms = 1000\n");
    let e = err(&text);
    assert_eq!(e.field, "heartbeat.timeout_ms");
    assert_eq!(e.line, line_of(&text, "timeout_ms = 1000"));
    assert!(e.fix.contains("1500"), "{e}");

    let text = format!("{MINIMAL}\n[heartbeat]\ninterval_ms = 5\n");
    let e = err(&text);
    assert_eq!(e.field, "heartbeat.interval_ms");
    assert!(e.message.contains("out of range"), "{e}");

    let text = format!("{MINIMAL}\n[witness]\naddress = \"witness.example\"\n");
    let e = err(&text);
    assert_eq!(e.field, "witness.address");
    assert_eq!(e.line, line_of(&text, "witness.example"));

    let text = format!("{MINIMAL}\n[witness]\naddress = \"10.77.0.3\"\nname = \"n1\"\n");
    assert_eq!(err(&text).field, "witness.name");

    let text = format!("{MINIMAL}\n[[check]]\nkind = \"tcp\"\naddress = \"127.0.0.1:80\"\n");
    let e = err(&text);
    assert!(e.message.contains("without an [app]"), "{e}");

    let app = format!("{MINIMAL}\n[app]\nstart = \"sleep 1000\"\n");
    let text = format!("{app}\n[[check]]\nkind = \"tcp\"\n");
    let e = err(&text);
    assert_eq!(e.field, "check[0].address");
    let text = format!("{app}\n[[check]]\nkind = \"http\"\n");
    let e = err(&text);
    assert_eq!(e.field, "check[0].kind");
    assert_eq!(e.line, line_of(&text, "\"http\""));

    let text = format!("{app}\n[failover]\npreferred = \"n3\"\n");
    let e = err(&text);
    assert_eq!(e.field, "failover.preferred");
    assert!(e.fix.contains("n1") && e.fix.contains("n2"), "{e}");

    let text = format!("{app}\n[app]\nstart = \"x\"\n");
    let e = err(&text);
    assert!(
        e.line > 0,
        "a duplicate table is reported with its line: {e}"
    );
}

#[test]
fn unknown_fields_and_wrong_types_are_reported_with_their_line() {
    let text = with("address = \"10.77.0.1\"", "adress = \"10.77.0.1\"");
    let e = err(&text);
    assert_eq!(e.line, line_of(&text, "adress"));
    assert!(e.message.contains("adress"), "{e}");

    let text = format!("{MINIMAL}\n[heartbeat]\ninterval_ms = \"fast\"\n");
    let e = err(&text);
    assert_eq!(e.line, line_of(&text, "\"fast\""));

    let one_node = MINIMAL.replacen("[[node]]\nname = \"n2\"\naddress = \"10.77.0.2\"\n", "", 1);
    let e = err(&one_node);
    assert_eq!(e.field, "node");
    assert!(e.message.contains("exactly 2"), "{e}");

    let e = Config::load(Path::new("/nonexistent/hapair.toml")).unwrap_err();
    assert_eq!(e.line, 0);
    assert!(e.message.contains("cannot read"), "{e}");
}

#[test]
fn per_node_dirs_must_match_the_replicated_dirs() {
    let text = with(
        "address = \"10.77.0.2\"",
        "address = \"10.77.0.2\"\ndirs = [\"/a\", \"/b\"]",
    );
    let e = err(&text);
    assert_eq!(e.field, "node[1].dirs");
    assert!(e.message.contains("2 paths"), "{e}");
}
