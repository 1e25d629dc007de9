//! What can go wrong deploying to Cloudflare.

use std::path::PathBuf;

/// One entry of the `errors` array of a Cloudflare API response.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ApiMessage {
    /// Cloudflare's error code (e.g. 10090: no such Worker).
    pub code: i64,
    /// What Cloudflare says.
    pub message: String,
}

/// The adapter's errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A credential is missing from the secret store.
    #[error(
        "the secret `{name}` is not set: {purpose}. Set it in the secret store \
         (the environment variable {env_var}, or a file named `{name}` in --secrets-dir)"
    )]
    MissingSecret {
        /// The secret's name.
        name: String,
        /// The environment variable that holds it with the default store.
        env_var: String,
        /// What it is for.
        purpose: &'static str,
    },
    /// The secret store failed.
    #[error(transparent)]
    Secret(#[from] chronicle_crypto::Error),
    /// Cloudflare refused a request.
    #[error("Cloudflare API: {method} {path} failed with HTTP {status}: {}", messages(.errors))]
    Api {
        /// The method.
        method: String,
        /// The path under the account.
        path: String,
        /// The HTTP status.
        status: u16,
        /// Cloudflare's errors.
        errors: Vec<ApiMessage>,
    },
    /// The request did not get an answer.
    #[error("Cloudflare API: {method} {path}: {source}")]
    Http {
        /// The method.
        method: String,
        /// The path under the account.
        path: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not what the API documents.
    #[error("Cloudflare API: {method} {path} answered something unexpected: {reason}")]
    Response {
        /// The method.
        method: String,
        /// The path under the account.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The Worker bundle is missing or incomplete.
    #[error("the Worker bundle {}: {reason}", path.display())]
    Bundle {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A request the adapter refuses before calling Cloudflare.
    #[error("{0}")]
    Invalid(String),
    /// The projection is not deployed on Cloudflare.
    #[error(
        "projection `{0}` is not deployed on Cloudflare (no Worker `{1}`); run `chronicle deploy` first"
    )]
    NotDeployed(String, String),
    /// The projection store failed.
    #[error(transparent)]
    Projection(#[from] chronicle_projections::Error),
}

fn messages(errors: &[ApiMessage]) -> String {
    if errors.is_empty() {
        return "no error message".to_owned();
    }
    errors
        .iter()
        .map(|e| format!("{} (code {})", e.message, e.code))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The adapter's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
