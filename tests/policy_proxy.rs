//! Secondary authorization on the real server (spec §"Secondary authorization"): a deny
//! is 403 AccessDeniedException with a log line naming the deciding policy;
//! GetHealthStatus is exempt; unknown kmsOperation values are evaluated, not rejected.

mod common;

use common::*;
use serde_json::json;

const POLICY: &str = r#"
@id("account-111122223333")
permit(principal in Xks::Account::"111122223333", action, resource);

@id("no-reencrypt-on-key-1")
forbid(principal, action, resource == Xks::Key::"/tenant-a/key-1")
when { context.kmsOperation == "ReEncrypt" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denials_are_403_logged_with_the_policy_and_health_is_exempt() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_ansi(false)
        .try_init()
        .expect("subscriber");
    let (dir, text, creds) = prepare(&Options::default());
    std::fs::write(dir.path().join("policy.cedar"), POLICY).expect("policy");
    let text = text + "\n[policy]\nfile = \"policy.cedar\"\n";
    let p = TestProxy::start_with(dir, &text, creds).await;
    let c = p.client(false);

    // The account's principal may encrypt, with any kmsOperation, even one never seen.
    for op in ["Encrypt", "GenerateDataKey", "SomethingNew"] {
        let mut body = encrypt_body(b"x", None);
        body["requestMetadata"]["kmsOperation"] = json!(op);
        let r = c.post(&key_url(&p, KEY, "encrypt"), &body).await;
        assert_eq!(r.status, 200, "{op}: {:?}", r.body);
    }
    // Another account: no permit matched → 403.
    let mut body = encrypt_body(b"x", None);
    body["requestMetadata"]["awsPrincipalArn"] = json!("arn:aws:iam::444455556666:role/intruder");
    let r = c.post(&key_url(&p, KEY, "encrypt"), &body).await;
    assert_eq!((r.status, r.error_name()), (403, "AccessDeniedException"));
    // A forbid decided: 403 and the log names it.
    let mut body = encrypt_body(b"x", None);
    body["requestMetadata"]["kmsOperation"] = json!("ReEncrypt");
    let r = c.post(&key_url(&p, KEY, "encrypt"), &body).await;
    assert_eq!((r.status, r.error_name()), (403, "AccessDeniedException"));
    // GetKeyMetadata is subject to the policy too.
    let md = json!({"requestMetadata": {"kmsRequestId": "m", "kmsOperation": "CreateKey", "awsPrincipalArn": "AWS Internal"}});
    assert_eq!(c.post(&key_url(&p, KEY, "metadata"), &md).await.status, 403);
    // Health is exempt whatever the policy says (it has no principal at all).
    assert_eq!(c.post(&health_url(&p), &health_body()).await.status, 200);

    let logs = capture.text();
    assert!(logs.contains("secondary authorization denied"), "{logs}");
    assert!(
        logs.contains("no-reencrypt-on-key-1"),
        "the deciding forbid is named:\n{logs}"
    );
    assert!(
        logs.contains("no permit matched"),
        "a default deny says so:\n{logs}"
    );
}
