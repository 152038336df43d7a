//! Backups: `hash` (streaming BLAKE3), `archive` (the tar+zstd the sidecar sends), `store` (one
//! S3-compatible store), `location` (a BackupLocation's two stores and their validation),
//! `engine` (the data path: both stores at once, verified, then catalogued), `catalog`
//! (SQLite), `schedule` (when a run is due) and `retention` (GFS).

pub mod archive;
pub mod catalog;
pub mod engine;
pub mod hash;
pub mod location;
pub mod retention;
pub mod schedule;
pub mod store;
