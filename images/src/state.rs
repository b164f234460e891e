//! The image's own types for the kernel-facing state of `process.json`:
//! register sets, queued signals, signal dispositions, alternate stacks,
//! rseq registrations, seccomp filters, scheduling, the vDSO's placement
//! and the fd table.
//!
//! The `sys` crate has live counterparts of each (what capture reads from
//! the kernel and restore hands back to it). They are kept apart, as a
//! snapshot's state types are kept apart from the objects they describe:
//! a change to a `sys` type cannot change what an image holds, because
//! `process.json` is written and read only through the types here, and
//! each crossing between the two is an explicit conversion (`From` both
//! ways, below).
//!
//! These types are the representation of format version
//! [`FORMAT_VERSION`](crate::FORMAT_VERSION) (2). The tests in
//! `tests/format_v2_fixtures.rs` load files written at that version and
//! check that they are written back byte for byte: a change here that
//! alters the JSON must come with a new version, and a reader of the old.

use serde::{Deserialize, Serialize};

/// The register state of one thread. Byte blobs are the kernel's regsets
/// verbatim, as hex strings. Fields added after the first image format
/// are `#[serde(default)]`, so older images still deserialize.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RegsState {
    /// `"x86_64"` or `"aarch64"`.
    pub arch: String,
    /// `NT_PRSTATUS`.
    #[serde(with = "hex_bytes")]
    pub gp: Vec<u8>,
    /// `NT_PRFPREG`.
    #[serde(default, with = "hex_bytes_opt")]
    pub fp: Option<Vec<u8>>,
    /// x86 `NT_X86_XSTATE` (standard XSAVE format); `None` without XSAVE.
    #[serde(default, with = "hex_bytes_opt")]
    pub xstate: Option<Vec<u8>>,
    /// arm64 `NT_ARM_TLS`.
    #[serde(default, with = "hex_bytes_opt")]
    pub tls: Option<Vec<u8>>,
    /// arm64 pointer-authentication keys; `None` on x86, on CPUs/kernels
    /// without PAC, and in images written before PAC support.
    #[serde(default)]
    pub pac: Option<PacKeysState>,
}

/// arm64 pointer-authentication state of a thread; every part optional.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct PacKeysState {
    /// `struct user_pac_address_keys`.
    #[serde(default)]
    pub address: Option<PacAddressKeysState>,
    /// The APGA key, two u64 in memory order.
    #[serde(default)]
    pub generic: Option<[u64; 2]>,
    /// `PR_PAC_AP*KEY` bits of the enabled keys.
    #[serde(default)]
    pub enabled_keys: Option<u64>,
}

/// The four address keys, each a `__uint128_t` as two u64 in memory order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacAddressKeysState {
    pub apia: [u64; 2],
    pub apib: [u64; 2],
    pub apda: [u64; 2],
    pub apdb: [u64; 2],
}

/// One queued signal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PendingSignalState {
    pub signo: i32,
    /// `si_code`.
    pub code: i32,
    /// The 128-byte `siginfo_t` as the kernel gave it, as hex.
    #[serde(with = "hex_bytes")]
    pub siginfo: Vec<u8>,
}

/// A signal's disposition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigActionState {
    pub signo: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// A thread's alternate signal stack (`SS_*` flags as `sigaltstack`
/// reports them).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct AltStackState {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// A thread's rseq registration.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RseqState {
    /// Address of the thread's `struct rseq`.
    pub abi_pointer: u64,
    /// The length it was registered with (32 or more).
    pub abi_size: u32,
    /// The signature every abort handler must be preceded by.
    pub signature: u32,
    pub flags: u32,
}

/// One classic-BPF seccomp filter.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SeccompFilterState {
    /// Each `struct sock_filter` as its 8 bytes in native order.
    pub insns: Vec<u64>,
    /// `SECCOMP_FILTER_FLAG_*`.
    pub flags: u64,
}

/// A thread's scheduling: policy, nice, priority, CPU affinity, I/O
/// priority.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SchedState {
    /// `SCHED_*`.
    pub policy: u32,
    /// `SCHED_FLAG_RESET_ON_FORK`.
    #[serde(default)]
    pub reset_on_fork: bool,
    pub nice: i32,
    /// The real-time priority (SCHED_FIFO, SCHED_RR; else 0).
    pub priority: u32,
    /// SCHED_DEADLINE parameters (ns; else 0).
    #[serde(default)]
    pub runtime_ns: u64,
    #[serde(default)]
    pub deadline_ns: u64,
    #[serde(default)]
    pub period_ns: u64,
    /// The CPUs the thread may run on.
    pub cpus: Vec<u32>,
    /// The raw I/O priority (class << 13 | level).
    pub ioprio: u16,
}

/// Where the process's vDSO areas were (`(start, end)`, end exclusive) and
/// what its vDSO was.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct VdsoState {
    pub vdso: Option<(u64, u64)>,
    pub vvar: Option<(u64, u64)>,
    pub vvar_vclock: Option<(u64, u64)>,
    /// crc32 of the whole `[vdso]` mapping's bytes (0 without a vDSO).
    pub vdso_crc32: u32,
    /// Length of the `[vdso]` mapping (0 without a vDSO).
    pub vdso_len: u64,
    /// Defined dynamic symbols, sorted by name then offset.
    pub symbols: Vec<VdsoSymbolState>,
}

/// One exported symbol of the vDSO.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VdsoSymbolState {
    pub name: String,
    /// From the start of the `[vdso]` mapping.
    pub offset: u64,
    pub size: u64,
}

/// One fd of the process.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FdState {
    pub fd: i32,
    pub kind: FdKindState,
    /// fdinfo `flags:`: access mode, status flags, O_CLOEXEC.
    pub flags: i32,
    /// The file offset.
    pub pos: u64,
    /// The mount the file was opened through.
    pub mnt_id: Option<u64>,
}

/// What an fd referred to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum FdKindState {
    /// A regular file (also a memfd).
    File {
        /// As the kernel printed it, without ` (deleted)`.
        path: String,
        deleted: bool,
        dev: u64,
        ino: u64,
        size: u64,
    },
    /// An anonymous pipe end.
    Pipe {
        ino: u64,
        read_end: bool,
    },
    /// A named pipe.
    Fifo {
        path: String,
        #[serde(default)]
        dev: u64,
        #[serde(default)]
        ino: u64,
    },
    CharDev {
        path: String,
        rdev: u64,
    },
    /// A terminal.
    Tty {
        path: String,
        rdev: u64,
    },
    Dir {
        path: String,
    },
    Socket {
        ino: u64,
    },
    /// An anonymous inode, by its link without `anon_inode:`.
    Anon {
        what: String,
    },
    /// An eventfd: its counter and whether it counts as a semaphore.
    EventFd {
        count: u64,
        semaphore: bool,
    },
    /// An epoll and the files registered in it, each by the fd number it
    /// was registered under (an fd of this image, checked at the dump to
    /// still be that file).
    Epoll {
        targets: Vec<EpollTargetState>,
    },
    /// A timerfd: clock, the flags of its last settime, the time left to
    /// its next expiration (zero: disarmed), its interval and the
    /// expirations not yet read.
    TimerFd {
        clockid: i32,
        settime_flags: i32,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
        /// An absolute timer on a REALTIME clock: its deadline (ns since
        /// the epoch), kept as it was.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        realtime_deadline_ns: Option<u64>,
    },
    /// A signalfd: bit `n - 1` for signal `n`.
    SignalFd {
        mask: u64,
    },
    /// A TCP or UDP socket without a connection: listening (TCP, with no
    /// connection waiting), bound, or neither.
    InetSocket {
        /// AF_INET 2, AF_INET6 10.
        family: u8,
        /// IPPROTO_TCP 6, IPPROTO_UDP 17.
        protocol: u8,
        /// The address it is bound to (port 0 and no address: unbound).
        addr: String,
        /// Listening, with this backlog.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen: Option<u32>,
        reuseaddr: bool,
        reuseport: bool,
        keepalive: bool,
        nodelay: bool,
        v6only: bool,
    },
    /// A unix socket: one end of a connection whose other end is another
    /// socket of the image (a socketpair, or a connection accepted from a
    /// listener of the image: that end has the listener's name), or a
    /// socket bound to a name (listening, or a datagram socket) with no
    /// peer (`peer` 0). What is queued to be read from it is in `pipes/`
    /// (`FdImage::pipe_data`, messages as `sys::unix_sockets::encode`
    /// writes them).
    UnixSocket {
        ino: u64,
        peer: u64,
        /// SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5.
        sock_type: u8,
        /// RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2.
        shutdown: u8,
        /// The name it is bound to: an absolute path, or `\0` and an
        /// abstract name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<Vec<u8>>,
        /// Listening, with this backlog.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen: Option<u32>,
        /// For a socket bound to a path (not an accepted connection): the
        /// socket file as the dump found it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<UnixSocketFile>,
    },
    /// Anything else: the link as read.
    Other {
        link: String,
    },
}

/// The file a unix socket bound to a path made: its (device, inode) at
/// the dump (a stale one left by the dumped process is replaced at the
/// restore, nothing else), permission bits and owner.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixSocketFile {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One file registered in an epoll.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpollTargetState {
    pub tfd: i32,
    /// The events mask with EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE,
    /// EPOLLWAKEUP.
    pub events: u32,
    pub data: u64,
}

impl FdKindState {
    /// One of the event kinds from its state as the kernel printed it.
    pub fn from_event(s: sys::event_fds::EventFdState) -> FdKindState {
        use sys::event_fds::EventFdState as E;
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        match s {
            E::EventFd(e) => FdKindState::EventFd {
                count: e.count,
                semaphore: e.semaphore,
            },
            E::Epoll(t) => FdKindState::Epoll {
                targets: t
                    .into_iter()
                    .map(|t| EpollTargetState {
                        tfd: t.tfd,
                        events: t.events,
                        data: t.data,
                    })
                    .collect(),
            },
            E::TimerFd(t) => FdKindState::TimerFd {
                clockid: t.clockid,
                settime_flags: t.settime_flags,
                value_ns: ns(t.value),
                interval_ns: ns(t.interval),
                ticks: t.ticks,
                realtime_deadline_ns: t.realtime_deadline.map(ns),
            },
            E::SignalFd(s) => FdKindState::SignalFd { mask: s.mask },
        }
    }
}

// ---- Conversions to and from the live `sys` types ----

impl From<sys::regs::ThreadRegs> for RegsState {
    fn from(r: sys::regs::ThreadRegs) -> Self {
        RegsState {
            arch: r.arch,
            gp: r.gp,
            fp: r.fp,
            xstate: r.xstate,
            tls: r.tls,
            pac: r.pac.map(Into::into),
        }
    }
}

impl From<RegsState> for sys::regs::ThreadRegs {
    fn from(r: RegsState) -> Self {
        sys::regs::ThreadRegs {
            arch: r.arch,
            gp: r.gp,
            fp: r.fp,
            xstate: r.xstate,
            tls: r.tls,
            pac: r.pac.map(Into::into),
        }
    }
}

impl From<sys::regs::PacKeys> for PacKeysState {
    fn from(k: sys::regs::PacKeys) -> Self {
        PacKeysState {
            address: k.address.map(Into::into),
            generic: k.generic,
            enabled_keys: k.enabled_keys,
        }
    }
}

impl From<PacKeysState> for sys::regs::PacKeys {
    fn from(k: PacKeysState) -> Self {
        sys::regs::PacKeys {
            address: k.address.map(Into::into),
            generic: k.generic,
            enabled_keys: k.enabled_keys,
        }
    }
}

impl From<sys::regs::PacAddressKeys> for PacAddressKeysState {
    fn from(k: sys::regs::PacAddressKeys) -> Self {
        PacAddressKeysState {
            apia: k.apia,
            apib: k.apib,
            apda: k.apda,
            apdb: k.apdb,
        }
    }
}

impl From<PacAddressKeysState> for sys::regs::PacAddressKeys {
    fn from(k: PacAddressKeysState) -> Self {
        sys::regs::PacAddressKeys {
            apia: k.apia,
            apib: k.apib,
            apda: k.apda,
            apdb: k.apdb,
        }
    }
}

impl From<sys::signals::PendingSignal> for PendingSignalState {
    fn from(s: sys::signals::PendingSignal) -> Self {
        PendingSignalState {
            signo: s.signo,
            code: s.code,
            siginfo: s.siginfo,
        }
    }
}

impl From<PendingSignalState> for sys::signals::PendingSignal {
    fn from(s: PendingSignalState) -> Self {
        sys::signals::PendingSignal {
            signo: s.signo,
            code: s.code,
            siginfo: s.siginfo,
        }
    }
}

impl From<sys::signals::SigAction> for SigActionState {
    fn from(a: sys::signals::SigAction) -> Self {
        SigActionState {
            signo: a.signo,
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        }
    }
}

impl From<SigActionState> for sys::signals::SigAction {
    fn from(a: SigActionState) -> Self {
        sys::signals::SigAction {
            signo: a.signo,
            handler: a.handler,
            flags: a.flags,
            restorer: a.restorer,
            mask: a.mask,
        }
    }
}

impl From<sys::signals::AltStack> for AltStackState {
    fn from(a: sys::signals::AltStack) -> Self {
        AltStackState {
            sp: a.sp,
            flags: a.flags,
            size: a.size,
        }
    }
}

impl From<AltStackState> for sys::signals::AltStack {
    fn from(a: AltStackState) -> Self {
        sys::signals::AltStack {
            sp: a.sp,
            flags: a.flags,
            size: a.size,
        }
    }
}

impl From<sys::rseq::RseqRegistration> for RseqState {
    fn from(r: sys::rseq::RseqRegistration) -> Self {
        RseqState {
            abi_pointer: r.abi_pointer,
            abi_size: r.abi_size,
            signature: r.signature,
            flags: r.flags,
        }
    }
}

impl From<RseqState> for sys::rseq::RseqRegistration {
    fn from(r: RseqState) -> Self {
        sys::rseq::RseqRegistration {
            abi_pointer: r.abi_pointer,
            abi_size: r.abi_size,
            signature: r.signature,
            flags: r.flags,
        }
    }
}

impl From<sys::seccomp::SeccompFilter> for SeccompFilterState {
    fn from(f: sys::seccomp::SeccompFilter) -> Self {
        SeccompFilterState {
            insns: f.insns,
            flags: f.flags,
        }
    }
}

impl From<SeccompFilterState> for sys::seccomp::SeccompFilter {
    fn from(f: SeccompFilterState) -> Self {
        sys::seccomp::SeccompFilter {
            insns: f.insns,
            flags: f.flags,
        }
    }
}

impl From<sys::sched::Scheduling> for SchedState {
    fn from(s: sys::sched::Scheduling) -> Self {
        SchedState {
            policy: s.policy,
            reset_on_fork: s.reset_on_fork,
            nice: s.nice,
            priority: s.priority,
            runtime_ns: s.runtime_ns,
            deadline_ns: s.deadline_ns,
            period_ns: s.period_ns,
            cpus: s.cpus,
            ioprio: s.ioprio,
        }
    }
}

impl From<SchedState> for sys::sched::Scheduling {
    fn from(s: SchedState) -> Self {
        sys::sched::Scheduling {
            policy: s.policy,
            reset_on_fork: s.reset_on_fork,
            nice: s.nice,
            priority: s.priority,
            runtime_ns: s.runtime_ns,
            deadline_ns: s.deadline_ns,
            period_ns: s.period_ns,
            cpus: s.cpus,
            ioprio: s.ioprio,
        }
    }
}

impl From<sys::vdso::VdsoLayout> for VdsoState {
    fn from(v: sys::vdso::VdsoLayout) -> Self {
        VdsoState {
            vdso: v.vdso,
            vvar: v.vvar,
            vvar_vclock: v.vvar_vclock,
            vdso_crc32: v.vdso_crc32,
            vdso_len: v.vdso_len,
            symbols: v
                .symbols
                .into_iter()
                .map(|s| VdsoSymbolState {
                    name: s.name,
                    offset: s.offset,
                    size: s.size,
                })
                .collect(),
        }
    }
}

impl From<VdsoState> for sys::vdso::VdsoLayout {
    fn from(v: VdsoState) -> Self {
        sys::vdso::VdsoLayout {
            vdso: v.vdso,
            vvar: v.vvar,
            vvar_vclock: v.vvar_vclock,
            vdso_crc32: v.vdso_crc32,
            vdso_len: v.vdso_len,
            symbols: v
                .symbols
                .into_iter()
                .map(|s| sys::vdso::VdsoSymbol {
                    name: s.name,
                    offset: s.offset,
                    size: s.size,
                })
                .collect(),
        }
    }
}

impl From<sys::fds::FdInfo> for FdState {
    fn from(f: sys::fds::FdInfo) -> Self {
        FdState {
            fd: f.fd,
            kind: f.kind.into(),
            flags: f.flags,
            pos: f.pos,
            mnt_id: f.mnt_id,
        }
    }
}

impl From<FdState> for sys::fds::FdInfo {
    fn from(f: FdState) -> Self {
        sys::fds::FdInfo {
            fd: f.fd,
            kind: f.kind.into(),
            flags: f.flags,
            pos: f.pos,
            mnt_id: f.mnt_id,
        }
    }
}

impl From<sys::fds::FdKind> for FdKindState {
    fn from(k: sys::fds::FdKind) -> Self {
        use sys::fds::FdKind as K;
        match k {
            K::File {
                path,
                deleted,
                dev,
                ino,
                size,
            } => FdKindState::File {
                path,
                deleted,
                dev,
                ino,
                size,
            },
            K::Pipe { ino, read_end } => FdKindState::Pipe { ino, read_end },
            K::Fifo { path, dev, ino } => FdKindState::Fifo { path, dev, ino },
            K::CharDev { path, rdev } => FdKindState::CharDev { path, rdev },
            K::Tty { path, rdev } => FdKindState::Tty { path, rdev },
            K::Dir { path } => FdKindState::Dir { path },
            K::Socket { ino } => FdKindState::Socket { ino },
            K::Anon { what } => FdKindState::Anon { what },
            K::Other { link } => FdKindState::Other { link },
        }
    }
}

impl From<FdKindState> for sys::fds::FdKind {
    fn from(k: FdKindState) -> Self {
        use sys::fds::FdKind as K;
        match k {
            FdKindState::File {
                path,
                deleted,
                dev,
                ino,
                size,
            } => K::File {
                path,
                deleted,
                dev,
                ino,
                size,
            },
            FdKindState::Pipe { ino, read_end } => K::Pipe { ino, read_end },
            FdKindState::Fifo { path, dev, ino } => K::Fifo { path, dev, ino },
            FdKindState::CharDev { path, rdev } => K::CharDev { path, rdev },
            FdKindState::Tty { path, rdev } => K::Tty { path, rdev },
            FdKindState::Dir { path } => K::Dir { path },
            FdKindState::Socket { ino } => K::Socket { ino },
            FdKindState::Anon { what } => K::Anon { what },
            FdKindState::EventFd { .. } => K::Anon {
                what: "[eventfd]".into(),
            },
            FdKindState::Epoll { .. } => K::Anon {
                what: "[eventpoll]".into(),
            },
            FdKindState::TimerFd { .. } => K::Anon {
                what: "[timerfd]".into(),
            },
            FdKindState::SignalFd { .. } => K::Anon {
                what: "[signalfd]".into(),
            },
            FdKindState::UnixSocket { ino, .. } => K::Socket { ino },
            FdKindState::InetSocket { .. } => K::Socket { ino: 0 },
            FdKindState::Other { link } => K::Other { link },
        }
    }
}

// ---- Byte blobs as hex ----

/// Serde helper for byte blobs: a lowercase hex string in human-readable
/// formats (JSON images stay compact and diffable), raw bytes otherwise.
/// Deserializing also accepts a sequence of numbers.
pub(crate) mod hex_bytes {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn encode(b: &[u8]) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(b.len() * 2);
        for &x in b {
            s.push(DIGITS[(x >> 4) as usize] as char);
            s.push(DIGITS[(x & 15) as usize] as char);
        }
        s
    }

    /// `None` for odd lengths or non-hex characters.
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        fn nibble(c: u8) -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            }
        }
        let s = s.as_bytes();
        if !s.len().is_multiple_of(2) {
            return None;
        }
        s.chunks_exact(2)
            .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
            .collect()
    }

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&encode(b))
        } else {
            s.serialize_bytes(b)
        }
    }

    pub(super) struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a hex string or a byte array")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            decode(v).ok_or_else(|| {
                E::custom(format_args!(
                    "invalid hex string of {} characters (odd length or a non-hex character)",
                    v.len()
                ))
            })
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if d.is_human_readable() {
            d.deserialize_any(BytesVisitor)
        } else {
            d.deserialize_byte_buf(BytesVisitor)
        }
    }
}

/// [`hex_bytes`] for `Option<Vec<u8>>` (`null` / absent is `None`).
mod hex_bytes_opt {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serialize, Serializer};

    use super::hex_bytes::{self, BytesVisitor};

    struct Hex<'a>(&'a [u8]);

    impl Serialize for Hex<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            hex_bytes::serialize(self.0, s)
        }
    }

    pub fn serialize<S: Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_some(&Hex(b)),
            None => s.serialize_none(),
        }
    }

    struct OptVisitor;

    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("null, a hex string or a byte array")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            hex_bytes::deserialize(d).map(Some)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            BytesVisitor.visit_str(v).map(Some)
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            Ok(Some(v.to_vec()))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            BytesVisitor.visit_seq(seq).map(Some)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        if d.is_human_readable() {
            d.deserialize_any(OptVisitor)
        } else {
            d.deserialize_option(OptVisitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sys -> state -> JSON -> state -> sys gives the original back, and
    /// the JSON parses to the same state.
    fn round_trip<L, S>(live: L)
    where
        L: Clone + PartialEq + std::fmt::Debug + From<S>,
        S: From<L> + Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let state = S::from(live.clone());
        let json = serde_json::to_string(&state).unwrap();
        let back: S = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state, "{json}");
        assert_eq!(L::from(back), live, "{json}");
    }

    #[test]
    fn every_fd_kind_comes_back() {
        use sys::fds::FdKind as K;
        let kinds = [
            K::File {
                path: "/var/tmp/a b".into(),
                deleted: true,
                dev: 65024,
                ino: u64::MAX,
                size: 1 << 40,
            },
            K::Pipe {
                ino: 7,
                read_end: true,
            },
            K::Fifo {
                path: "/run/f".into(),
                dev: 1,
                ino: 2,
            },
            K::CharDev {
                path: "/dev/null".into(),
                rdev: 259,
            },
            K::Tty {
                path: "/dev/pts/0".into(),
                rdev: 34816,
            },
            K::Dir { path: "/".into() },
            K::Socket { ino: 9 },
            K::Anon {
                what: "[eventfd]".into(),
            },
            K::Other {
                link: "mnt:[4026531841]".into(),
            },
        ];
        for (fd, kind) in (0..).zip(kinds) {
            round_trip::<_, FdState>(sys::fds::FdInfo {
                fd,
                kind,
                flags: libc::O_RDWR | libc::O_CLOEXEC,
                pos: 12345,
                mnt_id: (fd % 2 == 0).then_some(30),
            });
        }
    }

    #[test]
    fn arm64_registers_with_and_without_each_pac_part_come_back() {
        let regs = |pac| sys::regs::ThreadRegs {
            arch: "aarch64".into(),
            gp: (0..=255).collect(),
            fp: Some(vec![0xa5; 528]),
            xstate: None,
            tls: Some(vec![1, 2, 3, 4, 5, 6, 7, 8]),
            pac,
        };
        let keys = sys::regs::PacAddressKeys {
            apia: [1, 2],
            apib: [3, 4],
            apda: [5, 6],
            apdb: [u64::MAX, 0],
        };
        for pac in [
            None,
            Some(sys::regs::PacKeys::default()),
            Some(sys::regs::PacKeys {
                address: Some(keys),
                generic: Some([9, 10]),
                enabled_keys: Some(0b1111),
            }),
            Some(sys::regs::PacKeys {
                address: None,
                generic: Some([0, 0]),
                enabled_keys: None,
            }),
        ] {
            round_trip::<_, RegsState>(regs(pac));
        }
    }

    #[test]
    fn signals_seccomp_sched_rseq_and_vdso_come_back() {
        round_trip::<_, PendingSignalState>(sys::signals::PendingSignal {
            signo: 64,
            code: -1,
            siginfo: (0..128).collect(),
        });
        round_trip::<_, SigActionState>(sys::signals::SigAction {
            signo: 17,
            handler: sys::signals::SIG_IGN,
            flags: u64::MAX,
            restorer: 0x7f00_0000_0000,
            mask: 1 << 63,
        });
        round_trip::<_, AltStackState>(sys::signals::AltStack {
            sp: 0x7f00_1234_0000,
            flags: i32::MIN,
            size: 1 << 20,
        });
        round_trip::<_, RseqState>(sys::rseq::RseqRegistration {
            abi_pointer: 0x7f00_0000_0020,
            abi_size: 32,
            signature: 0x5305_3053,
            flags: 0,
        });
        round_trip::<_, SeccompFilterState>(sys::seccomp::SeccompFilter {
            insns: vec![0x0000_0004_0000_0020, u64::MAX, 0],
            flags: 2,
        });
        round_trip::<_, SchedState>(sys::sched::Scheduling {
            policy: sys::sched::SCHED_DEADLINE,
            reset_on_fork: true,
            nice: -20,
            priority: 0,
            runtime_ns: 1,
            deadline_ns: 2,
            period_ns: 3,
            cpus: vec![0, 1023],
            ioprio: u16::MAX,
        });
        round_trip::<_, VdsoState>(sys::vdso::VdsoLayout::default());
        round_trip::<_, VdsoState>(sys::vdso::VdsoLayout {
            vdso: Some((0x7fff_0000_0000, 0x7fff_0000_2000)),
            vvar: None,
            vvar_vclock: Some((0x7fff_0000_4000, 0x7fff_0000_5000)),
            vdso_crc32: u32::MAX,
            vdso_len: 8192,
            symbols: vec![sys::vdso::VdsoSymbol {
                name: "__vdso_time".into(),
                offset: 0xa00,
                size: 0x20,
            }],
        });
    }

    #[test]
    fn hex_blobs_refuse_bad_text_and_accept_older_byte_arrays() {
        assert_eq!(hex_bytes::decode("0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(hex_bytes::decode("abc"), None);
        assert_eq!(hex_bytes::decode("zz"), None);
        let bad = r#"{"signo": 10, "code": 0, "siginfo": "0g"}"#;
        let e = serde_json::from_str::<PendingSignalState>(bad).unwrap_err();
        assert!(e.to_string().contains("invalid hex string"), "{e}");
        // An array of numbers reads as the same bytes.
        let s: PendingSignalState =
            serde_json::from_str(r#"{"signo": 10, "code": 0, "siginfo": [1, 2, 255]}"#).unwrap();
        assert_eq!(s.siginfo, [1, 2, 255]);
        // Registers written before fp/xstate/tls/pac existed.
        let r: RegsState = serde_json::from_str(r#"{"arch": "x86_64", "gp": "07"}"#).unwrap();
        assert_eq!((r.fp, r.xstate, r.tls, r.pac), (None, None, None, None));
    }
}
