//! Logging setup: `tracing` with a human or JSON formatter on stderr.
//!
//! What is logged is decided at the call sites (one line per request in `api`); this
//! module only decides how it looks. Secrets cannot reach it: they are types whose
//! `Debug` is redacted and they are never passed as fields.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the config's level.
/// Returns an error if a subscriber is already installed.
pub fn init(config: &LoggingConfig) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| e.to_string())
}
