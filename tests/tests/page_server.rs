//! `tern page-server` and `tern restore --page-server` (issue 16, part 1):
//! an image chain's pages served over TCP, authenticated and encrypted
//! with a key of `tern keygen`, to restores whose directories hold
//! everything but the pages.
//!
//! - two lazy restores of one checkpoint read one server at once: one in
//!   this PID namespace, one in a new one (the same PID number in each),
//!   each `ck_lazy` checking its own pages page for page all the time and
//!   at its end;
//! - the server killed in the middle of a slow fill and started again on
//!   the same port: the restore's reads wait and retry, the process never
//!   reads a wrong or zero page and passes its checks;
//! - refused: a client with another key (both ends say so, the server
//!   logs it), a plaintext client, a key file others can read, and a
//!   directory whose image the server does not hold;
//! - an eager restore (no `--lazy-pages`) from a server, checked the same way.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_tests::ck::CkProcess;
use tern_tests::hosts::TwoHosts;
use tern_tests::lazy::{self, read_fails};
use tern_tests::{TernOutput, dump_args, pre_dump, spawn_tern, tempdir, tern, tern_bin};

const END: Duration = Duration::from_secs(60);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `ck_lazy ARGS` pre-dumped once into ROOT/img/p1 and dumped into
/// ROOT/img/dump; the original is reaped.
fn checkpointed(args: &[&str]) -> (CkProcess, tempfile::TempDir, PathBuf) {
    let mut ck = lazy::start_ck_lazy(args);
    let root = tempdir();
    let img = root.path().join("img");
    std::fs::create_dir(&img).unwrap();
    let p1 = img.join("p1");
    pre_dump(ck.pid, &p1, None, &[]);
    std::thread::sleep(Duration::from_millis(100));
    let dir = img.join("dump");
    let prev = p1.display().to_string();
    let v = tern(&dump_args(ck.pid, &dir, &["--prev-images-dir", &prev])).json();
    assert_eq!(v["killed"], true, "{v}");
    ck.release();
    (ck, root, dir)
}

/// Copy the tree `from` to `to` without its page files: what a restore
/// host holds when the pages stay with the server.
fn copy_without_pages(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type().unwrap();
        if t.is_dir() {
            copy_without_pages(&src, &dst);
        } else if t.is_file() && e.file_name() != "pages.img" {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

fn pages_files(root: &Path) -> usize {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                pages_files(&e.path())
            } else {
                usize::from(e.file_name() == "pages.img")
            }
        })
        .sum()
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let k = dir.join(name);
    let run = tern(&["keygen", &k.display().to_string(), "--json"]);
    assert_eq!(
        run.json()["key_file"],
        k.display().to_string(),
        "{}",
        run.describe()
    );
    k
}

/// A running `tern page-server`, killed on drop; its log is kept.
struct Server {
    child: Child,
    out: Option<TernOutput>,
    addr: String,
}

fn server_args(dir: &Path, listen: &str, key: &Path) -> Vec<String> {
    [
        "page-server",
        "-D",
        &dir.display().to_string(),
        "--listen",
        listen,
        "--key",
        &key.display().to_string(),
        "--json",
        "--log",
        "info",
    ]
    .map(String::from)
    .to_vec()
}

impl Server {
    fn start(dir: &Path, listen: &str, key: &Path) -> Server {
        Server::of(spawn_tern(&server_args(dir, listen, key)))
    }

    fn of(mut child: Child) -> Server {
        let out = TernOutput::of(&mut child);
        let v = out.json(END).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("the page server did not say it listens: {e}")
        });
        let addr = v["listen"].as_str().expect("listen").to_string();
        assert!(v["images"].as_u64() >= Some(2), "{v}");
        Server {
            child,
            out: Some(out),
            addr,
        }
    }

    /// Kill it; its log.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.out.take().map(|mut o| o.stderr()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn remote<'a>(addr: &'a str, key: &'a str) -> [&'a str; 4] {
    ["--page-server", addr, "--key", key]
}

fn verdicts(ck: &CkProcess) -> Vec<String> {
    ck.lines()
        .into_iter()
        .filter(|l| l == "PASS" || l.starts_with("FAIL"))
        .collect()
}

#[test]
fn two_lazy_restores_read_one_page_server_at_once() {
    let _one = serial();
    lazy::become_subreaper();
    let (ck, root, dir) = checkpointed(&["--mib", "32"]);
    let key = keygen(root.path(), "key");
    let keys = key.display().to_string();
    let mut server = Server::start(&dir, "127.0.0.1:0", &key);
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    copy_without_pages(&root.path().join("img"), &a);
    copy_without_pages(&root.path().join("img"), &b);
    assert_eq!(pages_files(&a), 0);
    let (da, db) = (a.join("dump"), b.join("dump"));
    // Here: detached, its service a daemon.
    let mut args = vec!["--prefetch", "address"];
    args.extend(remote(&server.addr, &keys));
    let v = lazy::restore_detached(&da, ck.pid, &args);
    let _cleanup = lazy::KillOnDrop(vec![ck.pid, lazy::service_pid(&v)]);
    // In a new PID namespace (tern is its PID 1 and stays to the end).
    let mut other = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(tern_bin())
        .args([
            "restore",
            "-D",
            &db.display().to_string(),
            "--lazy-pages",
            "--json",
        ])
        .args(remote(&server.addr, &keys))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) runs the second restore in a PID namespace of its own");
    let other_out = TernOutput::of(&mut other);
    let deadline = Instant::now() + END;
    let twin = loop {
        if let [p] = tern_tests::proc::in_other_namespace(ck.pid)[..] {
            break p;
        }
        if Instant::now() > deadline {
            let _ = other.kill();
            panic!(
                "the restore in a new PID namespace never brought PID {} back",
                ck.pid
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _twin = lazy::KillOnDrop(vec![twin]);
    let stats = lazy::wait_stats(&da, END).unwrap_or_else(|e| panic!("{e}"));
    let pages = stats["lazy"]["pages"].as_u64().unwrap_or(0);
    assert!(pages >= 32 * 256, "{stats}");
    // Both fills end: nothing of tern left in either process.
    lazy::assert_fill_left_nothing(ck.pid, "restored here");
    let deadline = Instant::now() + END;
    while !tern_tests::proc::fds(twin)
        .unwrap_or_default()
        .iter()
        .all(|(_, l)| l.as_str() != tern_tests::proc::UFFD_LINK)
    {
        assert!(
            Instant::now() < deadline,
            "the namespaced restore's fill never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lazy::assert_fill_left_nothing(twin, "restored in a PID namespace");
    // Both check every page and end: two PASS, no wrong page ever read.
    for p in [ck.pid, twin] {
        // SAFETY: kill(2) of a restored ck_lazy (our orphan / the
        // namespace's child).
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    let st = lazy::reap(ck.pid, END).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "status {st:#x}"
    );
    let status = tern_tests::wait_deadline(&mut other, END).expect("the namespaced restore ends");
    let ov = other_out.json(END).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "{ov}");
    assert!(ov["lazy"]["pages"].as_u64() >= Some(32 * 256), "{ov}");
    assert_eq!(verdicts(&ck), ["PASS", "PASS"], "{:#?}", ck.lines());
    let fails = read_fails(&ck);
    assert!(fails.is_empty(), "{fails:#?}");
    let log = server.stop();
    assert!(log.matches("connected").count() >= 2, "{log}");
    assert!(!log.contains("refused"), "{log}");
}

#[test]
fn a_page_server_restarted_in_the_middle_of_a_fill_serves_on() {
    let _one = serial();
    lazy::become_subreaper();
    // Readers slow enough that their faults do not bring it all in first.
    let (mut ck, root, dir) = checkpointed(&["--mib", "64", "--pace", "50000"]);
    let key = keygen(root.path(), "key");
    let keys = key.display().to_string();
    let mut server = Server::start(&dir, "127.0.0.1:0", &key);
    let addr = server.addr.clone();
    let a = root.path().join("a");
    copy_without_pages(&root.path().join("img"), &a);
    let da = a.join("dump");
    // 64 MiB at 8 MB/s: seconds of fill.
    let mut args = vec!["--prefetch", "address", "--prefetch-mb-s", "8"];
    args.extend(remote(&addr, &keys));
    let v = lazy::restore_detached(&da, ck.pid, &args);
    let _cleanup = lazy::KillOnDrop(vec![ck.pid, lazy::service_pid(&v)]);
    std::thread::sleep(Duration::from_millis(700));
    server.stop();
    // Down for a second: the readers fault on lazy pages meanwhile and wait.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !da.join("lazy-stats.json").exists(),
        "the fill ended while the server was down: {:?}",
        std::fs::read_to_string(da.join("lazy-stats.json"))
    );
    let _again = Server::start(&dir, &addr, &key);
    let stats = lazy::wait_stats(&da, END).unwrap_or_else(|e| panic!("{e}"));
    assert!(stats["lazy"]["pages"].as_u64() >= Some(64 * 256), "{stats}");
    lazy::assert_fill_left_nothing(ck.pid, "after the server came back");
    let fails = read_fails(&ck);
    assert!(fails.is_empty(), "{fails:#?}");
    let verdict = ck.verdict(END).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(verdict, "PASS");
    let log = std::fs::read_to_string(da.join("lazy-pages.log")).unwrap_or_default();
    assert!(
        log.contains("connecting again"),
        "the service never lost its server: {log}"
    );
}

#[test]
fn wrong_keys_plaintext_clients_open_key_files_and_other_images_are_refused() {
    let _one = serial();
    lazy::become_subreaper();
    let (_ck, root, dir) = checkpointed(&["--mib", "4"]);
    let key = keygen(root.path(), "key");
    let other = keygen(root.path(), "other");
    let mut server = Server::start(&dir, "127.0.0.1:0", &key);
    let a = root.path().join("a");
    copy_without_pages(&root.path().join("img"), &a);
    let da = a.join("dump");
    let da_s = da.display().to_string();
    let others = other.display().to_string();

    // Another key: the restore fails before any process exists.
    let mut args = vec!["restore", "-D", &da_s, "--lazy-pages", "--json"];
    args.extend(remote(&server.addr, &others));
    let run = tern(&args);
    run.assert_clear_failure(&["page server", "another key"]);

    // A plaintext client.
    let mut c = std::net::TcpStream::connect(&server.addr).unwrap();
    c.write_all(b"GET /pages.img HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    c.set_read_timeout(Some(END)).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut c, &mut buf).unwrap_or(0);
    assert_eq!(
        n,
        0,
        "the server answered a plaintext client: {:?}",
        &buf[..n]
    );

    // A directory holding another image: named, not read.
    let (_ck2, root2, _dir2) = checkpointed(&["--mib", "4"]);
    let b = root.path().join("b");
    copy_without_pages(&root2.path().join("img"), &b);
    let db = b.join("dump").display().to_string();
    let keys = key.display().to_string();
    let mut args = vec!["restore", "-D", &db, "--lazy-pages", "--json"];
    args.extend(remote(&server.addr, &keys));
    let run = tern(&args);
    run.assert_clear_failure(&["does not hold this image"]);

    let log = server.stop();
    assert!(
        log.contains("refused") && log.contains("another key"),
        "the server did not log the client with another key: {log}"
    );
    assert!(
        log.contains("plaintext"),
        "the server did not log the plaintext client: {log}"
    );

    // A key file others can read: refused by both ends, naming the fix.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    tern(&server_args(&dir, "127.0.0.1:0", &key)).assert_clear_failure(&["chmod 600"]);
    let mut args = vec!["restore", "-D", &da_s, "--lazy-pages"];
    args.extend(remote("127.0.0.1:9", &keys));
    tern(&args).assert_clear_failure(&["chmod 600"]);
    // And a key is never overwritten.
    tern(&["keygen", &keys]).assert_clear_failure(&["already exists"]);
}

#[test]
fn a_restore_on_another_host_reads_its_pages_over_a_shaped_link() {
    let _one = serial();
    lazy::become_subreaper();
    let (mut ck, root, dir) = checkpointed(&["--mib", "16"]);
    let key = keygen(root.path(), "key");
    let keys = key.display().to_string();
    let hosts = TwoHosts::new().unwrap_or_else(|e| panic!("two hosts: {e}"));
    hosts.shape("100mbit").unwrap_or_else(|e| panic!("{e}"));
    let listen = format!("{}:0", hosts.a.addr);
    let mut server = Server::of(
        hosts
            .on(&hosts.a, &tern_bin())
            .args(server_args(&dir, &listen, &key))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec"),
    );
    let b = root.path().join("b");
    copy_without_pages(&root.path().join("img"), &b);
    let db = b.join("dump");
    let out = hosts
        .on(&hosts.b, &tern_bin())
        .args([
            "restore",
            "-D",
            &db.display().to_string(),
            "--lazy-pages",
            "--detach",
            "--json",
        ])
        .args(remote(&server.addr, &keys))
        .stdin(Stdio::null())
        .output()
        .expect("ip netns exec");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "restore on host b: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["pid"].as_i64(), Some(i64::from(ck.pid)), "{v}");
    let _cleanup = lazy::KillOnDrop(vec![ck.pid, lazy::service_pid(&v)]);
    // The process lives on host b: its network namespace is b's.
    let ns = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    assert_eq!(
        ns(&format!("/proc/{}/ns/net", ck.pid)).unwrap(),
        ns(&format!("/run/netns/{}", hosts.b.netns)).unwrap(),
        "the restored process is not in host b's network namespace"
    );
    let stats = lazy::wait_stats(&db, END).unwrap_or_else(|e| panic!("{e}"));
    assert!(stats["lazy"]["pages"].as_u64() >= Some(16 * 256), "{stats}");
    lazy::assert_fill_left_nothing(ck.pid, "restored on host b");
    let fails = read_fails(&ck);
    assert!(fails.is_empty(), "{fails:#?}");
    assert_eq!(ck.verdict(END).unwrap_or_else(|e| panic!("{e}")), "PASS");
    let log = server.stop();
    assert!(
        log.contains(&format!("{}:", hosts.b.addr)) && log.contains("connected"),
        "the server saw no client from host b ({}): {log}",
        hosts.b.addr
    );
}

#[test]
fn an_eager_restore_reads_its_pages_from_a_page_server() {
    let _one = serial();
    lazy::become_subreaper();
    let (mut ck, root, dir) = checkpointed(&["--mib", "8"]);
    let key = keygen(root.path(), "key");
    let keys = key.display().to_string();
    let mut server = Server::start(&dir, "127.0.0.1:0", &key);
    let a = root.path().join("a");
    copy_without_pages(&root.path().join("img"), &a);
    let da = a.join("dump").display().to_string();
    let mut args = vec!["restore", "-D", &da, "--detach", "--json"];
    args.extend(remote(&server.addr, &keys));
    let run = tern(&args);
    let v = run.json();
    assert_eq!(
        v["pid"].as_i64(),
        Some(i64::from(ck.pid)),
        "{}",
        run.describe()
    );
    let _cleanup = lazy::KillOnDrop(vec![ck.pid]);
    assert!(v["fill"]["copied_bytes"].as_u64() > Some(8 << 20), "{v}");
    let fails = read_fails(&ck);
    assert!(fails.is_empty(), "{fails:#?}");
    assert_eq!(ck.verdict(END).unwrap_or_else(|e| panic!("{e}")), "PASS");
    assert!(server.stop().contains("connected"));
}
