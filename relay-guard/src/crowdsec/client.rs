//! LAPI over HTTP (reqwest, rustls): the bouncer's stream, the watcher's
//! login and alerts, and the newer endpoints used when the server has
//! them (usage metrics from 1.6.3, allowlist checks from 1.6.6). Keys and
//! passwords go in headers and bodies only; no error shows them.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::decision::StreamReply;

/// Per request, all in.
pub const TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of an error body quoted.
const BODY_QUOTE: usize = 200;
/// Most bytes of an answer read (a stream of a million decisions is about
/// 200 MB); a longer one is an error, and changes nothing.
pub const MAX_BODY: usize = 256 << 20;

/// What went wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LapiError {
    /// No answer (connection refused, timeout, TLS).
    #[error("LAPI at {url} is unreachable: {why}")]
    Unreachable { url: String, why: String },
    /// An HTTP error status.
    #[error("LAPI answered {status} to {what}: {body}")]
    Status {
        status: u16,
        what: &'static str,
        body: String,
    },
    /// A body that is not what the API documents.
    #[error("LAPI's answer to {what} does not parse: {why}")]
    Decode { what: &'static str, why: String },
}

impl LapiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            LapiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one LAPI.
#[derive(Clone)]
pub struct Lapi {
    http: reqwest::Client,
    base: String,
}

impl std::fmt::Debug for Lapi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lapi").field("base", &self.base).finish_non_exhaustive()
    }
}

/// The watcher's login answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Token {
    pub token: String,
    #[serde(default)]
    pub expire: String,
}

#[derive(Serialize)]
struct Login<'a> {
    machine_id: &'a str,
    password: &'a str,
    scenarios: [&'a str; 0],
}

/// A decision inside a pushed alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertDecision {
    pub origin: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub scope: String,
    pub value: String,
    pub duration: String,
    pub scenario: String,
}

/// The alert's source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertSource {
    pub scope: String,
    pub value: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub range: Option<String>,
}

/// One alert with one explicit decision, as `POST /v1/alerts` takes it
/// (every field that 1.4.6 requires).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub scenario: String,
    pub scenario_hash: String,
    pub scenario_version: String,
    pub message: String,
    pub events_count: i32,
    pub start_at: String,
    pub stop_at: String,
    pub capacity: i32,
    pub leakspeed: String,
    pub simulated: bool,
    pub events: Vec<serde_json::Value>,
    pub source: AlertSource,
    pub decisions: Vec<AlertDecision>,
}

fn quote(body: &str) -> String {
    let b: String = body.chars().take(BODY_QUOTE).collect();
    b.replace(|c: char| c.is_control(), " ")
}

impl Lapi {
    /// `base`: the `lapi_url`, without a trailing `/`.
    pub fn new(base: &str) -> Result<Lapi, LapiError> {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("relay-guard/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| LapiError::Unreachable {
                url: base.to_string(),
                why: e.to_string(),
            })?;
        Ok(Lapi {
            http,
            base: base.to_string(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: &reqwest::Error) -> LapiError {
        // reqwest's text names the URL (no secret in it) and the cause.
        let mut why = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            why.push_str(": ");
            why.push_str(&s.to_string());
            src = s.source();
        }
        LapiError::Unreachable {
            url: self.base.clone(),
            why,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &'static str) -> Result<reqwest::Response, LapiError> {
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(LapiError::Status {
            status: status.as_u16(),
            what,
            body: quote(&body),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        mut resp: reqwest::Response,
        what: &'static str,
    ) -> Result<T, LapiError> {
        let mut bytes: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| LapiError::Decode {
            what,
            why: e.to_string(),
        })? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(LapiError::Decode {
                    what,
                    why: format!("longer than {} MiB", MAX_BODY >> 20),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&bytes).map_err(|e| LapiError::Decode {
            what,
            why: e.to_string(),
        })
    }

    /// `GET /v1/decisions/stream`: everything (`startup`) or what changed
    /// since this key's last pull. `dedup=false`: every decision of a value,
    /// not only the longest (ignored by servers that do not know it).
    pub async fn stream(&self, key: &str, startup: bool, scopes: &str) -> Result<StreamReply, LapiError> {
        let what = "the decisions stream";
        let req = self
            .http
            .get(format!("{}/v1/decisions/stream", self.base))
            .query(&[
                ("startup", if startup { "true" } else { "false" }),
                ("scopes", scopes),
                ("dedup", "false"),
            ])
            .header("X-Api-Key", key);
        Self::json(self.send(req, what).await?, what).await
    }

    /// `POST /v1/watchers/login`.
    pub async fn login(&self, machine_id: &str, password: &str) -> Result<Token, LapiError> {
        let what = "the watcher login";
        let req = self.http.post(format!("{}/v1/watchers/login", self.base)).json(&Login {
            machine_id,
            password,
            scenarios: [],
        });
        Self::json(self.send(req, what).await?, what).await
    }

    /// `POST /v1/alerts`: the ids of the alerts stored.
    pub async fn push(&self, token: &str, alerts: &[Alert]) -> Result<Vec<String>, LapiError> {
        let what = "an alert push";
        let req = self
            .http
            .post(format!("{}/v1/alerts", self.base))
            .bearer_auth(token)
            .json(alerts);
        let ids: Option<Vec<serde_json::Value>> = Self::json(self.send(req, what).await?, what).await?;
        Ok(ids
            .unwrap_or_default()
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            })
            .collect())
    }

    /// Whether LAPI holds an alert of `scenario` for `prefix` from the
    /// last `since` (`GET /v1/alerts`, the watcher's own query).
    pub async fn alerts_since(
        &self,
        token: &str,
        scenario: &str,
        prefix: &ipnet::IpNet,
        since: Duration,
    ) -> Result<bool, LapiError> {
        let what = "an alert query";
        let single = prefix.prefix_len() == prefix.max_prefix_len();
        let (key, value) = if single {
            ("ip", prefix.addr().to_string())
        } else {
            ("range", prefix.to_string())
        };
        let req = self
            .http
            .get(format!("{}/v1/alerts", self.base))
            .query(&[
                (key, value.as_str()),
                ("scenario", scenario),
                ("since", &format!("{}s", since.as_secs().max(1))),
                ("limit", "1"),
            ])
            .bearer_auth(token);
        let found: Option<Vec<serde_json::Value>> = Self::json(self.send(req, what).await?, what).await?;
        Ok(found.is_some_and(|v| !v.is_empty()))
    }

    /// `GET /v1/allowlists/check/{value}` (LAPI 1.6.6+): `Ok(None)` when
    /// the server has no such endpoint.
    pub async fn allowlisted(&self, token: &str, value: &str) -> Result<Option<bool>, LapiError> {
        #[derive(Deserialize)]
        struct Check {
            allowlisted: bool,
        }
        let what = "an allowlist check";
        let req = self
            .http
            .get(format!(
                "{}/v1/allowlists/check/{}",
                self.base,
                value.replace('/', "%2F")
            ))
            .bearer_auth(token);
        match self.send(req, what).await {
            Ok(r) => Ok(Some(Self::json::<Check>(r, what).await?.allowlisted)),
            Err(e) if matches!(e.status(), Some(404 | 405)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /v1/usage-metrics` (LAPI 1.6.3+): `Ok(false)` when the server
    /// has no such endpoint.
    pub async fn usage_metrics(&self, key: &str, body: &serde_json::Value) -> Result<bool, LapiError> {
        let what = "the usage metrics";
        let req = self
            .http
            .post(format!("{}/v1/usage-metrics", self.base))
            .header("X-Api-Key", key)
            .json(body);
        match self.send(req, what).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.status(), Some(404 | 405)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
