//! The same-run ceiling of a PKCS#11-backed proxy (issue 15 §1): `null-server
//! --hsm-module …` adds to the null server exactly the key-manager work of one Encrypt —
//! one AES-256-GCM encrypt on the token with a cached key handle, and, when the request
//! asks for a CDIV, a decrypt of that output too (the proxy's self-check) — done inline
//! on the runtime thread, with a session from a small pool. No SigV4, JSON, routing,
//! call threads or logging: what a SoftHSM-backed proxy costs at the very least, so the
//! proxy's CPU per request is quoted as a ratio to it, measured minutes apart.

use anyhow::Result;

use crate::cli::NullServerArgs;

/// The backend work of one request, or nothing (a plain null server).
pub trait Work: Send + Sync + 'static {
    /// Does one request's key-manager work; `cdiv`: the request asked for a CDIV.
    fn serve(&self, cdiv: bool) -> Result<()>;
}

/// What `args` asks for: `None` for the plain null server.
pub fn from_args(args: &NullServerArgs) -> Result<Option<std::sync::Arc<dyn Work>>> {
    match &args.hsm_module {
        None => Ok(None),
        #[cfg(feature = "pkcs11")]
        Some(module) => {
            let pin = std::env::var(&args.hsm_pin_env).map_err(|_| {
                anyhow::anyhow!("--hsm-module needs the user PIN in ${}", args.hsm_pin_env)
            })?;
            Ok(Some(std::sync::Arc::new(hsm::HsmWork::open(
                module,
                &args.hsm_token,
                &pin,
            )?)))
        }
        #[cfg(not(feature = "pkcs11"))]
        Some(_) => anyhow::bail!("built without the pkcs11 feature"),
    }
}

#[cfg(feature = "pkcs11")]
mod hsm {
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use anyhow::{Context, Result, bail};
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
    use cryptoki::session::{Session, UserType};
    use cryptoki::slot::Slot;
    use cryptoki::types::AuthPin;
    use xks_proxy::backend::KeyUsage;

    use crate::servers::BENCH_KEY;

    pub struct HsmWork {
        ctx: Pkcs11,
        slot: Slot,
        key: ObjectHandle,
        /// Sessions not in use; a request takes one (or opens one) and gives it back.
        sessions: Mutex<Vec<Session>>,
        /// Keeps the application logged in (PKCS#11 logins are per application and end
        /// with its last session); behind a mutex only because a session is not `Sync`.
        _admin: Mutex<Session>,
        counter: AtomicU64,
    }

    impl HsmWork {
        pub fn open(module: &Path, token: &str, pin: &str) -> Result<Self> {
            let ctx =
                Pkcs11::new(module).with_context(|| format!("loading {}", module.display()))?;
            ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .context("C_Initialize")?;
            let slot = ctx
                .get_slots_with_token()
                .context("C_GetSlotList")?
                .into_iter()
                .find(|s| ctx.get_token_info(*s).is_ok_and(|i| i.label() == token))
                .with_context(|| format!("no token labelled {token}"))?;
            let admin = ctx.open_rw_session(slot).context("C_OpenSession")?;
            admin
                .login(UserType::User, Some(&AuthPin::from(pin)))
                .context("C_Login")?;
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(BENCH_KEY.as_bytes().to_vec()),
            ];
            let key = match admin.find_objects(&template).context("C_FindObjects")?[..] {
                [k] => k,
                [] => admin
                    .generate_key(
                        &Mechanism::AesKeyGen,
                        &xks_proxy::backend::pkcs11::aes256_template(
                            BENCH_KEY,
                            &[KeyUsage::Encrypt, KeyUsage::Decrypt],
                        ),
                    )
                    .context("C_GenerateKey")?,
                _ => bail!("more than one key labelled {BENCH_KEY}"),
            };
            Ok(Self {
                ctx,
                slot,
                key,
                sessions: Mutex::new(Vec::new()),
                _admin: Mutex::new(admin),
                counter: AtomicU64::new(0),
            })
        }
    }

    impl super::Work for HsmWork {
        fn serve(&self, cdiv: bool) -> Result<()> {
            let pooled = self
                .sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            let session = match pooled {
                Some(s) => s,
                None => self
                    .ctx
                    .open_ro_session(self.slot)
                    .context("C_OpenSession")?,
            };
            // The proxy's shapes: 32 bytes of plaintext, ~108 bytes of AAD, a 12-byte IV.
            let plaintext = [0x5au8; 32];
            let aad = [0u8; 108];
            let mut iv = [0u8; 12];
            iv[..8].copy_from_slice(&self.counter.fetch_add(1, Ordering::Relaxed).to_le_bytes());
            let params = GcmParams::new(&mut iv, &aad, 128.into())?;
            let sealed = session
                .encrypt(&Mechanism::AesGcm(params), self.key, &plaintext)
                .context("C_Encrypt")?;
            if cdiv {
                let params = GcmParams::new(&mut iv, &aad, 128.into())?;
                let opened = session
                    .decrypt(&Mechanism::AesGcm(params), self.key, &sealed)
                    .context("C_Decrypt")?;
                anyhow::ensure!(opened == plaintext, "decrypt returned other bytes");
            }
            self.sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(session);
            Ok(())
        }
    }
}
