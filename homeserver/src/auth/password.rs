//! Password hashing: argon2id with the crate's recommended parameters, off the async runtime.
//!
//! Each hash takes tens of milliseconds of CPU and 19 MiB of memory, so at most one runs per core
//! at a time: more would only thrash caches and slow every one of them (measured: register
//! throughput halves at 16 in flight on 2 cores without this bound).
//!
//! The 19 MiB are allocated once per core and reused. Allocated afresh for each hash, they came,
//! after the first, from the allocator's heap (glibc raises its mmap threshold to the largest
//! block freed), where smaller allocations made meanwhile pinned them: the server's memory grew
//! by tens of MiB with every burst of logins (230 MiB after 28 registrations, for a working set of
//! 20 MiB) and never shrank.

use std::sync::Mutex;

use argon2::{
    Algorithm, Argon2, Block, Params, PasswordHash, Version,
    password_hash::{Output, ParamsString, Salt, SaltString, rand_core::OsRng},
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

/// The argon2 output for `password` and `salt` with `argon2`'s parameters, `length` bytes long,
/// computed in memory kept for the purpose (one block array per hash running at once).
fn compute(argon2: &Argon2<'_>, password: &[u8], salt: Salt<'_>, length: usize) -> Result<Output> {
    static MEMORY: Mutex<Vec<Vec<Block>>> = Mutex::new(Vec::new());
    let mut blocks =
        MEMORY.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default();
    blocks.resize(argon2.params().block_count(), Block::default());
    let mut salt_bytes = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_bytes).map_err(Error::internal)?;
    let output = Output::init_with(length, |out| {
        argon2.hash_password_into_with_memory(password, salt, out, &mut blocks).map_err(Into::into)
    });
    MEMORY.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(blocks);
    output.map_err(Error::internal)
}

/// Hashes a password into a PHC string (algorithm, parameters and salt included).
pub async fn hash(password: &str) -> Result<String> {
    let password = password.to_owned();
    on_a_core(move || {
        let salt = SaltString::generate(&mut OsRng);
        let argon2 = Argon2::default();
        let output = compute(&argon2, password.as_bytes(), salt.as_salt(), Params::DEFAULT_OUTPUT_LEN)?;
        let hash = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(argon2.params()).map_err(Error::internal)?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(hash.to_string())
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
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return Ok(false) };
        let algorithm = Algorithm::try_from(parsed.algorithm).map_err(Error::internal)?;
        let version =
            parsed.version.map_or(Ok(Version::default()), Version::try_from).map_err(Error::internal)?;
        let params = Params::try_from(&parsed).map_err(Error::internal)?;
        let argon2 = Argon2::new(algorithm, version, params);
        // `Output` compares in constant time.
        Ok::<_, Error>(compute(&argon2, password.as_bytes(), salt, expected.len())? == expected)
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

    /// Hashes made here and by the crate's own hasher check either way.
    #[tokio::test]
    async fn compatible_with_the_crate() {
        use argon2::{PasswordHash, PasswordHasher, PasswordVerifier};
        let ours = super::hash("tr0ub4dor").await.unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(argon2::Argon2::default().verify_password(b"tr0ub4dor", &parsed).is_ok());
        let salt = argon2::password_hash::SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        // Other parameters than the default, as a hash stored by an older configuration might have.
        let params = argon2::Params::new(8192, 3, 1, Some(24)).unwrap();
        let theirs = argon2::Argon2::from(params).hash_password(b"tr0ub4dor", &salt).unwrap().to_string();
        assert!(super::verify("tr0ub4dor", Some(&theirs)).await.unwrap());
        assert!(!super::verify("tr0ub4dor!", Some(&theirs)).await.unwrap());
    }
}
