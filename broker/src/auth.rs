//! Tokens and passwords.
//!
//! Shoal issues HS256 tokens itself and can also accept RS256 / EdDSA tokens
//! from a team's existing auth service. The algorithm is pinned per key: a
//! token is verified only with the key configured for the algorithm in its
//! header, so HS/RS confusion and `alg: none` are rejected. `exp` is
//! required. Revoked token ids (`jti`) are kept in memory, loaded from the
//! store at start.

use std::{collections::HashMap, path::Path, sync::Arc};

use crate::clock::now_secs;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Semaphore;

use crate::config::AuthOpts;

/// The revocation id that stands for a server ban of `user` (never a
/// token id: those are hex).
pub fn ban_key(user: &str) -> String {
    format!("!ban:{user}")
}

/// Claims in a Shoal token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User name.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default)]
    pub iat: u64,
    /// Token id, used for revocation. External tokens without one cannot be revoked.
    #[serde(default)]
    pub jti: String,
    /// An operator (the admin console). Only from an external issuer:
    /// tokens from `POST /api/login` never carry it (see `--admins`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// Why a token was refused. Each variant is a metrics label and the
/// `message` of the 401 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AuthError {
    /// No token in `Authorization: Bearer` or `?token=`.
    #[error("missing token")]
    Missing,
    /// Not a JWT, or claims of the wrong shape.
    #[error("malformed token")]
    Malformed,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// Signature does not verify.
    #[error("invalid signature")]
    BadSignature,
    /// Algorithm in the header has no configured key.
    #[error("algorithm not accepted")]
    WrongAlgorithm,
    /// The token's `jti` was revoked by logout.
    #[error("token revoked")]
    Revoked,
    /// An operator banned the user from the server (`POST /api/admin/ban`).
    #[error("user banned")]
    Banned,
    /// The subject is not a valid user name.
    #[error("invalid subject")]
    BadSubject,
}

impl AuthError {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::WrongAlgorithm => "wrong_algorithm",
            AuthError::Revoked => "revoked",
            AuthError::Banned => "banned",
            AuthError::BadSubject => "bad_subject",
        }
    }

    /// Every variant, to pre-register metric labels.
    pub const ALL: [AuthError; 9] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::BadSignature,
        AuthError::WrongAlgorithm,
        AuthError::Revoked,
        AuthError::Banned,
        AuthError::BadSubject,
    ];
}

/// Token issuing and verification, and password hashing.
pub struct Auth {
    encoding: EncodingKey,
    keys: Vec<(Algorithm, DecodingKey)>,
    ttl_secs: u64,
    /// Revoked token ids and their tokens' expiry: an entry is needed
    /// only until then, and [`Auth::prune_revoked`] drops it after.
    revoked: RwLock<HashMap<String, u64>>,
    /// Argon2 costs ~35 ms of CPU; this bounds how many run at once so a
    /// login flood cannot take every blocking thread.
    hash_permits: Arc<Semaphore>,
    dummy_hash: String,
}

impl Auth {
    /// Build from the auth options; generates and persists an HS256 secret
    /// into `data` (the data dir) if none is configured.
    pub fn from_config(cfg: &AuthOpts, data: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let secret = match &cfg.jwt_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => load_or_create_secret(data).context("JWT secret in data dir")?,
        };
        let mut keys = vec![(Algorithm::HS256, DecodingKey::from_secret(&secret))];
        if let Some(p) = &cfg.jwt_rsa_public_key {
            let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            keys.push((
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(&pem).context("RSA public key")?,
            ));
        }
        if let Some(p) = &cfg.jwt_ed25519_public_key {
            let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            keys.push((
                Algorithm::EdDSA,
                DecodingKey::from_ed_pem(&pem).context("Ed25519 public key")?,
            ));
        }
        let dummy_hash = Argon2::default()
            .hash_password(b"dummy password for timing")
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
            .to_string();
        let permits = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Auth {
            encoding: EncodingKey::from_secret(&secret),
            keys,
            ttl_secs: cfg.token_ttl.as_secs(),
            revoked: RwLock::new(HashMap::new()),
            hash_permits: Arc::new(Semaphore::new(permits)),
            dummy_hash,
        })
    }

    /// Issue an HS256 token for `user`. Returns the token, its claims.
    pub fn issue(&self, user: &str) -> Result<(String, Claims), jsonwebtoken::errors::Error> {
        let now = now_secs();
        let claims = Claims {
            sub: user.to_string(),
            iat: now,
            exp: now + self.ttl_secs,
            jti: uuid::Uuid::new_v4().simple().to_string(),
            admin: false,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, claims))
    }

    /// Verify a token: pinned algorithm, signature, `exp`, `nbf`, subject,
    /// revocation.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, k)| k)
            .ok_or(AuthError::WrongAlgorithm)?;
        let mut v = Validation::new(header.alg);
        v.leeway = 5;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::WrongAlgorithm
            }
            _ => AuthError::Malformed,
        })?;
        let claims = data.claims;
        shoal_proto::names::validate_user(&claims.sub).map_err(|_| AuthError::BadSubject)?;
        if !claims.jti.is_empty() && self.revoked.read().contains_key(&claims.jti) {
            return Err(AuthError::Revoked);
        }
        if self.is_banned(&claims.sub) {
            return Err(AuthError::Banned);
        }
        Ok(claims)
    }

    /// Whether an operator banned `user` from the server (until the ban's
    /// end). A server ban is kept as the revocation of [`ban_key`], so it
    /// is stored, announced to every node and loaded at start as one.
    pub fn is_banned(&self, user: &str) -> bool {
        self.revoked
            .read()
            .get(&ban_key(user))
            .is_some_and(|exp| *exp >= now_secs())
    }

    /// Forget a revocation (a lifted server ban).
    pub fn unrevoke(&self, jti: &str) {
        self.revoked.write().remove(jti);
    }

    /// Mark a token id revoked in memory until `exp`, its token's expiry
    /// (the caller persists it).
    pub fn revoke(&self, jti: &str, exp: u64) {
        if !jti.is_empty() {
            let mut r = self.revoked.write();
            let e = r.entry(jti.to_string()).or_insert(exp);
            *e = (*e).max(exp);
        }
    }

    /// Load revoked ids and their expiry at start.
    pub fn load_revoked(&self, ids: impl IntoIterator<Item = (String, u64)>) {
        self.revoked.write().extend(ids);
    }

    /// Forget revocations whose tokens have expired (an expired token is
    /// refused anyway); returns how many remain.
    pub fn prune_revoked(&self, now: u64) -> usize {
        let mut r = self.revoked.write();
        r.retain(|_, exp| *exp >= now);
        r.len()
    }

    /// Expiry to assume for a revocation announced without one (by an
    /// older node): the longest a token this node issues lives, and at
    /// least a week, from now.
    pub fn default_revocation_expiry(&self) -> u64 {
        now_secs() + self.ttl_secs.max(7 * 24 * 3600)
    }

    /// Hash a password with Argon2id (off the async runtime).
    pub async fn hash_password(&self, password: String) -> anyhow::Result<String> {
        let _permit = self.hash_permits.clone().acquire_owned().await?;
        tokio::task::spawn_blocking(move || {
            Argon2::default()
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("argon2: {e}"))
        })
        .await?
    }

    /// Check a password against a stored hash; with `None` (unknown user) a
    /// dummy hash is checked so timing does not reveal which users exist.
    pub async fn check_password(&self, password: String, hash: Option<String>) -> bool {
        let Ok(_permit) = self.hash_permits.clone().acquire_owned().await else {
            return false;
        };
        // An account seen with an external token has no password (empty
        // hash): it cannot log in here, and costs the same as a miss.
        let hash = hash.filter(|h| !h.is_empty());
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|h| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

fn load_or_create_secret(dir: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let path = dir.join("jwt_secret");
    match std::fs::read(&path) {
        Ok(s) if s.len() >= 32 => return Ok(s),
        Ok(_) | Err(_) => {}
    }
    std::fs::create_dir_all(dir)?;
    let secret: [u8; 32] = rand::random();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path)?;
    f.write_all(hex.as_bytes())?;
    f.sync_all()?;
    tracing::warn!(path = %path.display(), "no SHOAL_JWT_SECRET set: generated a new secret into the data dir");
    Ok(hex.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> (Auth, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = crate::Config::for_tests(dir.path().to_path_buf());
        (Auth::from_config(&cfg.auth, dir.path()).expect("auth"), dir)
    }

    #[test]
    fn issue_verify_revoke() {
        let (a, _d) = auth();
        let (t, c) = a.issue("alice").expect("issue");
        assert_eq!(a.verify(&t).map(|c| c.sub), Ok("alice".to_string()));
        a.revoke(&c.jti, c.exp);
        assert_eq!(a.verify(&t).map(|c| c.sub), Err(AuthError::Revoked));
        // Kept until the token's expiry, forgotten after it.
        assert_eq!(a.prune_revoked(c.exp), 1);
        assert_eq!(a.prune_revoked(c.exp + 1), 0);
    }

    #[test]
    fn secret_is_persisted() {
        let (a, d) = auth();
        let (t, _) = a.issue("bob").expect("issue");
        let cfg = crate::Config::for_tests(d.path().to_path_buf());
        let b = Auth::from_config(&cfg.auth, d.path()).expect("auth");
        assert!(b.verify(&t).is_ok(), "restart keeps tokens valid");
    }

    #[test]
    fn rejects_bad_tokens() {
        let (a, _d) = auth();
        assert_eq!(a.verify("garbage").err(), Some(AuthError::Malformed));
        // alg=none
        let none =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(a.verify(none).is_err());
        // HS256 with another secret
        let other = EncodingKey::from_secret(b"another secret that is long enough!!");
        let claims = Claims {
            sub: "alice".into(),
            exp: now_secs() + 60,
            iat: 0,
            jti: "x".into(),
            admin: false,
        };
        let forged =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other).expect("enc");
        assert_eq!(a.verify(&forged).err(), Some(AuthError::BadSignature));
        // HS384 is not configured even with the right secret family
        let hs384 =
            jsonwebtoken::encode(&Header::new(Algorithm::HS384), &claims, &other).expect("enc");
        assert_eq!(a.verify(&hs384).err(), Some(AuthError::WrongAlgorithm));
        let expired = Claims {
            exp: now_secs() - 3600,
            ..claims.clone()
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &expired, &a.encoding)
            .expect("enc");
        assert_eq!(a.verify(&t).err(), Some(AuthError::Expired));
        let bad_sub = Claims {
            sub: "a b".into(),
            ..claims
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &bad_sub, &a.encoding)
            .expect("enc");
        assert_eq!(a.verify(&t).err(), Some(AuthError::BadSubject));
    }

    #[tokio::test]
    async fn passwords() {
        let (a, _d) = auth();
        let h = a.hash_password("correct horse".into()).await.expect("hash");
        assert!(
            a.check_password("correct horse".into(), Some(h.clone()))
                .await
        );
        assert!(!a.check_password("wrong".into(), Some(h)).await);
        assert!(
            !a.check_password("dummy password for timing".into(), None)
                .await
        );
    }
}
