//! The cluster configuration: one TOML file, identical on both nodes.
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` structs
//! that keep the byte span of every value an operator may get wrong, then
//! [`Config::parse`] checks meaning (addresses, paths, names, bounds) and
//! builds the [`Config`] the daemon runs with. Every error names the file,
//! the line, the field and a fix (see [`ConfigError`]); nothing is started
//! from a configuration that does not validate.

use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/hapair/hapair.toml";
/// Default replication port (QUIC, UDP).
pub const DEFAULT_REPL_PORT: u16 = 7700;
/// Default heartbeat port (QUIC, UDP).
pub const DEFAULT_HB_PORT: u16 = 7701;
/// Default witness port (QUIC, UDP).
pub const DEFAULT_WITNESS_PORT: u16 = 7702;
/// Most replicated directories.
const MAX_DIRS: usize = 64;
/// Most heartbeat networks per node.
const MAX_HEARTBEAT_NETS: usize = 8;
/// Most application checkers.
const MAX_CHECKS: usize = 16;

/// A configuration the daemon cannot run with: what is wrong, where, and
/// how to fix it. Exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error is not tied to a line (a missing file).
    pub line: usize,
    /// The field at fault, e.g. `node[1].address` (empty if unknown).
    pub field: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)?;
        if !self.fix.is_empty() {
            write!(f, " (fix: {})", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The replication mode of the mounts.
pub use hapair_proto::Mode;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCfg {
    pub name: String,
    /// Replication address (and default heartbeat address).
    pub address: IpAddr,
    /// Heartbeat addresses, one per network (at least one).
    pub heartbeat: Vec<IpAddr>,
    /// Interface the VIP goes on, on this node.
    pub interface: Option<String>,
    /// Where this node keeps its state (supervisor state, journals, admin
    /// socket).
    pub state_dir: PathBuf,
    /// This node's local path of each replicated directory, in the order
    /// of `[replication] dirs`.
    pub dirs: Vec<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipCfg {
    /// Address and prefix, e.g. 10.0.0.100/24.
    pub cidr: String,
    pub interface: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessCfg {
    pub address: SocketAddr,
    /// The witness's certificate name.
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppCfg {
    /// Shell command that runs the application in the foreground.
    pub start: String,
    /// Optional shell command that asks it to stop (else SIGTERM).
    pub stop: Option<String>,
    /// Run the commands as this user (default: root).
    pub user: Option<String>,
    /// After the stop command or SIGTERM, wait this long before SIGKILL.
    pub stop_timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// The application's process (the one `start` runs) is alive, or a
    /// process with this name exists.
    Process { name: Option<String> },
    /// A TCP connection to this address succeeds.
    Tcp { address: SocketAddr },
    /// This shell command exits with 0.
    Command { command: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckCfg {
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures before the application counts as failed.
    pub failures: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub file: PathBuf,
    pub cluster: String,
    pub tls_dir: PathBuf,
    pub nodes: [NodeCfg; 2],
    /// The replicated directories as written (the key both nodes share).
    pub dirs: Vec<String>,
    pub mode: Mode,
    pub repl_port: u16,
    pub repl_timeout_ms: u64,
    pub max_lag_ms: u64,
    pub hb_interval_ms: u64,
    pub hb_timeout_ms: u64,
    pub hb_port: u16,
    pub vip: Option<VipCfg>,
    pub witness: Option<WitnessCfg>,
    pub app: Option<AppCfg>,
    pub checks: Vec<CheckCfg>,
    pub auto_failover: bool,
    pub preferred: Option<String>,
    pub restart_budget: u32,
    pub restart_window_ms: u64,
}

impl Config {
    /// The node called `name`, and the other one.
    pub fn pair(&self, name: &str) -> Option<(&NodeCfg, &NodeCfg)> {
        match (self.nodes[0].name == name, self.nodes[1].name == name) {
            (true, _) => Some((&self.nodes[0], &self.nodes[1])),
            (_, true) => Some((&self.nodes[1], &self.nodes[0])),
            _ => None,
        }
    }

    pub fn node_names(&self) -> String {
        format!("{}, {}", self.nodes[0].name, self.nodes[1].name)
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            field: String::new(),
            message: format!("cannot read the configuration: {e}"),
            fix: format!(
                "create it (see the README's configuration section) or pass -c FILE (default {DEFAULT_CONFIG})"
            ),
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as the content of `path` (relative paths in it are
    /// relative to the file's directory).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let ctx = Ctx { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| ctx.line_of(s.start)).unwrap_or(0);
            ConfigError {
                file: path.to_path_buf(),
                line,
                field: String::new(),
                message: e.message().trim().to_string(),
                fix: "check the spelling and type against the README's configuration reference"
                    .into(),
            }
        })?;
        build(&ctx, raw)
    }
}

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        field: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.path.to_path_buf(),
            line: span.map(|s| self.line_of(s.start)).unwrap_or(0),
            field: field.to_string(),
            message: message.into(),
            fix: fix.into(),
        })
    }

    fn base_dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

// ----- the file as written ---------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: RawCluster,
    #[serde(rename = "node")]
    nodes: Option<Spanned<Vec<RawNode>>>,
    replication: RawReplication,
    vip: Option<RawVip>,
    heartbeat: Option<RawHeartbeat>,
    witness: Option<RawWitness>,
    app: Option<RawApp>,
    #[serde(rename = "check", default)]
    checks: Vec<RawCheck>,
    failover: Option<RawFailover>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    tls_dir: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    address: Spanned<String>,
    heartbeat: Option<Spanned<Vec<Spanned<String>>>>,
    interface: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    dirs: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    dirs: Spanned<Vec<Spanned<String>>>,
    mode: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    timeout_ms: Option<Spanned<u64>>,
    max_lag_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: Spanned<String>,
    interface: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeartbeat {
    interval_ms: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    port: Option<Spanned<u16>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWitness {
    address: Spanned<String>,
    name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    start: Spanned<String>,
    stop: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    stop_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    kind: Spanned<String>,
    address: Option<Spanned<String>>,
    process: Option<Spanned<String>>,
    command: Option<Spanned<String>>,
    interval_ms: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
    failures: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    auto: Option<bool>,
    preferred: Option<Spanned<String>>,
    restart_budget: Option<Spanned<u32>>,
    restart_window_ms: Option<Spanned<u64>>,
}

// ----- validation --------------------------------------------------------

fn span_of<T>(s: &Spanned<T>) -> Option<std::ops::Range<usize>> {
    Some(s.span())
}

fn in_range<T: PartialOrd + Copy + fmt::Display>(
    ctx: &Ctx<'_>,
    v: Option<&Spanned<T>>,
    field: &str,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let x = *s.get_ref();
            if x < min || x > max {
                ctx.err(
                    span_of(s),
                    field,
                    format!("{x} is out of range"),
                    format!("use a value from {min} to {max} (default {default})"),
                )
            } else {
                Ok(x)
            }
        }
    }
}

fn ip(ctx: &Ctx<'_>, s: &Spanned<String>, field: &str) -> Result<IpAddr, ConfigError> {
    s.get_ref().trim().parse::<IpAddr>().or_else(|_| {
        ctx.err(
            span_of(s),
            field,
            format!("{:?} is not an IP address", s.get_ref()),
            "write an IPv4 or IPv6 address such as 10.0.0.2 (no port, no host name)",
        )
    })
}

fn interface_name(ctx: &Ctx<'_>, s: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
    let n = s.get_ref();
    let ok = !n.is_empty()
        && n.len() < 16
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(n.clone())
    } else {
        ctx.err(
            span_of(s),
            field,
            format!("{n:?} is not a network interface name"),
            "use a name as `ip link` shows it, e.g. eth0 (1 to 15 characters)",
        )
    }
}

fn abs_path(ctx: &Ctx<'_>, s: &Spanned<String>, field: &str) -> Result<PathBuf, ConfigError> {
    let raw = s.get_ref();
    let p = Path::new(raw);
    if raw.is_empty() {
        return ctx.err(span_of(s), field, "empty path", "write an absolute path");
    }
    if raw.contains('\0') {
        return ctx.err(span_of(s), field, "NUL in path", "remove it");
    }
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        ctx.base_dir().join(p)
    };
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return ctx.err(
            span_of(s),
            field,
            format!("{raw:?} contains '..'"),
            "write the path without '..'",
        );
    }
    Ok(p)
}

fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn build(ctx: &Ctx<'_>, raw: RawConfig) -> Result<Config, ConfigError> {
    let cluster = raw.cluster.name.get_ref().clone();
    if cluster.is_empty()
        || cluster.len() > 64
        || !cluster
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return ctx.err(
            span_of(&raw.cluster.name),
            "cluster.name",
            format!("{cluster:?} is not a usable cluster name"),
            "use 1 to 64 letters, digits, '.', '_' or '-'",
        );
    }
    let tls_dir = match &raw.cluster.tls_dir {
        Some(s) => abs_path(ctx, s, "cluster.tls_dir")?,
        None => ctx.base_dir().join("tls"),
    };
    let default_state = match &raw.cluster.state_dir {
        Some(s) => abs_path(ctx, s, "cluster.state_dir")?,
        None => PathBuf::from("/var/lib/hapair").join(&cluster),
    };

    // Replicated directories.
    let rdirs = raw.replication.dirs.get_ref();
    if rdirs.is_empty() || rdirs.len() > MAX_DIRS {
        return ctx.err(
            span_of(&raw.replication.dirs),
            "replication.dirs",
            format!("{} directories listed", rdirs.len()),
            format!("list 1 to {MAX_DIRS} absolute directories, e.g. dirs = [\"/srv/app/data\"]"),
        );
    }
    let mut dirs = Vec::new();
    let mut dir_paths = Vec::new();
    for (i, d) in rdirs.iter().enumerate() {
        let field = format!("replication.dirs[{i}]");
        if !Path::new(d.get_ref()).is_absolute() {
            return ctx.err(
                span_of(d),
                &field,
                format!("{:?} is not an absolute path", d.get_ref()),
                "write the directory as an absolute path, e.g. /srv/app/data",
            );
        }
        let p = abs_path(ctx, d, &field)?;
        if let Some(j) = dir_paths.iter().position(|q: &PathBuf| nested(q, &p)) {
            return ctx.err(
                span_of(d),
                &field,
                format!("{} overlaps replication.dirs[{j}]", p.display()),
                "list each directory once and never one inside another",
            );
        }
        dirs.push(d.get_ref().clone());
        dir_paths.push(p);
    }

    // Nodes.
    let empty = Vec::new();
    let raw_nodes = raw.nodes.as_ref().map_or(&empty, |n| n.get_ref());
    if raw_nodes.len() != 2 {
        return ctx.err(
            raw.nodes.as_ref().map(|n| n.span()),
            "node",
            format!(
                "{} [[node]] sections; a hapair cluster has exactly 2",
                raw_nodes.len()
            ),
            "describe both nodes, each in its own [[node]] section with name and address",
        );
    }
    let mut nodes = Vec::new();
    for (i, n) in raw_nodes.iter().enumerate() {
        let f = |x: &str| format!("node[{i}].{x}");
        if let Err(e) = hapair_transport::validate_node_name(n.name.get_ref()) {
            return ctx.err(
                span_of(&n.name),
                &f("name"),
                format!("{e:#}"),
                "use the name given to `hapair tls init --nodes`",
            );
        }
        let address = ip(ctx, &n.address, &f("address"))?;
        let heartbeat = match &n.heartbeat {
            None => vec![address],
            Some(list) => {
                if list.get_ref().is_empty() || list.get_ref().len() > MAX_HEARTBEAT_NETS {
                    return ctx.err(
                        span_of(list),
                        &f("heartbeat"),
                        format!("{} heartbeat addresses", list.get_ref().len()),
                        format!("list 1 to {MAX_HEARTBEAT_NETS} addresses, one per network"),
                    );
                }
                let mut v = Vec::new();
                for (j, a) in list.get_ref().iter().enumerate() {
                    let a = ip(ctx, a, &format!("node[{i}].heartbeat[{j}]"))?;
                    if !v.contains(&a) {
                        v.push(a);
                    }
                }
                v
            }
        };
        let interface = match &n.interface {
            Some(s) => Some(interface_name(ctx, s, &f("interface"))?),
            None => None,
        };
        let state_dir = match &n.state_dir {
            Some(s) => abs_path(ctx, s, &f("state_dir"))?,
            None => default_state.join(n.name.get_ref()),
        };
        let local_dirs = match &n.dirs {
            None => dir_paths.clone(),
            Some(list) => {
                if list.get_ref().len() != dir_paths.len() {
                    return ctx.err(
                        span_of(list),
                        &f("dirs"),
                        format!(
                            "{} paths, but [replication] dirs lists {}",
                            list.get_ref().len(),
                            dir_paths.len()
                        ),
                        "give this node's local path of each replicated directory, in the same order",
                    );
                }
                let mut v: Vec<PathBuf> = Vec::new();
                for (j, d) in list.get_ref().iter().enumerate() {
                    let field = format!("node[{i}].dirs[{j}]");
                    let p = abs_path(ctx, d, &field)?;
                    if v.iter().any(|q| nested(q, &p)) {
                        return ctx.err(
                            span_of(d),
                            &field,
                            format!("{} overlaps another of this node's dirs", p.display()),
                            "never list one directory inside another",
                        );
                    }
                    v.push(p);
                }
                v
            }
        };
        for (j, d) in local_dirs.iter().enumerate() {
            if state_dir.starts_with(d) {
                let span = n.state_dir.as_ref().map(|s| s.span());
                return ctx.err(
                    span.or(Some(raw.cluster.name.span())),
                    &f("state_dir"),
                    format!(
                        "the state directory {} lies inside the replicated directory {}",
                        state_dir.display(),
                        d.display()
                    ),
                    format!("choose a state_dir outside {}", local_dirs[j].display()),
                );
            }
        }
        nodes.push(NodeCfg {
            name: n.name.get_ref().clone(),
            address,
            heartbeat,
            interface,
            state_dir,
            dirs: local_dirs,
        });
    }
    if nodes[0].name == nodes[1].name {
        return ctx.err(
            span_of(&raw_nodes[1].name),
            "node[1].name",
            format!("both nodes are named {:?}", nodes[1].name),
            "give the two nodes different names",
        );
    }
    if nodes[0].address == nodes[1].address {
        return ctx.err(
            span_of(&raw_nodes[1].address),
            "node[1].address",
            format!("both nodes have the address {}", nodes[1].address),
            "give each node its own replication address",
        );
    }

    let mode = match &raw.replication.mode {
        None => Mode::Sync,
        Some(s) => match s.get_ref().as_str() {
            "sync" => Mode::Sync,
            "strict" => Mode::Strict,
            "async" => Mode::Async,
            other => {
                return ctx.err(
                    span_of(s),
                    "replication.mode",
                    format!("unknown mode {other:?}"),
                    "use \"sync\" (default), \"strict\" or \"async\"",
                )
            }
        },
    };
    let repl_port = in_range(
        ctx,
        raw.replication.port.as_ref(),
        "replication.port",
        DEFAULT_REPL_PORT,
        1,
        65535,
    )?;
    let repl_timeout_ms = in_range(
        ctx,
        raw.replication.timeout_ms.as_ref(),
        "replication.timeout_ms",
        5000,
        100,
        600_000,
    )?;
    let max_lag_ms = in_range(
        ctx,
        raw.replication.max_lag_ms.as_ref(),
        "replication.max_lag_ms",
        100,
        1,
        60_000,
    )?;

    let hb = raw.heartbeat.as_ref();
    let hb_interval_ms = in_range(
        ctx,
        hb.and_then(|h| h.interval_ms.as_ref()),
        "heartbeat.interval_ms",
        200,
        10,
        10_000,
    )?;
    let hb_timeout_ms = in_range(
        ctx,
        hb.and_then(|h| h.timeout_ms.as_ref()),
        "heartbeat.timeout_ms",
        3000,
        30,
        600_000,
    )?;
    if hb_timeout_ms < 3 * hb_interval_ms {
        let span = hb
            .and_then(|h| h.timeout_ms.as_ref().or(h.interval_ms.as_ref()))
            .map(|s| s.span());
        return ctx.err(
            span,
            "heartbeat.timeout_ms",
            format!(
                "timeout_ms {hb_timeout_ms} is shorter than 3 × interval_ms {hb_interval_ms}: one lost heartbeat would look like a dead peer"
            ),
            format!("set timeout_ms to at least {}", 3 * hb_interval_ms),
        );
    }
    let hb_port = in_range(
        ctx,
        hb.and_then(|h| h.port.as_ref()),
        "heartbeat.port",
        DEFAULT_HB_PORT,
        1,
        65535,
    )?;
    if hb_port == repl_port {
        let span = hb.and_then(|h| h.port.as_ref()).map(|s| s.span());
        return ctx.err(
            span,
            "heartbeat.port",
            format!("the heartbeat port {hb_port} is also the replication port"),
            "use two different ports",
        );
    }

    let vip = match &raw.vip {
        None => None,
        Some(v) => {
            let interface = match &v.interface {
                Some(s) => Some(interface_name(ctx, s, "vip.interface")?),
                None => None,
            };
            for (i, n) in nodes.iter().enumerate() {
                let ifname = n.interface.clone().or_else(|| interface.clone());
                let Some(ifname) = ifname else {
                    return ctx.err(
                        span_of(&v.address),
                        "vip.interface",
                        format!("no interface for the VIP on node {}", n.name),
                        format!("set interface in [vip], or in node[{i}]"),
                    );
                };
                if let Err(e) = hapair_vip::Vip::parse(v.address.get_ref(), &ifname) {
                    return ctx.err(
                        span_of(&v.address),
                        "vip.address",
                        e.to_string(),
                        "write the address with its prefix, e.g. 10.0.0.100/24",
                    );
                }
            }
            Some(VipCfg {
                cidr: v.address.get_ref().clone(),
                interface,
            })
        }
    };

    let witness = match &raw.witness {
        None => None,
        Some(w) => {
            let a = w.address.get_ref();
            let address = a
                .parse::<SocketAddr>()
                .or_else(|_| {
                    a.parse::<IpAddr>()
                        .map(|ip| SocketAddr::new(ip, DEFAULT_WITNESS_PORT))
                })
                .or_else(|_| {
                    ctx.err(
                        span_of(&w.address),
                        "witness.address",
                        format!("{a:?} is not an address"),
                        format!("write IP or IP:PORT, e.g. 10.0.0.3:{DEFAULT_WITNESS_PORT}"),
                    )
                })?;
            let name = match &w.name {
                Some(s) => {
                    if let Err(e) = hapair_transport::validate_node_name(s.get_ref()) {
                        return ctx.err(
                            span_of(s),
                            "witness.name",
                            format!("{e:#}"),
                            "use the name given to `hapair tls init --nodes` for the witness",
                        );
                    }
                    s.get_ref().clone()
                }
                None => "witness".to_string(),
            };
            if nodes.iter().any(|n| n.name == name) {
                return ctx.err(
                    w.name.as_ref().map(|s| s.span()).or(Some(w.address.span())),
                    "witness.name",
                    format!("the witness is named like node {name:?}"),
                    "give the witness its own certificate name (default \"witness\")",
                );
            }
            Some(WitnessCfg { address, name })
        }
    };

    let app = match &raw.app {
        None => None,
        Some(a) => {
            if a.start.get_ref().trim().is_empty() {
                return ctx.err(
                    span_of(&a.start),
                    "app.start",
                    "empty start command",
                    "write the shell command that runs the application in the foreground",
                );
            }
            let stop_timeout_ms = in_range(
                ctx,
                a.stop_timeout_ms.as_ref(),
                "app.stop_timeout_ms",
                10_000,
                100,
                600_000,
            )?;
            let user = match &a.user {
                Some(u) => {
                    if nix::unistd::User::from_name(u.get_ref())
                        .ok()
                        .flatten()
                        .is_none()
                    {
                        return ctx.err(
                            span_of(u),
                            "app.user",
                            format!("no user {:?} on this host", u.get_ref()),
                            "create the user, or remove the field to run the application as root",
                        );
                    }
                    Some(u.get_ref().clone())
                }
                None => None,
            };
            Some(AppCfg {
                start: a.start.get_ref().clone(),
                stop: a.stop.as_ref().map(|s| s.get_ref().clone()),
                user,
                stop_timeout_ms,
            })
        }
    };

    if raw.checks.len() > MAX_CHECKS {
        return ctx.err(
            span_of(&raw.checks[MAX_CHECKS].kind),
            "check",
            format!("{} checkers", raw.checks.len()),
            format!("configure at most {MAX_CHECKS}"),
        );
    }
    let mut checks = Vec::new();
    for (i, c) in raw.checks.iter().enumerate() {
        let f = |x: &str| format!("check[{i}].{x}");
        if app.is_none() {
            return ctx.err(
                span_of(&c.kind),
                &f("kind"),
                "a checker without an [app] section",
                "add [app] with a start command, or remove the [[check]]",
            );
        }
        let need = |v: &Option<Spanned<String>>, name: &str| -> Result<String, ConfigError> {
            match v {
                Some(s) if !s.get_ref().trim().is_empty() => Ok(s.get_ref().clone()),
                _ => ctx.err(
                    span_of(&c.kind),
                    &f(name),
                    format!("a {} checker needs {name}", c.kind.get_ref()),
                    format!("add {name} = \"...\" to this [[check]]"),
                ),
            }
        };
        let kind = match c.kind.get_ref().as_str() {
            "tcp" => {
                let a = need(&c.address, "address")?;
                let address = a.parse::<SocketAddr>().or_else(|_| {
                    ctx.err(
                        c.address.as_ref().map(|s| s.span()),
                        &f("address"),
                        format!("{a:?} is not IP:PORT"),
                        "write e.g. \"127.0.0.1:8080\"",
                    )
                })?;
                CheckKind::Tcp { address }
            }
            "process" => CheckKind::Process {
                name: c.process.as_ref().map(|s| s.get_ref().clone()),
            },
            "command" => CheckKind::Command {
                command: need(&c.command, "command")?,
            },
            other => {
                return ctx.err(
                    span_of(&c.kind),
                    &f("kind"),
                    format!("unknown checker kind {other:?}"),
                    "use \"tcp\", \"process\" or \"command\"",
                )
            }
        };
        let interval_ms = in_range(
            ctx,
            c.interval_ms.as_ref(),
            &f("interval_ms"),
            1000,
            50,
            3_600_000,
        )?;
        let timeout_ms = in_range(
            ctx,
            c.timeout_ms.as_ref(),
            &f("timeout_ms"),
            1000,
            10,
            600_000,
        )?;
        let failures = in_range(ctx, c.failures.as_ref(), &f("failures"), 3, 1, 1000)?;
        checks.push(CheckCfg {
            kind,
            interval_ms,
            timeout_ms,
            failures,
        });
    }

    let fo = raw.failover.as_ref();
    let preferred = match fo.and_then(|f| f.preferred.as_ref()) {
        None => None,
        Some(p) => {
            if !nodes.iter().any(|n| &n.name == p.get_ref()) {
                return ctx.err(
                    span_of(p),
                    "failover.preferred",
                    format!("{:?} is not one of the nodes", p.get_ref()),
                    format!(
                        "use {:?} or {:?}, or remove the field",
                        nodes[0].name, nodes[1].name
                    ),
                );
            }
            Some(p.get_ref().clone())
        }
    };
    let restart_budget = in_range(
        ctx,
        fo.and_then(|f| f.restart_budget.as_ref()),
        "failover.restart_budget",
        3,
        0,
        1000,
    )?;
    let restart_window_ms = in_range(
        ctx,
        fo.and_then(|f| f.restart_window_ms.as_ref()),
        "failover.restart_window_ms",
        600_000,
        1000,
        86_400_000,
    )?;

    let [a, b]: [NodeCfg; 2] = match nodes.try_into() {
        Ok(v) => v,
        Err(_) => unreachable!("exactly two nodes were checked above"),
    };
    Ok(Config {
        file: ctx.path.to_path_buf(),
        cluster,
        tls_dir,
        nodes: [a, b],
        dirs,
        mode,
        repl_port,
        repl_timeout_ms,
        max_lag_ms,
        hb_interval_ms,
        hb_timeout_ms,
        hb_port,
        vip,
        witness,
        app,
        checks,
        auto_failover: fo.and_then(|f| f.auto).unwrap_or(true),
        preferred,
        restart_budget,
        restart_window_ms,
    })
}

#[cfg(test)]
mod tests;
