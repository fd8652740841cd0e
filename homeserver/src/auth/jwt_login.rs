//! `org.matrix.login.jwt`: an organisation's identity provider vouches for a user with a JWT it
//! signed; Hearth checks the signature, expiry, issuer and audience it was configured with.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::{
    config::JwtLoginConfig,
    error::{Error, Result},
};

pub const LOGIN_TYPE: &str = "org.matrix.login.jwt";

pub struct JwtLogin {
    key: DecodingKey,
    validation: Validation,
    subject_claim: String,
    pub create_users: bool,
}

impl std::fmt::Debug for JwtLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtLogin").field("subject_claim", &self.subject_claim).finish_non_exhaustive()
    }
}

impl JwtLogin {
    /// The verifier the configuration describes, if JWT login is enabled.
    pub fn from_config(config: &JwtLoginConfig) -> anyhow::Result<Option<Self>> {
        if !config.enabled {
            return Ok(None);
        }
        let algorithm: Algorithm = config
            .algorithm
            .parse()
            .map_err(|_| anyhow::anyhow!("jwt_login.algorithm: unknown algorithm"))?;
        let pem = || {
            std::fs::read(&config.public_key_file)
                .map_err(|e| anyhow::anyhow!("jwt_login.public_key_file {}: {e}", config.public_key_file))
        };
        let key = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                DecodingKey::from_secret(config.secret.expose().as_bytes())
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem()?)?,
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem()?)?,
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem()?)?,
            other => anyhow::bail!("jwt_login.algorithm: {other:?} is not supported"),
        };
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["exp".to_owned(), config.subject_claim.clone()];
        if config.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[&config.issuer]);
            required.push("iss".to_owned());
        }
        if config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&config.audience]);
            required.push("aud".to_owned());
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Self {
            key,
            validation,
            subject_claim: config.subject_claim.clone(),
            create_users: config.create_users,
        }))
    }

    /// Checks the token and returns the localpart it names.
    pub fn verify(&self, token: &str) -> Result<String> {
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| Error::forbidden(format!("invalid JWT: {e}")))?
        .claims;
        claims
            .get(&self.subject_claim)
            .and_then(serde_json::Value::as_str)
            .map(|s| s.trim_start_matches('@').split(':').next().unwrap_or_default().to_lowercase())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::forbidden(format!("the JWT's `{}` claim names no user", self.subject_claim))
            })
    }
}
