//! Backups (issue 11, in progress): streaming BLAKE3 hashing and the SQLite catalog. The data
//! path (sidecar -> API -> primary + secondary S3), schedules and retention build on these.

pub mod catalog;
pub mod hash;
pub mod store;
