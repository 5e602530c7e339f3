//! Secondary authorization (`xks_proxy::policy`) at the unit level: every shipped
//! example in `config/policies/` loads and decides as its comments say, and loading
//! rejects what it should, naming the file and line.
//!
//! Spec rules (docs/xks-api.md §"Secondary authorization", §"Request metadata"):
//! denials are 403 and logged with the matching rule; GetHealthStatus is exempt; unknown
//! kmsOperation values may be denied by policy but never rejected as invalid;
//! awsPrincipalArn may be an ARN, a service principal or "AWS Internal".

use std::path::{Path, PathBuf};
use std::time::Instant;

use xks_proxy::api::wire::RequestMetadata;
use xks_proxy::policy::{AuthzRequest, Decision, KeyOperation, NO_PERMIT, Policy, PolicyError};

const ROLE_111: &str = "arn:aws:iam::111122223333:role/app";
const ROLE_444: &str = "arn:aws:iam::444455556666:role/app";
const PAYROLL_SESSION: &str = "arn:aws:sts::111122223333:assumed-role/payroll-app/i-0123";
const PAYROLL_ROLE: &str = "arn:aws:iam::111122223333:role/payroll-app";
const VPCE: &str = "vpce-0abc1234def567890";

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies")
}

fn example(name: &str) -> Policy {
    Policy::from_file(&policies_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// One request, described by what varies between test rows.
#[derive(Debug, Clone, Copy)]
struct Req<'a> {
    op: KeyOperation,
    kms_operation: &'a str,
    principal: Option<&'a str>,
    prefix: &'a str,
    key: &'a str,
    vpce: Option<&'a str>,
}

const BASE: Req<'static> = Req {
    op: KeyOperation::Encrypt,
    kms_operation: "Encrypt",
    principal: Some(ROLE_111),
    prefix: "/tenant-a",
    key: "app-key",
    vpce: None,
};

fn metadata(r: &Req<'_>) -> RequestMetadata {
    RequestMetadata {
        kms_request_id: "4112f4d6-db54-4af4-ae30-c55a22a8dfae".into(),
        kms_operation: r.kms_operation.into(),
        aws_principal_arn: r.principal.map(Into::into),
        kms_key_arn: Some(
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab".into(),
        ),
        aws_source_vpce: r.vpce.map(Into::into),
        ..RequestMetadata::default()
    }
}

fn decide(policy: &Policy, r: &Req<'_>) -> Decision {
    let md = metadata(r);
    policy.authorize(&AuthzRequest {
        operation: r.op,
        prefix: r.prefix,
        key_id: r.key,
        metadata: &md,
    })
}

/// (why, request, allowed, text the reason must contain)
type Row<'a> = (&'a str, Req<'a>, bool, &'a str);

fn check_table(file: &str, rows: &[Row<'_>]) {
    let policy = example(file);
    for (why, req, allowed, reason) in rows {
        let d = decide(&policy, req);
        assert_eq!(d.allowed, *allowed, "{file}: {why}: {d:?}");
        assert!(d.reason.contains(reason), "{file}: {why}: {d:?}");
        // Every shipped example is written so that no request makes a policy error.
        assert!(!d.reason.contains("failed"), "{file}: {why}: {d:?}");
    }
}

#[test]
fn every_shipped_example_loads() {
    // Architecture: tests parse every shipped file in config/.
    let mut names = Vec::new();
    for entry in std::fs::read_dir(policies_dir()).expect("config/policies") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "cedar") {
            let policy = Policy::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!policy.policy_ids().is_empty(), "{}", path.display());
            names.push(
                path.file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "allow-all.cedar",
            "kms-operations-allowlist.cedar",
            "require-vpc-endpoint.cedar",
            "restrict-key-to-account.cedar",
        ],
        "a new example needs a decision table below and a line in config/policies/README.md"
    );
    assert!(policies_dir().join("README.md").is_file());
}

#[test]
fn allow_all_allows_every_operation_and_principal() {
    // Spec: unknown kmsOperation values are never rejected; principals may be service
    // principals or "AWS Internal".
    let rows: Vec<Row<'_>> = vec![
        ("encrypt", BASE, true, "allow-all"),
        (
            "decrypt",
            Req {
                op: KeyOperation::Decrypt,
                kms_operation: "Decrypt",
                ..BASE
            },
            true,
            "allow-all",
        ),
        (
            "metadata from CreateKey",
            Req {
                op: KeyOperation::GetKeyMetadata,
                kms_operation: "CreateKey",
                ..BASE
            },
            true,
            "allow-all",
        ),
        (
            "unknown kmsOperation",
            Req {
                kms_operation: "SomethingNew",
                ..BASE
            },
            true,
            "allow-all",
        ),
        (
            "AWS Internal",
            Req {
                principal: Some("AWS Internal"),
                ..BASE
            },
            true,
            "allow-all",
        ),
        (
            "service principal",
            Req {
                principal: Some("dynamodb.amazonaws.com"),
                ..BASE
            },
            true,
            "allow-all",
        ),
        (
            "no principal sent",
            Req {
                principal: None,
                ..BASE
            },
            true,
            "allow-all",
        ),
        (
            "no path prefix",
            Req { prefix: "", ..BASE },
            true,
            "allow-all",
        ),
    ];
    check_table("allow-all.cedar", &rows);
}

#[test]
fn restrict_key_to_account_decides_by_account_and_role() {
    // Spec: a policy may restrict an external key to certain AWS callers.
    let payroll = Req {
        key: "payroll-key",
        ..BASE
    };
    let rows: Vec<Row<'_>> = vec![
        ("account 111122223333", BASE, true, "account-111122223333"),
        (
            "account 444455556666",
            Req {
                principal: Some(ROLE_444),
                ..BASE
            },
            false,
            NO_PERMIT,
        ),
        (
            "AWS Internal has no account",
            Req {
                principal: Some("AWS Internal"),
                ..BASE
            },
            false,
            NO_PERMIT,
        ),
        (
            "service principal has no account",
            Req {
                principal: Some("kms.amazonaws.com"),
                ..BASE
            },
            false,
            NO_PERMIT,
        ),
        (
            "lookalike account in the resource part",
            Req {
                principal: Some("arn:aws:iam::444455556666:role/111122223333"),
                ..BASE
            },
            false,
            NO_PERMIT,
        ),
        (
            "payroll key, other role of the right account",
            payroll,
            false,
            "payroll-key-role-only",
        ),
        (
            "payroll key, payroll-app session",
            Req {
                principal: Some(PAYROLL_SESSION),
                ..payroll
            },
            true,
            "account-111122223333",
        ),
        (
            "payroll key, payroll-app role ARN",
            Req {
                principal: Some(PAYROLL_ROLE),
                ..payroll
            },
            true,
            "account-111122223333",
        ),
        (
            "payroll-key under another prefix is another key",
            Req {
                prefix: "/tenant-b",
                ..payroll
            },
            true,
            "account-111122223333",
        ),
        (
            "payroll key, payroll-app name in another account",
            Req {
                principal: Some("arn:aws:sts::444455556666:assumed-role/payroll-app/x"),
                ..payroll
            },
            false,
            "payroll-key-role-only",
        ),
    ];
    check_table("restrict-key-to-account.cedar", &rows);
}

#[test]
fn kms_operations_allowlist_decides_by_kms_operation() {
    // Spec: kmsOperation values beyond the known ones may be denied by policy (they are
    // evaluated, not rejected).
    let op = |kms_operation, op| Req {
        op,
        kms_operation,
        ..BASE
    };
    let rows: Vec<Row<'_>> = vec![
        (
            "GenerateDataKey",
            op("GenerateDataKey", KeyOperation::Encrypt),
            true,
            "allowed-kms-operations",
        ),
        (
            "GenerateDataKeyWithoutPlaintext",
            op("GenerateDataKeyWithoutPlaintext", KeyOperation::Encrypt),
            true,
            "allowed-kms-operations",
        ),
        (
            "Encrypt",
            op("Encrypt", KeyOperation::Encrypt),
            true,
            "allowed-kms-operations",
        ),
        (
            "Decrypt",
            op("Decrypt", KeyOperation::Decrypt),
            true,
            "allowed-kms-operations",
        ),
        (
            "CreateKey",
            op("CreateKey", KeyOperation::GetKeyMetadata),
            true,
            "allowed-kms-operations",
        ),
        (
            "ReEncrypt (encrypt side)",
            op("ReEncrypt", KeyOperation::Encrypt),
            false,
            NO_PERMIT,
        ),
        (
            "ReEncrypt (decrypt side)",
            op("ReEncrypt", KeyOperation::Decrypt),
            false,
            NO_PERMIT,
        ),
        (
            "unknown kmsOperation",
            op("SomethingNew", KeyOperation::Encrypt),
            false,
            NO_PERMIT,
        ),
        (
            "case matters",
            op("encrypt", KeyOperation::Encrypt),
            false,
            NO_PERMIT,
        ),
    ];
    check_table("kms-operations-allowlist.cedar", &rows);
}

#[test]
fn require_vpc_endpoint_decides_by_source_vpce() {
    // Spec: policy over requestMetadata including awsSourceVpce, which is optional.
    let rows: Vec<Row<'_>> = vec![
        (
            "encrypt through the endpoint",
            Req {
                vpce: Some(VPCE),
                ..BASE
            },
            true,
            "allow-all",
        ),
        (
            "decrypt through the other endpoint",
            Req {
                op: KeyOperation::Decrypt,
                kms_operation: "Decrypt",
                vpce: Some("vpce-0fed9876cba543210"),
                ..BASE
            },
            true,
            "allow-all",
        ),
        ("encrypt without awsSourceVpce", BASE, false, "require-vpce"),
        (
            "decrypt through another endpoint",
            Req {
                op: KeyOperation::Decrypt,
                kms_operation: "Decrypt",
                vpce: Some("vpce-0000000000000000"),
                ..BASE
            },
            false,
            "require-vpce",
        ),
        (
            "metadata (CreateKey) without awsSourceVpce",
            Req {
                op: KeyOperation::GetKeyMetadata,
                kms_operation: "CreateKey",
                ..BASE
            },
            true,
            "allow-all",
        ),
    ];
    check_table("require-vpc-endpoint.cedar", &rows);
}

#[test]
fn unknown_kms_operation_is_evaluated_never_an_error() {
    // Spec: "kmsOperation (MUST NOT reject unknown values)". Every example decides it
    // cleanly: no evaluation error, whatever the outcome.
    for file in [
        "allow-all.cedar",
        "kms-operations-allowlist.cedar",
        "require-vpc-endpoint.cedar",
        "restrict-key-to-account.cedar",
    ] {
        let policy = example(file);
        for weird in ["SomethingNew", "", "Encrypt ", "ünïcödé", "a\"b\\c"] {
            let d = decide(
                &policy,
                &Req {
                    kms_operation: weird,
                    vpce: Some(VPCE),
                    ..BASE
                },
            );
            assert!(!d.reason.contains("failed"), "{file} {weird:?}: {d:?}");
        }
    }
}

#[test]
fn deny_reason_names_the_forbid_or_says_no_permit_matched() {
    // Spec: denials SHOULD be logged with the matching rule.
    let policy = Policy::from_str(
        r#"
        permit(principal, action, resource);
        @id("no-444")
        forbid(principal in Xks::Account::"444455556666", action, resource);
        forbid(principal, action, resource) when { context.kmsOperation == "ReEncrypt" };
        "#,
        "inline.cedar",
    )
    .expect("loads");
    assert_eq!(policy.policy_ids(), ["policy0", "no-444", "policy2"]);

    let d = decide(&policy, &BASE);
    assert_eq!(
        d,
        Decision {
            allowed: true,
            reason: "policy0".into()
        }
    );
    let d = decide(
        &policy,
        &Req {
            principal: Some(ROLE_444),
            kms_operation: "ReEncrypt",
            ..BASE
        },
    );
    assert_eq!(
        d,
        Decision {
            allowed: false,
            reason: "no-444, policy2".into()
        }
    );

    let only_forbid = Policy::from_str(
        r#"permit(principal, action == Xks::Action::"Decrypt", resource);"#,
        "inline.cedar",
    )
    .expect("loads");
    let d = decide(&only_forbid, &BASE);
    assert_eq!(
        d,
        Decision {
            allowed: false,
            reason: NO_PERMIT.into()
        }
    );
}

#[test]
fn entity_model_scopes_match_as_documented() {
    // The entity model in the module doc and config/policies/README.md.
    let policy = Policy::from_str(
        r#"
        @id("keystore") permit(principal, action, resource in Xks::Keystore::"/tenant-a")
            when { resource.prefix == "/tenant-a" && resource.id like "app-*" };
        @id("root-key") permit(principal, action, resource == Xks::Key::"/k1")
            when { resource.prefix == "" && resource.id == "k1" };
        @id("internal") permit(principal == Xks::Principal::"AWS Internal", action, resource);
        @id("account") permit(principal, action == Xks::Action::"GetKeyMetadata", resource)
            when { principal has account && principal.account == "111122223333"
                   && principal.arn == "arn:aws:iam::111122223333:role/app" };
        @id("key-arn") permit(principal, action == Xks::Action::"Decrypt", resource)
            when { context has kmsKeyArn && context.kmsKeyArn like "arn:aws:kms:*:111122223333:key/*"
                   && context.kmsRequestId != "" };
        "#,
        "model.cedar",
    )
    .expect("loads");
    let principal = Some("arn:aws:iam::999999999999:role/x");
    for (req, reason) in [
        (Req { principal, ..BASE }, Some("keystore")),
        (
            Req {
                principal,
                key: "other",
                ..BASE
            },
            None,
        ),
        (
            Req {
                principal,
                prefix: "",
                key: "k1",
                ..BASE
            },
            Some("root-key"),
        ),
        (
            Req {
                principal: Some("AWS Internal"),
                key: "other",
                ..BASE
            },
            Some("internal"),
        ),
        (
            Req {
                op: KeyOperation::GetKeyMetadata,
                key: "other",
                ..BASE
            },
            Some("account"),
        ),
        (
            Req {
                op: KeyOperation::Decrypt,
                principal,
                key: "other",
                ..BASE
            },
            Some("key-arn"),
        ),
    ] {
        let d = decide(&policy, &req);
        match reason {
            Some(id) => assert_eq!(
                d,
                Decision {
                    allowed: true,
                    reason: id.into()
                },
                "{req:?}"
            ),
            None => assert!(!d.allowed, "{req:?}: {d:?}"),
        }
    }
}

#[test]
fn a_run_time_error_skips_the_policy_and_is_named_in_the_reason() {
    // Cedar semantics: a policy whose condition errors does not apply. The request must
    // still be decided (no panic) and the reason must point the operator at it. Strict
    // validation leaves few run-time errors; integer overflow is one (a missing
    // attribute read without `has` is covered by the unit test in src/policy.rs).
    let policy = Policy::from_str(
        r#"
        @id("allow-all") permit(principal, action, resource);
        @id("overflowing-forbid") forbid(principal, action, resource)
            when { context has awsSourceVpc && 9223372036854775807 + 1 > 0 };
        "#,
        "errors.cedar",
    )
    .expect("loads");
    let md = RequestMetadata {
        aws_source_vpc: Some("vpc-0123456789abcdef0".into()),
        ..metadata(&BASE)
    };
    let d = policy.authorize(&AuthzRequest {
        operation: KeyOperation::Encrypt,
        prefix: "",
        key_id: "k",
        metadata: &md,
    });
    assert!(d.allowed, "{d:?}");
    assert!(d.reason.starts_with("allow-all ("), "{d:?}");
    assert!(d.reason.contains("overflowing-forbid"), "{d:?}");
    println!("allow reason with an evaluation error: {}", d.reason);

    let deny_only = Policy::from_str(
        r#"@id("bad-permit") permit(principal, action, resource)
            when { context has awsSourceVpc && 9223372036854775807 + 1 > 0 };"#,
        "errors.cedar",
    )
    .expect("loads");
    let d = deny_only.authorize(&AuthzRequest {
        operation: KeyOperation::Decrypt,
        prefix: "",
        key_id: "k",
        metadata: &md,
    });
    assert!(!d.allowed);
    assert!(d.reason.starts_with(NO_PERMIT), "{d:?}");
    assert!(
        d.reason.contains("bad-permit") && d.reason.contains("failed to evaluate"),
        "{d:?}"
    );
    println!("deny reason with an evaluation error: {}", d.reason);
}

#[test]
fn a_syntax_error_names_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.cedar");
    std::fs::write(
        &path,
        "// line 1\n@id(\"ok\")\npermit(principal, action, resource);\n\npermit(principal, action resource);\n",
    )
    .expect("write");
    let err = Policy::from_file(&path).expect_err("syntax error");
    let PolicyError::Syntax { at, message } = &err else {
        panic!("not a syntax error: {err:?}");
    };
    assert_eq!(at.origin, path.display().to_string());
    assert_eq!(at.line_column.map(|(line, _)| line), Some(5), "{err}");
    assert!(!message.is_empty());
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:5:", path.display())),
        "{shown}"
    );
    println!("syntax error: {shown}");
}

#[test]
fn a_policy_that_does_not_fit_the_model_is_refused_with_its_line() {
    // Strict validation: these would silently never match (or, in a forbid, silently
    // let requests through) if they were loaded.
    for (text, line, needle) in [
        (
            "permit(principal, action, resource)\nwhen { context.kmsOperatoin == \"Encrypt\" };",
            2,
            "kmsOperatoin",
        ),
        (
            "\n\nforbid(principal, action, resource)\nunless { context.awsSourceVpce == \"vpce-1\" };",
            4,
            "awsSourceVpce",
        ),
        (
            "permit(principal, action == Action::\"Encrypt\", resource);",
            1,
            "Encrypt",
        ),
        (
            "permit(principal, action, resource) when { principal.account == \"111122223333\" };",
            1,
            "account",
        ),
        (
            "permit(principal, action, resource) when { resource.id == 7 };",
            1,
            "",
        ),
    ] {
        let err = Policy::from_str(text, "model.cedar").expect_err(text);
        let PolicyError::Invalid {
            at,
            policy,
            message,
        } = &err
        else {
            panic!("{text}: {err:?}");
        };
        assert_eq!(at.origin, "model.cedar");
        assert_eq!(at.line_column.map(|(l, _)| l), Some(line), "{text}: {err}");
        assert_eq!(policy, "policy0");
        assert!(message.contains(needle), "{text}: {err}");
        println!("refused: {err}");
    }
}

#[test]
fn other_load_errors_name_the_file() {
    type IsExpected = fn(&PolicyError) -> bool;
    let cases: [(&str, IsExpected); 5] = [
        ("// nothing here\n", |e| {
            matches!(e, PolicyError::Empty { .. })
        }),
        (
            "@id(\"a\") permit(principal, action, resource);\n@id(\"a\") forbid(principal, action, resource);",
            |e| matches!(e, PolicyError::DuplicateId { id, .. } if id == "a"),
        ),
        (
            "@id(\"policy1\") permit(principal, action, resource);\nforbid(principal, action, resource);",
            |e| matches!(e, PolicyError::DuplicateId { id, .. } if id == "policy1"),
        ),
        ("@id permit(principal, action, resource);", |e| {
            matches!(e, PolicyError::EmptyId { .. })
        }),
        ("permit(principal == ?principal, action, resource);", |e| {
            matches!(e, PolicyError::Template { .. })
        }),
    ];
    for (text, expected) in cases {
        let err = Policy::from_str(text, "some/file.cedar").expect_err(text);
        assert!(expected(&err), "{text}: {err:?}");
        assert!(err.to_string().starts_with("some/file.cedar: "), "{err}");
    }
    let missing = Policy::from_file(Path::new("/nonexistent/xks.cedar")).expect_err("missing");
    assert!(matches!(missing, PolicyError::Read { .. }));
    assert!(
        missing.to_string().contains("/nonexistent/xks.cedar"),
        "{missing}"
    );
}

#[test]
fn debug_output_is_short_and_useful() {
    let policy = example("restrict-key-to-account.cedar");
    let shown = format!("{policy:?}");
    assert!(shown.starts_with("Policy { origin: "), "{shown}");
    assert!(shown.contains("restrict-key-to-account.cedar"), "{shown}");
    assert!(
        shown.contains(r#"policies: ["account-111122223333", "payroll-key-role-only"]"#),
        "{shown}"
    );
    assert!(shown.len() < 300, "{shown}");
    let d = decide(&policy, &BASE);
    assert_eq!(
        format!("{d:?}"),
        r#"Decision { allowed: true, reason: "account-111122223333" }"#
    );
}

#[test]
fn policy_is_shareable_across_threads() {
    // The API layer keeps it in an ArcSwap<Option<Arc<Policy>>> read by every worker.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
    assert_send_sync::<PolicyError>();
}

#[test]
fn authorize_cost() {
    // Reports a figure; never asserts a timing (architecture: benches never assert).
    let policy = example("restrict-key-to-account.cedar");
    let md = metadata(&Req {
        key: "payroll-key",
        principal: Some(PAYROLL_SESSION),
        vpce: Some(VPCE),
        ..BASE
    });
    let req = AuthzRequest {
        operation: KeyOperation::Encrypt,
        prefix: "/tenant-a",
        key_id: "payroll-key",
        metadata: &md,
    };
    let rounds = 20_000u32;
    let mut allowed = 0u32;
    let start = Instant::now();
    for _ in 0..rounds {
        allowed += u32::from(policy.authorize(&req).allowed);
    }
    let per = start.elapsed() / rounds;
    assert_eq!(allowed, rounds);
    println!(
        "Policy::authorize (restrict-key-to-account.cedar, 2 policies): {:.1} µs per call ({} build)",
        per.as_secs_f64() * 1e6,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
}
