//! Placeholder: replaced by the PKCS#11 work.
