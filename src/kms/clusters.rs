//! The stand-in CloudHSM clusters (`--cloudhsm-clusters FILE`): each cluster is a
//! PKCS#11 token (SoftHSMv2 in tests) plus the facts KMS reads from CloudHSM's
//! DescribeClusters — its trust anchor, active HSMs per Availability Zone, backup
//! lineage and state. Read and validated once at start; errors name the key.
//!
//! ```toml
//! [[cluster]]
//! id = "cluster-abcdefghijk"            # KMS's pattern cluster-[2-7a-zA-Z]{11,16}
//! module = "/usr/lib/softhsm/libsofthsm2.so"
//! token_label = "hsm-a"                 # or token_serial = "..." (exactly one)
//! trust_anchor = "customerCA.crt"       # PEM; relative paths are from this file's directory
//! hsms_per_az = [1, 1]                  # active HSMs in each AZ; [] or [0] = none active
//! backup_lineage = "lineage-a"          # equal lineage = related clusters (shared backups)
//! state = "ACTIVE"                      # optional; anything else: CloudHsmClusterNotActive
//! ```
//!
//! The token's user (CKU_USER) is the cluster's `kmsuser`; its PIN is the password.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::validate::is_cluster_id;

/// CloudHSM cluster states (DescribeClusters); only `ACTIVE` can back a key store.
pub const CLUSTER_STATES: &[&str] = &[
    "CREATE_IN_PROGRESS",
    "UNINITIALIZED",
    "INITIALIZE_IN_PROGRESS",
    "INITIALIZED",
    "ACTIVE",
    "UPDATE_IN_PROGRESS",
    "MODIFY_IN_PROGRESS",
    "ROLLBACK_IN_PROGRESS",
    "DELETE_IN_PROGRESS",
    "DELETED",
    "DEGRADED",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    cluster: Vec<ClusterFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    id: String,
    module: PathBuf,
    #[serde(default)]
    token_label: Option<String>,
    #[serde(default)]
    token_serial: Option<String>,
    trust_anchor: PathBuf,
    hsms_per_az: Vec<u32>,
    backup_lineage: String,
    #[serde(default)]
    state: Option<String>,
}

/// How a cluster's token is found in its module: by label or by serial, never "the
/// first slot".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Serial(String),
}

/// One stand-in cluster, validated.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub id: String,
    pub module: PathBuf,
    pub token: TokenSelector,
    /// The trust anchor as DER (what IncorrectTrustAnchor compares).
    pub trust_anchor_der: Vec<u8>,
    /// Active HSMs in each Availability Zone.
    pub hsms_per_az: Vec<u32>,
    pub backup_lineage: String,
    /// `ACTIVE` or another CloudHSM cluster state.
    pub state: String,
}

impl Cluster {
    pub fn is_active(&self) -> bool {
        self.state == "ACTIVE"
    }

    pub fn active_hsms(&self) -> u32 {
        self.hsms_per_az.iter().sum()
    }

    /// KMS's requirement for a key store: at least two active HSMs in different AZs.
    pub fn meets_hsm_requirement(&self) -> bool {
        self.hsms_per_az.iter().filter(|n| **n > 0).count() >= 2
    }

    pub fn is_related(&self, other: &Cluster) -> bool {
        self.backup_lineage == other.backup_lineage
    }
}

/// Every stand-in cluster, by id. Empty when `--cloudhsm-clusters` is not given.
#[derive(Debug, Clone, Default)]
pub struct Clusters {
    by_id: BTreeMap<String, Cluster>,
}

/// Why the cluster file was refused; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct ClustersError {
    file: String,
    msg: String,
}

/// The DER of the first certificate in a PEM text, if it is one.
pub fn certificate_der(pem: &[u8]) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    if pem.label != "CERTIFICATE" {
        return None;
    }
    pem.parse_x509().ok()?;
    Some(pem.contents)
}

impl Clusters {
    pub fn get(&self, id: &str) -> Option<&Cluster> {
        self.by_id.get(id)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Reads and validates a cluster file.
    pub fn load(path: &Path) -> Result<Self, ClustersError> {
        let err = |msg: String| ClustersError {
            file: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(err)
    }

    /// Parses a cluster file's text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_id = BTreeMap::new();
        for (i, c) in file.cluster.into_iter().enumerate() {
            let key = |k: &str| format!("cluster[{i}].{k}");
            if !is_cluster_id(&c.id) {
                return Err(format!(
                    "{}: {:?} does not match cluster-[2-7a-zA-Z]{{11,16}}",
                    key("id"),
                    c.id
                ));
            }
            if by_id.contains_key(&c.id) {
                return Err(format!("{}: {} is listed twice", key("id"), c.id));
            }
            if !c.module.is_absolute() {
                return Err(format!("{}: must be an absolute path", key("module")));
            }
            let token = match (c.token_label, c.token_serial) {
                (Some(l), None) if !l.is_empty() => TokenSelector::Label(l),
                (None, Some(s)) if !s.is_empty() => TokenSelector::Serial(s),
                _ => {
                    return Err(format!(
                        "{}: give exactly one of token_label and token_serial (non-empty)",
                        key("token_label")
                    ));
                }
            };
            let anchor = base.join(&c.trust_anchor);
            let pem = std::fs::read(&anchor).map_err(|e| {
                format!(
                    "{}: cannot read {}: {e}",
                    key("trust_anchor"),
                    anchor.display()
                )
            })?;
            let trust_anchor_der = certificate_der(&pem).ok_or_else(|| {
                format!(
                    "{}: {} is not a PEM certificate",
                    key("trust_anchor"),
                    anchor.display()
                )
            })?;
            if c.backup_lineage.is_empty() {
                return Err(format!("{}: must not be empty", key("backup_lineage")));
            }
            let state = c.state.unwrap_or_else(|| "ACTIVE".to_owned());
            if !CLUSTER_STATES.contains(&state.as_str()) {
                return Err(format!(
                    "{}: {state:?} is not a CloudHSM cluster state ({})",
                    key("state"),
                    CLUSTER_STATES.join(", ")
                ));
            }
            by_id.insert(
                c.id.clone(),
                Cluster {
                    id: c.id,
                    module: c.module,
                    token,
                    trust_anchor_der,
                    hsms_per_az: c.hsms_per_az,
                    backup_lineage: c.backup_lineage,
                    state,
                },
            );
        }
        Ok(Self { by_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
    }

    const GOOD: &str = r#"
        [[cluster]]
        id = "cluster-abcdefghijk"
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "hsm-a"
        trust_anchor = "cloudhsm-trust-anchor.pem"
        hsms_per_az = [1, 1]
        backup_lineage = "a"
    "#;

    #[test]
    fn a_good_file_parses_with_defaults() {
        let c = Clusters::parse(GOOD, &certs()).expect("parses");
        let one = c.get("cluster-abcdefghijk").expect("listed");
        assert!(one.is_active());
        assert!(one.meets_hsm_requirement());
        assert_eq!(one.token, TokenSelector::Label("hsm-a".into()));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                GOOD.replace("cluster-abcdefghijk", "cluster-1"),
                "cluster[0].id",
            ),
            (GOOD.replace("/usr/lib", "usr/lib"), "cluster[0].module"),
            (
                GOOD.replace("token_label = \"hsm-a\"", ""),
                "cluster[0].token_label",
            ),
            (
                GOOD.replace("cloudhsm-trust-anchor.pem", "missing.pem"),
                "cluster[0].trust_anchor",
            ),
            (
                GOOD.replace("cloudhsm-trust-anchor.pem", "ca.key"),
                "cluster[0].trust_anchor",
            ),
            (
                GOOD.replace("backup_lineage = \"a\"", "backup_lineage = \"\""),
                "cluster[0].backup_lineage",
            ),
            (format!("{GOOD}\nstate = \"SLEEPY\""), "cluster[0].state"),
            (format!("{GOOD}{GOOD}"), "listed twice"),
            (format!("{GOOD}\nsubnets = 2"), "subnets"),
        ];
        for (text, want) in cases {
            let e = Clusters::parse(&text, &certs()).expect_err(want);
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn hsm_rule_needs_two_zones() {
        let c = Clusters::parse(&GOOD.replace("[1, 1]", "[2, 0]"), &certs()).expect("parses");
        let one = c.get("cluster-abcdefghijk").expect("listed");
        assert_eq!(one.active_hsms(), 2);
        assert!(!one.meets_hsm_requirement());
    }
}
