//! `xks-bench softhsm-loop`: AES-256-GCM through PKCS#11 in a plain loop, in-process,
//! with a cached key handle and one logged-in session per thread — no HTTP, no TLS,
//! no SigV4. It is what a SoftHSM-backed proxy can at best approach, so the figure
//! suite reports the proxy's rate as a ratio to it. `--lookup-each-call` shows the cost
//! of finding the key by label on every request (the anti-pattern).
//!
//! Uses `cryptoki` directly (the proxy's PKCS#11 dependency); only with the `pkcs11`
//! feature.

use anyhow::Result;

use crate::cli::SofthsmLoopArgs;

#[cfg(not(feature = "pkcs11"))]
pub fn softhsm_loop(_args: &SofthsmLoopArgs) -> Result<()> {
    anyhow::bail!("built without the pkcs11 feature")
}

#[cfg(feature = "pkcs11")]
pub fn softhsm_loop(args: &SofthsmLoopArgs) -> Result<()> {
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
    use cryptoki::session::{Session, UserType};
    use cryptoki::types::AuthPin;
    use xks_proxy::backend::KeyUsage;

    anyhow::ensure!(
        args.duration > 0.0 && args.duration <= 600.0,
        "--duration must be in (0, 600]"
    );
    anyhow::ensure!((1..=64).contains(&args.threads), "--threads must be 1..=64");
    let ctx =
        Pkcs11::new(&args.module).with_context(|| format!("loading {}", args.module.display()))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .context("C_Initialize")?;
    let mut slot = None;
    for s in ctx.get_slots_with_token().context("C_GetSlotList")? {
        if ctx
            .get_token_info(s)
            .is_ok_and(|i| i.label() == args.token_label)
        {
            slot = Some(s);
            break;
        }
    }
    let Some(slot) = slot else {
        bail!("no token labelled {}", args.token_label);
    };
    let pin = AuthPin::from(args.pin.as_str());
    let label = Attribute::Label(args.key_label.as_bytes().to_vec());
    let find = |session: &Session| -> Result<ObjectHandle> {
        session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), label.clone()])
            .context("C_FindObjects")?
            .first()
            .copied()
            .context("key not found")
    };
    // Create the key if missing (a throw-away test token). The admin session stays open
    // and logged in for the whole loop: PKCS#11 logins are per application, and
    // closing the last session would log the loop's sessions out.
    let admin = ctx.open_rw_session(slot).context("C_OpenSession")?;
    admin.login(UserType::User, Some(&pin)).context("C_Login")?;
    if find(&admin).is_err() {
        admin
            .generate_key(
                &Mechanism::AesKeyGen,
                &xks_proxy::backend::pkcs11::aes256_template(
                    &args.key_label,
                    &[KeyUsage::Encrypt, KeyUsage::Decrypt],
                ),
            )
            .context("C_GenerateKey")?;
    }

    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let plaintext = vec![0x5au8; args.plaintext_bytes];
    let aad = [0u8; 108];
    let started = Instant::now();
    let counts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.threads)
            .map(|_| {
                scope.spawn(|| -> Result<u64> {
                    let session = ctx.open_ro_session(slot).context("C_OpenSession")?;
                    let mut key = find(&session)?;
                    let mut ops = 0u64;
                    let mut iv = [0u8; 12];
                    // Bounded by the deadline and by a count no run reaches.
                    for i in 0..u64::MAX / 2 {
                        if i % 64 == 0 && Instant::now() >= deadline {
                            break;
                        }
                        if args.lookup_each_call {
                            key = find(&session)?;
                        }
                        iv[..8].copy_from_slice(&i.to_le_bytes());
                        let params = GcmParams::new(&mut iv, &aad, 128.into())?;
                        let out = session
                            .encrypt(&Mechanism::AesGcm(params), key, &plaintext)
                            .context("C_Encrypt")?;
                        if args.with_decrypt {
                            let params = GcmParams::new(&mut iv, &aad, 128.into())?;
                            let back = session
                                .decrypt(&Mechanism::AesGcm(params), key, &out)
                                .context("C_Decrypt")?;
                            anyhow::ensure!(back == plaintext, "decrypt returned other bytes");
                        }
                        std::hint::black_box(out);
                        ops += 1;
                    }
                    Ok(ops)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
            })
            .collect::<Result<Vec<u64>>>()
    })?;
    let secs = started.elapsed().as_secs_f64();
    let ops: u64 = counts.iter().sum();
    let rate = ops as f64 / secs;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "ops": ops, "seconds": secs, "ops_per_s": rate, "us_per_op": 1e6 / rate * args.threads as f64,
                "threads": args.threads, "lookup_each_call": args.lookup_each_call,
                "with_decrypt": args.with_decrypt,
                "plaintext_bytes": args.plaintext_bytes,
            })
        );
    } else {
        println!(
            "PKCS#11 AES-GCM {} ({} B, {} thread(s), {}): {ops} ops in {secs:.2} s = {rate:.0} ops/s",
            if args.with_decrypt {
                "encrypt+decrypt"
            } else {
                "encrypt"
            },
            args.plaintext_bytes,
            args.threads,
            if args.lookup_each_call {
                "label lookup per call"
            } else {
                "cached handle"
            }
        );
    }
    drop(admin);
    Ok(())
}
