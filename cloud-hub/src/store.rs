//! The hub's fleet state in sled, behind a narrow typed interface.
//!
//! Trees: `devices` (device id → [`DeviceRecord`]), `api_tokens` (SHA-256 of
//! a bearer token → [`ApiToken`]), `enroll_uses` (enrollment token id →
//! redemptions so far). Values are postcard. Everything the fleet keeps goes
//! through this type so that a distributed engine can take sled's place
//! later without touching callers.

use outpost_shared::telemetry::Sample;
use outpost_shared::time::Timestamp;
use outpost_shared::{DeviceId, Fingerprint};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What the hub knows about one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The id (certificate common name).
    pub id: DeviceId,
    /// Name the device gave at enrollment or in its last hello.
    pub name: String,
    /// When it enrolled.
    pub enrolled_at: Timestamp,
    /// Fingerprint of the certificate issued at enrollment.
    pub cert_fingerprint: Fingerprint,
    /// Agent version from the last hello.
    pub agent_version: Option<String>,
    /// Last time any message arrived from it.
    pub last_seen: Option<Timestamp>,
    /// Address of its last connection.
    pub last_addr: Option<String>,
    /// The latest telemetry sample.
    pub last_sample: Option<Sample>,
}

/// Roles of API callers, from least to most powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Reads fleet state.
    Viewer,
    /// Also sends commands and changes desired state.
    Operator,
    /// Also manages tokens.
    Admin,
}

/// A stored API token (its hash is the key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    /// What the caller may do.
    pub role: Role,
    /// Label for the audit log.
    pub name: String,
    /// When it was made.
    pub created_at: Timestamp,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption, or the data dir is locked by another
    /// hub process).
    #[error("hub store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value does not decode.
    #[error("hub store: corrupt value in tree {tree}: {source}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// The cause.
        source: postcard::Error,
    },
    /// The enrollment token has no redemptions left.
    #[error("enrollment token has been used {used} of {allowed} times")]
    UsedUp {
        /// Redemptions so far.
        used: u32,
        /// Redemptions allowed.
        allowed: u32,
    },
}

/// The hub's store. Cheap to clone; clones share one database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    devices: sled::Tree,
    api_tokens: sled::Tree,
    enroll_uses: sled::Tree,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data; serialization into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Corrupt { tree, source })
}

impl Store {
    /// Opens (or creates) the store under `data_dir/db`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(data_dir.join("db"))
            .cache_capacity(64 << 20)
            .flush_every_ms(Some(500))
            .open()?;
        Ok(Store {
            devices: db.open_tree("devices")?,
            api_tokens: db.open_tree("api_tokens")?,
            enroll_uses: db.open_tree("enroll_uses")?,
            db,
        })
    }

    /// Waits until everything written so far is on disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Stores an API token under the SHA-256 of its secret.
    pub fn put_api_token(&self, hash: &[u8; 32], token: &ApiToken) -> Result<(), StoreError> {
        self.api_tokens.insert(hash, encode(token))?;
        self.db.flush()?;
        Ok(())
    }

    /// Looks up an API token by the SHA-256 of its secret.
    pub fn api_token(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>, StoreError> {
        self.api_tokens
            .get(hash)?
            .map(|v| decode("api_tokens", &v))
            .transpose()
    }

    /// Enrolls a device with one redemption of token `token_id`, atomically:
    /// either the use is counted and the device recorded, or nothing is
    /// written.
    pub fn enroll(
        &self,
        token_id: &[u8; 16],
        allowed: u32,
        record: &DeviceRecord,
    ) -> Result<(), StoreError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError as Abort, TransactionError};
        let result = (&self.enroll_uses, &self.devices).transaction(|(uses, devices)| {
            let used = uses
                .get(token_id)?
                .and_then(|v| v.as_ref().try_into().ok().map(u32::from_le_bytes))
                .unwrap_or(0);
            if used >= allowed {
                return Err(Abort::Abort(StoreError::UsedUp { used, allowed }));
            }
            uses.insert(&token_id[..], &(used + 1).to_le_bytes()[..])?;
            devices.insert(record.id.as_str().as_bytes(), encode(record))?;
            Ok(())
        });
        match result {
            Ok(()) => {
                self.db.flush()?;
                Ok(())
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// One device.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.devices
            .get(id.as_str())?
            .map(|v| decode("devices", &v))
            .transpose()
    }

    /// Every device, ordered by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.devices
            .iter()
            .values()
            .map(|v| decode("devices", &v?))
            .collect()
    }

    /// Changes one device's record in place. Returns the new record, or
    /// `None` if the device is unknown.
    pub fn update_device(
        &self,
        id: &DeviceId,
        mut change: impl FnMut(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let mut corrupt = None;
        let new = self.devices.update_and_fetch(id.as_str(), |old| {
            let old = old?;
            match decode::<DeviceRecord>("devices", old) {
                Ok(mut record) => {
                    change(&mut record);
                    Some(encode(&record))
                }
                Err(e) => {
                    corrupt = Some(e);
                    Some(old.to_vec())
                }
            }
        })?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        new.map(|v| decode("devices", &v)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> DeviceRecord {
        DeviceRecord {
            id: id.parse().unwrap(),
            name: "n".into(),
            enrolled_at: Timestamp(1),
            cert_fingerprint: Fingerprint([0; 32]),
            agent_version: None,
            last_seen: None,
            last_addr: None,
            last_sample: None,
        }
    }

    #[test]
    fn enrollment_counts_uses_and_writes_nothing_when_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.enroll(&[1; 16], 2, &record("dev-a")).unwrap();
        store.enroll(&[1; 16], 2, &record("dev-b")).unwrap();
        let err = store.enroll(&[1; 16], 2, &record("dev-c")).unwrap_err();
        assert!(matches!(
            err,
            StoreError::UsedUp {
                used: 2,
                allowed: 2
            }
        ));
        let ids: Vec<_> = store
            .devices()
            .unwrap()
            .into_iter()
            .map(|d| d.id.to_string())
            .collect();
        assert_eq!(ids, ["dev-a", "dev-b"]);
    }

    #[test]
    fn devices_survive_reopen_and_update() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.enroll(&[2; 16], 1, &record("dev-a")).unwrap();
            let id = "dev-a".parse().unwrap();
            let new = store
                .update_device(&id, |r| r.name = "renamed".into())
                .unwrap()
                .unwrap();
            assert_eq!(new.name, "renamed");
            assert!(
                store
                    .update_device(&"dev-z".parse().unwrap(), |_| {})
                    .unwrap()
                    .is_none()
            );
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store
                .device(&"dev-a".parse().unwrap())
                .unwrap()
                .unwrap()
                .name,
            "renamed"
        );
    }
}
