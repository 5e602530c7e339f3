//! AES-GCM through `CKM_AES_GCM` on one session: the three IV policies, the 128-bit
//! tag split from the ciphertext on encrypt and appended on decrypt, and the
//! decrypt-path error rule (an authentication failure is `InvalidCiphertext`; the same
//! vendor code elsewhere is not).

use crate::crypto::rand::{SecureRandom, SystemRandom};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::errors::{Fault, Op, classify};
use super::settings::IvPolicy;
use crate::backend::{BackendError, Sealed, TAG_LEN};
use crate::secret::SecretBytes;

/// The IV length we generate and ask HSMs for (the spec allows 12 or 16; 12 is GCM's
/// native size).
pub(crate) const IV_LEN: usize = 12;
const TAG_BITS: u64 = (TAG_LEN as u64) * 8;

/// Encrypts `plaintext` under `key` with `aad`, choosing the IV per `policy`.
pub(crate) fn encrypt(
    session: &Session,
    key: ObjectHandle,
    policy: IvPolicy,
    rng: &SystemRandom,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Sealed, Fault> {
    let mut iv = [0u8; IV_LEN];
    if policy == IvPolicy::ProxyRandom {
        rng.fill(&mut iv)
            .map_err(|_| Fault::Final(BackendError::Failed("system RNG failed".into())))?;
    }
    // HsmGenerated / ZeroFilledReturned: the buffer goes in zero-filled and the HSM
    // writes its IV into it (CloudHSM requires the zeros; Luna ignores them).
    let output = {
        let params =
            GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(|e| classify(&e, Op::Encrypt))?;
        let mechanism = Mechanism::AesGcm(params);
        session
            .encrypt(&mechanism, key, plaintext)
            .map_err(|e| classify(&e, Op::Encrypt))?
    };
    split_output(policy, iv, plaintext.len(), output)
}

/// Splits `ciphertext ‖ tag [‖ iv]` and settles which IV was used.
fn split_output(
    policy: IvPolicy,
    iv_buffer: [u8; IV_LEN],
    plaintext_len: usize,
    mut output: Vec<u8>,
) -> Result<Sealed, Fault> {
    let bad_len = || {
        Fault::Final(BackendError::Failed(
            "unexpected AES-GCM output length from the HSM".into(),
        ))
    };
    let iv = match policy {
        IvPolicy::ProxyRandom => {
            if output.len() != plaintext_len + TAG_LEN {
                return Err(bad_len());
            }
            iv_buffer.to_vec()
        }
        IvPolicy::HsmGenerated if output.len() == plaintext_len + TAG_LEN + IV_LEN => {
            // Luna variant: the generated IV follows the tag in the output.
            output.split_off(plaintext_len + TAG_LEN)
        }
        IvPolicy::HsmGenerated | IvPolicy::ZeroFilledReturned => {
            if output.len() != plaintext_len + TAG_LEN {
                return Err(bad_len());
            }
            iv_buffer.to_vec()
        }
    };
    // An all-zero IV after an HSM-generated policy means the HSM used our zero buffer
    // as the IV: every encryption would reuse it. Refuse (2^-96 false alarm odds).
    if policy != IvPolicy::ProxyRandom && iv.iter().all(|b| *b == 0) {
        return Err(Fault::Final(BackendError::Failed(
            "the HSM returned no IV (check iv_policy for this HSM)".into(),
        )));
    }
    let tag_bytes = output.split_off(plaintext_len);
    let tag: [u8; TAG_LEN] = tag_bytes.as_slice().try_into().map_err(|_| bad_len())?;
    Ok(Sealed {
        iv,
        ciphertext: output,
        tag,
        key_version: 0,
    })
}

/// Decrypts `ciphertext ‖ tag` under `key`. The IV (12 or 16 bytes) goes to the HSM as
/// given. Authentication failures come back as `InvalidCiphertext`; codes that are
/// ambiguous (CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED) are flagged for the caller to
/// confirm the token is alive before trusting them.
pub(crate) fn decrypt(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
    aad: &[u8],
) -> Result<SecretBytes, Fault> {
    let mut input = Vec::with_capacity(ciphertext.len() + tag.len());
    input.extend_from_slice(ciphertext);
    input.extend_from_slice(tag);
    let mut iv_buf = iv.to_vec();
    let params =
        GcmParams::new(&mut iv_buf, aad, TAG_BITS.into()).map_err(|e| classify(&e, Op::Decrypt))?;
    let mechanism = Mechanism::AesGcm(params);
    // A tag mismatch reported as CKR_GENERAL_ERROR / CKR_FUNCTION_FAILED comes back as
    // a `Suspect`: the token settles it (see `classify`).
    let plain = session
        .decrypt(&mechanism, key, &input)
        .map_err(|e| classify(&e, Op::Decrypt))?;
    let plain = SecretBytes::new(plain);
    if plain.len() != ciphertext.len() {
        return Err(Fault::Final(BackendError::Failed(
            "unexpected AES-GCM output length from the HSM".into(),
        )));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(pt_len: usize, extra_iv: bool) -> Vec<u8> {
        let mut v: Vec<u8> = (0..pt_len as u8).collect();
        v.extend_from_slice(&[0xAA; TAG_LEN]);
        if extra_iv {
            v.extend_from_slice(&[0x11; IV_LEN]);
        }
        v
    }

    #[test]
    fn proxy_random_keeps_our_iv_and_splits_the_tag() {
        let s = split_output(IvPolicy::ProxyRandom, [7; IV_LEN], 5, out(5, false)).expect("ok");
        assert_eq!(s.iv, vec![7; IV_LEN]);
        assert_eq!(s.ciphertext, vec![0, 1, 2, 3, 4]);
        assert_eq!(s.tag, [0xAA; TAG_LEN]);
        assert_eq!(s.key_version, 0);
        assert!(split_output(IvPolicy::ProxyRandom, [7; IV_LEN], 5, out(5, true)).is_err());
    }

    #[test]
    fn hsm_generated_reads_the_iv_from_the_buffer_or_the_output() {
        let s = split_output(IvPolicy::HsmGenerated, [9; IV_LEN], 3, out(3, false)).expect("ok");
        assert_eq!(s.iv, vec![9; IV_LEN]);
        let s = split_output(IvPolicy::HsmGenerated, [0; IV_LEN], 3, out(3, true)).expect("ok");
        assert_eq!(s.iv, vec![0x11; IV_LEN]);
        assert_eq!(s.ciphertext, vec![0, 1, 2]);
        assert_eq!(s.tag, [0xAA; TAG_LEN]);
    }

    #[test]
    fn zero_filled_returned_reads_the_buffer_and_refuses_zero() {
        let s =
            split_output(IvPolicy::ZeroFilledReturned, [3; IV_LEN], 0, out(0, false)).expect("ok");
        assert_eq!(s.iv, vec![3; IV_LEN]);
        assert!(s.ciphertext.is_empty());
        for policy in [IvPolicy::ZeroFilledReturned, IvPolicy::HsmGenerated] {
            let err = split_output(policy, [0; IV_LEN], 4, out(4, false)).expect_err("must fail");
            assert!(
                matches!(err, Fault::Final(BackendError::Failed(_))),
                "{err:?}"
            );
        }
    }
}
