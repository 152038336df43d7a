//! Agent identity: the SQLite-ledgered CA (`ca`, `store`) and scoped, certificate-bound JWTs (`jwt`).

pub mod authority;
pub mod ca;
pub mod guard;
pub mod jwt;
pub mod rotation;
pub mod scopes;
pub mod store;
pub mod trust;
