//! Real programs, dumped after 0 and after 3 pre-dumps, restored, and shown
//! to carry on: `python3` with a large dict and a thread, a `python3`
//! asyncio program (epoll, a socketpair), `node` counting on
//! its timers (libuv's epoll and eventfds), a `bash` loop made
//! of builtins, `sqlite3` with an in-memory database reading commands from
//! a FIFO the test keeps writing to; `redis-server` with 20000 keys,
//! answering `redis-cli` after the restore. `python3` and `sqlite3` also restored
//! with `--lazy-pages` (working while their memory comes in), and a `bash`
//! loop whose children, forked while its pages are lazy, read its data.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tern_tests::PYTHON_COUNTER as PYTHON;
use tern_tests::ck::CkProcess;
use tern_tests::{pre_dump, spawn_tern, tempdir, tern, wait_deadline};

const READY: Duration = Duration::from_secs(60);

fn require(path: &str, package: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.is_file(),
        "{path} is missing: install the Debian package {package} (cargo xtask setup does)"
    );
    p
}

/// `tern check -t PID` first (it must list nothing tern cannot restore),
/// then pre-dumps, then `tern dump --verify`; the original is reaped.
fn checkpoint(pid: i32, root: &Path, pre_dumps: usize) -> PathBuf {
    let run = tern(&["check", "-t", &pid.to_string(), "--json"]);
    let v = run.json();
    assert_eq!(
        v["restorable"], true,
        "tern check -t {pid} lists what it cannot restore: {v}"
    );
    let mut prev: Option<PathBuf> = None;
    for i in 0..pre_dumps {
        let d = root.join(format!("pre{i}"));
        pre_dump(pid, &d, prev.as_deref(), &[]);
        prev = Some(d);
        std::thread::sleep(Duration::from_millis(100));
    }
    let dir = root.join("dump");
    let mut args = vec![
        "dump".to_string(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        dir.display().to_string(),
        "--verify".into(),
        "--json".into(),
    ];
    if let Some(p) = &prev {
        args.push("--prev-images-dir".into());
        args.push(p.display().to_string());
    }
    let v = tern(&args).json();
    assert_eq!(v["verify"]["mismatches"].as_u64(), Some(0), "{v}");
    assert_eq!(v["killed"].as_bool(), Some(true), "{v}");
    dir
}

/// `tern restore -D DIR --json FLAGS...` (it waits for the process).
fn restore(dir: &Path, flags: &[&str]) -> Child {
    let d = dir.display().to_string();
    let mut args = vec!["restore", "-D", &d, "--json"];
    args.extend_from_slice(flags);
    spawn_tern(&args)
}

/// A lazy restore whose fill takes a few seconds: the program works while
/// its memory is still coming in.
const LAZY: &[&str] = &["--lazy-pages", "--prefetch-mb-s", "16"];

/// After a lazy restore ended (the program exited): its JSON must show
/// the program ran while pages were lazy (it faulted) and pages were
/// served. (It may have exited before the fill ended: `exited`.)
fn assert_lazy_json(name: &str, r: Child) -> serde_json::Value {
    let out = r.wait_with_output().expect("tern restore output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| {
            panic!(
                "lazy restore of {name}: no JSON on stdout ({e}): {stdout:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let l = &v["lazy"];
    assert!(
        l["faults"].as_u64() > Some(0) && l["pages"].as_u64() > Some(0),
        "lazy restore of {name}: {v}"
    );
    v
}

/// A protocol-speaking program: checkpoint, restore, check it goes on
/// (`progress` grows) and then passes its own check.
fn carry_on(
    name: &str,
    program: &Path,
    args: &[&str],
    pre_dumps: usize,
    progress: &str,
    flags: &[&str],
) {
    carry_on_probed(name, program, args, pre_dumps, progress, flags, |_| Ok(()));
}

/// [`carry_on`], and once the restored program makes progress, `probe`
/// (given its directory) must succeed.
fn carry_on_probed(
    name: &str,
    program: &Path,
    args: &[&str],
    pre_dumps: usize,
    progress: &str,
    flags: &[&str],
    probe: impl Fn(&Path) -> Result<(), String>,
) {
    // One at a time: every workload here spins on the 2 cores, and a dump
    // waits on ptrace stops; in parallel they slowed each other past the
    // deadlines on a loaded machine.
    let _one = serial();
    let mut ck =
        CkProcess::start_program(name, program, args, READY).unwrap_or_else(|e| panic!("{e}"));
    let root = tempdir();
    let progress_file = ck.dir.path().join(progress);
    let dir = checkpoint(ck.pid, root.path(), pre_dumps);
    ck.release();
    let before = read_counter(&progress_file);
    let mut r = restore(&dir, flags);
    // It carries on: the counter moves past where the dump left it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if read_counter(&progress_file) > before {
            break;
        }
        if Instant::now() > deadline {
            // The restored process too, not only the tern waiting for it.
            // SAFETY: plain kill(2) of the restored PID.
            unsafe { libc::kill(ck.pid, libc::SIGKILL) };
            let _ = r.kill();
            let out = r.wait_with_output().expect("tern restore output");
            panic!(
                "restored {name} made no progress past {before}\n--- tern restore stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = probe(ck.dir.path()) {
        // SAFETY: plain kill(2) of the restored PID.
        unsafe { libc::kill(ck.pid, libc::SIGKILL) };
        let _ = r.kill();
        panic!("restored {name} after {pre_dumps} pre-dumps: {e}");
    }
    let verdict = ck
        .verdict(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        verdict, "PASS",
        "restored {name} after {pre_dumps} pre-dumps"
    );
    let st = wait_deadline(&mut r, Duration::from_secs(20)).expect("tern restore did not exit");
    assert!(
        st.success(),
        "tern restore exited {st} though {name} passed"
    );
    if flags.contains(&"--lazy-pages") {
        assert_lazy_json(name, r);
    }
}

fn read_counter(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Chroots into its own directory, then counts; on SIGTERM it checks from
/// inside that its root and cwd are still that directory.
const PYTHON_CHROOT: &str = r#"
import os, signal, sys, time
out = sys.argv[sys.argv.index('--out') + 1]
here = os.path.dirname(out)
name = os.path.basename(out)
os.chdir(here)
os.chroot(here)
def on_term(sig, frame):
    ok = os.getcwd() == '/' and os.path.exists('/' + name) and not os.path.exists(here)
    with open('/' + name, 'a') as f:
        f.write('PASS\n' if ok else 'FAIL cwd %r, %s still visible\n' % (os.getcwd(), here))
    os._exit(0 if ok else 1)
signal.signal(signal.SIGTERM, on_term)
with open('/' + name, 'a') as f:
    f.write('ready %d\n' % os.getpid())
n = 0
while True:
    n += 1
    with open('/count.tmp', 'w') as f:
        f.write(str(n))
    os.rename('/count.tmp', '/count')
    time.sleep(0.01)
"#;

/// A process in a chroot comes back in the same root directory.
#[test]
fn python_in_a_chroot() {
    let py = require("/usr/bin/python3", "python3");
    let root = tempdir();
    let script = root.path().join("prog.py");
    std::fs::write(&script, PYTHON_CHROOT).unwrap();
    let s = script.display().to_string();
    carry_on("python3", &py, &[&s], 0, "count", &[]);
}

fn python(pre_dumps: usize, flags: &[&str]) {
    let py = require("/usr/bin/python3", "python3");
    let root = tempdir();
    let script = root.path().join("prog.py");
    std::fs::write(&script, PYTHON).unwrap();
    let s = script.display().to_string();
    carry_on("python3", &py, &[&s], pre_dumps, "count", flags);
}

#[test]
fn python_without_pre_dump() {
    python(0, &[]);
}

#[test]
fn python_after_three_pre_dumps() {
    python(3, &[]);
}

#[test]
fn python_restored_lazily() {
    python(1, LAZY);
}

/// Node.js: libuv's epoll and eventfds, V8's threads, an HTTP server
/// listening on loopback. Counts on a 10 ms `setInterval`; answers `count
/// N` over HTTP; on SIGTERM it arms a 100 ms `setTimeout` and, when that
/// fires, checks a 200000-entry Map and that the timeout took under 1 s.
const NODE: &str = r#"
const fs = require('fs');
const path = require('path');
const out = process.argv[process.argv.indexOf('--out') + 1];
const dir = path.dirname(out);
const big = new Map();
for (let i = 0; i < 200000; i++) big.set('k' + i, i * 7);
const http = require('http');
let n = 0;
const server = http.createServer((req, res) => res.end('count ' + n + '\n'));
server.listen(0, '127.0.0.1', () => {
  fs.writeFileSync(path.join(dir, 'port'), String(server.address().port));
});
setInterval(() => {
  n++;
  fs.writeFileSync(path.join(dir, 'count.tmp'), String(n));
  fs.renameSync(path.join(dir, 'count.tmp'), path.join(dir, 'count'));
}, 10);
process.on('SIGTERM', () => {
  const t0 = Date.now();
  setTimeout(() => {
    const why = [];
    for (let i = 0; i < 200000; i += 997) {
      if (big.get('k' + i) !== i * 7) { why.push('entry k' + i + ' is ' + big.get('k' + i)); break; }
    }
    const took = Date.now() - t0;
    if (took > 1000) why.push('a 100 ms setTimeout fired after ' + took + ' ms');
    fs.appendFileSync(out, why.length ? 'FAIL ' + why.join(', ') + '\n' : 'PASS\n');
    process.exit(why.length ? 1 : 0);
  }, 100);
});
fs.appendFileSync(out, 'ready ' + process.pid + '\n');
"#;

fn node(pre_dumps: usize, flags: &[&str]) {
    let node = require("/usr/bin/node", "nodejs");
    let root = tempdir();
    let script = root.path().join("prog.js");
    std::fs::write(&script, NODE).unwrap();
    let s = script.display().to_string();
    // After the restore its server answers, on the port it had.
    carry_on_probed("node", &node, &[&s], pre_dumps, "count", flags, |dir| {
        use std::io::{Read, Write};
        let port =
            std::fs::read_to_string(dir.join("port")).map_err(|e| format!("port file: {e}"))?;
        let addr = format!("127.0.0.1:{}", port.trim());
        let mut c =
            std::net::TcpStream::connect(&addr).map_err(|e| format!("connect to {addr}: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        c.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)
            .map_err(|e| format!("reading the answer: {e}"))?;
        if answer.starts_with("HTTP/1.1 200") && answer.contains("count ") {
            Ok(())
        } else {
            Err(format!("its HTTP server answered {answer:?}"))
        }
    });
}

#[test]
fn node_without_pre_dump() {
    node(0, &[]);
}

#[test]
fn node_after_three_pre_dumps() {
    node(3, &[]);
}

#[test]
fn node_restored_lazily() {
    node(1, LAZY);
}

/// Python's asyncio: an epoll selector and a socketpair as its self-pipe
/// (signals reach the loop through it). Counts from a task every 10 ms; on
/// SIGTERM (`add_signal_handler`, so through the socketpair) it awaits a
/// 100 ms sleep and checks a 300000-entry dict and a queue between two
/// tasks.
const PYTHON_ASYNCIO: &str = r#"
import asyncio, os, signal, sys, time
out = sys.argv[sys.argv.index('--out') + 1]
here = os.path.dirname(out)
d = {i: str(i) * 3 for i in range(300000)}

async def counter():
    n = 0
    while True:
        n += 1
        with open(os.path.join(here, 'count.tmp'), 'w') as f:
            f.write(str(n))
        os.rename(os.path.join(here, 'count.tmp'), os.path.join(here, 'count'))
        await asyncio.sleep(0.01)

async def producer(q):
    i = 0
    while True:
        await q.put(i)
        i += 1
        await asyncio.sleep(0.005)

async def consumer(q, seen):
    while True:
        v = await q.get()
        if seen and v != seen[-1] + 1:
            seen.append(-1)
        seen.append(v)

async def main():
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    q = asyncio.Queue(maxsize=4)
    seen = []
    tasks = [asyncio.create_task(t) for t in (counter(), producer(q), consumer(q, seen))]
    with open(out, 'a') as f:
        f.write('ready %d\n' % os.getpid())
    await done.wait()
    t0 = time.monotonic()
    await asyncio.sleep(0.1)
    took = time.monotonic() - t0
    why = []
    if took > 1.0:
        why.append('a 0.1 s sleep took %.3f s' % took)
    for i in range(0, 300000, 997):
        if d.get(i) != str(i) * 3:
            why.append('entry %d is %r' % (i, d.get(i)))
            break
    if -1 in seen or len(seen) < 2:
        why.append('the queue gave %d values, in order: %s' % (len(seen), -1 not in seen))
    with open(out, 'a') as f:
        f.write('FAIL ' + ', '.join(why) + '\n' if why else 'PASS\n')
    os._exit(1 if why else 0)

asyncio.run(main())
"#;

fn python_asyncio(pre_dumps: usize, flags: &[&str]) {
    let py = require("/usr/bin/python3", "python3");
    let root = tempdir();
    let script = root.path().join("prog.py");
    std::fs::write(&script, PYTHON_ASYNCIO).unwrap();
    let s = script.display().to_string();
    carry_on("python3", &py, &[&s], pre_dumps, "count", flags);
}

#[test]
fn python_asyncio_without_pre_dump() {
    python_asyncio(0, &[]);
}

#[test]
fn python_asyncio_after_three_pre_dumps() {
    python_asyncio(3, &[]);
}

#[test]
fn python_asyncio_restored_lazily() {
    python_asyncio(1, LAZY);
}

/// `redis-cli -p PORT ARGS...`: its output, or why it failed.
fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("/usr/bin/redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "redis-cli {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `redis-server` (Debian's) with 20000 keys loaded and no client
/// connected, checkpointed, restored: it answers `redis-cli` with its
/// data, then shuts down cleanly (so `tern restore` exits 0).
fn redis(pre_dumps: usize, flags: &[&str]) {
    let server = require("/usr/bin/redis-server", "redis-server");
    require("/usr/bin/redis-cli", "redis-tools");
    let _one = serial();
    let root = tempdir();
    // A free port: the kernel picks one, then it is let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut child = Command::new(&server)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(root.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(root.path().join("log")).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    let pid = child.id() as i32;
    let deadline = Instant::now() + READY;
    while redis_cli(port, &["ping"]).as_deref() != Ok("PONG") {
        assert!(
            Instant::now() < deadline,
            "redis-server did not answer PING"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // 20000 keys, in batches of 1000 through MSET.
    for b in 0..20 {
        let mut args = vec!["mset".to_string()];
        for i in b * 1000..(b + 1) * 1000 {
            args.push(format!("key:{i}"));
            args.push(format!("value-{}", i * 7));
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(redis_cli(port, &a).as_deref(), Ok("OK"));
    }
    assert_eq!(redis_cli(port, &["dbsize"]).as_deref(), Ok("20000"));
    let dir = checkpoint(pid, root.path(), pre_dumps);
    let _ = child.wait();
    let mut r = restore(&dir, flags);
    let check = || -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while redis_cli(port, &["ping"]).as_deref() != Ok("PONG") {
            if Instant::now() > deadline {
                return Err("the restored redis-server does not answer PING".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let n = redis_cli(port, &["dbsize"])?;
        if n != "20000" {
            return Err(format!("DBSIZE {n}, expected 20000"));
        }
        for i in [0, 1, 4999, 12345, 19999] {
            let v = redis_cli(port, &["get", &format!("key:{i}")])?;
            if v != format!("value-{}", i * 7) {
                return Err(format!("GET key:{i}: {v:?}"));
            }
        }
        // It still takes writes.
        if redis_cli(port, &["set", "after", "restore"])? != "OK"
            || redis_cli(port, &["get", "after"])? != "restore"
        {
            return Err("SET/GET after the restore".into());
        }
        Ok(())
    };
    let checked = check();
    let _ = redis_cli(port, &["shutdown", "nosave"]);
    let st = wait_deadline(&mut r, Duration::from_secs(20));
    if let Err(e) = checked {
        // SAFETY: plain kill(2) of the restored PID.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let out = r.wait_with_output().map(|o| o.stderr).unwrap_or_default();
        panic!(
            "restored redis-server after {pre_dumps} pre-dumps {flags:?}: {e}\n--- tern restore stderr:\n{}",
            String::from_utf8_lossy(&out)
        );
    }
    let st = st.expect("tern restore did not exit after SHUTDOWN");
    assert!(
        st.success(),
        "tern restore exited {st} after redis-server's SHUTDOWN"
    );
}

#[test]
fn redis_without_pre_dump() {
    redis(0, &[]);
}

#[test]
fn redis_after_three_pre_dumps() {
    redis(3, &[]);
}

#[test]
fn redis_restored_lazily() {
    redis(1, LAZY);
}

/// Builtins only (no child process: tern dumps one process).
const BASH: &str = r#"
out=$2; dir=$(dirname "$out"); i=0
trap 'echo PASS >> "$out"; exit 0' TERM
echo "ready $$" >> "$out"
while true; do
  i=$((i+1))
  if (( i % 2000 == 0 )); then echo $i > "$dir/count"; fi
done
"#;

fn bash(pre_dumps: usize) {
    let b = require("/usr/bin/bash", "bash");
    carry_on("bash", &b, &["-c", BASH, "bash"], pre_dumps, "count", &[]);
}

#[test]
fn bash_without_pre_dump() {
    bash(0);
}

#[test]
fn bash_after_three_pre_dumps() {
    bash(3);
}

/// sqlite3 with an in-memory database reading commands from a FIFO: the
/// test writes rows before the dump and queries them after the restore.
fn sqlite(pre_dumps: usize, flags: &[&str]) {
    // One at a time: every workload here spins on the 2 cores, and a dump
    // waits on ptrace stops; in parallel they slowed each other past the
    // deadlines on a loaded machine.
    let _one = serial();
    let sq = require("/usr/bin/sqlite3", "sqlite3");
    let work = tempdir();
    let fifo = work.path().join("cmds");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo on a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    // Read-write, so that neither side blocks on open and the FIFO never
    // sees end-of-file while the test holds it.
    let mut cmds = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let out_path = work.path().join("out");
    let mut child = Command::new(&sq)
        .arg(":memory:")
        .stdin(std::fs::File::open(&fifo).unwrap())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(work.path().join("err")).unwrap())
        .current_dir(work.path())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    writeln!(
        cmds,
        "CREATE TABLE t(x INTEGER, y TEXT);\n\
         WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c WHERE n < 50000) INSERT INTO t SELECT n, printf('row-%d', n) FROM c;\n\
         SELECT 'before', count(*), sum(x) FROM t;"
    )
    .unwrap();
    wait_for(&out_path, "before|50000|1250025000");
    let root = tempdir();
    let dir = checkpoint(pid, root.path(), pre_dumps);
    let _ = child.kill();
    let _ = child.wait();
    let mut r = restore(&dir, flags);
    writeln!(
        cmds,
        "INSERT INTO t VALUES (7, 'after');\nSELECT 'after', count(*), sum(x) FROM t;"
    )
    .unwrap();
    wait_for(&out_path, "after|50001|1250025007");
    writeln!(cmds, ".quit").unwrap();
    let st = wait_deadline(&mut r, Duration::from_secs(20)).expect("sqlite3 did not quit");
    assert!(
        st.success(),
        "tern restore (waiting for sqlite3) exited {st}"
    );
    if flags.contains(&"--lazy-pages") {
        assert_lazy_json("sqlite3", r);
    }
}

fn wait_for(path: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(text)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{} never showed {text:?}; it holds {:?}",
        path.display(),
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

#[test]
fn sqlite_without_pre_dump() {
    sqlite(0, &[]);
}

#[test]
fn sqlite_after_three_pre_dumps() {
    sqlite(3, &[]);
}

#[test]
fn sqlite_restored_lazily() {
    sqlite(1, &["--lazy-pages", "--prefetch-mb-s", "2"]);
}

/// Forks a checking child every few ms, unless DIR/hold exists (then it
/// says `held` in DIR/state and forks nothing: an image holds one process,
/// and tern refuses to dump one with a child). Each child reads random
/// blocks of a 1.3 MB string the parent built before the dump and exits 1
/// (after a `FAIL child ...` line) if one is wrong.
const BASH_FORKING: &str = r#"
out=$2; dir=$(dirname "$out"); n=0; fails=0
export LC_ALL=C
printf -v data 'block-%06d;' {1..100000}
mkfifo "$dir/nap"; exec 3<>"$dir/nap"
trap 'if ((fails == 0)); then echo PASS >> "$out"; else echo "FAIL $fails children failed" >> "$out"; fi; exit 0' TERM
echo "ready $$" >> "$out"
while true; do
  if [[ -e $dir/hold ]]; then echo held > "$dir/state"; read -t 0.01 -u 3; continue; fi
  echo run > "$dir/state"
  ( for j in 1 2 3 4; do
      k=$(( (RANDOM * 32768 + RANDOM) % 100000 + 1 ))
      printf -v want 'block-%06d;' $k
      got=${data:$(( (k - 1) * 13 )):13}
      if [[ ${#data} != 1300000 || $got != "$want" ]]; then
        echo "FAIL child: block $k reads '$got' (length ${#data})" >> "$out"; exit 1
      fi
    done; exit 0 )
  if (( $? != 0 )); then fails=$((fails + 1)); fi
  n=$((n + 1)); if (( n % 20 == 0 )); then echo $n > "$dir/count"; fi
  read -t 0.003 -u 3
done
"#;

/// The forking bash loop, held while it is dumped, restored lazily (a slow
/// fill) and let go: children forked while the parent's pages are lazy
/// read the parent's data (served through their own userfaultfds), and at
/// least 100 of them finish, all right.
#[test]
fn bash_forking_children_restored_lazily() {
    let _one = serial();
    let b = require("/usr/bin/bash", "bash");
    let mut ck = CkProcess::start_program("bash", &b, &["-c", BASH_FORKING, "bash"], READY)
        .unwrap_or_else(|e| panic!("{e}"));
    let d = ck.dir.path().to_path_buf();
    let count = d.join("count");
    // It forks a while before the dump: the children work.
    wait_for(&count, "");
    let started = Instant::now();
    while read_counter(&count) < 40 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "bash forked fewer than 40 children in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(d.join("hold"), "").unwrap();
    let pid = ck.pid;
    let held = tern_tests::proc::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(d.join("state")).is_ok_and(|s| s.trim() == "held")
            && std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .is_ok_and(|c| c.trim().is_empty())
    });
    assert!(held, "bash did not stop forking within 10 s");
    let root = tempdir();
    let dir = checkpoint(pid, root.path(), 0);
    ck.release();
    let before = read_counter(&count);
    let mut r = restore(&dir, &["--lazy-pages", "--prefetch-mb-s", "2"]);
    std::fs::remove_file(d.join("hold")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_counter(&count) < before + 100 {
        if Instant::now() > deadline || ck.lines().iter().any(|l| l.starts_with("FAIL")) {
            // SAFETY: plain kill(2) of the restored PID.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = r.kill();
            let out = r.wait_with_output().expect("tern restore output");
            panic!(
                "restored bash: {} children done since the dump (need 100); result file {:?}\n--- tern restore stderr:\n{}",
                read_counter(&count) - before,
                ck.lines(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let verdict = ck
        .verdict(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(verdict, "PASS", "restored forking bash: {:?}", ck.lines());
    let st = wait_deadline(&mut r, Duration::from_secs(20)).expect("tern restore did not exit");
    assert!(st.success(), "tern restore exited {st} though bash passed");
    let v = assert_lazy_json("bash", r);
    assert!(
        v["lazy"]["children"].as_u64() > Some(0),
        "no child was forked while pages were lazy (the fill was too quick): {v}"
    );
}

/// Serialises the tests of this file (see the callers).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
