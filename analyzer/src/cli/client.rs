//! The CLI's connections to a running analyzer: TLS, the bearer token and the loopback rule
//! from the global flags (`--tls-ca`, `--token-file`, `--insecure`; see `afetm-auth`).
use std::sync::OnceLock;

use afetm_auth::{AuthChannel, ClientAuth};
use afetm_proto::{control_client::ControlClient, query_client::QueryClient};
use anyhow::{Context, Result};

static AUTH: OnceLock<ClientAuth> = OnceLock::new();

/// Sets how this process connects (once, from the command line).
pub fn init(auth: ClientAuth) {
    let _ = AUTH.set(auth);
}

async fn channel(server: &str) -> Result<AuthChannel> {
    let auth = AUTH.get_or_init(ClientAuth::default);
    let channel =
        auth.endpoint(server)?.connect().await.with_context(|| format!("cannot reach analyzer at {server}"))?;
    Ok(AuthChannel::new(channel, auth.interceptor()))
}

/// A Query client.
pub async fn query(server: &str) -> Result<QueryClient<AuthChannel>> {
    Ok(QueryClient::new(channel(server).await?).max_decoding_message_size(afetm_analyzer::service::MAX_MESSAGE_BYTES))
}

/// A Control client.
pub async fn control(server: &str) -> Result<ControlClient<AuthChannel>> {
    Ok(ControlClient::new(channel(server).await?).max_encoding_message_size(afetm_analyzer::service::MAX_MESSAGE_BYTES))
}
