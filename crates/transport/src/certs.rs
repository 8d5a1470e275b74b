//! Cluster certificates: generation (`hapair tls init`) and loading.
//!
//! One private CA per cluster signs one certificate per node. A node's name
//! is both its certificate's common name and its only DNS subject
//! alternative name, so that a TLS peer can be checked by node name.

use anyhow::{anyhow, bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::RootCertStore;
use std::collections::HashSet;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Longest node name (a DNS label is at most 63 bytes, but names may have
/// several dot-separated labels).
pub const MAX_NODE_NAME: usize = 64;

/// File names of the cluster CA inside a TLS directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// How long generated certificates are valid.
const VALIDITY_DAYS: i64 = 3653;
/// Certificates start being valid a day in the past so that a node whose
/// clock lags the one that generated them still accepts them.
const BACKDATE_DAYS: i64 = 1;

/// Checks that `name` can be used as a node name: 1 to 64 bytes of
/// `[A-Za-z0-9._-]`, a valid DNS name (no empty label, no label longer than
/// 63 bytes, none that starts or ends with '-'), not an IP address (the certificate is checked by DNS name)
/// and not `ca` (the CA's own files are `ca.pem`/`ca.key`).
pub fn validate_node_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NODE_NAME {
        bail!("node name '{name}' must be 1 to {MAX_NODE_NAME} characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        bail!("node name '{name}' may only contain letters, digits, '.', '_' and '-'");
    }
    if name.eq_ignore_ascii_case("ca") {
        bail!("node name '{name}' is reserved (the CA's files are ca.pem and ca.key)");
    }
    match ServerName::try_from(name) {
        Ok(ServerName::DnsName(_)) => Ok(()),
        Ok(_) => bail!("node name '{name}' looks like an IP address; use a host-like name"),
        Err(_) => bail!("node name '{name}' is not a valid DNS name (empty label, label over 63 characters, or a label starting/ending with '-')"),
    }
}

fn cert_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.pem"))
}

fn key_path(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.key"))
}

/// One file to write: its final path, its content and its mode.
struct Pending {
    path: PathBuf,
    contents: String,
    mode: u32,
}

/// Writes a cluster CA and one certificate + key per node into `dir`
/// (created with mode 0700 if missing): `ca.pem`, `ca.key` (0600),
/// `<node>.pem`, `<node>.key` (0600). Node certificates are signed by the CA,
/// carry the node name as CN and as a DNS SAN, are valid for 10 years and
/// usable for both client and server authentication.
///
/// Refuses, writing nothing, if a node name is invalid (see
/// [`validate_node_name`]) or repeated (case-insensitively, as DNS names
/// compare), if the list is empty, or if any of the files already exists in
/// `dir` (unless `force`). Returns the paths written, CA first.
pub fn tls_init(dir: &Path, nodes: &[String], force: bool) -> Result<Vec<PathBuf>> {
    if nodes.is_empty() {
        bail!("no node names given: name every node of the cluster");
    }
    let mut seen = HashSet::new();
    for node in nodes {
        validate_node_name(node)?;
        if !seen.insert(node.to_ascii_lowercase()) {
            bail!("node name '{node}' is given twice (names are compared case-insensitively)");
        }
    }

    let mut targets = vec![dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE)];
    for node in nodes {
        targets.push(cert_path(dir, node));
        targets.push(key_path(dir, node));
    }
    if !force {
        let existing: Vec<String> = targets
            .iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "refusing to overwrite existing TLS files: {} (remove them or pass --force)",
                existing.join(", ")
            );
        }
    }

    // Everything is generated and checked in memory before the first byte is
    // written, so that a failure leaves the directory as it was.
    let pending = generate(dir, nodes)?;

    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} exists and is not a directory", dir.display());
        }
    } else {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create TLS directory {}", dir.display()))?;
    }

    // Write each file under a temporary name first, then rename them all into
    // place: a reader never sees a half-written key.
    let mut temps = Vec::with_capacity(pending.len());
    let result = (|| -> Result<()> {
        for p in &pending {
            let file_name = p
                .path
                .file_name()
                .ok_or_else(|| anyhow!("no file name in {}", p.path.display()))?;
            let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
            // A leftover temporary file from an earlier failed run is ours to replace.
            let _ = fs::remove_file(&tmp);
            temps.push(tmp.clone());
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(p.mode)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            // The umask may have narrowed the mode; set it exactly.
            f.set_permissions(fs::Permissions::from_mode(p.mode))
                .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
            f.write_all(p.contents.as_bytes())
                .and_then(|_| f.sync_all())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        for (p, tmp) in pending.iter().zip(&temps) {
            fs::rename(tmp, &p.path).with_context(|| {
                format!("cannot rename {} to {}", tmp.display(), p.path.display())
            })?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for tmp in &temps {
            let _ = fs::remove_file(tmp);
        }
        return Err(e);
    }
    // Make the renames durable too.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(pending.into_iter().map(|p| p.path).collect())
}

/// Generates the CA and node certificates, and checks each node certificate
/// the way a peer will (chain to the CA, name) before anything is written.
fn generate(dir: &Path, nodes: &[String]) -> Result<Vec<Pending>> {
    let now = time::OffsetDateTime::from(SystemTime::now());
    let not_before = now - time::Duration::days(BACKDATE_DAYS);
    let not_after = now + time::Duration::days(VALIDITY_DAYS);

    let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut ca_params = CertificateParams::default();
    let mut ca_dn = DistinguishedName::new();
    ca_dn.push(DnType::CommonName, "hapair cluster CA");
    ca_params.distinguished_name = ca_dn;
    // The CA signs node certificates only, never another CA.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("cannot sign the CA certificate")?;
    let ca_issuer = Issuer::new(ca_params, ca_key);

    let mut roots = RootCertStore::empty();
    roots
        .add(ca_cert.der().clone())
        .map_err(|e| anyhow!("generated CA certificate is unusable: {e}"))?;
    let algs = crate::provider().signature_verification_algorithms;

    let mut out = vec![
        Pending {
            path: dir.join(CA_CERT_FILE),
            contents: ca_cert.pem(),
            mode: 0o644,
        },
        Pending {
            path: dir.join(CA_KEY_FILE),
            contents: ca_issuer.key().serialize_pem(),
            mode: 0o600,
        },
    ];
    for node in nodes {
        let key = KeyPair::generate()
            .with_context(|| format!("cannot generate the key of node '{node}'"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::DnsName(node.as_str().try_into().map_err(|e| {
                anyhow!("node name '{node}' is not usable in a certificate: {e}")
            })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &ca_issuer)
            .with_context(|| format!("cannot sign the certificate of node '{node}'"))?;
        check_node_cert(cert.der(), &roots, node, algs.all)
            .with_context(|| format!("generated certificate of node '{node}' does not verify"))?;
        out.push(Pending {
            path: cert_path(dir, node),
            contents: cert.pem(),
            mode: 0o644,
        });
        out.push(Pending {
            path: key_path(dir, node),
            contents: key.serialize_pem(),
            mode: 0o600,
        });
    }
    Ok(out)
}

/// Checks that `cert` chains to `roots` and is valid for `node`, as a peer
/// checks it during the handshake.
fn check_node_cert(
    cert: &CertificateDer<'_>,
    roots: &RootCertStore,
    node: &str,
    algs: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm],
) -> Result<()> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert).map_err(|e| anyhow!("{e}"))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &[],
        UnixTime::now(),
        algs,
    )
    .map_err(|e| anyhow!("{e}"))?;
    let name = ServerName::try_from(node).map_err(|e| anyhow!("{e}"))?;
    rustls::client::verify_server_name(&parsed, &name).map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The TLS material one node uses: the cluster CA, its own certificate chain
/// and its private key.
pub struct TlsMaterial {
    node: String,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            node: self.node.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsMaterial")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Loads `ca.pem`, `<node>.pem` and `<node>.key` from `dir`, and checks
    /// that they belong together: the certificate is signed by the CA, is
    /// valid now, names `node`, and matches the key. The key file must not be
    /// readable by group or others. Errors name the file at fault.
    pub fn load(dir: &Path, node: &str) -> Result<TlsMaterial> {
        validate_node_name(node)?;
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = cert_path(dir, node);
        let key_path = key_path(dir, node);

        let ca_certs = read_certs(&ca_path)?;
        let mut roots = RootCertStore::empty();
        for c in ca_certs {
            roots
                .add(c)
                .map_err(|e| anyhow!("{}: not a usable CA certificate: {e}", ca_path.display()))?;
        }

        let chain = read_certs(&cert_path)?;

        let meta = fs::metadata(&key_path)
            .with_context(|| format!("cannot read key file {}", key_path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "key file {} is readable by group or others (mode {:o}); run: chmod 600 {}",
                key_path.display(),
                meta.permissions().mode() & 0o7777,
                key_path.display()
            );
        }
        let key_pem = fs::read(&key_path)
            .with_context(|| format!("cannot read key file {}", key_path.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            anyhow!(
                "{}: no usable private key in PEM form: {e}",
                key_path.display()
            )
        })?;

        let provider = crate::provider();
        check_node_cert(&chain[0], &roots, node, provider.signature_verification_algorithms.all).with_context(|| {
            format!(
                "{} is not a valid certificate of node '{node}' signed by {} (expired, another cluster's CA, or another node's?)",
                cert_path.display(),
                ca_path.display()
            )
        })?;
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |e| {
                anyhow!(
                    "{} does not match the certificate {}: {e}",
                    key_path.display(),
                    cert_path.display()
                )
            },
        )?;

        Ok(TlsMaterial {
            node: node.to_string(),
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// The node name this material belongs to.
    pub fn node(&self) -> &str {
        &self.node
    }
}

/// Reads every certificate of a PEM file; at least one is required.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = fs::read(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: unreadable PEM: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{}: no certificate in it (expected a PEM 'CERTIFICATE' block)",
            path.display()
        );
    }
    Ok(certs)
}
