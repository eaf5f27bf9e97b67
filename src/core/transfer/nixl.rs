//! The `nixl` backend: NVIDIA's NIXL library (UCX underneath: shared memory or CMA on one host, TCP or RDMA
//! between hosts), opened at run time from `libnixl_capi.so` wherever the loader finds it (`LD_LIBRARY_PATH`;
//! the `nixl-cu12` wheel ships it in `site-packages/.nixl_cu12.mesonpy.libs`).
//!
//! An agent started with this backend runs a NIXL agent beside its own, registers every region with it as
//! DRAM, and hands its NIXL metadata and region addresses (`NixlOffer`) only to peers that passed the keyed
//! handshake, over the same connection. A transfer is one NIXL request over the merged ranges, polled to
//! completion; its notification is NIXL's, which the target's poller hands to the owner as any other.
//!
//! The C API is declared here and resolved with libloading rather than through the `nixl-sys` crate: its
//! build runs bindgen, which needs libclang (absent on this project's build machines) even for its stub, and
//! its stub aborts the process when the library is missing. The few calls used here are the C API's own
//! (`nixl_capi_*`, as its `wrapper.h` declares them); a missing library is an error when the backend is asked
//! for, never at start-up.
use super::{Direction, Notification, Range, TransferError};
use crate::core::protocol::transfer::{MAX_CONTROL_BYTES, NixlOffer};
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The library's file name, as the loader searches for it.
pub const LIBRARY: &str = "libnixl_capi.so";
/// How often the target looks for notifications: a hand-off's lease ends on one, so this bounds how late.
const NOTIFICATION_POLL: Duration = Duration::from_micros(200);

type Handle = *mut c_void;
type Status = c_int;
const SUCCESS: Status = 0;
const IN_PROGRESS: Status = 1;
const DRAM: c_int = 0;
const READ: c_int = 0;
const WRITE: c_int = 1;

/// `nixl_capi_agent_config_t`.
#[repr(C)]
struct AgentConfig {
    enable_prog_thread: bool,
    enable_listen_thread: bool,
    listen_port: c_int,
    thread_sync: c_int,
    num_workers: c_uint,
    pthr_delay_us: u64,
    lthr_delay_us: u64,
    capture_telemetry: bool,
}

/// Declares the calls used, each resolved as `nixl_capi_<name>` when the library is opened.
macro_rules! api {
    ($($name:ident: fn($($arg:ty),*);)*) => {
        struct Api {
            _library: libloading::Library,
            $($name: unsafe extern "C" fn($($arg),*) -> Status,)*
        }

        impl Api {
            fn open() -> Result<Self, String> {
                // SAFETY: loading runs the library's initialisers, which is what using NIXL means; every symbol's
                // type below is the C API's declaration of it.
                unsafe {
                    let library = libloading::Library::new(LIBRARY).map_err(|e| {
                        format!(
                            "cannot open {LIBRARY} ({e}); put the directory holding it on LD_LIBRARY_PATH (pip \
                             install nixl-cu12 puts it in site-packages/.nixl_cu12.mesonpy.libs)"
                        )
                    })?;
                    $(let $name = *library
                        .get::<unsafe extern "C" fn($($arg),*) -> Status>(concat!("nixl_capi_", stringify!($name)))
                        .map_err(|e| format!("{LIBRARY} lacks nixl_capi_{}: {e}", stringify!($name)))?;)*
                    Ok(Self { _library: library, $($name,)* })
                }
            }
        }
    };
}

api! {
    create_configured_agent: fn(*const c_char, *const AgentConfig, *mut Handle);
    destroy_agent: fn(Handle);
    get_plugin_params: fn(Handle, *const c_char, *mut Handle, *mut Handle);
    destroy_mem_list: fn(Handle);
    destroy_params: fn(Handle);
    create_backend: fn(Handle, *const c_char, Handle, *mut Handle);
    create_reg_dlist: fn(c_int, *mut Handle);
    reg_dlist_add_desc: fn(Handle, usize, usize, u64, *const c_void, usize);
    destroy_reg_dlist: fn(Handle);
    register_mem: fn(Handle, Handle, Handle);
    get_local_md: fn(Handle, *mut *mut c_void, *mut usize);
    load_remote_md: fn(Handle, *const c_void, usize, *mut *mut c_char);
    invalidate_remote_md: fn(Handle, *const c_char);
    create_xfer_dlist: fn(c_int, *mut Handle);
    xfer_dlist_add_desc: fn(Handle, usize, usize, u64);
    destroy_xfer_dlist: fn(Handle);
    create_opt_args: fn(*mut Handle);
    destroy_opt_args: fn(Handle);
    opt_args_set_notif_msg: fn(Handle, *const c_void, usize);
    opt_args_set_has_notif: fn(Handle, bool);
    create_xfer_req: fn(Handle, c_int, Handle, Handle, *const c_char, *mut Handle, Handle);
    post_xfer_req: fn(Handle, Handle, Handle);
    get_xfer_status: fn(Handle, Handle);
    release_xfer_req: fn(Handle, Handle);
    destroy_xfer_req: fn(Handle);
    create_notif_map: fn(*mut Handle);
    destroy_notif_map: fn(Handle);
    get_notifs: fn(Handle, Handle, Handle);
    notif_map_size: fn(Handle, *mut usize);
    notif_map_get_agent_at: fn(Handle, usize, *mut *const c_char);
    notif_map_get_notifs_size: fn(Handle, *const c_char, *mut usize);
    notif_map_get_notif: fn(Handle, *const c_char, usize, *mut *const c_void, *mut usize);
    notif_map_clear: fn(Handle);
}

/// The library, opened once per process.
fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(Api::open).as_ref().map_err(Clone::clone)
}

/// Whether NIXL can be used in this process, and why not.
pub fn available() -> Result<(), String> {
    api().map(|_| ())
}

fn check(what: &str, status: Status) -> Result<(), TransferError> {
    match status {
        SUCCESS => Ok(()),
        _ => Err(nixl_error(format!("{what} failed ({})", status_name(status)))),
    }
}

fn status_name(status: Status) -> &'static str {
    match status {
        -1 => "invalid parameter",
        -2 => "backend error",
        -3 => "invalid state",
        -4 => "exception in NIXL",
        -6 => "not found: metadata not loaded, or no backend serves it",
        _ => "error",
    }
}

fn nixl_error(why: String) -> TransferError {
    TransferError::Unavailable { backend: "nixl", why }
}

/// A NIXL object pointer; NIXL's calls on one agent are serialised by `Shared::agent`'s lock.
#[derive(Clone, Copy)]
struct Ptr(Handle);
// SAFETY: only ever used under the agent's lock, or (lists, requests) by the one thread that made them.
unsafe impl Send for Ptr {}

/// The NIXL agent, shared by the owner and its notification poller.
struct Shared {
    api: &'static Api,
    agent: Mutex<Ptr>,
    name: String,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let agent = self.agent.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the agent was made by create_configured_agent and nothing uses it past this point.
        unsafe { (self.api.destroy_agent)(agent.0) };
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ptr> {
        self.agent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// This process's NIXL agent for one transfer agent.
pub(super) struct NixlAgent {
    shared: Arc<Shared>,
    /// Base address of every registered region, in region order.
    addresses: Mutex<Vec<u64>>,
    /// Remote agents whose metadata is loaded, with the peers using each.
    remotes: Mutex<HashMap<String, usize>>,
}

impl NixlAgent {
    /// Opens the library, creates a NIXL agent with a UCX backend and starts handing its notifications to
    /// `notifications` (as from the agent id its sender's name carries).
    pub fn start(id: u64, notifications: mpsc::Sender<Notification>) -> Result<Self, TransferError> {
        let api = api().map_err(nixl_error)?;
        // Unique per process: a restarted worker keeps its id, and a peer must not confuse the two.
        let name = format!("dynamo-{id:016x}-{:08x}", rand::random::<u32>());
        let c_name = CString::new(name.clone()).map_err(|e| nixl_error(e.to_string()))?;
        let config = AgentConfig {
            enable_prog_thread: true,
            enable_listen_thread: false,
            listen_port: 0,
            thread_sync: 0,
            num_workers: 1,
            pthr_delay_us: 0,
            lthr_delay_us: 100_000,
            capture_telemetry: false,
        };
        let mut agent: Handle = std::ptr::null_mut();
        // SAFETY: valid C string and config; the out pointer is ours.
        check("creating a NIXL agent", unsafe { (api.create_configured_agent)(c_name.as_ptr(), &config, &mut agent) })?;
        let shared = Arc::new(Shared { api, agent: Mutex::new(Ptr(agent)), name });
        create_ucx_backend(&shared)?;
        let poller = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("nixl-notifications".into())
            .spawn(move || poll_notifications(poller, notifications))
            .map_err(TransferError::Io)?;
        Ok(Self { shared, addresses: Mutex::default(), remotes: Mutex::default() })
    }

    /// Registers `len` bytes at `address` (a region's mapping, which outlives this agent) as DRAM, as the
    /// next region. Its address is offered even when NIXL refused it, so the others keep their ids; a
    /// transfer touching it then fails in NIXL.
    pub fn register(&self, address: u64, len: u64) -> Result<(), TransferError> {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner()).push(address);
        let api = self.shared.api;
        // SAFETY: out pointer given by `make`.
        let list = Owned::make("creating a NIXL registration list", api.destroy_reg_dlist, |out| unsafe {
            (api.create_reg_dlist)(DRAM, out)
        })?;
        // SAFETY: a live list, and the range is a live mapping; no metadata blob.
        let status =
            unsafe { (api.reg_dlist_add_desc)(list.ptr, address as usize, len as usize, 0, std::ptr::null(), 0) };
        check("describing memory for NIXL", status)?;
        // SAFETY: a live agent under its lock and a live list; no optional arguments.
        let status = unsafe { (api.register_mem)(self.shared.lock().0, list.ptr, std::ptr::null_mut()) };
        check("registering memory with NIXL", status)
    }

    /// What a proven peer needs to move this agent's regions.
    pub fn offer(&self) -> Result<NixlOffer, TransferError> {
        let api = self.shared.api;
        let (mut data, mut len): (*mut c_void, usize) = (std::ptr::null_mut(), 0);
        // SAFETY: a live agent under its lock; out pointers ours.
        check("reading NIXL's local metadata", unsafe {
            (api.get_local_md)(self.shared.lock().0, &mut data, &mut len)
        })?;
        if data.is_null() {
            return Err(nixl_error("NIXL gave no local metadata".into()));
        }
        // SAFETY: NIXL returned `len` bytes at `data`, allocated with malloc, now ours to copy and free.
        let metadata = unsafe {
            let bytes = std::slice::from_raw_parts(data as *const u8, len).to_vec();
            libc::free(data);
            bytes
        };
        let addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(NixlOffer { name: self.shared.name.clone(), metadata, addresses })
    }

    /// Loads a peer's metadata (once per remote agent, however many peers use it).
    pub fn load(self: &Arc<Self>, offer: &NixlOffer) -> Result<RemoteAgent, TransferError> {
        if offer.metadata.len() as u64 > MAX_CONTROL_BYTES {
            return Err(nixl_error("the peer's NIXL metadata is oversized".into()));
        }
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        if !remotes.contains_key(&offer.name) {
            let mut name: *mut c_char = std::ptr::null_mut();
            let api = self.shared.api;
            // SAFETY: a live agent under its lock; NIXL parses the bytes (bounded above); out pointer ours.
            check("loading the peer's NIXL metadata", unsafe {
                (api.load_remote_md)(
                    self.shared.lock().0,
                    offer.metadata.as_ptr() as *const c_void,
                    offer.metadata.len(),
                    &mut name,
                )
            })?;
            if !name.is_null() {
                // SAFETY: a NUL-terminated string NIXL allocated with malloc, ours to free.
                let loaded = unsafe {
                    let loaded = CStr::from_ptr(name).to_string_lossy().into_owned();
                    libc::free(name as *mut c_void);
                    loaded
                };
                if loaded != offer.name {
                    return Err(nixl_error(format!(
                        "the peer offered NIXL agent {} but its metadata is {loaded}'s",
                        offer.name
                    )));
                }
            }
        }
        *remotes.entry(offer.name.clone()).or_default() += 1;
        let name = CString::new(offer.name.clone()).map_err(|e| nixl_error(e.to_string()))?;
        Ok(RemoteAgent { agent: self.clone(), name, addresses: offer.addresses.clone() })
    }

    /// Moves every range as one NIXL request and waits for it, on the blocking pool (the status is polled).
    async fn transfer(
        &self,
        remote: &RemoteAgent,
        direction: Direction,
        ranges: &[Range],
        notification: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), TransferError> {
        let mut pairs = Vec::with_capacity(ranges.len());
        for range in ranges {
            let base = remote.addresses.get(range.remote.region as usize).ok_or_else(|| {
                TransferError::Descriptors(format!("the peer's NIXL offer lacks region {}", range.remote.region))
            })?;
            let local = range.region.as_mut_ptr() as u64 + range.local.offset;
            pairs.push((local, base + range.remote.offset, range.local.len));
        }
        // The regions stay mapped while the request may touch them: released before this returns.
        let keep: Vec<_> = ranges.iter().map(|r| r.region.clone()).collect();
        let shared = self.shared.clone();
        let name = remote.name.clone();
        let notification = notification.map(<[u8]>::to_vec);
        let moved = tokio::task::spawn_blocking(move || {
            let moved = run_request(&shared, &name, direction, &pairs, notification.as_deref(), timeout);
            drop(keep);
            moved
        });
        moved.await.map_err(|e| nixl_error(format!("the NIXL request's thread failed: {e}")))?
    }
}

/// A peer's NIXL agent, loaded into this one.
pub(super) struct RemoteAgent {
    agent: Arc<NixlAgent>,
    name: CString,
    addresses: Vec<u64>,
}

impl RemoteAgent {
    pub async fn transfer(
        &self,
        direction: Direction,
        ranges: &[Range],
        notification: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), TransferError> {
        self.agent.transfer(self, direction, ranges, notification, timeout).await
    }
}

impl Drop for RemoteAgent {
    fn drop(&mut self) {
        let mut remotes = self.agent.remotes.lock().unwrap_or_else(|p| p.into_inner());
        let name = self.name.to_string_lossy().into_owned();
        let Some(users) = remotes.get_mut(&name) else { return };
        *users -= 1;
        if *users == 0 {
            remotes.remove(&name);
            // SAFETY: a live agent under its lock and a valid C string; a failure leaves stale metadata only.
            unsafe { (self.agent.shared.api.invalidate_remote_md)(self.agent.shared.lock().0, self.name.as_ptr()) };
        }
    }
}

fn create_ucx_backend(shared: &Shared) -> Result<(), TransferError> {
    let api = shared.api;
    let agent = shared.lock();
    let (mut mems, mut params, mut backend): (Handle, Handle, Handle) =
        (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: a live agent under its lock, a C string literal, out pointers ours.
    check("finding NIXL's UCX plugin", unsafe {
        (api.get_plugin_params)(agent.0, c"UCX".as_ptr(), &mut mems, &mut params)
    })
    .map_err(|e| nixl_error(format!("{e}; is the plugins directory beside {LIBRARY}?")))?;
    // SAFETY: as above, with the plugin's default parameters just read.
    let created = check("starting NIXL's UCX backend", unsafe {
        (api.create_backend)(agent.0, c"UCX".as_ptr(), params, &mut backend)
    });
    // SAFETY: both were handed to us by get_plugin_params; the backend belongs to the agent from here on.
    unsafe {
        (api.destroy_mem_list)(mems);
        (api.destroy_params)(params);
    }
    created
}

/// A NIXL object of ours, destroyed when dropped.
struct Owned {
    ptr: Handle,
    destroy: unsafe extern "C" fn(Handle) -> Status,
}

impl Owned {
    /// Runs `create` with an out pointer; the object it made, or why it could not.
    fn make(
        what: &str,
        destroy: unsafe extern "C" fn(Handle) -> Status,
        create: impl FnOnce(*mut Handle) -> Status,
    ) -> Result<Self, TransferError> {
        let mut ptr: Handle = std::ptr::null_mut();
        check(what, create(&mut ptr))?;
        Ok(Self { ptr, destroy })
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: made by the call `destroy` pairs with, and used by nobody past this point.
            unsafe { (self.destroy)(self.ptr) };
        }
    }
}

/// Builds, posts and waits for one request; releases it whatever happens.
fn run_request(
    shared: &Shared,
    remote: &CStr,
    direction: Direction,
    pairs: &[(u64, u64, u64)],
    notification: Option<&[u8]>,
    timeout: Duration,
) -> Result<(), TransferError> {
    let api = shared.api;
    let list = |address: fn(&(u64, u64, u64)) -> u64| -> Result<Owned, TransferError> {
        // SAFETY: out pointer given by `make`.
        let list = Owned::make("creating a NIXL descriptor list", api.destroy_xfer_dlist, |out| unsafe {
            (api.create_xfer_dlist)(DRAM, out)
        })?;
        for pair in pairs {
            // SAFETY: a live list; the address is only recorded here.
            unsafe { (api.xfer_dlist_add_desc)(list.ptr, address(pair) as usize, pair.2 as usize, 0) };
        }
        Ok(list)
    };
    let (local, remote_list) = (list(|p| p.0)?, list(|p| p.1)?);
    // SAFETY: out pointer given by `make`.
    let args = Owned::make("creating NIXL options", api.destroy_opt_args, |out| unsafe { (api.create_opt_args)(out) })?;
    if let Some(message) = notification {
        // SAFETY: live options; NIXL copies the message.
        unsafe {
            (api.opt_args_set_notif_msg)(args.ptr, message.as_ptr() as *const c_void, message.len());
            (api.opt_args_set_has_notif)(args.ptr, true);
        }
    }
    let op = match direction {
        Direction::Write => WRITE,
        Direction::Read => READ,
    };
    // SAFETY: a live agent under its lock, live lists and options, a valid C string; out pointer from `make`.
    let request = Owned::make("creating the NIXL request", api.destroy_xfer_req, |out| unsafe {
        (api.create_xfer_req)(shared.lock().0, op, local.ptr, remote_list.ptr, remote.as_ptr(), out, args.ptr)
    })?;
    // The request copied what it needs from the lists.
    drop((local, remote_list));
    let outcome = wait(shared, request.ptr, args.ptr, timeout);
    // SAFETY: a request of this agent; releasing one still in flight aborts it before its memory is let go.
    unsafe { (api.release_xfer_req)(shared.lock().0, request.ptr) };
    outcome
}

fn wait(shared: &Shared, request: Handle, args: Handle, timeout: Duration) -> Result<(), TransferError> {
    let api = shared.api;
    let deadline = Instant::now() + timeout;
    // SAFETY: a live agent under its lock, a request just made, live options.
    let mut status = unsafe { (api.post_xfer_req)(shared.lock().0, request, args) };
    let mut polls = 0u32;
    while status == IN_PROGRESS {
        if Instant::now() >= deadline {
            return Err(TransferError::Timeout(timeout));
        }
        // Spin briefly (a small request completes in microseconds), then yield the core.
        polls += 1;
        if polls > 64 {
            std::thread::sleep(Duration::from_micros(20));
        } else {
            std::hint::spin_loop();
        }
        // SAFETY: as above.
        status = unsafe { (api.get_xfer_status)(shared.lock().0, request) };
    }
    check("the NIXL transfer", status)
}

/// Hands NIXL's notifications to the owner until the agent is dropped.
fn poll_notifications(shared: Weak<Shared>, notifications: mpsc::Sender<Notification>) {
    let Some(api) = shared.upgrade().map(|s| s.api) else { return };
    let mut map: Handle = std::ptr::null_mut();
    // SAFETY: out pointer ours.
    if unsafe { (api.create_notif_map)(&mut map) } != SUCCESS {
        tracing::error!("NIXL notifications cannot be read: no notification map");
        return;
    }
    while let Some(shared) = shared.upgrade() {
        // SAFETY: a live agent under its lock and our map; no options.
        let status = unsafe { (api.get_notifs)(shared.lock().0, map, std::ptr::null_mut()) };
        drop(shared);
        if status == SUCCESS {
            // SAFETY: our map, just filled.
            for notification in unsafe { drain(api, map) } {
                if let Err(mpsc::error::TrySendError::Full(_)) = notifications.try_send(notification) {
                    tracing::warn!("NIXL notifications dropped: nobody reads them");
                }
            }
        }
        std::thread::sleep(NOTIFICATION_POLL);
    }
    // SAFETY: our map, no longer used.
    unsafe { (api.destroy_notif_map)(map) };
}

/// Every notification in `map`, which is left empty; oversized ones are dropped, as on the other backends.
///
/// # Safety
/// `map` is a live notification map of this library.
unsafe fn drain(api: &Api, map: Handle) -> Vec<Notification> {
    let mut out = Vec::new();
    let mut agents = 0usize;
    // SAFETY: every call is on a live map; pointers NIXL returns stay valid until the map is cleared below.
    unsafe {
        (api.notif_map_size)(map, &mut agents);
        for i in 0..agents {
            let mut name: *const c_char = std::ptr::null();
            if (api.notif_map_get_agent_at)(map, i, &mut name) != SUCCESS || name.is_null() {
                continue;
            }
            let from = agent_id(&CStr::from_ptr(name).to_string_lossy());
            let mut count = 0usize;
            (api.notif_map_get_notifs_size)(map, name, &mut count);
            for j in 0..count {
                let (mut data, mut len): (*const c_void, usize) = (std::ptr::null(), 0);
                if (api.notif_map_get_notif)(map, name, j, &mut data, &mut len) != SUCCESS {
                    continue;
                }
                if len as u64 > MAX_CONTROL_BYTES {
                    tracing::warn!("an oversized NIXL notification ({len} bytes) from agent {from:016x} was dropped");
                    continue;
                }
                let message = if data.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(data as *const u8, len).to_vec()
                };
                out.push(Notification { from, message });
            }
        }
        (api.notif_map_clear)(map);
    }
    out
}

/// The agent id in a dynamo NIXL agent's name (`dynamo-<id hex>-<nonce>`); 0 for another NIXL user's agent.
fn agent_id(name: &str) -> u64 {
    name.strip_prefix("dynamo-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notifications_sender_is_known_by_the_id_in_its_agent_name() {
        assert_eq!(agent_id("dynamo-00000000000000ff-1a2b3c4d"), 255);
        assert_eq!(agent_id("vllm-engine-0"), 0, "another NIXL user's agent");
        assert_eq!(agent_id("dynamo-zz-1"), 0);
    }

    #[test]
    fn a_status_says_what_failed() {
        assert!(check("x", SUCCESS).is_ok());
        let error = check("loading the peer's NIXL metadata", -6).unwrap_err().to_string();
        assert!(error.contains("loading the peer's NIXL metadata failed (not found"), "{error}");
    }
}
