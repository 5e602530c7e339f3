//! GetKeyMetadata (spec §"GetKeyMetadata"): the key's spec, usages and status.

use super::error::ApiError;
use super::wire::{MetadataRequest, MetadataResponse};
use super::{Call, require_principal};

pub async fn handle(call: &Call<'_>, req: MetadataRequest) -> Result<MetadataResponse, ApiError> {
    require_principal(&req.request_metadata)?;
    let key = call.key_id.to_owned();
    let md = call.backend.call(move |b| b.key_metadata(&key)).await?;
    Ok(MetadataResponse {
        key_spec: md.spec.name(),
        // Spec: at most 10 usages; we have 7 kinds, listed once each.
        key_usage: md.usages.iter().map(|u| u.as_str().to_owned()).collect(),
        key_status: md.status.as_str().to_owned(),
    })
}
