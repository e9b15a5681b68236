//! creditgate's own HTTP endpoints (everything that is not proxied).
//! The billing, admin and credits APIs join `health` here.

pub mod health;
