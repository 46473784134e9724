//! Stdio streams opened for writing on SDP sockets (`fdopen(fd, "w")`).
//!
//! The C library writes a stream's buffer with its internal `write`, which no preload sees:
//! the bytes land on the app end behind the library's back, as *stray bytes* that the progress
//! thread takes from the bell end. While the connection is out of credits the library stuffs
//! the app end (so that it polls not writable), and stuffing and stray bytes then share the
//! bell end's queue, where nothing tells them apart: a large write to a slow reader lost
//! hundreds of kilobytes in eight megabytes (`tests/lifetime.rs`,
//! `a_large_write_through_a_stdio_stream_arrives_whole`). So such a stream is made with
//! `fopencookie`, whose writes go through this library's `write` like the program's own, and
//! its close through `close`. Its `fileno` still names the socket (the C library's `_fileno`,
//! whose place in the structure is checked against the standard streams first).

use libc::{c_char, c_int, c_void, size_t, ssize_t};

/// glibc's `cookie_io_functions_t`.
#[repr(C)]
struct CookieIo {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, size_t) -> ssize_t>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, size_t) -> ssize_t>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut i64, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

unsafe extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, io: CookieIo) -> *mut libc::FILE;
    static stdin: *mut libc::FILE;
    static stdout: *mut libc::FILE;
    static stderr: *mut libc::FILE;
}

/// Where glibc keeps a stream's descriptor (`struct _IO_FILE::_fileno`) on LP64: after the
/// flags word and thirteen pointers.
const FILENO_AT: usize = 8 + 13 * 8;

/// Whether [`FILENO_AT`] holds the descriptor of the three standard streams.
fn fileno_place_checked() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: the C library's standard streams, live for the process; reading an int
        // inside their structure, which is larger than FILENO_AT + 4.
        unsafe {
            [(stdin, 0), (stdout, 1), (stderr, 2)]
                .into_iter()
                .all(|(f, fd)| {
                    !f.is_null()
                        && libc::fileno(f) == fd
                        && std::ptr::read_unaligned(f.cast::<u8>().add(FILENO_AT).cast::<c_int>())
                            == fd
                })
        }
    })
}

/// A write-only stream on the offloaded socket `fd`, whose writes and close go through this
/// library; `None` when it cannot be made (the caller makes a plain one).
pub fn open(fd: c_int, mode: *const c_char) -> Option<*mut libc::FILE> {
    if !fileno_place_checked() {
        return None;
    }
    let io = CookieIo {
        read: None,
        write: Some(cookie_write),
        seek: None,
        close: Some(cookie_close),
    };
    // SAFETY: `mode` is fdopen's NUL-terminated mode; the cookie is the descriptor itself.
    let f = unsafe { fopencookie(fd as isize as *mut c_void, mode, io) };
    if f.is_null() {
        return None;
    }
    // SAFETY: a stream just made, whose `_fileno` is at FILENO_AT (checked above).
    unsafe { std::ptr::write_unaligned(f.cast::<u8>().add(FILENO_AT).cast::<c_int>(), fd) };
    Some(f)
}

/// The stream's buffer, written as the program's own `write` would, whole if it can be; the
/// count written (the C library marks the stream failed at a short one, and stops at an
/// error as a plain stream does, EINTR included). Never negative: the C library takes the
/// count as unsigned, and a -1 made `fwrite` copy from past the end of the caller's buffer.
unsafe extern "C" fn cookie_write(cookie: *mut c_void, buf: *const c_char, n: size_t) -> ssize_t {
    let fd = cookie as isize as c_int;
    let mut done = 0usize;
    while done < n {
        // SAFETY: `buf` holds `n` bytes (the C library's buffer).
        let r = unsafe { crate::hooks::data::write(fd, buf.add(done).cast(), n - done) };
        if r <= 0 {
            break;
        }
        done += r as usize;
    }
    done as ssize_t
}

unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    // SAFETY: the stream's descriptor, closed once, by its `fclose`.
    unsafe { crate::hooks::lifecycle::close(cookie as isize as c_int) }
}
