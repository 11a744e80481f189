//! HTTP serving: the accept loops, the keep-alive HTTP task with the WebSocket upgrade, the
//! route table of the REST endpoints (SPEC 3), and the playground.

mod accept;
mod playground;
mod routes;
mod serve;

pub(crate) use accept::accept_loop;

/// What a listener serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Role {
    /// Clients and, unless `admin_listen` is set, the backend endpoints too.
    Public { backend: bool },
    /// Backend endpoints only (`admin_listen`).
    Admin,
}

impl Role {
    fn backend(self) -> bool {
        matches!(self, Role::Admin | Role::Public { backend: true })
    }

    fn public(self) -> bool {
        matches!(self, Role::Public { .. })
    }
}
