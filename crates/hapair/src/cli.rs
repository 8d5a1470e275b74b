//! The cluster commands of the command line: which node this is, talking to
//! the local daemon, printing status, validating a configuration, running
//! the witness.

use crate::config::Config;
use crate::daemon::admin::{self, Request, Response};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A command refused in the current state (exit code 3, see the SPEC).
#[derive(Debug)]
pub struct Refused {
    pub exit_code: u8,
    pub reason: String,
}
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}
impl std::error::Error for Refused {}

/// Loads the configuration and works out which node this is: `--node`, or
/// the one node whose address is on this host.
pub fn load(path: &Path, node: Option<&str>) -> anyhow::Result<(Config, String)> {
    let cfg = Config::load(path)?;
    let node = match node {
        Some(n) => {
            if cfg.pair(n).is_none() {
                return Err(crate::usage(format!(
                    "--node {n}: not a node of {} (nodes: {})",
                    path.display(),
                    cfg.node_names()
                )));
            }
            n.to_string()
        }
        None => {
            let local: Vec<&str> = cfg
                .nodes
                .iter()
                .filter(|n| {
                    std::iter::once(&n.address)
                        .chain(&n.heartbeat)
                        .any(|a| std::net::UdpSocket::bind(SocketAddr::new(*a, 0)).is_ok())
                })
                .map(|n| n.name.as_str())
                .collect();
            match local.as_slice() {
                [one] => one.to_string(),
                [] => {
                    return Err(crate::usage(format!(
                        "none of the nodes' addresses ({}) is on this host: pass --node NAME",
                        cfg.nodes
                            .iter()
                            .map(|n| format!("{} {}", n.name, n.address))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
                _ => {
                    return Err(crate::usage(
                        "both nodes' addresses are on this host: pass --node NAME".to_string(),
                    ))
                }
            }
        }
    };
    Ok((cfg, node))
}

fn socket_of(cfg: &Config, node: &str) -> anyhow::Result<PathBuf> {
    let (me, _) = cfg
        .pair(node)
        .ok_or_else(|| crate::usage(format!("no node {node:?} in the configuration")))?;
    Ok(admin::socket_path(&me.state_dir))
}

pub fn admin(path: &Path, node: Option<&str>, req: Request) -> anyhow::Result<()> {
    let (cfg, node) = load(path, node)?;
    match admin::call(&socket_of(&cfg, &node)?, &req)? {
        Response::Ok { message } => {
            println!("{node}: {message}");
            Ok(())
        }
        Response::Refused { exit_code, reason } => Err(Refused { exit_code, reason }.into()),
        Response::Error { message } => anyhow::bail!("{message}"),
        Response::Status(_) => anyhow::bail!("unexpected answer from the daemon"),
    }
}

pub fn status(path: &Path, node: Option<&str>, json: bool) -> anyhow::Result<()> {
    let (cfg, node) = load(path, node)?;
    let v = match admin::call(&socket_of(&cfg, &node)?, &Request::Status)? {
        Response::Status(v) => v,
        Response::Error { message } => anyhow::bail!("{message}"),
        _ => anyhow::bail!("unexpected answer from the daemon"),
    };
    if json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    print!("{}", human_status(&v));
    Ok(())
}

/// The status as an operator reads it.
pub fn human_status(v: &serde_json::Value) -> String {
    let s = |x: &serde_json::Value| match x {
        serde_json::Value::String(t) => t.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut o = String::new();
    o += &format!(
        "cluster {}  node {}: {} — {}\n",
        s(&v["cluster"]),
        s(&v["node"]),
        s(&v["state"]),
        s(&v["detail"])
    );
    let p = &v["peer"];
    o += &format!(
        "peer {}: {} ({}; last heard {} ms ago)\n",
        s(&p["name"]),
        s(&p["state"]),
        if p["alive"] == true {
            "alive"
        } else {
            "silent"
        },
        s(&p["last_heard_ms_ago"])
    );
    o += &format!(
        "data generation {} (newest known {}){}{}\n",
        s(&v["data_gen"]),
        s(&v["known_gen"]),
        if v["stale"] == true { ", STALE" } else { "" },
        if v["in_sync"] == true {
            ", in sync"
        } else {
            ""
        }
    );
    o += &format!(
        "replication {}: {}\n",
        s(&v["replication"]["mode"]),
        if v["replication"]["resync_running"] == true {
            "resyncing"
        } else if v["replication"]["mirror_running"] == true {
            "receiving (mirror)"
        } else {
            ""
        }
    );
    if let Some(dirs) = v["replication"]["dirs"].as_array() {
        for d in dirs {
            let r = &d["replication"];
            o += &format!(
                "  {} ({}): {}{}\n",
                s(&d["dir"]),
                s(&d["path"]),
                if d["mounted"] == true {
                    "mounted, "
                } else {
                    "not mounted"
                },
                if r.is_null() {
                    String::new()
                } else {
                    format!(
                        "{} seq {} durable {}",
                        s(&r["state"]),
                        s(&r["last_seq"]),
                        s(&r["durable_seq"])
                    )
                }
            );
        }
    }
    o += &format!(
        "vip {}: held by {}\n",
        s(&v["vip"]["configured"]),
        s(&v["vip"]["holder"])
    );
    if v["witness"]["configured"] == true {
        o += &format!(
            "witness {}: {}{}\n",
            s(&v["witness"]["address"]),
            if v["witness"]["reachable"] == true {
                "reachable"
            } else {
                "unreachable"
            },
            if v["witness"]["lease_held"] == true {
                ", lease held"
            } else {
                ""
            }
        );
    } else {
        o += "witness: none configured — under a network partition both nodes may serve (split brain)\n";
    }
    if v["app"]["configured"] == true {
        o += &format!(
            "application: {} (pid {}), last check {}, restarts {}\n",
            s(&v["app"]["state"]),
            s(&v["app"]["pid"]),
            match v["app"]["check"]["last_ok"].as_bool() {
                Some(true) => "ok".to_string(),
                Some(false) => format!("FAILED: {}", s(&v["app"]["check"]["last_failure"])),
                None => "-".to_string(),
            },
            s(&v["app"]["restarts"]["total"])
        );
    }
    if let Some(ts) = v["transitions"].as_array() {
        o += "last transitions:\n";
        for t in ts.iter().rev().take(5) {
            o += &format!(
                "  {} {} -> {}: {}\n",
                s(&t["at"]),
                s(&t["from"]),
                s(&t["to"]),
                s(&t["reason"])
            );
        }
    }
    o
}

pub fn check_config(path: &Path, node: Option<&str>) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    if let Some(n) = node {
        if cfg.pair(n).is_none() {
            return Err(crate::usage(format!(
                "--node {n}: not a node (nodes: {})",
                cfg.node_names()
            )));
        }
    }
    println!(
        "{}: ok — cluster {}, nodes {}, {} replicated director{}, mode {}, heartbeat every {} ms (peer dead after {} ms), {}, {}",
        path.display(),
        cfg.cluster,
        cfg.node_names(),
        cfg.dirs.len(),
        if cfg.dirs.len() == 1 { "y" } else { "ies" },
        cfg.mode,
        cfg.hb_interval_ms,
        cfg.hb_timeout_ms,
        cfg.vip.as_ref().map_or("no VIP".to_string(), |v| format!("VIP {}", v.cidr)),
        cfg.witness.as_ref().map_or("no witness (split brain possible under a partition)".to_string(), |w| format!("witness {} at {}", w.name, w.address)),
    );
    Ok(())
}

pub fn witness(
    path: &Path,
    node: Option<&str>,
    listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let Some(w) = cfg.witness.clone() else {
        return Err(crate::usage(format!(
            "{}: no [witness] section: configure its address (and name) first",
            path.display()
        )));
    };
    let name = node.map(str::to_string).unwrap_or_else(|| w.name.clone());
    hapair_transport::install_crypto_provider();
    let tls = hapair_transport::TlsMaterial::load(&cfg.tls_dir, &name)
        .map_err(|e| crate::usage(format!("TLS material of the witness {name:?}: {e:#}")))?;
    crate::witness::run(crate::witness::WitnessArgs {
        listen: listen.unwrap_or(w.address),
        tls,
        nodes: [cfg.nodes[0].name.clone(), cfg.nodes[1].name.clone()],
        state_dir: state_dir.unwrap_or_else(|| {
            PathBuf::from("/var/lib/hapair")
                .join(&cfg.cluster)
                .join("witness")
        }),
        max_lease_ms: cfg.hb_timeout_ms,
        interval_ms: cfg.hb_interval_ms,
    })
}
