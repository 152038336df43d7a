//! Agent identity: the SQLite-ledgered CA (`ca`, `store`) and scoped, certificate-bound JWTs (`jwt`).

pub mod ca;
pub mod store;
