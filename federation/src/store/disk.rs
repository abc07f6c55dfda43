//! The embedded store's journal on disk: every key, the revision and the
//! leases in one redb file, written in one crash-safe transaction (fsync'd
//! before the write is acknowledged) per store write.
//!
//! The journal keeps state, not history: after a restart the store has every
//! acknowledged key at its revisions, and watches may start from the next
//! revision (older starts get [`super::WatchEvent::Compacted`], as etcd
//! answers after a compaction). Leases keep their TTL and get a full TTL
//! again at start, as etcd's leases do when a new leader takes over.

use super::KeyValue;
use redb::{Database, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Key → create revision, mod revision, lease (8 bytes each, big endian), value.
const KVS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("kvs");
/// Lease id → TTL in milliseconds.
const LEASES: TableDefinition<'static, i64, u64> = TableDefinition::new("leases");
/// `revision`, `next_lease`, `format`.
const META: TableDefinition<'static, &str, i64> = TableDefinition::new("meta");

/// The layout of the file; a file with another is refused, not misread.
const FORMAT: i64 = 1;
/// The file in the data directory.
pub const FILE: &str = "registry.redb";

/// An open journal.
pub struct Journal {
    db: Database,
    path: PathBuf,
}

/// What a journal held when it was opened.
#[derive(Default)]
pub struct Loaded {
    /// The revision of the last acknowledged write (1 for a new store).
    pub revision: i64,
    /// Every key.
    pub kvs: BTreeMap<String, KeyValue>,
    /// Every lease and its TTL.
    pub leases: HashMap<i64, Duration>,
    /// The last lease id handed out.
    pub next_lease: i64,
}

/// The changes of one store write, applied to the journal at once.
#[derive(Default)]
pub struct Changes {
    /// Keys written (`Some`) or deleted (`None`).
    pub keys: BTreeSet<String>,
    /// Leases granted or gone.
    pub leases: BTreeSet<i64>,
}

impl Changes {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.leases.is_empty()
    }
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> String {
    format!("embedded registry {}: {what}: {e}", path.display())
}

/// Tries for the file's lock, 50 ms apart (a second in all).
const OPEN_TRIES: u32 = 20;

impl Journal {
    /// Opens (or creates) the journal in `dir`, which is created if missing
    /// (mode 0700: it holds the sealed CA). Another process holding it open
    /// is refused.
    pub fn open(dir: &Path) -> Result<(Self, Loaded), String> {
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| err(dir, "cannot create the data directory", e))?;
        }
        let path = dir.join(FILE);
        // The lock is held until the last handle goes: a store just
        // dropped in this process may still be let go by a background task
        // (the lease reaper mid-tick), so the lock is tried for a moment.
        let mut tries = 0;
        let db = loop {
            match Database::create(&path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < OPEN_TRIES => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => break r,
            }
        }
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => err(
                &path,
                "already open in another process (one federation per --data-dir)",
                e,
            ),
            e => err(&path, "cannot open", e),
        })?;
        // The journal holds role bindings, token hashes, the audit log and
        // the sealed CA: its owner's only, whoever made the directory.
        {
            use std::os::unix::fs::PermissionsExt as _;
            for (p, mode) in [(dir, 0o700), (path.as_path(), 0o600)] {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| err(p, "cannot restrict its permissions", e))?;
            }
        }
        let j = Self { db, path };
        let loaded = j.load()?;
        Ok((j, loaded))
    }

    fn load(&self) -> Result<Loaded, String> {
        let p = &self.path;
        // Create the tables (and the format mark) on first use.
        let w = self.db.begin_write().map_err(|e| err(p, "write", e))?;
        {
            let mut meta = w.open_table(META).map_err(|e| err(p, "meta", e))?;
            let format = meta
                .get("format")
                .map_err(|e| err(p, "meta", e))?
                .map(|v| v.value());
            match format {
                None => {
                    meta.insert("format", FORMAT)
                        .map_err(|e| err(p, "meta", e))?;
                }
                Some(FORMAT) => {}
                Some(f) => {
                    return Err(err(
                        p,
                        "unknown layout",
                        format!("format {f}, this build reads {FORMAT}"),
                    ))
                }
            }
            w.open_table(KVS).map_err(|e| err(p, "kvs", e))?;
            w.open_table(LEASES).map_err(|e| err(p, "leases", e))?;
        }
        w.commit().map_err(|e| err(p, "commit", e))?;

        let r = self.db.begin_read().map_err(|e| err(p, "read", e))?;
        let meta = r.open_table(META).map_err(|e| err(p, "meta", e))?;
        let get = |k: &str| -> Result<Option<i64>, String> {
            Ok(meta
                .get(k)
                .map_err(|e| err(p, "meta", e))?
                .map(|v| v.value()))
        };
        let mut out = Loaded {
            revision: get("revision")?.unwrap_or(1),
            next_lease: get("next_lease")?.unwrap_or(0x1000),
            ..Loaded::default()
        };
        let kvs = r.open_table(KVS).map_err(|e| err(p, "kvs", e))?;
        for row in kvs.iter().map_err(|e| err(p, "kvs", e))? {
            let (k, v) = row.map_err(|e| err(p, "kvs", e))?;
            let key = k.value().to_string();
            let kv = decode(&key, v.value()).ok_or_else(|| {
                err(
                    p,
                    "corrupt value",
                    format!("key {key:?} is shorter than its header"),
                )
            })?;
            out.kvs.insert(key, kv);
        }
        let leases = r.open_table(LEASES).map_err(|e| err(p, "leases", e))?;
        for row in leases.iter().map_err(|e| err(p, "leases", e))? {
            let (id, ttl) = row.map_err(|e| err(p, "leases", e))?;
            out.leases
                .insert(id.value(), Duration::from_millis(ttl.value()));
        }
        Ok(out)
    }

    /// Writes `changes` as they now are in `kvs` and `leases`, with the
    /// store's revision and lease counter, in one transaction that is on disk
    /// when this returns.
    pub fn commit(
        &self,
        changes: &Changes,
        revision: i64,
        next_lease: i64,
        kvs: &BTreeMap<String, KeyValue>,
        leases: &dyn Fn(i64) -> Option<Duration>,
    ) -> Result<(), String> {
        let p = &self.path;
        let w = self.db.begin_write().map_err(|e| err(p, "write", e))?;
        {
            let mut t = w.open_table(KVS).map_err(|e| err(p, "kvs", e))?;
            for key in &changes.keys {
                match kvs.get(key) {
                    Some(kv) => {
                        t.insert(key.as_str(), encode(kv).as_slice())
                            .map_err(|e| err(p, "kvs", e))?;
                    }
                    None => {
                        t.remove(key.as_str()).map_err(|e| err(p, "kvs", e))?;
                    }
                }
            }
            let mut l = w.open_table(LEASES).map_err(|e| err(p, "leases", e))?;
            for id in &changes.leases {
                match leases(*id) {
                    Some(ttl) => {
                        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                        l.insert(*id, ms).map_err(|e| err(p, "leases", e))?;
                    }
                    None => {
                        l.remove(*id).map_err(|e| err(p, "leases", e))?;
                    }
                }
            }
            let mut m = w.open_table(META).map_err(|e| err(p, "meta", e))?;
            m.insert("revision", revision)
                .map_err(|e| err(p, "meta", e))?;
            m.insert("next_lease", next_lease)
                .map_err(|e| err(p, "meta", e))?;
        }
        w.commit().map_err(|e| err(p, "commit", e))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

const HEADER: usize = 24;

fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_be_bytes());
    out.extend_from_slice(&kv.mod_revision.to_be_bytes());
    out.extend_from_slice(&kv.lease.to_be_bytes());
    out.extend_from_slice(&kv.value);
    out
}

fn decode(key: &str, b: &[u8]) -> Option<KeyValue> {
    let word =
        |i: usize| -> Option<i64> { Some(i64::from_be_bytes(b.get(i..i + 8)?.try_into().ok()?)) };
    Some(KeyValue {
        key: key.to_string(),
        create_revision: word(0)?,
        mod_revision: word(8)?,
        lease: word(16)?,
        value: b.get(HEADER..)?.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_short_ones_are_refused() {
        let kv = KeyValue {
            key: "/k".into(),
            value: b"v".to_vec(),
            create_revision: 3,
            mod_revision: 9,
            lease: 0x1001,
        };
        assert_eq!(decode("/k", &encode(&kv)), Some(kv));
        assert_eq!(decode("/k", &[0; HEADER - 1]), None);
    }
}
