//! Placeholder: the KMS emulator.
