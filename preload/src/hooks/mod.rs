//! The exported C entry points, grouped by concern.
//!
//! A hook is short: the fast path (an fd that is not ours) calls the C library at once; the
//! slow path takes the guard, calls into `ops`, and maps the result back to the C convention.

/// Defines hooks that, in this stage, always hand the call to the C library unchanged.
macro_rules! passthrough {
    ($( fn $name:ident ( $($a:ident : $t:ty),* ) -> $r:ty; )*) => {
        $(
            /// Interposed C library function; see its manual page.
            ///
            /// # Safety
            /// The C function's contract.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($a: $t),*) -> $r {
                unsafe { crate::real::$name($($a),*) }
            }
        )*
    };
}

pub mod data;
pub mod lifecycle;
pub mod process;
pub mod readiness;
pub mod stdio;
