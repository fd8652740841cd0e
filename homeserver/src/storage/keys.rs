//! End-to-end encryption keys and the embedded to-device queue.

use std::collections::BTreeMap;

use async_trait::async_trait;
use ruma::{DeviceId, UserId};
use sqlx::Row;

use super::{PairMark, SqlStore, StoreResult, UserMark, mark_pair, mark_user, now_ms};

/// Why a key upload was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyConflict {
    /// The device already has different identity keys.
    DeviceKeys,
    /// A one-time key id is already used with a different key.
    OneTimeKey(String),
}

/// A key handed out by a claim.
#[derive(Debug, Clone)]
pub struct ClaimedKey {
    /// `algorithm:key_id`.
    pub id: String,
    pub json: String,
}

/// A to-device message waiting for its device.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub stream_ordering: i64,
    pub json: String,
}

/// Which of a user's own keys a signature is for.
#[derive(Debug, Clone, Copy)]
pub enum SignedTarget<'a> {
    Device(&'a str),
    Master,
}

#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores a device's keys at `position`: identity keys (refused if the device already has
    /// different ones), one-time keys `(algorithm, key_id, json)` and fallback keys (replacing
    /// the previous one of each algorithm).
    async fn upload_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        device_keys: Option<(&str, &str)>,
        one_time_keys: &[(String, String, String)],
        fallback_keys: &[(String, String, String)],
        position: i64,
    ) -> StoreResult<Result<(), KeyConflict>>;

    /// Unclaimed one-time keys of a device, per algorithm.
    async fn one_time_key_counts(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> StoreResult<BTreeMap<String, u64>>;
    /// Algorithms of the device's fallback keys that no claim has used yet.
    async fn unused_fallback_key_types(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> StoreResult<Vec<String>>;

    /// Identity keys of a user's devices (all, or those named), as `(device_id, json)`.
    async fn device_keys(&self, user_id: &UserId, devices: &[String]) -> StoreResult<Vec<(String, String)>>;

    /// Takes one one-time key of `algorithm` from a device (each key goes to one claimer only),
    /// or its fallback key when none is left; records the count change at `position`.
    async fn claim_key(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        algorithm: &str,
        position: i64,
    ) -> StoreResult<Option<ClaimedKey>>;

    /// Records that a user's device list changed at `position`.
    async fn device_list_changed(&self, user_id: &UserId, position: i64) -> StoreResult<()>;
    /// Users whose device list changed in `(after, upto]`.
    async fn device_list_changes(&self, after: i64, upto: i64) -> StoreResult<Vec<String>>;

    /// Queues to-device messages `(user, device, json)` at `position`, once per sender device
    /// and transaction id; false if that transaction was already queued.
    async fn queue_to_device(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        messages: &[(String, String, String)],
        position: i64,
    ) -> StoreResult<bool>;
    /// A device's messages in `(after, upto]`, oldest first, at most `limit`.
    async fn to_device_messages(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> StoreResult<Vec<Envelope>>;
    /// Removes a device's messages at or below `upto` (the device has seen them).
    async fn remove_to_device(&self, user_id: &UserId, device_id: &DeviceId, upto: i64) -> StoreResult<()>;

    /// A user's cross-signing keys as `(usage, json)`: `master`, `self_signing`, `user_signing`.
    async fn cross_signing_keys(&self, user_id: &UserId) -> StoreResult<Vec<(String, String)>>;
    /// Stores cross-signing keys `(usage, json)` and marks the user's device list changed.
    async fn put_cross_signing_keys(
        &self,
        user_id: &UserId,
        keys: &[(String, String)],
        position: i64,
    ) -> StoreResult<()>;
    /// Users whose keys changed in `(after, upto]` as only this user sees them (their own
    /// user-signing key, their signatures of others' master keys).
    async fn own_key_changes(&self, user_id: &UserId, after: i64, upto: i64) -> StoreResult<Vec<String>>;
    /// Adds `(signer, key_id, signature)` to one of the user's own keys (a device's keys, or the
    /// master key) and marks the device list changed; false if there is no such key.
    async fn add_key_signature(
        &self,
        user_id: &UserId,
        target: SignedTarget<'_>,
        signature: (&str, &str, &str),
        position: i64,
    ) -> StoreResult<bool>;
    /// Stores `signer`'s signature `(key_id, signature)` of `target`'s master key.
    async fn put_user_signature(
        &self,
        signer: &UserId,
        target: &UserId,
        signature: (&str, &str),
        position: i64,
    ) -> StoreResult<()>;
    /// `signer`'s signatures of `target`'s master key, as `(key_id, signature)`.
    async fn user_signatures(&self, signer: &UserId, target: &UserId) -> StoreResult<Vec<(String, String)>>;

    /// Stream changes known by whom they concern in `(after, upto]`, for the in-memory window:
    /// `(kind, user, device, position)` with kind `d` (device list), `k` (key counts), `t`
    /// (to-device message), `s` (sessions revoked or refreshed) or `o` (keys only the user sees).
    async fn stream_marks(&self, after: i64, upto: i64) -> StoreResult<Vec<(String, String, String, i64)>>;
}

#[async_trait]
impl KeyStore for SqlStore {
    async fn upload_keys(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        device_keys: Option<(&str, &str)>,
        one_time_keys: &[(String, String, String)],
        fallback_keys: &[(String, String, String)],
        position: i64,
    ) -> StoreResult<Result<(), KeyConflict>> {
        let (user, device) = (user_id.as_str(), device_id.as_str());
        let mut tx = self.begin().await?;
        if let Some((json, identity)) = device_keys {
            let existing = sqlx::query("SELECT json FROM device_keys WHERE user_id = $1 AND device_id = $2")
                .bind(user)
                .bind(device)
                .fetch_optional(&mut *tx)
                .await?;
            match existing {
                Some(row) => {
                    // The same identity keys again (new signatures, say) replace the object; other
                    // identity keys for the same device are an attack or a bug.
                    let stored: String = row.try_get("json")?;
                    if identity_of(&stored) != identity {
                        return Ok(Err(KeyConflict::DeviceKeys));
                    }
                    // Signatures others added (cross-signing) stay with the keys.
                    let merged = merge_signatures(&stored, json)?;
                    if stored != merged {
                        sqlx::query("UPDATE device_keys SET json = $3 WHERE user_id = $1 AND device_id = $2")
                            .bind(user)
                            .bind(device)
                            .bind(&merged)
                            .execute(&mut *tx)
                            .await?;
                        mark_user(&mut tx, UserMark::DeviceList, user, position).await?;
                    }
                }
                None => {
                    sqlx::query("INSERT INTO device_keys (user_id, device_id, json) VALUES ($1, $2, $3)")
                        .bind(user)
                        .bind(device)
                        .bind(json)
                        .execute(&mut *tx)
                        .await?;
                    mark_user(&mut tx, UserMark::DeviceList, user, position).await?;
                }
            }
        }
        for (algorithm, key_id, json) in one_time_keys {
            // Most keys are new: insert, and only on a clash look at what is there.
            let inserted = sqlx::query(
                "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, json)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id, device_id, algorithm, key_id) DO NOTHING RETURNING key_id",
            )
            .bind(user)
            .bind(device)
            .bind(algorithm)
            .bind(key_id)
            .bind(json)
            .fetch_optional(&mut *tx)
            .await?;
            if inserted.is_none() {
                let stored: String = sqlx::query(
                    "SELECT json FROM one_time_keys
                     WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 AND key_id = $4",
                )
                .bind(user)
                .bind(device)
                .bind(algorithm)
                .bind(key_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("json")?;
                if stored != *json {
                    return Ok(Err(KeyConflict::OneTimeKey(format!("{algorithm}:{key_id}"))));
                }
            }
        }
        for (algorithm, key_id, json) in fallback_keys {
            sqlx::query(
                "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, json, used)
                 VALUES ($1, $2, $3, $4, $5, 0)
                 ON CONFLICT (user_id, device_id, algorithm)
                 DO UPDATE SET key_id = excluded.key_id, json = excluded.json, used = 0",
            )
            .bind(user)
            .bind(device)
            .bind(algorithm)
            .bind(key_id)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
        if !one_time_keys.is_empty() || !fallback_keys.is_empty() {
            mark_pair(&mut tx, PairMark::KeyCounts, user, device, position).await?;
        }
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn one_time_key_counts(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> StoreResult<BTreeMap<String, u64>> {
        sqlx::query(
            "SELECT algorithm, COUNT(*) AS n FROM one_time_keys
             WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm",
        )
        .bind(user_id.as_str())
        .bind(device_id.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("algorithm")?, u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0))))
        .collect()
    }

    async fn unused_fallback_key_types(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
    ) -> StoreResult<Vec<String>> {
        sqlx::query("SELECT algorithm FROM fallback_keys WHERE user_id = $1 AND device_id = $2 AND used = 0")
            .bind(user_id.as_str())
            .bind(device_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| row.try_get("algorithm").map_err(Into::into))
            .collect()
    }

    async fn device_keys(&self, user_id: &UserId, devices: &[String]) -> StoreResult<Vec<(String, String)>> {
        let rows =
            sqlx::query("SELECT device_id, json FROM device_keys WHERE user_id = $1 ORDER BY device_id")
                .bind(user_id.as_str())
                .fetch_all(&self.pool)
                .await?;
        let mut keys = Vec::new();
        for row in rows {
            let device: String = row.try_get("device_id")?;
            if devices.is_empty() || devices.contains(&device) {
                keys.push((device, row.try_get("json")?));
            }
        }
        Ok(keys)
    }

    async fn claim_key(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        algorithm: &str,
        position: i64,
    ) -> StoreResult<Option<ClaimedKey>> {
        let (user, device) = (user_id.as_str(), device_id.as_str());
        // Two claims can pick the same key; the loser's DELETE then finds nothing and tries the
        // next key, so every key goes to exactly one claimer.
        for _ in 0..16 {
            let mut tx = self.begin().await?;
            let candidate = sqlx::query(
                "SELECT key_id FROM one_time_keys WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                 ORDER BY key_id LIMIT 1",
            )
            .bind(user)
            .bind(device)
            .bind(algorithm)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(candidate) = candidate else { break };
            let key_id: String = candidate.try_get("key_id")?;
            let taken = sqlx::query(
                "DELETE FROM one_time_keys
                 WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 AND key_id = $4 RETURNING json",
            )
            .bind(user)
            .bind(device)
            .bind(algorithm)
            .bind(&key_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = taken {
                let json: String = row.try_get("json")?;
                mark_pair(&mut tx, PairMark::KeyCounts, user, device, position).await?;
                tx.commit().await?;
                return Ok(Some(ClaimedKey { id: format!("{algorithm}:{key_id}"), json }));
            }
        }
        let mut tx = self.begin().await?;
        let fallback = sqlx::query(
            "UPDATE fallback_keys SET used = 1 WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
             RETURNING key_id, json",
        )
        .bind(user)
        .bind(device)
        .bind(algorithm)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = fallback else { return Ok(None) };
        let claimed = ClaimedKey {
            id: format!("{algorithm}:{}", row.try_get::<String, _>("key_id")?),
            json: row.try_get("json")?,
        };
        mark_pair(&mut tx, PairMark::KeyCounts, user, device, position).await?;
        tx.commit().await?;
        Ok(Some(claimed))
    }

    async fn device_list_changed(&self, user_id: &UserId, position: i64) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        mark_user(&mut tx, UserMark::DeviceList, user_id.as_str(), position).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn device_list_changes(&self, after: i64, upto: i64) -> StoreResult<Vec<String>> {
        sqlx::query(
            "SELECT user_id FROM device_list_changes WHERE stream_ordering > $1 AND stream_ordering <= $2",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| row.try_get("user_id").map_err(Into::into))
        .collect()
    }

    async fn queue_to_device(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        messages: &[(String, String, String)],
        position: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let first = sqlx::query(
            "INSERT INTO to_device_txns (user_id, device_id, txn_id, created_ts) VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id, device_id, txn_id) DO NOTHING RETURNING txn_id",
        )
        .bind(sender.as_str())
        .bind(sender_device.as_str())
        .bind(txn_id)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        if first.is_none() {
            return Ok(false);
        }
        for (user, device, json) in messages {
            sqlx::query(
                "INSERT INTO to_device (user_id, device_id, stream_ordering, json) VALUES ($1, $2, $3, $4)",
            )
            .bind(user)
            .bind(device)
            .bind(position)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn to_device_messages(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> StoreResult<Vec<Envelope>> {
        sqlx::query(
            "SELECT stream_ordering, json FROM to_device
             WHERE user_id = $1 AND device_id = $2 AND stream_ordering > $3 AND stream_ordering <= $4
             ORDER BY stream_ordering LIMIT $5",
        )
        .bind(user_id.as_str())
        .bind(device_id.as_str())
        .bind(after)
        .bind(upto)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(Envelope { stream_ordering: row.try_get("stream_ordering")?, json: row.try_get("json")? })
        })
        .collect()
    }

    async fn remove_to_device(&self, user_id: &UserId, device_id: &DeviceId, upto: i64) -> StoreResult<()> {
        sqlx::query("DELETE FROM to_device WHERE user_id = $1 AND device_id = $2 AND stream_ordering <= $3")
            .bind(user_id.as_str())
            .bind(device_id.as_str())
            .bind(upto)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn stream_marks(&self, after: i64, upto: i64) -> StoreResult<Vec<(String, String, String, i64)>> {
        sqlx::query(
            "SELECT 'd' AS kind, user_id, '' AS device_id, stream_ordering FROM device_list_changes
               WHERE stream_ordering > $1 AND stream_ordering <= $2
             UNION ALL
             SELECT 'k', user_id, device_id, stream_ordering FROM key_count_changes
               WHERE stream_ordering > $1 AND stream_ordering <= $2
             UNION ALL
             SELECT 't', user_id, device_id, stream_ordering FROM to_device
               WHERE stream_ordering > $1 AND stream_ordering <= $2
             UNION ALL
             SELECT 's', user_id, '', stream_ordering FROM session_changes
               WHERE stream_ordering > $1 AND stream_ordering <= $2
             UNION ALL
             SELECT 'o', user_id, '', stream_ordering FROM own_key_changes
               WHERE stream_ordering > $1 AND stream_ordering <= $2",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("kind")?,
                row.try_get("user_id")?,
                row.try_get("device_id")?,
                row.try_get("stream_ordering")?,
            ))
        })
        .collect()
    }
    async fn cross_signing_keys(&self, user_id: &UserId) -> StoreResult<Vec<(String, String)>> {
        sqlx::query("SELECT usage, json FROM cross_signing_keys WHERE user_id = $1")
            .bind(user_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("usage")?, row.try_get("json")?)))
            .collect()
    }

    async fn put_cross_signing_keys(
        &self,
        user_id: &UserId,
        keys: &[(String, String)],
        position: i64,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        for (usage, json) in keys {
            sqlx::query(
                "INSERT INTO cross_signing_keys (user_id, usage, json) VALUES ($1, $2, $3)
                 ON CONFLICT (user_id, usage) DO UPDATE SET json = excluded.json",
            )
            .bind(user_id.as_str())
            .bind(usage)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
        // A user-signing key alone is the user's own business: others query nothing again.
        if keys.iter().all(|(usage, _)| usage == "user_signing") {
            mark_pair(&mut tx, PairMark::OwnKeys, user_id.as_str(), user_id.as_str(), position).await?;
        } else {
            mark_user(&mut tx, UserMark::DeviceList, user_id.as_str(), position).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn own_key_changes(&self, user_id: &UserId, after: i64, upto: i64) -> StoreResult<Vec<String>> {
        sqlx::query(
            "SELECT changed_user FROM own_key_changes
             WHERE user_id = $1 AND stream_ordering > $2 AND stream_ordering <= $3",
        )
        .bind(user_id.as_str())
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| row.try_get("changed_user").map_err(Into::into))
        .collect()
    }

    async fn add_key_signature(
        &self,
        user_id: &UserId,
        target: SignedTarget<'_>,
        (signer, key_id, signature): (&str, &str, &str),
        position: i64,
    ) -> StoreResult<bool> {
        let (select, update, key) = match target {
            SignedTarget::Device(device) => (
                "SELECT json FROM device_keys WHERE user_id = $1 AND device_id = $2",
                "UPDATE device_keys SET json = $3 WHERE user_id = $1 AND device_id = $2",
                device,
            ),
            SignedTarget::Master => (
                "SELECT json FROM cross_signing_keys WHERE user_id = $1 AND usage = $2",
                "UPDATE cross_signing_keys SET json = $3 WHERE user_id = $1 AND usage = $2",
                "master",
            ),
        };
        let mut tx = self.begin().await?;
        let Some(row) = sqlx::query(select).bind(user_id.as_str()).bind(key).fetch_optional(&mut *tx).await?
        else {
            return Ok(false);
        };
        let mut value: serde_json::Value = serde_json::from_str(&row.try_get::<String, _>("json")?)
            .map_err(|e| super::StoreError::Corrupt(e.to_string()))?;
        value["signatures"][signer][key_id] = signature.into();
        sqlx::query(update)
            .bind(user_id.as_str())
            .bind(key)
            .bind(value.to_string())
            .execute(&mut *tx)
            .await?;
        mark_user(&mut tx, UserMark::DeviceList, user_id.as_str(), position).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn put_user_signature(
        &self,
        signer: &UserId,
        target: &UserId,
        (key_id, signature): (&str, &str),
        position: i64,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO cross_signing_signatures (signer_id, target_id, key_id, signature) VALUES ($1, $2, $3, $4)
             ON CONFLICT (signer_id, target_id, key_id) DO UPDATE SET signature = excluded.signature",
        )
        .bind(signer.as_str())
        .bind(target.as_str())
        .bind(key_id)
        .bind(signature)
        .execute(&mut *tx)
        .await?;
        // Only the signer sees the signature: the signer's devices are told the target changed
        // (as Synapse tells them), and no one else is told anything.
        mark_pair(&mut tx, PairMark::OwnKeys, signer.as_str(), target.as_str(), position).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn user_signatures(&self, signer: &UserId, target: &UserId) -> StoreResult<Vec<(String, String)>> {
        sqlx::query(
            "SELECT key_id, signature FROM cross_signing_signatures WHERE signer_id = $1 AND target_id = $2",
        )
        .bind(signer.as_str())
        .bind(target.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("key_id")?, row.try_get("signature")?)))
        .collect()
    }
}

/// `new` with every signature of `stored` it lacks added.
fn merge_signatures(stored: &str, new: &str) -> StoreResult<String> {
    let corrupt = |e: serde_json::Error| super::StoreError::Corrupt(e.to_string());
    let stored: serde_json::Value = serde_json::from_str(stored).map_err(corrupt)?;
    let mut merged: serde_json::Value = serde_json::from_str(new).map_err(corrupt)?;
    if let Some(signers) = stored["signatures"].as_object() {
        for (signer, keys) in signers {
            for (key_id, signature) in keys.as_object().into_iter().flatten() {
                if merged["signatures"][signer].get(key_id).is_none() {
                    merged["signatures"][signer][key_id] = signature.clone();
                }
            }
        }
    }
    Ok(merged.to_string())
}

/// The identity part of a device keys object (its `keys` field, canonically), which must never
/// change for a device.
pub fn identity_of(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("keys").map(|k| k.to_string()))
        .unwrap_or_default()
}
