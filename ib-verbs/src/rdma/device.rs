//! Device and port discovery, the protection domain, and the registration cache.
//!
//! One [`Device`] per process is shared by its connections (one context, one PD, so a buffer
//! registered once serves every connection). It is found again on demand: [`Device::get`]
//! reuses the cached device only while its port is still ACTIVE, and otherwise re-reads the
//! device list, so a device that appears after start-up, or disappears, is noticed at the
//! next connection without a restart.
//!
//! Choice of device and port: the first device (or the one named by `LIBSDP_RDMA_DEVICE`)
//! with an ACTIVE port; on that port, the GID to use is the first IPv4-mapped one
//! (`::ffff:a.b.c.d`, a RoCE v2 GID on rxe and RoCE NICs), else the first non-zero one, else
//! index 0 with the LID (InfiniBand without a routable GID).

use std::collections::HashMap;
use std::ffi::{CStr, c_int, c_void};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::Unavailable;
use super::bindings as b;
use super::dl::{self, Verbs};
use crate::transport::{Access, MemKey, RegError};

/// Environment variable naming the device to use (`rxe0`, `mlx5_0`, ...).
pub const DEVICE_ENV: &str = "LIBSDP_RDMA_DEVICE";

/// Facts about the chosen port, as the peer needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub port: u8,
    pub lid: u16,
    pub gid: [u8; 16],
    pub gid_index: u8,
    /// `enum ibv_mtu` of the port (1 = 256 ... 5 = 4096).
    pub active_mtu: u32,
}

/// Limits of the device that size a queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    pub max_qp_wr: u32,
    pub max_cqe: u32,
    /// Outstanding RDMA READs we may issue per QP (initiator depth).
    pub max_qp_init_rd_atom: u32,
    /// Outstanding RDMA READs a QP may serve (responder resources).
    pub max_qp_rd_atom: u32,
}

/// An open device: context, PD, the port in use, the registration cache.
pub struct Device {
    pub(crate) verbs: &'static Verbs,
    pub(crate) ctx: *mut b::ibv_context,
    pub(crate) pd: *mut b::ibv_pd,
    name: String,
    port: PortInfo,
    limits: DeviceLimits,
    regs: Mutex<RegCache>,
    /// The process's completion channel on this device, made at first need (see
    /// [`Device::channel_fd`]); `Err` holds the errno of a failed creation.
    channel: OnceLock<Result<ChanPtr, i32>>,
}

/// `ibv_comp_channel *`, shared by every CQ made with `RdmaOptions::shared_channel`.
#[derive(Clone, Copy)]
pub(crate) struct ChanPtr(pub(crate) *mut b::ibv_comp_channel);
// SAFETY: a completion channel may be used from any thread (verbs are MT-safe).
unsafe impl Send for ChanPtr {}
unsafe impl Sync for ChanPtr {}

// SAFETY: libibverbs objects may be used from any thread (the verbs are MT-safe); the cache is
// behind a mutex and the rest is immutable after `open`.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("limits", &self.limits)
            .finish()
    }
}

static CURRENT: Mutex<Weak<Device>> = Mutex::new(Weak::new());

impl Device {
    /// The process's device: the cached one while its port is ACTIVE, else a fresh discovery.
    pub fn get() -> Result<Arc<Device>, Unavailable> {
        Device::get_named(None)
    }

    /// As [`Device::get`], for the device called `name` (None: `LIBSDP_RDMA_DEVICE` or the
    /// first usable one).
    pub fn get_named(name: Option<&str>) -> Result<Arc<Device>, Unavailable> {
        let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = cur.upgrade()
            && d.port_active()
            && name.is_none_or(|n| n == d.name)
        {
            return Ok(d);
        }
        let d = Arc::new(Device::discover(name)?);
        *cur = Arc::downgrade(&d);
        Ok(d)
    }

    /// Reads the device list and opens the first usable device.
    pub fn discover(name: Option<&str>) -> Result<Device, Unavailable> {
        let verbs = dl::verbs().map_err(Unavailable::Library)?;
        let wanted = match name {
            Some(n) => Some(n.to_string()),
            None => std::env::var(DEVICE_ENV).ok().filter(|s| !s.is_empty()),
        };
        let mut n: c_int = 0;
        // SAFETY: ibv_get_device_list writes the count into `n` and returns a NULL-terminated
        // array (or NULL with errno set: ENOSYS without kernel support).
        let list = unsafe { (verbs.ibv_get_device_list)(&mut n) };
        if list.is_null() {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(Unavailable::NoDevice(format!(
                "ibv_get_device_list failed (errno {errno})"
            )));
        }
        let mut why = String::from("no RDMA device");
        let mut found = None;
        for i in 0..n.max(0) as usize {
            // SAFETY: `list` holds `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            if dev.is_null() {
                break;
            }
            // SAFETY: a listed device has a NUL-terminated name owned by the list.
            let name = unsafe { CStr::from_ptr((verbs.ibv_get_device_name)(dev)) }
                .to_string_lossy()
                .into_owned();
            if wanted.as_deref().is_some_and(|w| w != name) {
                continue;
            }
            match Device::open(verbs, dev, &name) {
                Ok(d) => {
                    found = Some(d);
                    break;
                }
                Err(e) => why = e,
            }
        }
        // SAFETY: the list came from ibv_get_device_list; opened contexts stay valid after it
        // is freed (rdma-core keeps the device refcounted).
        unsafe { (verbs.ibv_free_device_list)(list) };
        found.ok_or(Unavailable::NoDevice(why))
    }

    fn open(verbs: &'static Verbs, dev: *mut b::ibv_device, name: &str) -> Result<Device, String> {
        // SAFETY: `dev` is a listed device.
        let ctx = unsafe { (verbs.ibv_open_device)(dev) };
        if ctx.is_null() {
            return Err(format!("{name}: ibv_open_device failed ({})", last_errno()));
        }
        let close = |e: String| {
            // SAFETY: `ctx` was opened above and nothing else references it yet.
            unsafe { (verbs.ibv_close_device)(ctx) };
            Err(e)
        };
        // SAFETY: zeroed ibv_device_attr is a valid output buffer (plain integers).
        let mut attr: b::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, output buffer of the declared type.
        if unsafe { (verbs.ibv_query_device)(ctx, &mut attr) } != 0 {
            return close(format!("{name}: ibv_query_device failed"));
        }
        let mut port = None;
        for p in 1..=attr.phys_port_cnt {
            if let Some(info) = query_port(verbs, ctx, p) {
                port = Some(info);
                break;
            }
        }
        let Some(port) = port else {
            return close(format!("{name}: no ACTIVE port"));
        };
        // SAFETY: live context.
        let pd = unsafe { (verbs.ibv_alloc_pd)(ctx) };
        if pd.is_null() {
            return close(format!("{name}: ibv_alloc_pd failed ({})", last_errno()));
        }
        Ok(Device {
            verbs,
            ctx,
            pd,
            name: name.to_string(),
            port,
            limits: DeviceLimits {
                max_qp_wr: attr.max_qp_wr.max(1) as u32,
                max_cqe: attr.max_cqe.max(1) as u32,
                max_qp_init_rd_atom: attr.max_qp_init_rd_atom.max(0) as u32,
                max_qp_rd_atom: attr.max_qp_rd_atom.max(0) as u32,
            },
            regs: Mutex::new(RegCache::default()),
            channel: OnceLock::new(),
        })
    }

    /// The process's completion channel on this device (DESIGN §5: one per process, served by
    /// the progress thread), created at the first call, non-blocking; `Err(errno)` if it
    /// cannot be made.
    pub(crate) fn channel(&self) -> Result<ChanPtr, i32> {
        *self.channel.get_or_init(|| {
            // SAFETY: live context.
            let ch = unsafe { (self.verbs.ibv_create_comp_channel)(self.ctx) };
            if ch.is_null() {
                return Err(last_errno());
            }
            // SAFETY: a live channel; its fd is ours to make non-blocking (take_cq_events must
            // never block in ibv_get_cq_event).
            let fd = unsafe { (*ch).fd };
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
            Ok(ChanPtr(ch))
        })
    }

    /// The descriptor of the process's completion channel: readable when a CQ made with
    /// `RdmaOptions::shared_channel` and armed has a completion. Serve it with
    /// [`Device::take_cq_events`].
    pub fn channel_fd(&self) -> Option<RawFd> {
        // SAFETY: a live channel (it lives as long as the device).
        self.channel().ok().map(|c| unsafe { (*c.0).fd })
    }

    /// Takes every pending completion event of the shared channel, acknowledges it at once (so
    /// that destroying its CQ never waits), then reports the CQ's connection
    /// ([`crate::rdma::RdmaConn::event_id`]) to `f`. Returns how many.
    pub fn take_cq_events(&self, mut f: impl FnMut(u64)) -> usize {
        let Ok(ch) = self.channel() else {
            return 0;
        };
        let mut n = 0;
        loop {
            let mut cq: *mut b::ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut c_void = std::ptr::null_mut();
            // SAFETY: a live, non-blocking channel: -1 (EAGAIN) when empty.
            if unsafe { (self.verbs.ibv_get_cq_event)(ch.0, &mut cq, &mut ctx) } != 0 {
                return n;
            }
            // SAFETY: the event names a CQ of this channel, live until acknowledged.
            unsafe { (self.verbs.ibv_ack_cq_events)(cq, 1) };
            n += 1;
            f(ctx as u64);
        }
    }

    /// The device's name (`rxe0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port in use.
    pub fn port(&self) -> PortInfo {
        self.port
    }

    /// The device's limits.
    pub fn limits(&self) -> DeviceLimits {
        self.limits
    }

    /// Whether our port is still ACTIVE (re-queried now).
    pub fn port_active(&self) -> bool {
        query_port(self.verbs, self.ctx, self.port.port).is_some()
    }

    /// Registers `addr..addr+len` for `access`; see [`RegCache`] for sharing and retention.
    ///
    /// # Safety
    /// As [`crate::Connection::register`].
    pub(crate) unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Reg, RegError> {
        if len == 0 || len > u32::MAX as usize || (addr as usize).checked_add(len).is_none() {
            return Err(RegError::BadRange);
        }
        let mut cache = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        if access == Access::LocalWrite
            && let Some(r) = cache.share_local(addr as u64, len as u64)
        {
            return Ok(r);
        }
        let flags = match access {
            Access::LocalWrite => b::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
            Access::RemoteRead => b::ibv_access_flags::IBV_ACCESS_REMOTE_READ,
        } as c_int;
        // SAFETY: the caller guarantees the range is valid for the access until deregistered;
        // the PD is live.
        let mr = unsafe { (self.verbs.ibv_reg_mr)(self.pd, addr.cast::<c_void>(), len, flags) };
        if mr.is_null() {
            return Err(RegError::TooMany);
        }
        // SAFETY: a non-NULL MR returned by ibv_reg_mr is readable.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        let key = match access {
            Access::LocalWrite => lkey,
            Access::RemoteRead => rkey,
        };
        let r = Reg {
            key: MemKey(key),
            addr: addr as u64,
            len: len as u64,
            access,
        };
        let evicted = cache.insert(r, MrPtr(mr));
        drop(cache);
        for m in evicted {
            self.dereg(m);
        }
        Ok(r)
    }

    /// Drops one reference to a registration; the MR goes when the last one does (a
    /// `RemoteRead` key is revoked then; a `LocalWrite` one may be retained, see [`RegCache`]).
    pub(crate) fn deregister(&self, key: MemKey, access: Access) {
        let mut cache = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        let gone = cache.release(key, access);
        drop(cache);
        for m in gone {
            self.dereg(m);
        }
    }

    /// Retain unused `LocalWrite` registrations (up to `max` of them) for reuse by a later
    /// registration of a range they cover. Off (0) by default: a retained registration pins
    /// the pages it had, so memory unmapped and mapped again at the same address would receive
    /// RDMA READ data in the old pages. Only turn it on for buffers that stay mapped (a
    /// bounce pool), or call [`Device::forget_range`] from an `munmap` hook.
    pub fn set_retain_local(&self, max: usize) {
        let mut cache = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain_max = max;
        let gone = cache.trim();
        drop(cache);
        for m in gone {
            self.dereg(m);
        }
    }

    /// Drops retained registrations overlapping `addr..addr+len` (the range is being unmapped).
    pub fn forget_range(&self, addr: u64, len: u64) {
        let mut cache = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        let gone = cache.forget(addr, len);
        drop(cache);
        for m in gone {
            self.dereg(m);
        }
    }

    /// Registration cache statistics: (hits, misses, live MRs).
    pub fn reg_stats(&self) -> (u64, u64, usize) {
        let cache = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        (cache.hits, cache.misses, cache.mrs.len())
    }

    fn dereg(&self, m: MrPtr) {
        // SAFETY: the MR came from ibv_reg_mr on this PD and the cache no longer names it.
        unsafe { (self.verbs.ibv_dereg_mr)(m.0) };
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let cache = std::mem::take(self.regs.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (_, e) in cache.mrs {
            self.dereg(e.mr);
        }
        if let Some(Ok(ch)) = self.channel.get() {
            // SAFETY: every CQ on the channel belonged to a connection holding an Arc of this
            // device, so all are destroyed.
            unsafe { (self.verbs.ibv_destroy_comp_channel)(ch.0) };
        }
        // SAFETY: every QP/CQ/MR of this PD and context belongs to a connection holding an
        // Arc of this device, so none is left; the PD and context are ours.
        unsafe {
            (self.verbs.ibv_dealloc_pd)(self.pd);
            (self.verbs.ibv_close_device)(self.ctx);
        }
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The port's facts if it is ACTIVE.
fn query_port(verbs: &Verbs, ctx: *mut b::ibv_context, port: u8) -> Option<PortInfo> {
    // SAFETY: zeroed ibv_port_attr is a valid output buffer (integers), and is at least as
    // large as the legacy structure the exported ibv_query_port fills.
    let mut pa: b::ibv_port_attr = unsafe { std::mem::zeroed() };
    // SAFETY: live context, output buffer of (at least) the declared type.
    if unsafe { (verbs.ibv_query_port)(ctx, port, &mut pa) } != 0
        || pa.state != b::ibv_port_state::IBV_PORT_ACTIVE
    {
        return None;
    }
    let mut best: Option<(u8, [u8; 16])> = None;
    for i in 0..pa.gid_tbl_len.clamp(0, 256) {
        // SAFETY: an ibv_gid is 16 plain bytes.
        let mut gid: b::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: live context, index inside the table, output buffer of the declared type.
        if unsafe { (verbs.ibv_query_gid)(ctx, port, i, &mut gid) } != 0 {
            continue;
        }
        // SAFETY: both union members are plain bytes.
        let raw = unsafe { gid.raw };
        if raw == [0; 16] {
            continue;
        }
        let v4_mapped = raw[..10] == [0; 10] && raw[10..12] == [0xff, 0xff];
        if v4_mapped {
            best = Some((i as u8, raw));
            break;
        }
        best.get_or_insert((i as u8, raw));
    }
    let (gid_index, gid) = best.unwrap_or((0, [0; 16]));
    Some(PortInfo {
        port,
        lid: pa.lid,
        gid,
        gid_index,
        active_mtu: pa.active_mtu,
    })
}

/// A registered MR pointer (owned by the cache).
#[derive(Debug)]
pub(crate) struct MrPtr(*mut b::ibv_mr);

// SAFETY: an MR handle may be deregistered from any thread.
unsafe impl Send for MrPtr {}

/// A registration as handed out: the key (lkey for `LocalWrite`, rkey for `RemoteRead`) and
/// the exact range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reg {
    pub key: MemKey,
    pub addr: u64,
    pub len: u64,
    pub access: Access,
}

#[derive(Debug)]
struct Entry {
    mr: MrPtr,
    addr: u64,
    len: u64,
    refs: u32,
    /// Last use, for LRU retention.
    stamp: u64,
}

/// The registration cache of a device.
///
/// - `LocalWrite` registrations are shared: registering a range covered by a live
///   `LocalWrite` MR takes a reference to it (no system call) and returns its key; the MR goes
///   when the last reference does, or is retained (up to `retain_max` unused MRs, least
///   recently used dropped first) when retention is on.
/// - `RemoteRead` registrations are never shared nor retained: their key is what the peer may
///   read with, and [`crate::Connection::deregister`] must revoke it at once.
#[derive(Debug, Default)]
struct RegCache {
    /// Keyed by (key, is_remote).
    mrs: HashMap<(u32, bool), Entry>,
    retain_max: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl RegCache {
    fn share_local(&mut self, addr: u64, len: u64) -> Option<Reg> {
        self.clock += 1;
        let clock = self.clock;
        let hit = self
            .mrs
            .iter_mut()
            .find(|((_, remote), e)| !remote && e.addr <= addr && addr + len <= e.addr + e.len);
        match hit {
            Some(((key, _), e)) => {
                e.refs += 1;
                e.stamp = clock;
                self.hits += 1;
                Some(Reg {
                    key: MemKey(*key),
                    addr: e.addr,
                    len: e.len,
                    access: Access::LocalWrite,
                })
            }
            None => None,
        }
    }

    fn insert(&mut self, r: Reg, mr: MrPtr) -> Vec<MrPtr> {
        self.clock += 1;
        self.misses += 1;
        let remote = r.access == Access::RemoteRead;
        self.mrs.insert(
            (r.key.0, remote),
            Entry {
                mr,
                addr: r.addr,
                len: r.len,
                refs: 1,
                stamp: self.clock,
            },
        );
        self.trim()
    }

    fn release(&mut self, key: MemKey, access: Access) -> Vec<MrPtr> {
        let remote = access == Access::RemoteRead;
        let Some(e) = self.mrs.get_mut(&(key.0, remote)) else {
            return Vec::new();
        };
        e.refs = e.refs.saturating_sub(1);
        if e.refs == 0 && (remote || self.retain_max == 0) {
            let e = self.mrs.remove(&(key.0, remote)).expect("present");
            return vec![e.mr];
        }
        self.trim()
    }

    /// Drops the least recently used unreferenced local MRs beyond `retain_max`.
    fn trim(&mut self) -> Vec<MrPtr> {
        let mut idle: Vec<(u64, (u32, bool))> = self
            .mrs
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .map(|(k, e)| (e.stamp, *k))
            .collect();
        if idle.len() <= self.retain_max {
            return Vec::new();
        }
        idle.sort_unstable();
        let excess = idle.len() - self.retain_max;
        idle[..excess]
            .iter()
            .filter_map(|(_, k)| self.mrs.remove(k).map(|e| e.mr))
            .collect()
    }

    fn forget(&mut self, addr: u64, len: u64) -> Vec<MrPtr> {
        let end = addr.saturating_add(len);
        let keys: Vec<(u32, bool)> = self
            .mrs
            .iter()
            .filter(|(_, e)| e.refs == 0 && e.addr < end && addr < e.addr + e.len)
            .map(|(k, _)| *k)
            .collect();
        keys.iter()
            .filter_map(|k| self.mrs.remove(k).map(|e| e.mr))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    fn reg(key: u32, addr: u64, len: u64, access: Access) -> Reg {
        Reg {
            key: MemKey(key),
            addr,
            len,
            access,
        }
    }

    #[test]
    fn cache_local_covered_range_shares_the_mr() {
        let mut c = RegCache::default();
        assert!(
            c.insert(
                reg(1, 4096, 8192, Access::LocalWrite),
                MrPtr(ptr::null_mut())
            )
            .is_empty()
        );
        let r = c.share_local(4096 + 100, 1000).expect("covered");
        assert_eq!(r.key, MemKey(1));
        assert!(c.share_local(4096 + 8000, 1000).is_none(), "not covered");
        assert!(
            c.release(MemKey(1), Access::LocalWrite).is_empty(),
            "one ref left"
        );
        assert_eq!(
            c.release(MemKey(1), Access::LocalWrite).len(),
            1,
            "last ref frees"
        );
        assert!(c.mrs.is_empty());
    }

    #[test]
    fn cache_remote_release_frees_at_once_even_with_retention() {
        let mut c = RegCache {
            retain_max: 8,
            ..Default::default()
        };
        c.insert(reg(7, 0, 100, Access::RemoteRead), MrPtr(ptr::null_mut()));
        assert_eq!(c.release(MemKey(7), Access::RemoteRead).len(), 1);
    }

    #[test]
    fn cache_retention_keeps_lru_bounded_and_forget_drops_overlaps() {
        let mut c = RegCache {
            retain_max: 2,
            ..Default::default()
        };
        for k in 1..=3u32 {
            c.insert(
                reg(k, k as u64 * 1000, 100, Access::LocalWrite),
                MrPtr(ptr::null_mut()),
            );
        }
        assert!(c.release(MemKey(1), Access::LocalWrite).is_empty());
        assert!(c.release(MemKey(2), Access::LocalWrite).is_empty());
        // Third idle MR: the oldest (key 1) goes.
        let gone = c.release(MemKey(3), Access::LocalWrite);
        assert_eq!(gone.len(), 1);
        assert!(!c.mrs.contains_key(&(1, false)));
        assert!(c.share_local(2010, 10).is_some(), "retained MR reused");
        assert_eq!(c.forget(3000, 1).len(), 1, "idle overlapping MR dropped");
        assert!(c.forget(2000, 100).is_empty(), "a referenced MR stays");
    }
}
