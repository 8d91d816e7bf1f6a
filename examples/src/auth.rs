//! A call filter that admits external clients by bearer token: the shape of most API-key schemes.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use grains_silo::{Client, ClientConfig, Silo};
//!
//! // The silo: clients must present one of these tokens.
//! let silo = Silo::builder().incoming_filter(grains_examples::auth::require_bearer_token(["s3cret"])).start().await?;
//!
//! // A client (over TLS in production: the token travels as it is).
//! let config = ClientConfig { bearer_token: Some("s3cret".into()), ..ClientConfig::default() };
//! let client = Client::connect_with("http://127.0.0.1:30000", config).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;

use grains::CallError;
use grains_silo::{CallInfo, CallerIdentity};

/// A filter that lets a client's call through only if the client connected with one of `tokens`
/// ([`grains_silo::ClientConfig::bearer_token`]). Calls from inside the cluster — grains, the silo's own
/// process, members that proved the cluster secret — pass: they are already trusted.
pub fn require_bearer_token<T: Into<String>>(
    tokens: impl IntoIterator<Item = T>,
) -> impl Fn(&CallInfo<'_>) -> Result<(), CallError> + Send + Sync + 'static {
    let tokens: BTreeSet<String> = tokens.into_iter().map(Into::into).collect();
    move |call| {
        let CallerIdentity::Client(client) = call.caller else { return Ok(()) };
        let presented = client.bearer_token.as_ref().map(|t| t.as_str());
        // Compared against every token in constant time, so timing does not tell how much of a guess matched.
        let valid = presented.is_some_and(|p| tokens.iter().fold(false, |found, t| constant_time_eq(t, p) | found));
        if valid {
            Ok(())
        } else {
            let what = if presented.is_some() { "an unknown bearer token" } else { "no bearer token" };
            Err(CallError::PermissionDenied(format!("{}.{}: the client sent {what}", call.grain, call.method)))
        }
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}
