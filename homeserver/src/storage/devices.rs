//! Devices: one per login, with a display name and where it was last seen.
//!
//! Deleting a device deletes its sessions in the same transaction, so its access tokens stop
//! working at once.

use async_trait::async_trait;
use ruma::{DeviceId, OwnedDeviceId, UserId};
use sqlx::Row;

use super::{SqlStore, StoreResult, UserMark, mark_user, now_ms, parse_id};

/// Creates a device or marks it seen: ($1 user, $2 device, $3 display name or NULL to keep,
/// $4 IP or NULL to keep, $5 now).
pub(super) const UPSERT_DEVICE: &str = "INSERT INTO devices
        (user_id, device_id, display_name, last_seen_ip, last_seen_ts, created_ts)
    VALUES ($1, $2, $3, $4, $5, $5)
    ON CONFLICT (user_id, device_id) DO UPDATE SET
        display_name = COALESCE(excluded.display_name, devices.display_name),
        last_seen_ip = COALESCE(excluded.last_seen_ip, devices.last_seen_ip),
        last_seen_ts = excluded.last_seen_ts";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: OwnedDeviceId,
    pub display_name: Option<String>,
    pub last_seen_ip: Option<String>,
    pub last_seen_ts: Option<i64>,
}

#[async_trait]
pub trait DeviceStore: Send + Sync {
    /// Creates the device, or marks an existing one as just seen. A display name given here
    /// replaces the old one; `None` keeps it.
    async fn upsert_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        display_name: Option<&str>,
        ip: Option<&str>,
    ) -> StoreResult<()>;
    async fn get_device(&self, user_id: &UserId, device_id: &DeviceId) -> StoreResult<Option<DeviceRecord>>;
    async fn list_devices(&self, user_id: &UserId) -> StoreResult<Vec<DeviceRecord>>;
    /// Returns `false` if the user has no such device.
    async fn set_device_display_name(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        display_name: Option<&str>,
    ) -> StoreResult<bool>;
    /// Records a request from the device (throttled by the caller).
    async fn touch_device(&self, user_id: &UserId, device_id: &DeviceId, ip: &str) -> StoreResult<()>;
    /// Deletes the devices and their sessions (marked revoked at `position`). Unknown ids are
    /// ignored.
    async fn delete_devices(
        &self,
        user_id: &UserId,
        device_ids: &[OwnedDeviceId],
        position: i64,
    ) -> StoreResult<()>;
    /// Deletes every device of the user but `keep`, and their sessions (marked at `position`).
    async fn delete_devices_except(
        &self,
        user_id: &UserId,
        keep: Option<&DeviceId>,
        position: i64,
    ) -> StoreResult<()>;
}

fn device_from_row(row: &sqlx::any::AnyRow) -> StoreResult<DeviceRecord> {
    Ok(DeviceRecord {
        device_id: parse_id(row.try_get("device_id")?)?,
        display_name: row.try_get("display_name")?,
        last_seen_ip: row.try_get("last_seen_ip")?,
        last_seen_ts: row.try_get("last_seen_ts")?,
    })
}

#[async_trait]
impl DeviceStore for SqlStore {
    async fn upsert_device(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        display_name: Option<&str>,
        ip: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(UPSERT_DEVICE)
            .bind(user_id.as_str())
            .bind(device_id.as_str())
            .bind(display_name)
            .bind(ip)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get_device(&self, user_id: &UserId, device_id: &DeviceId) -> StoreResult<Option<DeviceRecord>> {
        sqlx::query(
            "SELECT device_id, display_name, last_seen_ip, last_seen_ts FROM devices
             WHERE user_id = $1 AND device_id = $2",
        )
        .bind(user_id.as_str())
        .bind(device_id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(device_from_row)
        .transpose()
    }

    async fn list_devices(&self, user_id: &UserId) -> StoreResult<Vec<DeviceRecord>> {
        sqlx::query(
            "SELECT device_id, display_name, last_seen_ip, last_seen_ts FROM devices
             WHERE user_id = $1 ORDER BY device_id",
        )
        .bind(user_id.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(device_from_row)
        .collect()
    }

    async fn set_device_display_name(
        &self,
        user_id: &UserId,
        device_id: &DeviceId,
        display_name: Option<&str>,
    ) -> StoreResult<bool> {
        let updated =
            sqlx::query("UPDATE devices SET display_name = $3 WHERE user_id = $1 AND device_id = $2")
                .bind(user_id.as_str())
                .bind(device_id.as_str())
                .bind(display_name)
                .execute(&self.pool)
                .await?;
        Ok(updated.rows_affected() > 0)
    }

    async fn touch_device(&self, user_id: &UserId, device_id: &DeviceId, ip: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE devices SET last_seen_ip = $3, last_seen_ts = $4 WHERE user_id = $1 AND device_id = $2",
        )
        .bind(user_id.as_str())
        .bind(device_id.as_str())
        .bind(ip)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_devices(
        &self,
        user_id: &UserId,
        device_ids: &[OwnedDeviceId],
        position: i64,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        mark_user(&mut tx, UserMark::Sessions, user_id.as_str(), position).await?;
        for device_id in device_ids {
            for table in [
                "DELETE FROM sessions WHERE user_id = $1 AND device_id = $2",
                "DELETE FROM devices WHERE user_id = $1 AND device_id = $2",
                "DELETE FROM device_keys WHERE user_id = $1 AND device_id = $2",
                "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id = $2",
                "DELETE FROM fallback_keys WHERE user_id = $1 AND device_id = $2",
                "DELETE FROM to_device WHERE user_id = $1 AND device_id = $2",
                "DELETE FROM pushers WHERE user_id = $1 AND device_id = $2",
            ] {
                sqlx::query(table).bind(user_id.as_str()).bind(device_id.as_str()).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_devices_except(
        &self,
        user_id: &UserId,
        keep: Option<&DeviceId>,
        position: i64,
    ) -> StoreResult<()> {
        // An empty string is never a device id, so it stands for "keep nothing".
        let keep = keep.map_or("", DeviceId::as_str);
        let mut tx = self.begin().await?;
        mark_user(&mut tx, UserMark::Sessions, user_id.as_str(), position).await?;
        for table in [
            "DELETE FROM sessions WHERE user_id = $1 AND device_id <> $2",
            "DELETE FROM devices WHERE user_id = $1 AND device_id <> $2",
            "DELETE FROM device_keys WHERE user_id = $1 AND device_id <> $2",
            "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id <> $2",
            "DELETE FROM fallback_keys WHERE user_id = $1 AND device_id <> $2",
            "DELETE FROM to_device WHERE user_id = $1 AND device_id <> $2",
            "DELETE FROM pushers WHERE user_id = $1 AND device_id <> $2",
        ] {
            sqlx::query(table).bind(user_id.as_str()).bind(keep).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
