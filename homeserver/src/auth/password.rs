//! Password hashing: argon2id with the crate's recommended parameters, off the async runtime.

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};

use crate::error::{Error, Result};

/// Hashes a password into a PHC string (algorithm, parameters and salt included).
pub async fn hash(password: &str) -> Result<String> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(Error::internal)
    })
    .await
    .map_err(Error::internal)?
}

/// Checks a password against a stored hash. With no hash (unknown user, or an account without a
/// password) a dummy hash is checked instead, so the answer takes as long either way and does not
/// reveal which accounts exist.
pub async fn verify(password: &str, stored: Option<&str>) -> Result<bool> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let known = stored.is_some();
    let stored = match stored {
        Some(stored) => stored.to_owned(),
        None => match DUMMY.get() {
            Some(dummy) => dummy.clone(),
            None => {
                let dummy = hash("hearth-dummy-password").await?;
                DUMMY.get_or_init(|| dummy).clone()
            }
        },
    };
    let password = password.to_owned();
    let matches = tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&stored).map_err(Error::internal)?;
        Ok::<_, Error>(
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
        )
    })
    .await
    .map_err(Error::internal)??;
    Ok(known && matches)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn hash_and_verify() {
        let h = super::hash("correct horse").await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(super::verify("correct horse", Some(&h)).await.unwrap());
        assert!(!super::verify("wrong", Some(&h)).await.unwrap());
        assert!(!super::verify("correct horse", None).await.unwrap());
    }
}
