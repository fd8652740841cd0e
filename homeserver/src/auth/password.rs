//! Password hashing: argon2id with the crate's recommended parameters, off the async runtime.
//!
//! Each hash takes tens of milliseconds of CPU and 19 MiB of memory, so at most one runs per core
//! at a time: more would only thrash caches and slow every one of them (measured: register
//! throughput halves at 16 in flight on 2 cores without this bound).

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};

use crate::error::{Error, Result};

/// Runs `work` on the blocking pool once a core is free for it.
async fn on_a_core<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    static CORES: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let cores = CORES.get_or_init(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, std::num::NonZero::get))
    });
    let _permit = cores.acquire().await.map_err(Error::internal)?;
    tokio::task::spawn_blocking(work).await.map_err(Error::internal)
}

/// Hashes a password into a PHC string (algorithm, parameters and salt included).
pub async fn hash(password: &str) -> Result<String> {
    let password = password.to_owned();
    on_a_core(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(Error::internal)
    })
    .await?
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
    let matches = on_a_core(move || {
        let parsed = PasswordHash::new(&stored).map_err(Error::internal)?;
        Ok::<_, Error>(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
    })
    .await??;
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
