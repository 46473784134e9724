//! Data calls, socket options and names.
//!
//! The fast path (an fd that is not an offloaded connection: files, pipes, TCP sockets) is
//! two atomic loads and the C library's call. An offloaded fd goes to `ops::offload::data`;
//! if the connection went back to TCP meanwhile, the call passes through after all.

use std::slice;

use libc::{
    c_int, c_uint, c_ulong, c_void, iovec, mmsghdr, msghdr, off_t, off64_t, size_t, sockaddr,
    socklen_t, ssize_t, timespec,
};
use ops::fdtable::{self, Meta};
use ops::offload::data as od;

use crate::guard::switch_call;
use crate::real;

/// Is `fd` the app end of an offloaded connection?
#[inline(always)]
pub(crate) fn offloaded(fd: c_int) -> bool {
    const BOTH: u64 = Meta::TRACKED | Meta::OFFLOADED;
    fdtable::raw(fd) & BOTH == BOTH
}

/// Runs an offloaded receive; `None`: pass through.
fn do_recv(fd: c_int, bufs: &mut [&mut [u8]], flags: c_int) -> Option<ssize_t> {
    switch_call(Some(-1), || od::recv(fd, bufs, flags).map(od::to_c)).flatten()
}

fn do_send(fd: c_int, bufs: &[&[u8]], flags: c_int) -> Option<ssize_t> {
    switch_call(Some(-1), || od::send(fd, bufs, flags).map(od::to_c)).flatten()
}

// ---------------------------------------------------------------------------------------------
// User memory as the kernel checks it. An offloaded call copies with plain loads and stores,
// where the kernel would have answered EFAULT (or EINVAL) for a bad pointer or length: these
// checks give the kernel's answer instead of a crash, with no system call on the data path.

/// LINUX: `access_ok`'s limit, TASK_SIZE_MAX (47-bit user space less its guard page on x86_64;
/// 48-bit on AArch64). Buffers above it fail at once with EFAULT.
#[cfg(target_arch = "x86_64")]
const TASK_SIZE: usize = (1 << 47) - 4096;
#[cfg(not(target_arch = "x86_64"))]
const TASK_SIZE: usize = 1 << 48;

/// LINUX: MAX_RW_COUNT, the most one call moves; longer lengths are cut to it.
const MAX_RW_COUNT: usize = (i32::MAX as usize) & !4095;

/// LINUX: UIO_MAXIOV, the most iovecs one call takes.
const UIO_MAXIOV: usize = 1024;

/// How the kernel would treat a user buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Span {
    /// Usable (or empty).
    Good,
    /// In user space but in the null page, where nothing is mapped: EFAULT when the kernel
    /// copies, that is after it waited for data (a non-blocking call still gets EAGAIN). A
    /// pointer into other unmapped memory cannot be told without a system call and is not
    /// detected.
    Fault,
    /// Beyond user space or wrapping around: `access_ok` fails, EFAULT before anything else.
    Bad,
}

fn span(p: *const c_void, n: usize) -> Span {
    let a = p as usize;
    if n == 0 {
        Span::Good
    } else if n > TASK_SIZE || a > TASK_SIZE - n {
        Span::Bad
    } else if a < 4096 {
        Span::Fault
    } else {
        Span::Good
    }
}

/// Whether the kernel could copy `n` bytes from `p` (no EFAULT).
pub(crate) fn user_readable(p: *const c_void, n: usize) -> bool {
    span(p, n) == Span::Good
}

/// A small structure the kernel copies in or out at once (a msghdr, an int, a sockaddr).
fn obj_ok<T>(p: *const T) -> bool {
    span(p.cast(), std::mem::size_of::<T>()) == Span::Good
}

fn fail(e: c_int) -> ssize_t {
    od::to_c(Err(e))
}

/// A receive into a buffer the kernel would fault on: wait for data as the kernel does, then
/// EFAULT (end of stream, EAGAIN and errors are reported as they are). Nothing is consumed.
fn recv_fault(fd: c_int, flags: c_int) -> Option<ssize_t> {
    let mut one = [0u8; 1];
    match do_recv(fd, &mut [&mut one[..]], flags | libc::MSG_PEEK) {
        Some(n) if n > 0 => Some(fail(libc::EFAULT)),
        r => r,
    }
}

/// A send from a buffer the kernel would fault on: the connection's errors first (EPIPE on a
/// shut-down socket), as the kernel checks them before copying, then EFAULT.
fn send_fault(fd: c_int, flags: c_int) -> Option<ssize_t> {
    match do_send(fd, &[], flags) {
        Some(n) if n >= 0 => Some(fail(libc::EFAULT)),
        r => r,
    }
}

/// A receive into one buffer, checked as the kernel checks it (`clamp`: the recv family cuts
/// the length to MAX_RW_COUNT before checking; read checks the whole length).
///
/// # Safety
/// A `Good` buffer must be writable for its length, as the call's contract says.
unsafe fn recv_one(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    clamp: bool,
) -> Option<ssize_t> {
    let n = if clamp { n.min(MAX_RW_COUNT) } else { n };
    match span(buf, n) {
        Span::Bad => Some(fail(libc::EFAULT)),
        Span::Fault => recv_fault(fd, flags),
        Span::Good => do_recv(
            fd,
            &mut [unsafe { out_buf(buf, n.min(MAX_RW_COUNT)) }],
            flags,
        ),
    }
}

/// # Safety
/// As [`recv_one`], for reading.
unsafe fn send_one(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    clamp: bool,
) -> Option<ssize_t> {
    let n = if clamp { n.min(MAX_RW_COUNT) } else { n };
    match span(buf, n) {
        Span::Bad => Some(fail(libc::EFAULT)),
        Span::Fault => send_fault(fd, flags),
        Span::Good => do_send(fd, &[unsafe { in_buf(buf, n.min(MAX_RW_COUNT)) }], flags),
    }
}

/// An iovec array after the kernel's checks (`import_iovec`): its segments, and whether one
/// of them faults at copy time. `Err`: the errno the kernel answers at once.
///
/// # Safety
/// A `Good` array holds `cnt` iovecs.
unsafe fn iov_check(iov: *const iovec, cnt: usize) -> Result<(Vec<iovec>, bool), c_int> {
    if cnt > UIO_MAXIOV {
        return Err(libc::EINVAL);
    }
    if cnt == 0 {
        return Ok((Vec::new(), false));
    }
    if span(iov.cast(), cnt * std::mem::size_of::<iovec>()) != Span::Good {
        return Err(libc::EFAULT);
    }
    // SAFETY: checked above that the array is in user space and out of the null page.
    let v = unsafe { slice::from_raw_parts(iov, cnt) }.to_vec();
    if v.iter().any(|e| (e.iov_len as isize) < 0) {
        return Err(libc::EINVAL);
    }
    let mut fault = false;
    let mut total = 0usize;
    let mut out = Vec::with_capacity(cnt);
    for e in v {
        match span(e.iov_base, e.iov_len) {
            Span::Bad => return Err(libc::EFAULT),
            Span::Fault => fault = true,
            Span::Good => {}
        }
        let len = e.iov_len.min(MAX_RW_COUNT - total);
        total += len;
        out.push(iovec {
            iov_base: e.iov_base,
            iov_len: len,
        });
    }
    Ok((out, fault))
}

/// `readv`/`recvmsg` on an offloaded fd with a checked iovec array. `zero_is_eof`: a read of
/// zero bytes returns at once (LINUX: `sock_read_iter`), as readv does and recvmsg does not.
///
/// # Safety
/// As `readv(2)`.
unsafe fn recv_iov(
    fd: c_int,
    iov: *const iovec,
    cnt: usize,
    flags: c_int,
    zero_returns: bool,
) -> Option<ssize_t> {
    match unsafe { iov_check(iov, cnt) } {
        Err(e) => Some(fail(e)),
        Ok((segs, _)) if zero_returns && segs.iter().all(|e| e.iov_len == 0) => Some(0),
        Ok((_, true)) => recv_fault(fd, flags),
        Ok((segs, false)) => do_recv(
            fd,
            &mut unsafe { iov_mut(segs.as_ptr(), segs.len()) },
            flags,
        ),
    }
}

/// # Safety
/// As `writev(2)`.
unsafe fn send_iov(fd: c_int, iov: *const iovec, cnt: usize, flags: c_int) -> Option<ssize_t> {
    match unsafe { iov_check(iov, cnt) } {
        Err(e) => Some(fail(e)),
        Ok((_, true)) => send_fault(fd, flags),
        Ok((segs, false)) => do_send(fd, &unsafe { iov_ref(segs.as_ptr(), segs.len()) }, flags),
    }
}

/// LINUX: `__copy_msghdr`'s checks of a msghdr the kernel copied in, for a receive (`send`
/// false) or a send: the name length, the name itself (sends copy it), the control buffer
/// (sends copy it), the iovec count.
fn msghdr_check(m: &msghdr, send: bool) -> Result<(), c_int> {
    if !m.msg_name.is_null() && (m.msg_namelen as c_int) < 0 {
        return Err(libc::EINVAL);
    }
    if send && !m.msg_name.is_null() && m.msg_namelen > 0 {
        let n = (m.msg_namelen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        if span(m.msg_name, n) != Span::Good {
            return Err(libc::EFAULT);
        }
    }
    if m.msg_iovlen > UIO_MAXIOV {
        return Err(libc::EMSGSIZE);
    }
    if send && m.msg_controllen > i32::MAX as usize {
        return Err(libc::ENOBUFS);
    }
    if send && span(m.msg_control, m.msg_controllen) != Span::Good {
        return Err(libc::EFAULT);
    }
    Ok(())
}

/// # Safety
/// `buf` must be valid for writes of `n` bytes (or n == 0).
unsafe fn out_buf<'a>(buf: *mut c_void, n: size_t) -> &'a mut [u8] {
    if n == 0 || buf.is_null() {
        &mut []
    } else {
        unsafe { slice::from_raw_parts_mut(buf.cast(), n) }
    }
}

/// # Safety
/// `buf` must be valid for reads of `n` bytes (or n == 0).
unsafe fn in_buf<'a>(buf: *const c_void, n: size_t) -> &'a [u8] {
    if n == 0 || buf.is_null() {
        &[]
    } else {
        unsafe { slice::from_raw_parts(buf.cast(), n) }
    }
}

/// # Safety
/// `iov` must hold `cnt` valid iovecs whose buffers are writable.
unsafe fn iov_mut<'a>(iov: *const iovec, cnt: usize) -> Vec<&'a mut [u8]> {
    if iov.is_null() {
        return Vec::new();
    }
    let v = unsafe { slice::from_raw_parts(iov, cnt) };
    v.iter()
        .map(|e| unsafe { out_buf(e.iov_base, e.iov_len) })
        .collect()
}

/// # Safety
/// `iov` must hold `cnt` valid iovecs whose buffers are readable.
unsafe fn iov_ref<'a>(iov: *const iovec, cnt: usize) -> Vec<&'a [u8]> {
    if iov.is_null() {
        return Vec::new();
    }
    let v = unsafe { slice::from_raw_parts(iov, cnt) };
    v.iter()
        .map(|e| unsafe { in_buf(e.iov_base, e.iov_len) })
        .collect()
}

#[cold]
#[inline(never)]
unsafe fn read_offloaded(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // LINUX: read of zero bytes from a socket returns at once (`sock_read_iter`).
    if n == 0 {
        return 0;
    }
    match unsafe { recv_one(fd, buf, n, 0, false) } {
        Some(r) => r,
        None => unsafe { real::read(fd, buf, n) },
    }
}

/// # Safety
/// As `read(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // The hot path for every file and pipe: a table load, then the C library (a tail call).
    if offloaded(fd) {
        return unsafe { read_offloaded(fd, buf, n) };
    }
    unsafe { real::read(fd, buf, n) }
}

/// # Safety
/// As `read(2)`, with glibc's fortify check.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if offloaded(fd) && n <= buflen {
        return unsafe { read_offloaded(fd, buf, n) };
    }
    unsafe { real::__read_chk(fd, buf, n, buflen) }
}

#[cold]
#[inline(never)]
unsafe fn write_offloaded(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    match unsafe { send_one(fd, buf, n, 0, false) } {
        Some(r) => r,
        None => unsafe { real::write(fd, buf, n) },
    }
}

/// # Safety
/// As `write(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    if offloaded(fd) {
        return unsafe { write_offloaded(fd, buf, n) };
    }
    unsafe { real::write(fd, buf, n) }
}

/// # Safety
/// As `readv(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if offloaded(fd)
        && cnt >= 0
        && let Some(r) = unsafe { recv_iov(fd, iov, cnt as usize, 0, true) }
    {
        return r;
    }
    unsafe { real::readv(fd, iov, cnt) }
}

/// # Safety
/// As `writev(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    if offloaded(fd)
        && cnt >= 0
        && let Some(r) = unsafe { send_iov(fd, iov, cnt as usize, 0) }
    {
        return r;
    }
    unsafe { real::writev(fd, iov, cnt) }
}

/// # Safety
/// As `recv(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    if offloaded(fd)
        && let Some(r) = unsafe { recv_one(fd, buf, n, flags, true) }
    {
        return r;
    }
    unsafe { real::recv(fd, buf, n, flags) }
}

/// # Safety
/// As `recv(2)`, with glibc's fortify check.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    if offloaded(fd)
        && n <= buflen
        && let Some(r) = unsafe { recv_one(fd, buf, n, flags, true) }
    {
        return r;
    }
    unsafe { real::__recv_chk(fd, buf, n, buflen, flags) }
}

/// LINUX: recvfrom on a connected TCP socket leaves the address untouched and reports
/// length 0 (`move_addr_to_user`); without an address the length is not looked at. A bad or
/// negative length fails the call after the bytes were received, as in the kernel.
unsafe fn no_addr(r: ssize_t, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t {
    if r < 0 || addr.is_null() {
        return r;
    }
    if !obj_ok(len) {
        return fail(libc::EFAULT);
    }
    // SAFETY: checked above.
    if (unsafe { *len } as c_int) < 0 {
        return fail(libc::EINVAL);
    }
    unsafe { *len = 0 };
    r
}

/// # Safety
/// As `recvfrom(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if offloaded(fd)
        && let Some(r) = unsafe { recv_one(fd, buf, n, flags, true) }
    {
        return unsafe { no_addr(r, addr, len) };
    }
    unsafe { real::recvfrom(fd, buf, n, flags, addr, len) }
}

/// # Safety
/// As `recvfrom(2)`, with glibc's fortify check.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if offloaded(fd)
        && n <= buflen
        && let Some(r) = unsafe { recv_one(fd, buf, n, flags, true) }
    {
        return unsafe { no_addr(r, addr, len) };
    }
    unsafe { real::__recvfrom_chk(fd, buf, n, buflen, flags, addr, len) }
}

/// # Safety
/// As `recvmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    if offloaded(fd) && !msg.is_null() {
        if !obj_ok(msg) {
            return fail(libc::EFAULT);
        }
        let m = unsafe { &mut *msg };
        if let Err(e) = msghdr_check(m, false) {
            return fail(e);
        }
        if let Some(r) = unsafe { recv_iov(fd, m.msg_iov, m.msg_iovlen, flags, false) } {
            if r < 0 {
                return r;
            }
            m.msg_namelen = 0;
            m.msg_controllen = 0;
            m.msg_flags = 0;
            return r;
        }
    }
    unsafe { real::recvmsg(fd, msg, flags) }
}

/// # Safety
/// As `recvmmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    vec: *mut mmsghdr,
    vlen: c_uint,
    flags: c_int,
    timeout: *mut timespec,
) -> c_int {
    if offloaded(fd) && !vec.is_null() {
        // LINUX: the timeout is read and checked first; more than UIO_MAXIOV messages are cut.
        if !timeout.is_null() {
            if !obj_ok(timeout) {
                return fail(libc::EFAULT) as c_int;
            }
            let t = unsafe { *timeout };
            if t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec) {
                return fail(libc::EINVAL) as c_int;
            }
        }
        let vlen = (vlen as usize).min(UIO_MAXIOV);
        if vlen == 0 {
            return 0;
        }
        if span(vec.cast(), vlen * std::mem::size_of::<mmsghdr>()) != Span::Good {
            return fail(libc::EFAULT) as c_int;
        }
        let msgs = unsafe { slice::from_raw_parts_mut(vec, vlen) };
        let mut done = 0;
        for (i, mm) in msgs.iter_mut().enumerate() {
            // After the first message, never block (as the kernel does without MSG_WAITFORONE
            // semantics for stream sockets once data was returned).
            let f = if i == 0 {
                flags & !libc::MSG_WAITFORONE
            } else {
                flags | libc::MSG_DONTWAIT
            };
            let r = unsafe { recvmsg(fd, &mut mm.msg_hdr, f) };
            if r < 0 {
                return if done > 0 { done } else { -1 };
            }
            mm.msg_len = r as c_uint;
            done += 1;
            if r == 0 {
                break;
            }
        }
        return done;
    }
    unsafe { real::recvmmsg(fd, vec, vlen, flags, timeout) }
}

/// # Safety
/// As `send(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    if offloaded(fd)
        && let Some(r) = unsafe { send_one(fd, buf, n, flags, true) }
    {
        return r;
    }
    unsafe { real::send(fd, buf, n, flags) }
}

/// # Safety
/// As `sendto(2)`. LINUX: TCP ignores the address of a connected socket.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    if offloaded(fd) {
        // LINUX: the address is copied in (and checked) before anything, then ignored.
        if !addr.is_null() {
            if (len as c_int) < 0 || len as usize > std::mem::size_of::<libc::sockaddr_storage>() {
                return fail(libc::EINVAL);
            }
            if span(addr.cast(), len as usize) != Span::Good {
                return fail(libc::EFAULT);
            }
        }
        if let Some(r) = unsafe { send_one(fd, buf, n, flags, true) } {
            return r;
        }
    }
    unsafe { real::sendto(fd, buf, n, flags, addr, len) }
}

/// # Safety
/// As `sendmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if !msg.is_null() && obj_ok(msg) && ops::offload::any_bound() {
        // SAFETY: checked readable above.
        unsafe { relay_passed_fds(&*msg) };
    }
    if offloaded(fd) && !msg.is_null() {
        if !obj_ok(msg) {
            return fail(libc::EFAULT);
        }
        let m = unsafe { &*msg };
        if let Err(e) = msghdr_check(m, true) {
            return fail(e);
        }
        if let Some(r) = unsafe { send_iov(fd, m.msg_iov, m.msg_iovlen, flags) } {
            return r;
        }
    }
    unsafe { real::sendmsg(fd, msg, flags) }
}

/// Offloaded fds among the SCM_RIGHTS of `m` go to a relay before they leave for another
/// process (`ops::offload::exec::before_passing`). Control data the kernel could not read is
/// left to it (EFAULT). Callers walk only while the process holds a connection
/// (`ops::offload::any_bound`): the other sockets' messages are read by nobody but the kernel.
///
/// # Safety
/// `m` is a readable msghdr.
unsafe fn relay_passed_fds(m: &msghdr) {
    let len = m.msg_controllen;
    if m.msg_control.is_null()
        || len < std::mem::size_of::<libc::cmsghdr>()
        || !user_readable(m.msg_control, len)
    {
        return;
    }
    // SAFETY: the control buffer is readable for its whole length; the CMSG macros stay within
    // msg_controllen.
    unsafe {
        let limit = m.msg_control as usize + len;
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            let h = std::ptr::read_unaligned(c);
            // A header whose length the kernel would refuse (EINVAL) ends the walk here: the
            // next header's address would be computed from it.
            let hlen = h.cmsg_len as usize;
            if hlen < std::mem::size_of::<libc::cmsghdr>() || hlen > limit - c as usize {
                return;
            }
            if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let end = c as usize + hlen;
                let n = end.saturating_sub(data as usize) / std::mem::size_of::<c_int>();
                for i in 0..n {
                    let passed = std::ptr::read_unaligned((data as *const c_int).add(i));
                    if offloaded(passed) {
                        crate::guard::switch(|| ops::offload::exec::before_passing(passed));
                    } else if ops::offload::quiet::any_sets() {
                        // An epoll set another process may wait on or change.
                        crate::guard::switch(|| ops::offload::quiet::set_shared(passed));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
}

/// # Safety
/// As `sendmmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    vec: *mut mmsghdr,
    vlen: c_uint,
    flags: c_int,
) -> c_int {
    if offloaded(fd) && !vec.is_null() {
        let vlen = (vlen as usize).min(UIO_MAXIOV);
        if vlen == 0 {
            return 0;
        }
        if span(vec.cast(), vlen * std::mem::size_of::<mmsghdr>()) != Span::Good {
            return fail(libc::EFAULT) as c_int;
        }
        let msgs = unsafe { slice::from_raw_parts_mut(vec, vlen) };
        let mut done = 0;
        for mm in msgs.iter_mut() {
            let r = unsafe { sendmsg(fd, &mm.msg_hdr, flags) };
            if r < 0 {
                return if done > 0 { done } else { -1 };
            }
            mm.msg_len = r as c_uint;
            done += 1;
        }
        return done;
    }
    if !vec.is_null() && ops::offload::any_bound() {
        let n = (vlen as usize).min(UIO_MAXIOV);
        if span(vec.cast(), n * std::mem::size_of::<mmsghdr>()) == Span::Good {
            // SAFETY: readable, checked above.
            for mm in unsafe { slice::from_raw_parts(vec, n) } {
                unsafe { relay_passed_fds(&mm.msg_hdr) };
            }
        }
    }
    unsafe { real::sendmmsg(fd, vec, vlen, flags) }
}

/// Copies up to `count` bytes from `in_fd` (a file or pipe) into the offloaded `out_fd`.
/// `offset`: read at this file offset and advance it, without moving the file position.
unsafe fn copy_into_offloaded(
    out_fd: c_int,
    in_fd: c_int,
    offset: Option<&mut i64>,
    count: usize,
) -> ssize_t {
    let mut buf = vec![0u8; count.min(256 * 1024)];
    let mut pos = offset;
    let mut total = 0usize;
    // A pipe cannot take back what a non-blocking socket refused: its bytes are looked at
    // first (`tee`) and taken once sent.
    let peek_pipe = pos.is_none() && od::is_nonblocking(out_fd) && is_pipe(in_fd) == Ok(true);
    while total < count {
        let want = buf.len().min(count - total);
        let n = match pos.as_deref() {
            // SAFETY: buf is writable for `want` bytes.
            Some(&off) => unsafe {
                libc::syscall(libc::SYS_pread64, in_fd, buf.as_mut_ptr(), want, off) as ssize_t
            },
            None if peek_pipe => match pipe_peek(in_fd, &mut buf[..want]) {
                Some(n) => n,
                None => return if total > 0 { total as ssize_t } else { -1 },
            },
            None => unsafe { real::read(in_fd, buf.as_mut_ptr().cast(), want) },
        };
        if n <= 0 {
            return if total > 0 || n == 0 {
                total as ssize_t
            } else {
                -1
            };
        }
        let sent = match do_send(out_fd, &[&buf[..n as usize]], 0) {
            Some(s) => s,
            None => unsafe { real::write(out_fd, buf.as_ptr().cast(), n as usize) },
        };
        if peek_pipe && sent > 0 {
            // Take from the pipe what the socket took (it is there: `tee` copied it).
            let mut left = sent as usize;
            while left > 0 {
                // SAFETY: buf is writable for `left` bytes (left <= n <= buf.len()).
                let r = unsafe { real::read(in_fd, buf.as_mut_ptr().cast(), left) };
                if r <= 0 {
                    break;
                }
                left -= r as usize;
            }
        }
        if sent < n && pos.is_none() && !peek_pipe {
            // The socket took less than was read (non-blocking, or an error): the file's
            // position goes back to the first byte not sent, as the kernel's sendfile leaves
            // it (a pipe was only looked at when the socket is non-blocking: `peek_pipe`).
            let back = n - sent.max(0);
            let errno = ops::sys::errno();
            // SAFETY: lseek on the caller's fd; a pipe answers ESPIPE, which changes nothing.
            unsafe { libc::syscall(libc::SYS_lseek, in_fd, -(back as i64), libc::SEEK_CUR) };
            ops::sys::set_errno(errno);
        }
        if sent <= 0 {
            return if total > 0 { total as ssize_t } else { sent };
        }
        total += sent as usize;
        if let Some(p) = pos.as_deref_mut() {
            *p += sent as i64;
        }
        if (sent as usize) < n as usize {
            break;
        }
    }
    total as ssize_t
}

/// # Safety
/// As `sendfile(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut off_t,
    count: size_t,
) -> ssize_t {
    if offloaded(out_fd) {
        if !offset.is_null() && !obj_ok(offset) {
            return fail(libc::EFAULT);
        }
        let off = if offset.is_null() {
            None
        } else {
            Some(unsafe { &mut *offset })
        };
        return unsafe { copy_into_offloaded(out_fd, in_fd, off, count) };
    }
    unsafe { real::sendfile(out_fd, in_fd, offset, count) }
}

/// # Safety
/// As `sendfile64(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile64(
    out_fd: c_int,
    in_fd: c_int,
    offset: *mut off64_t,
    count: size_t,
) -> ssize_t {
    if offloaded(out_fd) {
        if !offset.is_null() && !obj_ok(offset) {
            return fail(libc::EFAULT);
        }
        let off = if offset.is_null() {
            None
        } else {
            Some(unsafe { &mut *offset })
        };
        return unsafe { copy_into_offloaded(out_fd, in_fd, off, count) };
    }
    unsafe { real::sendfile64(out_fd, in_fd, offset, count) }
}

/// # Safety
/// As `splice(2)`. With an offloaded end the bytes are copied through a buffer (the kernel
/// cannot splice a shared-memory ring).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut off64_t,
    fd_out: c_int,
    off_out: *mut off64_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    if offloaded(fd_out) && off_out.is_null() {
        // LINUX: the offset is read first; then one end must be a pipe, without an offset.
        if !off_in.is_null() && !obj_ok(off_in) {
            return fail(libc::EFAULT);
        }
        match is_pipe(fd_in) {
            Err(e) => return fail(e),
            Ok(false) => return fail(libc::EINVAL),
            Ok(true) if !off_in.is_null() => return fail(libc::ESPIPE),
            Ok(true) => {}
        }
        let off = if off_in.is_null() {
            None
        } else {
            Some(unsafe { &mut *off_in })
        };
        return unsafe { copy_into_offloaded(fd_out, fd_in, off, len) };
    }
    if offloaded(fd_in) && off_in.is_null() {
        if !off_out.is_null() && !obj_ok(off_out) {
            return fail(libc::EFAULT);
        }
        match is_pipe(fd_out) {
            Err(e) => return fail(e),
            Ok(false) => return fail(libc::EINVAL),
            Ok(true) if !off_out.is_null() => return fail(libc::ESPIPE),
            Ok(true) => {}
        }
        let mut buf = vec![0u8; len.min(256 * 1024)];
        let fl = if flags & libc::SPLICE_F_NONBLOCK != 0 {
            libc::MSG_DONTWAIT
        } else {
            0
        };
        // Peeked, and taken once the pipe took them: a full pipe (non-blocking) leaves the
        // rest in the connection, where a receive taking them first lost them.
        let n = match do_recv(fd_in, &mut [&mut buf[..]], fl | libc::MSG_PEEK) {
            Some(n) => n,
            None => return unsafe { real::splice(fd_in, off_in, fd_out, off_out, len, flags) },
        };
        if n <= 0 {
            return n;
        }
        let mut done = 0usize;
        while done < n as usize {
            let w = if off_out.is_null() {
                unsafe { real::write(fd_out, buf[done..].as_ptr().cast(), n as usize - done) }
            } else {
                // SAFETY: off_out is the caller's offset; pwrite does not move the file position.
                let w = unsafe {
                    libc::syscall(
                        libc::SYS_pwrite64,
                        fd_out,
                        buf[done..].as_ptr(),
                        n as usize - done,
                        *off_out,
                    ) as ssize_t
                };
                if w > 0 {
                    unsafe { *off_out += w as i64 };
                }
                w
            };
            if w <= 0 {
                break;
            }
            done += w as usize;
        }
        if done > 0 {
            // The bytes the pipe took, which the peek left first in the connection.
            let mut taken = vec![0u8; done];
            let _ = do_recv(fd_in, &mut [&mut taken[..]], libc::MSG_DONTWAIT);
            return done as ssize_t;
        }
        return -1; // the pipe's error (EAGAIN when full and non-blocking), in errno
    }
    unsafe { real::splice(fd_in, off_in, fd_out, off_out, len, flags) }
}

/// Copies the first bytes of the pipe `fd` into `buf` without taking them (`tee` into a
/// pipe of our own, read back): waits for bytes as a read of `fd` would. `None`: our pipe
/// could not be made, or `tee` failed (errno set).
fn pipe_peek(fd: c_int, buf: &mut [u8]) -> Option<ssize_t> {
    let mut p = [-1 as c_int; 2];
    // SAFETY: a valid array of two fds.
    if unsafe { libc::syscall(libc::SYS_pipe2, p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return None;
    }
    let flags = if od::is_nonblocking(fd) {
        libc::SPLICE_F_NONBLOCK
    } else {
        0
    };
    // SAFETY: tee between two pipes; our pipe's read end is read into `buf` (at most its
    // length was copied).
    let r = unsafe {
        let n = libc::syscall(libc::SYS_tee, fd, p[1], buf.len(), flags) as ssize_t;
        let mut got = 0isize;
        while got < n {
            let k = libc::syscall(
                libc::SYS_read,
                p[0],
                buf.as_mut_ptr().add(got as usize),
                (n - got) as usize,
            ) as ssize_t;
            if k <= 0 {
                break;
            }
            got += k;
        }
        if n < 0 { n } else { got }
    };
    let errno = ops::sys::errno();
    // SAFETY: closing our own pipe.
    unsafe {
        libc::syscall(libc::SYS_close, p[0]);
        libc::syscall(libc::SYS_close, p[1]);
    }
    ops::sys::set_errno(errno);
    (r >= 0).then_some(r)
}

/// Whether `fd` is a pipe (splice needs one end to be).
fn is_pipe(fd: c_int) -> Result<bool, c_int> {
    // SAFETY: fstat into a zeroed struct on an fd number; a bad fd just fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) } < 0 {
        return Err(ops::sys::errno());
    }
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// The kernel socket to ask for names and most options: the shadow of an offloaded fd.
fn kernel_socket(fd: c_int) -> c_int {
    if offloaded(fd)
        && let Some(Some(s)) = switch_call(None, || od::shadow_of(fd))
    {
        return s;
    }
    if ops::offload::relayed::maybe()
        && !fdtable::is_tracked(fd)
        && let Some(Some(s)) = switch_call(None, || ops::offload::relayed::shadow_for(fd))
    {
        return s;
    }
    fd
}

/// Options that stay with the socket the program holds, even when another one answers for
/// its names and TCP options: timeouts (blocking happens there) and its pending error.
fn own_option(level: c_int, name: c_int) -> bool {
    level == libc::SOL_SOCKET
        && matches!(name, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO | libc::SO_ERROR)
}

/// # Safety
/// As `getsockopt(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    if offloaded(fd) && level == libc::SOL_SOCKET {
        if name == libc::SO_ERROR
            && obj_ok(val.cast::<c_int>())
            && obj_ok(len)
            && unsafe { *len } as c_int >= std::mem::size_of::<c_int>() as c_int
            && let Some(Some(e)) = switch_call(None, || od::take_so_error(fd))
        {
            unsafe {
                *(val as *mut c_int) = e;
                *len = std::mem::size_of::<c_int>() as socklen_t;
            }
            return 0;
        }
        // Timeouts live on the app end, where the kernel blocks.
        if name == libc::SO_RCVTIMEO || name == libc::SO_SNDTIMEO {
            return unsafe { real::getsockopt(fd, level, name, val, len) };
        }
    }
    if own_option(level, name) {
        return unsafe { real::getsockopt(fd, level, name, val, len) };
    }
    unsafe { real::getsockopt(kernel_socket(fd), level, name, val, len) }
}

/// # Safety
/// As `setsockopt(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    ops::offload::keepalive::note_option(level, name);
    if offloaded(fd) {
        let shadow = kernel_socket(fd);
        if level == libc::SOL_SOCKET && (name == libc::SO_RCVTIMEO || name == libc::SO_SNDTIMEO) {
            // Blocking calls block on the app end: its timeouts are the ones that count.
            let rc = unsafe { real::setsockopt(fd, level, name, val, len) };
            if rc == 0 {
                unsafe { real::setsockopt(shadow, level, name, val, len) };
            }
            return rc;
        }
        let rc = unsafe { real::setsockopt(shadow, level, name, val, len) };
        if rc == 0 {
            // The stream probes its peer itself and keeps urgent bytes inline or apart: it
            // reads the shadow's settings back.
            crate::guard::switch(|| ops::offload::keepalive::option_set(fd, level, name));
        }
        return rc;
    }
    let other = kernel_socket(fd);
    if other != fd {
        // A relayed connection (ops::offload::relayed): TCP options and names are the
        // shadow's; timeouts are the socket the program blocks on.
        if own_option(level, name) {
            let rc = unsafe { real::setsockopt(fd, level, name, val, len) };
            if rc == 0 {
                unsafe { real::setsockopt(other, level, name, val, len) };
            }
            return rc;
        }
        return unsafe { real::setsockopt(other, level, name, val, len) };
    }
    let rc = unsafe { real::setsockopt(fd, level, name, val, len) };
    if rc == 0 {
        ops::offload::keepalive::note_buffer_size(fd, level, name);
    }
    rc
}

/// # Safety
/// As `getsockname(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    unsafe { real::getsockname(kernel_socket(fd), addr, len) }
}

/// # Safety
/// As `getpeername(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    unsafe { real::getpeername(kernel_socket(fd), addr, len) }
}

/// # Safety
/// As `shutdown(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    if offloaded(fd)
        && let Some(Some(r)) = switch_call(Some(Err(libc::EIO)), || od::shutdown(fd, how))
            .map(|o| o.map(|r| r.map(|_| 0)))
    {
        return od::to_c(r.map(|v| v as isize)) as c_int;
    }
    unsafe { real::shutdown(fd, how) }
}

/// `ioctl` is variadic in C; see `fcntl` for the fixed third word.
///
/// # Safety
/// As `ioctl(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: c_ulong) -> c_int {
    let query = request == libc::FIONREAD || request == libc::TIOCOUTQ || request == od::SIOCATMARK;
    if offloaded(fd) && query && arg != 0 && !obj_ok(arg as *const c_int) {
        // LINUX: the answer cannot be written: EFAULT.
        return fail(libc::EFAULT) as c_int;
    }
    if offloaded(fd)
        && query
        && arg != 0
        && let Some(Some(r)) = switch_call(None, || od::ioctl_query(fd, request))
    {
        return match r {
            Ok(v) => {
                unsafe { *(arg as *mut c_int) = v };
                0
            }
            Err(e) => od::to_c(Err(e)) as c_int,
        };
    }
    unsafe { real::ioctl(fd, request, arg) }
}
