//! Secondary authorization: an optional Cedar policy over an XKS request's
//! `requestMetadata` (spec §"Secondary authorization"), deciding allow or deny for
//! GetKeyMetadata, Encrypt and Decrypt. GetHealthStatus is exempt by construction:
//! [`KeyOperation`] has no variant for it.
//!
//! This module owns the policy file format, the entity model below, loading and
//! validating policies, and the decision with the ids of the policies that made it. It
//! does not own the wire: `api` turns a deny into 403 AccessDeniedException and logs
//! [`Decision::reason`].
//!
//! # The entity model
//!
//! Every request becomes one Cedar request. The schema is
//! `config/policies/xks.cedarschema` (compiled in); evaluation itself is schema-less.
//!
//! | Cedar | built from | attributes / parents |
//! |---|---|---|
//! | principal `Xks::Principal::"<awsPrincipalArn>"` | the value exactly as sent: an IAM/STS ARN, a service principal (`dynamodb.amazonaws.com`) or `AWS Internal` (`""` if absent) | `arn: String` (= the id); `account: String` only when the ARN's account field is 12 digits; parent `Xks::Account::"<account>"` then too |
//! | action `Xks::Action::"GetKeyMetadata"` / `"Encrypt"` / `"Decrypt"` | the URI's operation ([`KeyOperation`]), *not* `kmsOperation` | — |
//! | resource `Xks::Key::"<prefix>/<keyId>"` | the path prefix (`""` or `/tenant-a`) and the external key id from the URI | `id: String` (the key id), `prefix: String`; parent `Xks::Keystore::"<prefix>"` |
//! | context | `requestMetadata` | `kmsRequestId`, `kmsOperation` (always); `kmsKeyArn`, `awsSourceVpc`, `awsSourceVpce`, `kmsViaService` (absent when not sent) |
//!
//! So `principal in Xks::Account::"111122223333"` restricts to one AWS account,
//! `resource in Xks::Keystore::"/tenant-a"` to one keystore, and optional context is
//! read as `context has awsSourceVpce && context.awsSourceVpce == "vpce-0abc"`.
//!
//! # Loading is strict, evaluation follows Cedar
//!
//! A policy file is parsed, `@id("...")` annotations become the policy ids (otherwise
//! Cedar's `policy0`, `policy1`, … in file order), and the set is validated against the
//! schema in strict mode. A misspelt attribute, an unknown action, or an optional
//! attribute read without `has` is therefore a load error with file and line. That
//! matters most for `forbid`: at run time an erroring policy is *skipped* (Cedar's
//! semantics), so `forbid … when { context.awsSourceVpce != "vpce-1" }` would let
//! through exactly the requests that carry no VPC endpoint. Run-time errors that remain
//! possible (integer overflow, say) never panic; the policy counts as not applying and
//! the error is named in [`Decision::reason`].
//!
//! # Cost
//!
//! [`Policy::authorize`] is synchronous and takes about 13 µs of CPU per
//! call in a release build for the shipped examples, a third of it Cedar's transitive
//! closure over the two parent edges, so it runs inline on the async worker.
//!
//! `kmsOperation` is just a string in the context: a value nobody has seen before is
//! evaluated like any other, never rejected (spec: "MUST NOT reject unknown values").

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy as cedar;
use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use crate::api::route::Operation;
use crate::api::wire::RequestMetadata;

/// The Cedar schema of the entity model, also shipped for operators to use with the
/// Cedar CLI. Compiled in so that the proxy's idea of the model cannot drift from the
/// copy it validates against.
pub const SCHEMA: &str = include_str!("../config/policies/xks.cedarschema");

/// What [`Decision::reason`] says for a deny that no `forbid` caused.
pub const NO_PERMIT: &str = "no permit matched";

/// The XKS operations that secondary authorization applies to. There is deliberately no
/// GetHealthStatus: the spec exempts it, so it cannot even be asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyOperation {
    GetKeyMetadata,
    Encrypt,
    Decrypt,
}

impl KeyOperation {
    /// The Cedar action id (`Xks::Action::"<this>"`), same as the spec's API name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOperation::GetKeyMetadata => "GetKeyMetadata",
            KeyOperation::Encrypt => "Encrypt",
            KeyOperation::Decrypt => "Decrypt",
        }
    }

    /// The key operation for a routed XKS operation; `None` for GetHealthStatus, which
    /// is exempt from secondary authorization.
    pub fn from_operation(op: Operation) -> Option<Self> {
        match op {
            Operation::GetHealthStatus => None,
            Operation::GetKeyMetadata => Some(KeyOperation::GetKeyMetadata),
            Operation::Encrypt => Some(KeyOperation::Encrypt),
            Operation::Decrypt => Some(KeyOperation::Decrypt),
        }
    }

    fn index(self) -> usize {
        match self {
            KeyOperation::GetKeyMetadata => 0,
            KeyOperation::Encrypt => 1,
            KeyOperation::Decrypt => 2,
        }
    }
}

/// One request to authorize. Borrowed, so the caller builds it for free.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    pub operation: KeyOperation,
    /// The keystore's path prefix as configured: `""` or e.g. `/tenant-a`.
    pub prefix: &'a str,
    /// The external key id from the URI.
    pub key_id: &'a str,
    pub metadata: &'a RequestMetadata,
}

/// The outcome of [`Policy::authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The ids of the policies that determined the decision (`"allow-app"`,
    /// `"policy0, policy2"`): the permits that matched for an allow, the forbids that
    /// matched for a deny, or [`NO_PERMIT`]. Policies that failed to evaluate are
    /// appended with Cedar's message, so an operator can fix them.
    pub reason: String,
}

/// Where in a policy file something is: `origin[:line:column]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLocation {
    /// The file path (or whatever name the caller gave [`Policy::from_str`]).
    pub origin: String,
    /// 1-based line and column (in bytes), when Cedar pointed at a place.
    pub line_column: Option<(usize, usize)>,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_column {
            Some((line, column)) => write!(f, "{}:{line}:{column}", self.origin),
            None => f.write_str(&self.origin),
        }
    }
}

/// Why a policy file could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid Cedar syntax.
    #[error("{at}: Cedar syntax error: {message}")]
    Syntax { at: SourceLocation, message: String },
    /// Valid Cedar that does not fit the entity model (see `config/policies/xks.cedarschema`).
    #[error("{at}: policy {policy:?} does not fit the xks entity model: {message}")]
    Invalid {
        at: SourceLocation,
        policy: String,
        message: String,
    },
    /// Two policies with the same `@id` (or an `@id` equal to another's default id).
    #[error("{origin}: two policies have the id {id:?}")]
    DuplicateId { origin: String, id: String },
    #[error("{origin}: policy {policy:?} has an empty @id")]
    EmptyId { origin: String, policy: String },
    /// Templates need links that a policy file cannot express, so they would never apply.
    #[error(
        "{origin}: {id:?} is a template (it uses ?principal or ?resource); write a plain policy"
    )]
    Template { origin: String, id: String },
    /// A file of nothing but comments would deny every request; if that is really the
    /// intent, say so with `forbid(principal, action, resource);`.
    #[error(
        "{origin}: no policies (this would deny every request; write `forbid(principal, action, resource);` if that is intended)"
    )]
    Empty { origin: String },
    /// The compiled-in schema did not load: a bug in this module, caught by its tests.
    #[error("internal error: the built-in xks policy schema is invalid: {0}")]
    Schema(String),
}

/// A loaded, validated policy set and what `authorize` needs to build requests cheaply.
pub struct Policy {
    origin: String,
    set: PolicySet,
    authorizer: Authorizer,
    /// Policy ids in file order, for startup logs.
    ids: Vec<String>,
    /// Parsed once here so that `authorize` only clones them (they are `Arc`-backed).
    principal_type: EntityTypeName,
    account_type: EntityTypeName,
    key_type: EntityTypeName,
    keystore_type: EntityTypeName,
    /// Indexed by [`KeyOperation::index`].
    actions: [EntityUid; 3],
}

impl fmt::Debug for Policy {
    // The policy AST is long and says nothing a log reader needs; the origin and ids do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("origin", &self.origin)
            .field("policies", &self.ids)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Loads a `.cedar` policy file.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_str(&text, &path.display().to_string())
    }

    /// Loads policies from text; `origin` names it in errors (usually the file path).
    pub fn from_str(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let policy = Self::parse(text, origin)?;
        policy.validate(text)?;
        Ok(policy)
    }

    /// The policy ids in file order (`@id` where given, else `policyN`).
    pub fn policy_ids(&self) -> Vec<String> {
        self.ids.clone()
    }

    /// Decides one request. Never panics and never fails: anything that goes wrong is a
    /// deny whose reason says what.
    pub fn authorize(&self, req: &AuthzRequest<'_>) -> Decision {
        let (request, entities) = match self.cedar_request(req) {
            Ok(built) => built,
            // Unreachable with string-only attributes, but if Cedar ever refuses what we
            // build, fail closed and say so rather than panic on the request path.
            Err(e) => {
                return Decision {
                    allowed: false,
                    reason: format!("request could not be evaluated: {e}"),
                };
            }
        };
        let response = self
            .authorizer
            .is_authorized(&request, &self.set, &entities);
        decision_from(&response)
    }

    /// Parses and re-ids the policies, without schema validation.
    fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let parsed = PolicySet::from_str(text).map_err(|e| PolicyError::Syntax {
            at: locate(text, origin, &e),
            message: message_of(&e),
        })?;
        if let Some(t) = parsed.templates().next() {
            return Err(PolicyError::Template {
                origin: origin.to_owned(),
                id: t.id().to_string(),
            });
        }
        // Cedar numbers policies policy0, policy1, ... in file order but iterates the set
        // in no particular order; sort by that number to keep file order for the logs.
        let mut policies: Vec<(usize, &cedar::Policy)> = parsed
            .policies()
            .map(|p| (default_index(p.id()), p))
            .collect();
        policies.sort_by_key(|(n, _)| *n);
        if policies.is_empty() {
            return Err(PolicyError::Empty {
                origin: origin.to_owned(),
            });
        }

        let mut set = PolicySet::new();
        let mut ids = Vec::with_capacity(policies.len());
        let mut seen = HashSet::with_capacity(policies.len());
        for (_, p) in policies {
            let id = match p.annotation("id") {
                Some("") => {
                    return Err(PolicyError::EmptyId {
                        origin: origin.to_owned(),
                        policy: p.id().to_string(),
                    });
                }
                Some(named) => named.to_owned(),
                None => p.id().to_string(),
            };
            if !seen.insert(id.clone()) {
                return Err(PolicyError::DuplicateId {
                    origin: origin.to_owned(),
                    id,
                });
            }
            // Cannot clash: ids are unique (checked just above) and the set is new.
            set.add(p.new_id(PolicyId::new(&id)))
                .map_err(|_| PolicyError::DuplicateId {
                    origin: origin.to_owned(),
                    id: id.clone(),
                })?;
            ids.push(id);
        }

        Ok(Policy {
            origin: origin.to_owned(),
            set,
            authorizer: Authorizer::new(),
            ids,
            principal_type: type_name("Xks::Principal")?,
            account_type: type_name("Xks::Account")?,
            key_type: type_name("Xks::Key")?,
            keystore_type: type_name("Xks::Keystore")?,
            actions: [
                action_uid(KeyOperation::GetKeyMetadata)?,
                action_uid(KeyOperation::Encrypt)?,
                action_uid(KeyOperation::Decrypt)?,
            ],
        })
    }

    /// Strict validation against [`SCHEMA`]; the first error becomes the load error.
    fn validate(&self, text: &str) -> Result<(), PolicyError> {
        let (schema, _warnings) =
            Schema::from_cedarschema_str(SCHEMA).map_err(|e| PolicyError::Schema(e.to_string()))?;
        let result = Validator::new(schema).validate(&self.set, ValidationMode::Strict);
        match result.validation_errors().next() {
            None => Ok(()),
            Some(e) => Err(PolicyError::Invalid {
                at: locate(text, &self.origin, e),
                policy: e.policy_id().to_string(),
                message: message_of(e),
            }),
        }
    }

    /// The Cedar request and entity store for one XKS request: two entities, at most
    /// six context strings, no schema checks (the policies were validated at load).
    fn cedar_request(&self, req: &AuthzRequest<'_>) -> Result<(Request, Entities), String> {
        let md = req.metadata;
        let arn = md.aws_principal_arn.as_deref().unwrap_or("");
        let principal_uid =
            EntityUid::from_type_name_and_id(self.principal_type.clone(), EntityId::new(arn));
        let mut principal_attrs = HashMap::with_capacity(2);
        principal_attrs.insert("arn".to_owned(), string(arn));
        let mut principal_parents = HashSet::new();
        if let Some(account) = account_of(arn) {
            principal_attrs.insert("account".to_owned(), string(account));
            principal_parents.insert(EntityUid::from_type_name_and_id(
                self.account_type.clone(),
                EntityId::new(account),
            ));
        }
        let principal = Entity::new(principal_uid.clone(), principal_attrs, principal_parents)
            .map_err(|e| e.to_string())?;

        let key_uid = EntityUid::from_type_name_and_id(
            self.key_type.clone(),
            EntityId::new(format!("{}/{}", req.prefix, req.key_id)),
        );
        let key = Entity::new(
            key_uid.clone(),
            HashMap::from([
                ("id".to_owned(), string(req.key_id)),
                ("prefix".to_owned(), string(req.prefix)),
            ]),
            HashSet::from([EntityUid::from_type_name_and_id(
                self.keystore_type.clone(),
                EntityId::new(req.prefix),
            )]),
        )
        .map_err(|e| e.to_string())?;

        let optional = [
            ("kmsKeyArn", &md.kms_key_arn),
            ("awsSourceVpc", &md.aws_source_vpc),
            ("awsSourceVpce", &md.aws_source_vpce),
            ("kmsViaService", &md.kms_via_service),
        ];
        let context = Context::from_pairs(
            [
                ("kmsRequestId", Some(&md.kms_request_id)),
                ("kmsOperation", Some(&md.kms_operation)),
            ]
            .into_iter()
            .chain(optional.into_iter().map(|(k, v)| (k, v.as_ref())))
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), string(v)))),
        )
        .map_err(|e| e.to_string())?;

        let request = Request::new(
            principal_uid,
            self.actions[req.operation.index()].clone(),
            key_uid,
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        let entities =
            Entities::from_entities([principal, key], None).map_err(|e| e.to_string())?;
        Ok((request, entities))
    }
}

fn decision_from(response: &cedar::Response) -> Decision {
    let allowed = response.decision() == cedar::Decision::Allow;
    let diagnostics = response.diagnostics();
    // Sorted: the set has no order, and a log line should not change between runs.
    let mut ids: Vec<String> = diagnostics.reason().map(ToString::to_string).collect();
    ids.sort_unstable();
    let mut reason = if ids.is_empty() {
        NO_PERMIT.to_owned()
    } else {
        ids.join(", ")
    };
    let mut errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
    if !errors.is_empty() {
        errors.sort_unstable();
        reason.push_str(&format!(
            " ({} failed to evaluate and did not apply: {})",
            if errors.len() == 1 {
                "1 policy"
            } else {
                "policies"
            },
            errors.join("; ")
        ));
    }
    Decision { allowed, reason }
}

/// The 12-digit account field of an ARN (`arn:partition:service:region:account:resource`);
/// `None` for service principals, "AWS Internal" and anything else.
fn account_of(arn: &str) -> Option<&str> {
    let mut fields = arn.splitn(6, ':');
    if fields.next()? != "arn" {
        return None;
    }
    let account = fields.nth(3)?;
    fields.next()?; // a resource part must follow
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn type_name(name: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(name).map_err(|e| PolicyError::Schema(e.to_string()))
}

fn action_uid(op: KeyOperation) -> Result<EntityUid, PolicyError> {
    Ok(EntityUid::from_type_name_and_id(
        type_name("Xks::Action")?,
        EntityId::new(op.as_str()),
    ))
}

/// `N` for Cedar's default id `policyN`; anything else sorts last.
fn default_index(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Cedar's message plus its hint, if it has one ("did you mean ...").
fn message_of(d: &dyn miette::Diagnostic) -> String {
    match d.help() {
        Some(help) => format!("{d} ({help})"),
        None => d.to_string(),
    }
}

/// The place Cedar's first label points at, as a line and column in `text`.
fn locate(text: &str, origin: &str, d: &dyn miette::Diagnostic) -> SourceLocation {
    let offset = d
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    SourceLocation {
        origin: origin.to_owned(),
        line_column: offset.map(|offset| line_column(text, offset)),
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let head = &text.as_bytes()[..offset.min(text.len())];
    let line_start = head
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |newline| newline + 1);
    let line = head.iter().filter(|&&b| b == b'\n').count() + 1;
    (line, head.len() - line_start + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(op: &str, principal: &str) -> RequestMetadata {
        RequestMetadata {
            kms_request_id: "req-1".into(),
            kms_operation: op.into(),
            aws_principal_arn: Some(principal.into()),
            kms_key_arn: Some(
                "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                    .into(),
            ),
            ..RequestMetadata::default()
        }
    }

    fn decide(policy: &Policy, operation: KeyOperation, md: &RequestMetadata) -> Decision {
        policy.authorize(&AuthzRequest {
            operation,
            prefix: "/tenant-a",
            key_id: "app-key",
            metadata: md,
        })
    }

    #[test]
    fn the_builtin_schema_loads() {
        let (_, warnings) = Schema::from_cedarschema_str(SCHEMA).expect("schema");
        assert_eq!(warnings.count(), 0);
    }

    #[test]
    fn health_is_not_a_key_operation() {
        // Spec §"Secondary authorization": GetHealthStatus is exempt.
        assert_eq!(
            KeyOperation::from_operation(Operation::GetHealthStatus),
            None
        );
        for (op, key_op) in [
            (Operation::GetKeyMetadata, KeyOperation::GetKeyMetadata),
            (Operation::Encrypt, KeyOperation::Encrypt),
            (Operation::Decrypt, KeyOperation::Decrypt),
        ] {
            assert_eq!(KeyOperation::from_operation(op), Some(key_op));
            assert_eq!(key_op.as_str(), op.as_str());
        }
    }

    #[test]
    fn account_is_parsed_only_from_arns_with_a_12_digit_account() {
        for (arn, account) in [
            ("arn:aws:iam::111122223333:role/app", Some("111122223333")),
            (
                "arn:aws:sts::111122223333:assumed-role/app/session",
                Some("111122223333"),
            ),
            ("arn:aws-cn:iam::444455556666:root", Some("444455556666")),
            ("arn:aws:iam::11112222333:role/app", None),
            ("arn:aws:iam::1111222233334:role/app", None),
            ("arn:aws:iam::111122223333", None),
            ("arn:aws:s3:::bucket", None),
            ("AWS Internal", None),
            ("dynamodb.amazonaws.com", None),
            ("", None),
        ] {
            assert_eq!(account_of(arn), account, "{arn}");
        }
    }

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_column("ab\ncd\n", 0), (1, 1));
        assert_eq!(line_column("ab\ncd\n", 4), (2, 2));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    #[test]
    fn a_missing_attribute_without_has_skips_that_policy_and_names_the_error() {
        // Spec §"Secondary authorization" + Cedar semantics: an erroring policy does not
        // apply. Strict validation refuses such a policy at load, so build it unvalidated
        // to prove that the run-time path is still safe.
        let policy = Policy::parse(
            r#"
            @id("needs-vpce")
            permit(principal, action, resource) when { context.awsSourceVpce == "vpce-0abc" };
            @id("forbid-odd-vpce")
            forbid(principal, action, resource) when { context.awsSourceVpce == "vpce-bad" };
            "#,
            "inline",
        )
        .expect("parses");
        assert!(matches!(
            policy.validate(""),
            Err(PolicyError::Invalid { .. })
        ));
        let md = metadata("Encrypt", "arn:aws:iam::111122223333:role/app");
        let d = decide(&policy, KeyOperation::Encrypt, &md);
        assert!(!d.allowed);
        assert!(d.reason.starts_with(NO_PERMIT), "{}", d.reason);
        assert!(d.reason.contains("needs-vpce"), "{}", d.reason);
        assert!(d.reason.contains("forbid-odd-vpce"), "{}", d.reason);
        assert!(d.reason.contains("awsSourceVpce"), "{}", d.reason);
    }
}
