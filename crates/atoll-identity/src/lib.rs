//! Who is who in Atoll.
//!
//! - [`AtollId`]: a node's identity, `atoll://<workspace>/<role>/<zone>/<name>`,
//!   carried as the only URI SAN of its certificate ([`id_of_certificate`]).
//! - [`Authority`]: Atoll's own CA (a root and an intermediate, or an
//!   intermediate the user brings) issuing short-lived node certificates,
//!   from a node's certificate signing request ([`key_and_request`]).
//! - [`Token`]: bootstrap tokens (one use, to join) and API tokens, stored
//!   only as hashes.
//!
//! Design: `docs/design/identity-and-access.md`.

mod ca;
mod id;
mod token;

pub use ca::{
    Authority, BACKDATE, CaError, CaOptions, IssueRequest, Issued, KeySource, fingerprint,
    fingerprints_of_pem, hosts_of_pem, intermediate_of_chain, key_and_request, validity_of_pem,
};
pub use id::{AtollId, IdError, NO_ZONE, Role, id_of_certificate, id_of_pem};
pub use token::{Token, TokenError, TokenKind};
