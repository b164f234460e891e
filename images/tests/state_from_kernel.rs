//! The image's state types carry what the kernel reports through an image
//! and back unchanged: values read by `sys` from a real stopped process
//! (registers, queued signals, rseq, seccomp filters, scheduling, fds, the
//! vDSO) and from this one (signal dispositions, the alternate stack) go
//! sys -> state -> JSON -> state -> sys and compare equal; the registers
//! that come back (also from the JSON of an older image, without `tls`
//! and `pac`) are accepted by the kernel and read back the same.

use std::time::{Duration, Instant};

use images::process::{Creds, FdImage, MmState, ProcessImage, ThreadImage};
use images::state::{
    AltStackState, FdState, PendingSignalState, RegsState, RseqState, SchedState,
    SeccompFilterState, SigActionState, VdsoState,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// sys -> state -> JSON -> state -> sys.
fn through_image<L, S>(live: &L) -> L
where
    L: Clone + From<S>,
    S: From<L> + Serialize + DeserializeOwned,
{
    let json = serde_json::to_string(&S::from(live.clone())).unwrap();
    L::from(serde_json::from_str::<S>(&json).unwrap())
}

/// A forked child that set up its state, then stopped itself under our
/// ptrace (PTRACE_TRACEME + SIGSTOP). Killed and reaped on drop.
struct Stopped {
    pid: i32,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: our own child; kill and reap it.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

const SIGRT2: i32 = 36;

/// The child: nice 3, two pipe ends and /dev/null open, SIGUSR1 (value
/// 4242) queued to the process and SIGRTMIN+2 to the thread (both
/// blocked), a seccomp filter that allows everything, then SIGSTOP. Only
/// raw system calls after the fork.
fn stopped_child() -> Stopped {
    // SAFETY: the child makes raw system calls only and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: raw system calls on this (forked) process only.
        unsafe {
            let fail = |step: i32| libc::_exit(100 + step);
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                fail(0);
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::sigaddset(&mut set, SIGRT2);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if libc::setpriority(libc::PRIO_PROCESS, 0, 3) != 0 {
                fail(1);
            }
            let mut p = [0i32; 2];
            if libc::pipe(p.as_mut_ptr()) != 0 {
                fail(2);
            }
            if libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) < 0 {
                fail(3);
            }
            let v = libc::sigval {
                sival_ptr: 4242usize as *mut libc::c_void,
            };
            if libc::sigqueue(libc::getpid(), libc::SIGUSR1, v) != 0 {
                fail(4);
            }
            let me = libc::gettid();
            if libc::syscall(libc::SYS_tgkill, libc::getpid(), me, SIGRT2) != 0 {
                fail(5);
            }
            // BPF_RET | BPF_K, SECCOMP_RET_ALLOW.
            let allow = [libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0x7fff_0000,
            }];
            let prog = libc::sock_fprog {
                len: 1,
                filter: allow.as_ptr() as *mut _,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_seccomp, 1, 0, &prog) != 0
            {
                fail(6);
            }
            libc::raise(libc::SIGSTOP);
            libc::_exit(0);
        }
    }
    let child = Stopped { pid };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut st = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            assert!(
                libc::WIFSTOPPED(st) && libc::WSTOPSIG(st) == libc::SIGSTOP,
                "the child did not stop as set up (wait status {st:#x}; exit 100+N is step N)"
            );
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "the child did not stop within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kernel_state_of_a_stopped_process_comes_back_unchanged_through_the_image() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "reading another process's seccomp filters needs root"
    );
    let child = stopped_child();
    let pid = child.pid;

    let regs = sys::regs::ThreadRegs::capture(pid).expect("registers of the stopped child");
    assert_eq!(through_image::<_, RegsState>(&regs), regs);

    let shared = sys::signals::pending(pid, sys::signals::Queue::Process).unwrap();
    let own = sys::signals::pending(pid, sys::signals::Queue::Thread).unwrap();
    assert_eq!(
        shared
            .iter()
            .map(|s| (s.signo, s.value()))
            .collect::<Vec<_>>(),
        [(libc::SIGUSR1, Some(4242))],
        "the child's queued SIGUSR1"
    );
    assert_eq!(
        own.iter().map(|s| s.signo).collect::<Vec<_>>(),
        [SIGRT2],
        "the child's thread-directed signal"
    );
    for s in shared.iter().chain(&own) {
        let back = through_image::<_, PendingSignalState>(s);
        assert_eq!(&back, s);
        assert_eq!(back.value(), s.value());
        assert_eq!(back.sender_pid(), Some(pid));
    }

    let rseq = sys::rseq::registration(pid)
        .unwrap()
        .expect("glibc registers rseq for every thread (kernel 4.18+, glibc 2.35+)");
    assert_eq!(through_image::<_, RseqState>(&rseq), rseq);

    let filters = sys::seccomp::filters(pid).expect("the child's seccomp filter");
    assert_eq!(filters.len(), 1, "{filters:?}");
    for f in &filters {
        assert_eq!(&through_image::<_, SeccompFilterState>(f), f);
    }

    let sched = sys::sched::read(pid).unwrap();
    assert_eq!(sched.nice, 3);
    assert_eq!(through_image::<_, SchedState>(&sched), sched);

    let fds = sys::fds::fd_table(pid).unwrap();
    let kinds: Vec<&sys::fds::FdKind> = fds.iter().map(|f| &f.kind).collect();
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, sys::fds::FdKind::Pipe { read_end: true, .. }))
            && kinds.iter().any(
                |k| matches!(k, sys::fds::FdKind::CharDev { path, .. } if path == "/dev/null")
            ),
        "{kinds:?}"
    );
    for f in &fds {
        assert_eq!(&through_image::<_, FdState>(f), f);
    }

    let vdso = sys::vdso::VdsoLayout::of_pid(pid).unwrap();
    assert!(vdso.vdso.is_some() && !vdso.symbols.is_empty(), "{vdso:?}");
    assert_eq!(through_image::<_, VdsoState>(&vdso), vdso);

    // The registers that came through the image, set into the thread: the
    // kernel takes them and reports them back as they were.
    let back = through_image::<_, RegsState>(&regs);
    back.apply(pid)
        .expect("the kernel takes the registers back");
    assert_eq!(sys::regs::ThreadRegs::capture(pid).unwrap(), regs);
    // As an image written before `tls` and `pac` existed holds them.
    let mut old = serde_json::to_value(RegsState::from(regs.clone())).unwrap();
    let fields = old.as_object_mut().unwrap();
    fields.remove("tls");
    fields.remove("pac");
    let old: RegsState = serde_json::from_value(old).unwrap();
    sys::regs::ThreadRegs::from(old)
        .apply(pid)
        .expect("the kernel takes the registers of an older image");
    assert_eq!(sys::regs::ThreadRegs::capture(pid).unwrap(), regs);

    // And the whole process state made of them passes the image's checks
    // and parses back equal.
    let p = ProcessImage {
        pid,
        ppid: 1,
        pgid: pid,
        sid: pid,
        comm: "child".into(),
        exe: "/proc/self/exe".into(),
        exe_unlinked: None,
        cwd: "/".into(),
        root: "/".into(),
        umask: 0o022,
        personality: 0,
        dumpable: Some(1),
        thp_disable: None,
        memory_merge: false,
        oom_score_adj: None,
        coredump_filter: None,
        creds: Creds::default(),
        mm: MmState {
            auxv: vec![0, 0],
            ..MmState::default()
        },
        vdso: vdso.into(),
        sigactions: Vec::new(),
        shared_pending: shared.into_iter().map(Into::into).collect(),
        itimers: Vec::new(),
        posix_timers: Vec::new(),
        rlimits: Vec::new(),
        seccomp_filters: filters.into_iter().map(Into::into).collect(),
        threads: vec![ThreadImage {
            tid: pid,
            comm: "child".into(),
            regs: regs.into(),
            blocked: 0,
            pending: own.into_iter().map(Into::into).collect(),
            altstack: AltStackState {
                sp: 0,
                flags: 2,
                size: 0,
            },
            rseq: Some(rseq.into()),
            seccomp_mode: 2,
            seccomp: vec![0],
            clear_child_tid: 0,
            robust_list: 0,
            robust_list_len: 0,
            sched: Some(sched.into()),
        }],
        fds: fds
            .into_iter()
            .map(|f| FdImage {
                info: f.into(),
                pipe_data: None,
                pipe_capacity: None,
                same_as: None,
            })
            .collect(),
        unlinked_files: Vec::new(),
    };
    let text = serde_json::to_vec_pretty(&p).unwrap();
    let parsed = ProcessImage::parse(std::path::Path::new("process.json"), &text).unwrap();
    assert_eq!(parsed, p);
}

#[test]
fn this_process_s_signal_dispositions_and_alternate_stack_come_back_unchanged() {
    // Rust's runtime catches SIGSEGV and SIGBUS on an alternate stack
    // (SA_SIGINFO | SA_ONSTACK) and ignores SIGPIPE; every test thread has
    // its own alternate stack.
    let mut seen = Vec::new();
    for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGPIPE, libc::SIGCHLD] {
        let mut old = [0u8; sys::signals::KernelSigaction::SIZE];
        // SAFETY: rt_sigaction only reads the disposition into `old`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<u8>(),
                old.as_mut_ptr(),
                8,
            )
        };
        assert_eq!(r, 0, "rt_sigaction({sig})");
        let k = sys::signals::KernelSigaction::from_bytes(&old).unwrap();
        let a = sys::signals::SigAction::from_kernel(sig, &k);
        let back = through_image::<_, SigActionState>(&a);
        assert_eq!(back, a);
        assert_eq!(back.to_kernel(), k);
        seen.push(a);
    }
    assert!(
        seen[0].has_handler() && seen[0].flags & libc::SA_ONSTACK as u64 != 0,
        "SIGSEGV: {:?}",
        seen[0]
    );
    assert_eq!(seen[2].handler, sys::signals::SIG_IGN, "SIGPIPE");

    // SAFETY: stack_t is plain data; all zeros is a valid value.
    let mut ss: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigaltstack only reads the current stack into `ss`.
    assert_eq!(unsafe { libc::sigaltstack(std::ptr::null(), &mut ss) }, 0);
    let a = sys::signals::AltStack {
        sp: ss.ss_sp as u64,
        flags: ss.ss_flags,
        size: ss.ss_size as u64,
    };
    assert!(
        a.size > 0,
        "Rust gives each thread an alternate stack: {a:?}"
    );
    let back = through_image::<_, AltStackState>(&a);
    assert_eq!(back, a);
    assert_eq!(
        sys::signals::StackT::from(back).to_bytes(),
        sys::signals::StackT::from(a).to_bytes()
    );
}
