//! The Cloudflare API v4 calls a projection Worker needs: Workers scripts
//! (module upload, cron schedules, delete), Queues (queues, consumers,
//! messages). JSON in Cloudflare's envelope, a bearer token, nothing else.

use std::fmt;

use chronicle_crypto::SecretStore;
use reqwest::multipart::{Form, Part};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::error::{ApiMessage, Error, Result};

/// The secret with the Cloudflare account id.
pub const ACCOUNT_ID_SECRET: &str = "cloudflare-account-id";
/// The secret with the Cloudflare API token (Workers Scripts and Queues
/// edit permissions).
pub const API_TOKEN_SECRET: &str = "cloudflare-api-token";
/// Cloudflare's API.
pub const DEFAULT_BASE_URL: &str = "https://api.cloudflare.com/client/v4";

/// A module of a Worker: its name in the upload (and the import
/// specifier the other modules use), its content type and its bytes.
#[derive(Clone)]
pub struct Module {
    /// The name, e.g. `index.js`.
    pub name: String,
    /// `application/javascript+module`, `application/wasm`, ...
    pub content_type: &'static str,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("name", &self.name)
            .field("content_type", &self.content_type)
            .field("size", &self.bytes.len())
            .finish()
    }
}

/// A Worker script as the API describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Script {
    /// The script's name.
    #[serde(default)]
    pub id: String,
    /// Its content hash.
    #[serde(default)]
    pub etag: Option<String>,
    /// When it last changed.
    #[serde(default)]
    pub modified_on: Option<String>,
    /// The events it handles (`scheduled`, `queue`, ...).
    #[serde(default)]
    pub handlers: Vec<String>,
}

/// A queue.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Queue {
    /// Its id.
    pub queue_id: String,
    /// Its name.
    pub queue_name: String,
}

/// A queue consumer's settings (Cloudflare's names and units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct ConsumerSettings {
    /// Messages per batch.
    pub batch_size: u32,
    /// Deliveries of a message before it goes to the dead-letter queue.
    pub max_retries: u32,
    /// How long to wait to fill a batch, in milliseconds.
    pub max_wait_time_ms: u32,
    /// The most invocations at once.
    pub max_concurrency: u32,
    /// Seconds before a failed batch is delivered again.
    pub retry_delay: u32,
}

/// A queue consumer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Consumer {
    /// Its id.
    pub consumer_id: String,
    /// The Worker that consumes (absent for an HTTP pull consumer).
    #[serde(default)]
    pub script_name: Option<String>,
    /// Its settings.
    pub settings: ConsumerSettings,
    /// The queue its failed messages go to.
    #[serde(default)]
    pub dead_letter_queue: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<T> {
    success: bool,
    #[serde(default)]
    errors: Vec<ApiMessage>,
    result: Option<T>,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

#[derive(Deserialize)]
struct ResultInfo {
    #[serde(default)]
    page: Option<u32>,
    #[serde(default)]
    total_pages: Option<u32>,
}

#[derive(Deserialize)]
struct Schedules {
    schedules: Vec<Schedule>,
}

#[derive(Deserialize, Serialize)]
struct Schedule {
    cron: String,
}

/// A client of the Cloudflare API for one account.
///
/// ```no_run
/// # async fn demo() -> chronicle_cloudflare::Result<()> {
/// use chronicle_cloudflare::CloudflareApi;
/// use chronicle_crypto::EnvSecrets;
///
/// // CHRONICLE_CLOUDFLARE_ACCOUNT_ID and CHRONICLE_CLOUDFLARE_API_TOKEN
/// let api = CloudflareApi::from_secrets(&EnvSecrets::with_prefix("CHRONICLE_"), None).await?;
/// println!("{:?}", api.script("chronicle-user-profile").await?);
/// # Ok(()) }
/// ```
pub struct CloudflareApi {
    http: reqwest::Client,
    base: String,
    account: String,
    token: Zeroizing<String>,
}

impl fmt::Debug for CloudflareApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareApi")
            .field("base", &self.base)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl CloudflareApi {
    /// A client for `account` with `token`, at `base_url` (Cloudflare's
    /// own when `None`).
    pub fn new(account: &str, token: &str, base_url: Option<&str>) -> Result<Self> {
        let account = account.trim();
        if account.is_empty() || !account.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Error::Invalid(format!(
                "`{account}` is not a Cloudflare account id (letters and digits, as the dashboard's \
                 URL shows it); check the secret `{ACCOUNT_ID_SECRET}`"
            )));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("chronicle/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|source| Error::Http {
                method: "-".into(),
                path: "-".into(),
                source,
            })?;
        Ok(CloudflareApi {
            http,
            base: base_url
                .unwrap_or(DEFAULT_BASE_URL)
                .trim_end_matches('/')
                .to_owned(),
            account: account.to_owned(),
            token: Zeroizing::new(token.trim().to_owned()),
        })
    }

    /// A client whose account id and token come from `secrets`
    /// ([`ACCOUNT_ID_SECRET`], [`API_TOKEN_SECRET`]); an error names the
    /// missing one.
    pub async fn from_secrets(secrets: &dyn SecretStore, base_url: Option<&str>) -> Result<Self> {
        let account = require(
            secrets,
            ACCOUNT_ID_SECRET,
            "the Cloudflare account to deploy to",
        )
        .await?;
        let token = require(
            secrets,
            API_TOKEN_SECRET,
            "an API token with Workers Scripts and Queues edit permissions",
        )
        .await?;
        CloudflareApi::new(&account, &token, base_url)
    }

    /// The account.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The API's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The script `name`, or `None` when the account has no such Worker.
    pub async fn script(&self, name: &str) -> Result<Option<Script>> {
        let path = format!("workers/services/{name}");
        match self.json::<Value>(Method::GET, &path, None).await {
            Ok(service) => {
                let script = service
                    .pointer("/default_environment/script")
                    .cloned()
                    .unwrap_or(Value::Null);
                Ok(Some(serde_json::from_value(script).unwrap_or_default()))
            }
            Err(Error::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads and deploys the Worker `name`: `metadata` (main module,
    /// compatibility date, bindings, limits) and its modules, as one
    /// multipart request.
    pub async fn upload_script(
        &self,
        name: &str,
        metadata: &Value,
        modules: &[Module],
    ) -> Result<Script> {
        let path = format!("workers/scripts/{name}");
        let mut form = Form::new().part(
            "metadata",
            Part::text(metadata.to_string())
                .mime_str("application/json")
                .expect("a valid content type"),
        );
        for module in modules {
            form = form.part(
                module.name.clone(),
                Part::bytes(module.bytes.clone())
                    .file_name(module.name.clone())
                    .mime_str(module.content_type)
                    .expect("a valid content type"),
            );
        }
        let request = self.request(Method::PUT, &path).multipart(form);
        self.send(Method::PUT, &path, request).await
    }

    /// Deletes the Worker `name` with its triggers and consumers; `false`
    /// when there was none.
    pub async fn delete_script(&self, name: &str) -> Result<bool> {
        let path = format!("workers/scripts/{name}");
        let request = self
            .request(Method::DELETE, &path)
            .query(&[("force", "true")]);
        match self.send::<Value>(Method::DELETE, &path, request).await {
            Ok(_) => Ok(true),
            Err(Error::Api { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets the Worker's cron triggers (replacing any).
    pub async fn put_schedules(&self, name: &str, crons: &[String]) -> Result<()> {
        let body: Vec<Schedule> = crons
            .iter()
            .map(|cron| Schedule { cron: cron.clone() })
            .collect();
        let path = format!("workers/scripts/{name}/schedules");
        self.json::<Value>(
            Method::PUT,
            &path,
            Some(serde_json::to_value(body).expect("schedules serialize")),
        )
        .await?;
        Ok(())
    }

    /// The Worker's cron triggers.
    pub async fn schedules(&self, name: &str) -> Result<Vec<String>> {
        let path = format!("workers/scripts/{name}/schedules");
        let s: Schedules = self.json(Method::GET, &path, None).await?;
        Ok(s.schedules.into_iter().map(|s| s.cron).collect())
    }

    /// The queue called `name`, if the account has it.
    pub async fn find_queue(&self, name: &str) -> Result<Option<Queue>> {
        let mut page = 1u32;
        loop {
            let path = "queues".to_owned();
            let request = self
                .request(Method::GET, &path)
                .query(&[("page", page.to_string()), ("per_page", "100".to_owned())]);
            let (queues, info): (Vec<Queue>, _) =
                self.send_paged(Method::GET, &path, request).await?;
            if let Some(q) = queues.iter().find(|q| q.queue_name == name) {
                return Ok(Some(q.clone()));
            }
            let last = info
                .and_then(|i| i.total_pages.map(|t| i.page.unwrap_or(page) >= t))
                .unwrap_or(true);
            if last || queues.is_empty() {
                return Ok(None);
            }
            page += 1;
        }
    }

    /// Creates the queue `name`.
    pub async fn create_queue(&self, name: &str) -> Result<Queue> {
        self.json(
            Method::POST,
            "queues",
            Some(serde_json::json!({ "queue_name": name })),
        )
        .await
    }

    /// Deletes a queue (and the messages in it).
    pub async fn delete_queue(&self, queue_id: &str) -> Result<()> {
        self.json::<Value>(Method::DELETE, &format!("queues/{queue_id}"), None)
            .await?;
        Ok(())
    }

    /// The queue's consumers.
    pub async fn consumers(&self, queue_id: &str) -> Result<Vec<Consumer>> {
        let consumers: Vec<Value> = self
            .json(Method::GET, &format!("queues/{queue_id}/consumers"), None)
            .await?;
        // HTTP pull consumers have other settings: keep the Worker ones.
        Ok(consumers
            .into_iter()
            .filter_map(|c| serde_json::from_value(c).ok())
            .collect())
    }

    /// Makes the Worker `script` the queue's consumer with `settings`:
    /// creates the consumer, or changes the one with `consumer_id`.
    pub async fn set_consumer(
        &self,
        queue_id: &str,
        consumer_id: Option<&str>,
        script: &str,
        settings: &ConsumerSettings,
        dead_letter_queue: &str,
    ) -> Result<Consumer> {
        let body = serde_json::json!({
            "script_name": script,
            "type": "worker",
            "settings": settings,
            "dead_letter_queue": dead_letter_queue,
        });
        let (method, path) = match consumer_id {
            Some(id) => (Method::PUT, format!("queues/{queue_id}/consumers/{id}")),
            None => (Method::POST, format!("queues/{queue_id}/consumers")),
        };
        self.json(method, &path, Some(body)).await
    }

    /// Removes a consumer.
    pub async fn delete_consumer(&self, queue_id: &str, consumer_id: &str) -> Result<()> {
        self.json::<Value>(
            Method::DELETE,
            &format!("queues/{queue_id}/consumers/{consumer_id}"),
            None,
        )
        .await?;
        Ok(())
    }

    /// Publishes a JSON message to a queue.
    pub async fn send_message(&self, queue_id: &str, body: &Value) -> Result<()> {
        self.json::<Value>(
            Method::POST,
            &format!("queues/{queue_id}/messages"),
            Some(serde_json::json!({ "body": body, "content_type": "json" })),
        )
        .await?;
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}/accounts/{}/{path}", self.base, self.account)
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(self.token.as_str())
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T> {
        let mut request = self.request(method.clone(), path);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        self.send(method, path, request).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T> {
        self.send_paged(method, path, request).await.map(|(t, _)| t)
    }

    async fn send_paged<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(T, Option<ResultInfo>)> {
        let http = |source| Error::Http {
            method: method.to_string(),
            path: path.to_owned(),
            source,
        };
        let response = request.send().await.map_err(http)?;
        let status = response.status();
        let text = response.text().await.map_err(http)?;
        tracing::debug!(%method, path, status = status.as_u16(), "cloudflare api");
        let unexpected = |reason: String| Error::Response {
            method: method.to_string(),
            path: path.to_owned(),
            reason,
        };
        let envelope: Envelope<Value> = match serde_json::from_str(&text) {
            Ok(e) => e,
            Err(_) if !status.is_success() => {
                return Err(Error::Api {
                    method: method.to_string(),
                    path: path.to_owned(),
                    status: status.as_u16(),
                    errors: vec![ApiMessage {
                        code: 0,
                        message: text.chars().take(300).collect(),
                    }],
                });
            }
            Err(e) => return Err(unexpected(format!("not Cloudflare's JSON envelope ({e})"))),
        };
        if !envelope.success || !status.is_success() {
            return Err(Error::Api {
                method: method.to_string(),
                path: path.to_owned(),
                status: if status.is_success() {
                    StatusCode::BAD_REQUEST.as_u16()
                } else {
                    status.as_u16()
                },
                errors: envelope.errors,
            });
        }
        let result = envelope.result.unwrap_or(Value::Null);
        let t = serde_json::from_value(result)
            .map_err(|e| unexpected(format!("the result does not read: {e}")))?;
        Ok((t, envelope.result_info))
    }
}

/// The secret `name` as text, or an error naming it and saying what it is
/// for.
pub(crate) async fn require(
    secrets: &dyn SecretStore,
    name: &str,
    purpose: &'static str,
) -> Result<Zeroizing<String>> {
    let missing = || Error::MissingSecret {
        name: name.to_owned(),
        env_var: chronicle_crypto::EnvSecrets::with_prefix("CHRONICLE_").variable(name),
        purpose,
    };
    let value = secrets.get(name).await?.ok_or_else(missing)?;
    let text = value
        .expose_str()
        .map_err(|_| Error::Invalid(format!("the secret `{name}` is not UTF-8 text")))?;
    if text.trim().is_empty() {
        return Err(missing());
    }
    Ok(Zeroizing::new(text.to_owned()))
}
