//! `api::route::parse`: any path yields a route or "not an XKS URI", never a panic;
//! a route re-renders to exactly the path it came from and parses to itself again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xks_proxy::api::route::{MAX_URI_LEN, Operation, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Some(route) = parse(path) else {
        return;
    };
    assert!(path.len() <= MAX_URI_LEN);
    let rendered = match (route.operation, route.key_id) {
        (Operation::GetHealthStatus, None) => format!("{}/kms/xks/v1/health", route.prefix),
        (op, Some(key_id)) => {
            // The id is one path segment: the router peels it off at a '/'.
            assert!(!key_id.contains('/'), "key id {key_id:?} spans segments");
            let verb = match op {
                Operation::GetKeyMetadata => "metadata",
                Operation::Encrypt => "encrypt",
                Operation::Decrypt => "decrypt",
                Operation::GetHealthStatus => unreachable!("health has no key id"),
            };
            format!("{}/kms/xks/v1/keys/{key_id}/{verb}", route.prefix)
        }
        (op, None) => panic!("{op:?} without a key id"),
    };
    assert_eq!(
        rendered, path,
        "route {route:?} does not re-render to its path"
    );
    assert_eq!(parse(&rendered), Some(route));
});
