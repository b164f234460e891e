//! eventfd, epoll, timerfd and signalfd: the state of each, as the kernel
//! prints it in /proc/PID/fdinfo/N, and kcmp(KCMP_EPOLL_TFD), which tells
//! whether an epoll's registered file is the one an fd refers to now.
//!
//! The dump reads these (the process frozen, or for `tern check` running);
//! the restore recreates each object in the process with injected calls
//! (`eventfd2`, `epoll_create1` + `epoll_ctl`, `timerfd_create` +
//! `timerfd_settime` + `TFD_IOC_SET_TICKS`, `signalfd4`), using the layouts
//! and constants written out here.
//!
//! The fdinfo formats (fs/eventfd.c, fs/eventpoll.c, fs/timerfd.c,
//! fs/signalfd.c):
//! - eventfd: `eventfd-count: %16llx` (hex), `eventfd-id: %d`,
//!   `eventfd-semaphore: %d` (Linux 6.6+);
//! - epoll: one line per registered file, `tfd: %8d events: %8x data:
//!   %16llx  pos:%lli ino:%lx sdev:%x` (events and data in hex);
//! - timerfd: `clockid: %d`, `ticks: %llu`, `settime flags: 0%o`,
//!   `it_value: (%llu, %llu)` (time left: seconds, nanoseconds),
//!   `it_interval: (%llu, %llu)`;
//! - signalfd: `sigmask: %016llx`.

use std::time::Duration;

/// `EFD_SEMAPHORE` (include/uapi/linux/eventfd.h).
pub const EFD_SEMAPHORE: i32 = 1;
/// `TFD_TIMER_ABSTIME`, `TFD_TIMER_CANCEL_ON_SET` (include/uapi/linux/timerfd.h).
pub const TFD_TIMER_ABSTIME: i32 = 1;
pub const TFD_TIMER_CANCEL_ON_SET: i32 = 2;
/// `TFD_IOC_SET_TICKS` = `_IOW('T', 0, __u64)`: sets the expirations a
/// timerfd holds unread (CONFIG_CHECKPOINT_RESTORE).
pub const TFD_IOC_SET_TICKS: u64 = (1 << 30) | (8 << 16) | ((b'T' as u64) << 8);
/// kcmp(2) type comparing an fd with a file registered in an epoll.
const KCMP_EPOLL_TFD: libc::c_long = 7;
/// The clocks a timerfd can use: REALTIME, MONOTONIC, BOOTTIME,
/// REALTIME_ALARM, BOOTTIME_ALARM.
pub const TIMERFD_CLOCKS: [i32; 5] = [0, 1, 7, 8, 9];
/// The clocks that count real time (CLOCK_REALTIME, REALTIME_ALARM): an
/// absolute timer on them has a deadline any host shares.
pub const REALTIME_CLOCKS: [i32; 2] = [0, 8];
/// The alarm clocks (they need CAP_WAKE_ALARM).
pub const ALARM_CLOCKS: [i32; 2] = [8, 9];
/// `EPOLLEXCLUSIVE`, `EPOLLWAKEUP`, `EPOLLONESHOT`, `EPOLLET`
/// (include/uapi/linux/eventpoll.h).
pub const EPOLLEXCLUSIVE: u32 = 1 << 28;
pub const EPOLLWAKEUP: u32 = 1 << 29;
pub const EPOLLONESHOT: u32 = 1 << 30;
pub const EPOLLET: u32 = 1 << 31;

/// An eventfd's counter and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventFd {
    pub count: u64,
    pub semaphore: bool,
}

/// One file registered in an epoll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpollTarget {
    /// The fd number it was registered under (`EPOLL_CTL_ADD`'s fd).
    pub tfd: i32,
    /// The events mask with its input flags (EPOLLET, EPOLLONESHOT,
    /// EPOLLEXCLUSIVE, EPOLLWAKEUP); a oneshot that fired keeps only those.
    pub events: u32,
    /// The 64-bit user data.
    pub data: u64,
}

/// A timerfd's clock, arming and unread expirations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerFd {
    pub clockid: i32,
    /// Expirations not yet read.
    pub ticks: u64,
    /// The flags of its last `timerfd_settime` (ABSTIME, CANCEL_ON_SET).
    pub settime_flags: i32,
    /// Time left until the next expiration (zero: disarmed).
    pub value: Duration,
    pub interval: Duration,
    /// An absolute timer on a REALTIME clock: its deadline on that clock
    /// (since the epoch), which a restore keeps whenever it happens.
    pub realtime_deadline: Option<Duration>,
}

/// A signalfd's mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalFd {
    /// Bit `n - 1` for signal `n`.
    pub mask: u64,
}

/// The state of one of these fds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFdState {
    EventFd(EventFd),
    Epoll(Vec<EpollTarget>),
    TimerFd(TimerFd),
    SignalFd(SignalFd),
}

#[derive(Debug, thiserror::Error)]
pub enum EventFdsError {
    #[error("fd {fd} of PID {pid}: reading /proc/{pid}/fdinfo/{fd}: {source}")]
    Read {
        pid: i32,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "fd {fd} of PID {pid} ({what}): /proc/{pid}/fdinfo/{fd} lacks {missing} ({text:?}); this kernel does not report what a restore needs (Linux 6.6+ prints it all)"
    )]
    Format {
        pid: i32,
        fd: i32,
        what: &'static str,
        missing: &'static str,
        text: String,
    },
    #[error("fd {fd} of PID {pid} is {link}, not an eventfd, epoll, timerfd or signalfd")]
    NotEventFd { pid: i32, fd: i32, link: String },
    #[error(
        "epoll fd {epfd} of PID {pid}: kcmp(KCMP_EPOLL_TFD) of its entry for fd {tfd}: {source} (a kernel without CONFIG_CHECKPOINT_RESTORE cannot tell)"
    )]
    Kcmp {
        pid: i32,
        epfd: i32,
        tfd: i32,
        #[source]
        source: std::io::Error,
    },
}

fn field<'t>(text: &'t str, name: &str) -> Option<&'t str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// An eventfd's fdinfo; None if a field is missing.
pub fn parse_eventfd(text: &str) -> Option<EventFd> {
    Some(EventFd {
        count: u64::from_str_radix(field(text, "eventfd-count")?, 16).ok()?,
        semaphore: field(text, "eventfd-semaphore")?.parse::<u8>().ok()? != 0,
    })
}

/// An epoll's fdinfo: every `tfd:` line (none for an empty epoll); None if
/// one of them does not parse.
pub fn parse_epoll(text: &str) -> Option<Vec<EpollTarget>> {
    let mut out = Vec::new();
    for l in text.lines().filter(|l| l.starts_with("tfd:")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        // tfd: N events: X data: X pos:N ino:X sdev:X
        let at = |name: &str| w.iter().position(|x| *x == name).and_then(|i| w.get(i + 1));
        out.push(EpollTarget {
            tfd: at("tfd:")?.parse().ok()?,
            events: u32::from_str_radix(at("events:")?, 16).ok()?,
            data: u64::from_str_radix(at("data:")?, 16).ok()?,
        });
    }
    Some(out)
}

/// `(%llu, %llu)`: seconds and nanoseconds.
fn parse_timespec(v: &str) -> Option<Duration> {
    let (s, ns) = v.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    let ns: u32 = ns.trim().parse().ok()?;
    let s: u64 = s.trim().parse().ok()?;
    (ns < 1_000_000_000).then(|| Duration::new(s, ns))
}

/// A timerfd's fdinfo; None if a field is missing.
pub fn parse_timerfd(text: &str) -> Option<TimerFd> {
    Some(TimerFd {
        clockid: field(text, "clockid")?.parse().ok()?,
        ticks: field(text, "ticks")?.parse().ok()?,
        settime_flags: i32::from_str_radix(field(text, "settime flags")?, 8).ok()?,
        value: parse_timespec(field(text, "it_value")?)?,
        interval: parse_timespec(field(text, "it_interval")?)?,
        realtime_deadline: None,
    })
}

/// A signalfd's fdinfo; None if the mask is missing.
pub fn parse_signalfd(text: &str) -> Option<SignalFd> {
    Some(SignalFd {
        mask: u64::from_str_radix(field(text, "sigmask")?, 16).ok()?,
    })
}

/// Which of these kinds an fd link (`anon_inode:[eventfd]`, or the part
/// after `anon_inode:`) names.
pub fn kind_of_link(link: &str) -> Option<&'static str> {
    match link.strip_prefix("anon_inode:").unwrap_or(link) {
        "[eventfd]" => Some("eventfd"),
        "[eventpoll]" => Some("eventpoll"),
        "[timerfd]" => Some("timerfd"),
        "[signalfd]" => Some("signalfd"),
        _ => None,
    }
}

/// The state of `pid`'s `fd`, which must be one of these kinds.
pub fn read(pid: i32, fd: i32) -> Result<EventFdState, EventFdsError> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|source| EventFdsError::Read { pid, fd, source })?
        .to_string_lossy()
        .into_owned();
    let what = kind_of_link(&link).ok_or_else(|| EventFdsError::NotEventFd {
        pid,
        fd,
        link: link.clone(),
    })?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .map_err(|source| EventFdsError::Read { pid, fd, source })?;
    let format = |missing: &'static str| EventFdsError::Format {
        pid,
        fd,
        what,
        missing,
        text: text.clone(),
    };
    Ok(match what {
        "eventfd" => EventFdState::EventFd(
            parse_eventfd(&text).ok_or_else(|| format("eventfd-count or eventfd-semaphore"))?,
        ),
        "eventpoll" => {
            EventFdState::Epoll(parse_epoll(&text).ok_or_else(|| format("well-formed tfd lines"))?)
        }
        "timerfd" => {
            let mut t = parse_timerfd(&text)
                .ok_or_else(|| format("clockid, ticks, settime flags, it_value or it_interval"))?;
            if t.value.is_zero() && !t.interval.is_zero() {
                t = forwarded_timerfd(pid, fd, t)?;
            }
            // The clock read right after fdinfo: the deadline to within
            // microseconds.
            if t.settime_flags & TFD_TIMER_ABSTIME != 0
                && REALTIME_CLOCKS.contains(&t.clockid)
                && !t.value.is_zero()
            {
                let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
                    .map(Duration::from)
                    .map_err(|e| EventFdsError::Read {
                        pid,
                        fd,
                        source: e.into(),
                    })?;
                t.realtime_deadline = Some(now + t.value);
            }
            EventFdState::TimerFd(t)
        }
        _ => EventFdState::SignalFd(parse_signalfd(&text).ok_or_else(|| format("sigmask"))?),
    })
}

/// A periodic timerfd that expired and was not read since shows no time
/// left in fdinfo: the kernel moves it to its next period only when it is
/// read, or asked with `timerfd_gettime`. That call, on a duplicate of
/// the fd (the same timer), moves it on and counts the expirations passed;
/// fdinfo then has both right. (What a read would see is unchanged.)
fn forwarded_timerfd(pid: i32, fd: i32, t: TimerFd) -> Result<TimerFd, EventFdsError> {
    use std::os::fd::AsRawFd;
    let read_err = |source| EventFdsError::Read { pid, fd, source };
    let dup = crate::fds::pidfd_getfd(pid, fd)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    // SAFETY: zeroed plain struct, filled by the kernel.
    let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: timerfd_gettime on our own fd into a local.
    if unsafe { libc::timerfd_gettime(dup.as_raw_fd(), &mut spec) } != 0 {
        return Err(read_err(std::io::Error::last_os_error()));
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).map_err(read_err)?;
    Ok(parse_timerfd(&text).unwrap_or(t))
}

/// `struct kcmp_epoll_slot` (include/uapi/linux/kcmp.h).
#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// Whether the file `pid`'s epoll `epfd` holds registered under `tfd` is
/// the one `pid`'s fd `tfd` refers to now (false if `tfd` is closed: the
/// registration outlived the fd through a dup or a fork).
pub fn epoll_target_is_open(pid: i32, epfd: i32, tfd: i32) -> Result<bool, EventFdsError> {
    if !std::path::Path::new(&format!("/proc/{pid}/fd/{tfd}")).exists() {
        return Ok(false);
    }
    let slot = KcmpEpollSlot {
        efd: epfd as u32,
        tfd: tfd as u32,
        toff: 0,
    };
    // SAFETY: kcmp reads the slot, which lives across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_EPOLL_TFD,
            tfd,
            &slot as *const KcmpEpollSlot,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // EBADF: tfd closed meanwhile; ENOENT: no such registration.
        if matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::ENOENT)) {
            return Ok(false);
        }
        return Err(EventFdsError::Kcmp {
            pid,
            epfd,
            tfd,
            source: e,
        });
    }
    Ok(r == 0)
}

/// `struct epoll_event` as the kernel takes it: packed on x86_64 (12
/// bytes), naturally aligned elsewhere (16 bytes).
pub fn epoll_event_bytes(events: u32, data: u64) -> Vec<u8> {
    let mut b = events.to_ne_bytes().to_vec();
    if cfg!(not(target_arch = "x86_64")) {
        b.extend_from_slice(&[0; 4]);
    }
    b.extend_from_slice(&data.to_ne_bytes());
    b
}

/// `struct itimerspec` (interval, then value; each seconds + nanoseconds).
pub fn itimerspec_bytes(interval: Duration, value: Duration) -> Vec<u8> {
    [
        interval.as_secs(),
        u64::from(interval.subsec_nanos()),
        value.as_secs(),
        u64::from(value.subsec_nanos()),
    ]
    .iter()
    .flat_map(|w| w.to_ne_bytes())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn me() -> i32 {
        std::process::id() as i32
    }

    fn owned(fd: i32) -> OwnedFd {
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: a new fd of ours.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn an_eventfd_count_above_u32_is_read_in_hex() {
        // SAFETY: plain syscalls on our own fds.
        let e = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE) });
        let v: u64 = 0x1_2345_6789;
        // SAFETY: writes 8 bytes from v.
        let n = unsafe { libc::write(e.as_raw_fd(), (&v as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(
            read(me(), e.as_raw_fd()).unwrap(),
            EventFdState::EventFd(EventFd {
                count: v,
                semaphore: true
            })
        );
    }

    #[test]
    fn an_epoll_lists_each_target_with_flags_and_data() {
        // SAFETY: plain syscalls on our own fds and buffers.
        unsafe {
            let ep = owned(libc::epoll_create1(libc::EPOLL_CLOEXEC));
            let a = owned(libc::eventfd(0, libc::EFD_CLOEXEC));
            let b = owned(libc::eventfd(0, libc::EFD_CLOEXEC));
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: 0xdead_beef_0000_0001,
            };
            assert_eq!(
                libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, a.as_raw_fd(), &mut ev),
                0
            );
            ev.events = libc::EPOLLOUT as u32 | EPOLLONESHOT;
            ev.u64 = 7;
            assert_eq!(
                libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, b.as_raw_fd(), &mut ev),
                0
            );
            let EventFdState::Epoll(mut t) = read(me(), ep.as_raw_fd()).unwrap() else {
                panic!("not an epoll");
            };
            t.sort_by_key(|t| t.tfd);
            assert_eq!(
                t,
                vec![
                    // The kernel adds EPOLLERR | EPOLLHUP to every entry.
                    EpollTarget {
                        tfd: a.as_raw_fd(),
                        events: (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 | EPOLLET,
                        data: 0xdead_beef_0000_0001
                    },
                    EpollTarget {
                        tfd: b.as_raw_fd(),
                        events: (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32
                            | EPOLLONESHOT,
                        data: 7
                    }
                ]
            );
            assert!(epoll_target_is_open(me(), ep.as_raw_fd(), a.as_raw_fd()).unwrap());
            // The registration outlives a closed fd through a dup; the fd
            // number then names another file.
            let a_dup = owned(libc::dup(a.as_raw_fd()));
            let a_no = a.as_raw_fd();
            drop(a);
            assert!(!epoll_target_is_open(me(), ep.as_raw_fd(), a_no).unwrap());
            let other = owned(libc::eventfd(0, libc::EFD_CLOEXEC));
            assert_eq!(other.as_raw_fd(), a_no, "the lowest free fd is reused");
            assert!(!epoll_target_is_open(me(), ep.as_raw_fd(), a_no).unwrap());
            drop(a_dup);
        }
    }

    #[test]
    fn a_timerfd_shows_clock_flags_time_left_and_unread_ticks() {
        // SAFETY: plain syscalls on our own fds and buffers.
        unsafe {
            let t = owned(libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            ));
            // Fires after 1 ms, then every 3600 s: one tick unread.
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 3600,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                },
            };
            assert_eq!(
                libc::timerfd_settime(t.as_raw_fd(), 0, &spec, std::ptr::null_mut()),
                0
            );
            std::thread::sleep(Duration::from_millis(20));
            let EventFdState::TimerFd(s) = read(me(), t.as_raw_fd()).unwrap() else {
                panic!("not a timerfd");
            };
            assert_eq!(s.clockid, libc::CLOCK_MONOTONIC);
            // Expired, not read: fdinfo alone says 0 left; the read moves
            // the timer on to its next period first.
            assert_eq!(s.ticks, 1);
            assert_eq!(s.settime_flags, 0);
            assert_eq!(s.interval, Duration::from_secs(3600));
            assert!(
                s.value > Duration::from_secs(3590) && s.value <= Duration::from_secs(3600),
                "{s:?}"
            );
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a local.
            assert_eq!(libc::read(t.as_raw_fd(), (&mut v as *mut u64).cast(), 8), 8);
            assert_eq!(v, 1, "the one expiration, counted once");
            // The ioctl the restore uses sets the unread expirations.
            let n: u64 = 5;
            assert_eq!(
                libc::ioctl(t.as_raw_fd(), TFD_IOC_SET_TICKS as _, &n as *const u64),
                0,
                "TFD_IOC_SET_TICKS: {}",
                std::io::Error::last_os_error()
            );
            let EventFdState::TimerFd(s) = read(me(), t.as_raw_fd()).unwrap() else {
                panic!("not a timerfd");
            };
            assert_eq!(s.ticks, 5);
            // An absolute REALTIME timer: the flags say so, the value is
            // still the time left.
            let mut now: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(libc::CLOCK_REALTIME, &mut now);
            let abs = owned(libc::timerfd_create(
                libc::CLOCK_REALTIME,
                libc::TFD_CLOEXEC,
            ));
            let spec = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: now.tv_sec + 100,
                    tv_nsec: 0,
                },
            };
            assert_eq!(
                libc::timerfd_settime(
                    abs.as_raw_fd(),
                    TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET,
                    &spec,
                    std::ptr::null_mut()
                ),
                0
            );
            let EventFdState::TimerFd(s) = read(me(), abs.as_raw_fd()).unwrap() else {
                panic!("not a timerfd");
            };
            assert_eq!(s.settime_flags, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET);
            assert!(s.value > Duration::from_secs(98) && s.value <= Duration::from_secs(100));
            let deadline = s
                .realtime_deadline
                .expect("an absolute REALTIME timer's deadline");
            let set = Duration::new(u64::try_from(now.tv_sec).unwrap() + 100, 0);
            assert!(
                deadline.abs_diff(set) < Duration::from_millis(5),
                "deadline {deadline:?}, set {set:?}"
            );
        }
    }

    #[test]
    fn a_signalfd_shows_its_mask() {
        // SAFETY: plain syscalls on our own fd and a zeroed sigset.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::sigaddset(&mut set, 40);
            let s = owned(libc::signalfd(-1, &set, libc::SFD_CLOEXEC));
            assert_eq!(
                read(me(), s.as_raw_fd()).unwrap(),
                EventFdState::SignalFd(SignalFd {
                    mask: (1 << (libc::SIGUSR1 - 1)) | (1 << 39)
                })
            );
        }
    }

    #[test]
    fn other_fds_are_not_read_as_these() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            read(me(), f.as_raw_fd()),
            Err(EventFdsError::NotEventFd { .. })
        ));
    }

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(
            epoll_event_bytes(1, 2).len(),
            std::mem::size_of::<libc::epoll_event>()
        );
        assert_eq!(
            itimerspec_bytes(Duration::ZERO, Duration::ZERO).len(),
            std::mem::size_of::<libc::itimerspec>()
        );
        assert_eq!(
            TFD_IOC_SET_TICKS, 0x4008_5400,
            "_IOW('T', 0, u64) on x86_64 and arm64"
        );
    }
}
