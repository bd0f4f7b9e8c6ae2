//! What fleet managers reach over HTTP: the JSON API ([`http`]: routes,
//! authentication, the audit middleware, request spans) and the console
//! ([`console`]: server-rendered pages on the same authentication and audit).
//! Both act through the service layer ([`crate::service`]); JSON shapes are
//! in [`crate::api`].

pub mod console;
pub mod http;
pub mod tls;
