//! libibverbs opened with `dlopen` on first need, never linked.
//!
//! `libsdp.so` is preloaded into every program; a `NEEDED` entry on libibverbs would make every
//! program on a machine without rdma-core fail to start (PRELOAD.md). So the library is opened
//! the first time the `rdma` provider is asked for, its entry points resolved once into
//! [`Verbs`], and the result (or the reason it failed) kept for the life of the process.
//!
//! Only the slow-path entry points are resolved here. The hot path (`post_send`,
//! `post_recv`, `poll_cq`, `req_notify_cq`) goes through the context's provider table
//! (`ctx->ops`), exactly as the `static inline` functions of `verbs.h` do (see `conn.rs`).
//!
//! The signatures below are written by hand from `infiniband/verbs.h` (rdma-core 44); the
//! structures they take are the generated [`super::bindings`], checked against the installed
//! headers by `tests/rdma_layout.rs`.
//!
//! This module and `device.rs` / `conn.rs` are the provider's FFI: every `unsafe` block says
//! which contract holds.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use super::bindings as b;

/// The default library: the run-time name (soname) of rdma-core's libibverbs.
pub const LIBIBVERBS: &str = "libibverbs.so.1";

/// Why libibverbs could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// `dlopen` failed (rdma-core not installed): dlerror's text.
    NoLibrary(String),
    /// The library lacks an entry point we need (too old or not rdma-core).
    NoSymbol(&'static str),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::NoLibrary(e) => write!(f, "cannot load {LIBIBVERBS}: {e}"),
            LoadError::NoSymbol(s) => write!(f, "{LIBIBVERBS} has no symbol {s}"),
        }
    }
}

macro_rules! dl_table {
    ($(#[$m:meta])* $table:ident { $($name:ident : fn($($arg:ty),*) $(-> $ret:ty)?;)* }) => {
        $(#[$m])*
        pub(crate) struct $table {
            /// The `dlopen` handle: never closed (the table points into the library).
            _handle: usize,
            $(pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        impl $table {
            fn resolve(handle: *mut c_void) -> Result<$table, LoadError> {
                Ok($table {
                    _handle: handle as usize,
                    $($name: {
                        let name = concat!(stringify!($name), "\0");
                        // SAFETY: `handle` is a live dlopen handle and `name` is NUL-terminated.
                        let p = unsafe { libc::dlsym(handle, name.as_ptr().cast()) };
                        if p.is_null() {
                            return Err(LoadError::NoSymbol(stringify!($name)));
                        }
                        // SAFETY: the symbol is the rdma-core function of that name, whose C
                        // signature (verbs.h) is the one written in the table.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p)
                        }
                    },)*
                })
            }
        }
    };
}

dl_table! {
    /// The libibverbs entry points we call (slow path only).
    Verbs {
    ibv_fork_init: fn() -> c_int;
    ibv_get_device_list: fn(*mut c_int) -> *mut *mut b::ibv_device;
    ibv_free_device_list: fn(*mut *mut b::ibv_device);
    ibv_get_device_name: fn(*mut b::ibv_device) -> *const c_char;
    ibv_open_device: fn(*mut b::ibv_device) -> *mut b::ibv_context;
    ibv_close_device: fn(*mut b::ibv_context) -> c_int;
    ibv_query_device: fn(*mut b::ibv_context, *mut b::ibv_device_attr) -> c_int;
    ibv_query_port: fn(*mut b::ibv_context, u8, *mut b::ibv_port_attr) -> c_int;
    ibv_query_gid: fn(*mut b::ibv_context, u8, c_int, *mut b::ibv_gid) -> c_int;
    ibv_alloc_pd: fn(*mut b::ibv_context) -> *mut b::ibv_pd;
    ibv_dealloc_pd: fn(*mut b::ibv_pd) -> c_int;
    ibv_reg_mr: fn(*mut b::ibv_pd, *mut c_void, usize, c_int) -> *mut b::ibv_mr;
    ibv_dereg_mr: fn(*mut b::ibv_mr) -> c_int;
    ibv_create_comp_channel: fn(*mut b::ibv_context) -> *mut b::ibv_comp_channel;
    ibv_destroy_comp_channel: fn(*mut b::ibv_comp_channel) -> c_int;
    ibv_create_cq: fn(*mut b::ibv_context, c_int, *mut c_void, *mut b::ibv_comp_channel, c_int) -> *mut b::ibv_cq;
    ibv_destroy_cq: fn(*mut b::ibv_cq) -> c_int;
    ibv_get_cq_event: fn(*mut b::ibv_comp_channel, *mut *mut b::ibv_cq, *mut *mut c_void) -> c_int;
    ibv_ack_cq_events: fn(*mut b::ibv_cq, c_uint);
    ibv_create_qp: fn(*mut b::ibv_pd, *mut b::ibv_qp_init_attr) -> *mut b::ibv_qp;
    ibv_modify_qp: fn(*mut b::ibv_qp, *mut b::ibv_qp_attr, c_int) -> c_int;
    ibv_destroy_qp: fn(*mut b::ibv_qp) -> c_int;
    }
}

dl_table! {
    /// The librdmacm entry points of the rdma_cm bootstrap (`cm.rs`).
    Cm {
    rdma_create_event_channel: fn() -> *mut b::rdma_event_channel;
    rdma_destroy_event_channel: fn(*mut b::rdma_event_channel);
    rdma_create_id: fn(*mut b::rdma_event_channel, *mut *mut b::rdma_cm_id, *mut c_void, b::rdma_port_space::Type) -> c_int;
    rdma_destroy_id: fn(*mut b::rdma_cm_id) -> c_int;
    rdma_bind_addr: fn(*mut b::rdma_cm_id, *mut libc::sockaddr) -> c_int;
    rdma_listen: fn(*mut b::rdma_cm_id, c_int) -> c_int;
    rdma_resolve_addr: fn(*mut b::rdma_cm_id, *mut libc::sockaddr, *mut libc::sockaddr, c_int) -> c_int;
    rdma_resolve_route: fn(*mut b::rdma_cm_id, c_int) -> c_int;
    rdma_connect: fn(*mut b::rdma_cm_id, *mut b::rdma_conn_param) -> c_int;
    rdma_accept: fn(*mut b::rdma_cm_id, *mut b::rdma_conn_param) -> c_int;
    rdma_reject: fn(*mut b::rdma_cm_id, *const c_void, u8) -> c_int;
    rdma_establish: fn(*mut b::rdma_cm_id) -> c_int;
    rdma_disconnect: fn(*mut b::rdma_cm_id) -> c_int;
    rdma_get_cm_event: fn(*mut b::rdma_event_channel, *mut *mut b::rdma_cm_event) -> c_int;
    rdma_ack_cm_event: fn(*mut b::rdma_cm_event) -> c_int;
    rdma_init_qp_attr: fn(*mut b::rdma_cm_id, *mut b::ibv_qp_attr, *mut c_int) -> c_int;
    rdma_migrate_id: fn(*mut b::rdma_cm_id, *mut b::rdma_event_channel) -> c_int;
    rdma_get_src_port: fn(*mut b::rdma_cm_id) -> u16;
    }
}

// SAFETY: the table holds function pointers into a library that is never unloaded, and
// libibverbs' functions are thread-safe (rdma-core documents the verbs as MT-safe).
unsafe impl Send for Verbs {}
unsafe impl Sync for Verbs {}
// SAFETY: as for Verbs (librdmacm is MT-safe).
unsafe impl Send for Cm {}
unsafe impl Sync for Cm {}

/// The default rdma_cm library (soname).
pub const LIBRDMACM: &str = "librdmacm.so.1";

/// Opens `name` and resolves the table. `ibv_fork_init` is called at once, before any other
/// verb of the process and so before the first registration (it must precede registrations;
/// on kernels with copy-on-fork for pinned pages it does nothing).
pub(crate) fn load_from(name: &str) -> Result<Verbs, LoadError> {
    let verbs = Verbs::resolve(open(name)?)?;
    // SAFETY: ibv_fork_init takes no arguments. Its failure (EINVAL after a registration by
    // someone else in the process) is not fatal: fork safety is then the kernel's
    // copy-on-fork, as on every kernel since 5.13.
    unsafe { (verbs.ibv_fork_init)() };
    Ok(verbs)
}

fn open(name: &str) -> Result<*mut c_void, LoadError> {
    let cname = CString::new(name).map_err(|_| LoadError::NoLibrary("NUL in name".into()))?;
    // SAFETY: dlopen with a NUL-terminated name; RTLD_NOW so a missing symbol fails here, not
    // later in a hot path.
    let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl call
        // of this thread; copied out at once.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "dlopen failed".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(LoadError::NoLibrary(msg));
    }
    Ok(handle)
}

static CM: OnceLock<Result<Cm, LoadError>> = OnceLock::new();

/// The process's librdmacm, loaded on the first call (after libibverbs, whose
/// `ibv_fork_init` must come first).
pub(crate) fn cm() -> Result<&'static Cm, LoadError> {
    verbs()?;
    CM.get_or_init(|| Cm::resolve(open(LIBRDMACM)?))
        .as_ref()
        .map_err(Clone::clone)
}

static VERBS: OnceLock<Result<Verbs, LoadError>> = OnceLock::new();

/// The process's libibverbs, loaded on the first call.
pub(crate) fn verbs() -> Result<&'static Verbs, LoadError> {
    VERBS
        .get_or_init(|| load_from(LIBIBVERBS))
        .as_ref()
        .map_err(Clone::clone)
}
