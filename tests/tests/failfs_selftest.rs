//! The `failfs` harness itself: its mount serves reads and writes like any
//! file system, and fsync(2) of a file or a directory there fails with EIO
//! (what the durability tests rely on). No skipping: a mount that cannot be
//! made fails the test with the reason.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use tern_tests::failfs::{self, FailFs};

#[test]
fn failfs_serves_io_and_fails_fsync() {
    let tmp = tern_tests::tempdir();
    let fs = FailFs::mount(&tmp.path().join("mnt")).unwrap_or_else(|e| panic!("{e}"));
    let mnt = fs.path().to_path_buf();
    assert!(
        failfs::is_mounted(&mnt),
        "no failfs mount at {}",
        mnt.display()
    );

    let p = mnt.join("file");
    std::fs::write(&p, b"hello failfs").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"hello failfs");

    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let e = f.sync_all().expect_err("fsync on failfs succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "fsync: {e}");
    let e = f.sync_data().expect_err("fdatasync on failfs succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "fdatasync: {e}");

    // Writes through the same file need no fsync to be read back.
    f.seek(SeekFrom::Start(6)).unwrap();
    f.write_all(b"FAILFS, more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "hello FAILFS, more");
    assert_eq!(std::fs::read(&p).unwrap(), b"hello FAILFS, more");

    let d = File::open(&mnt).unwrap();
    let e = d
        .sync_all()
        .expect_err("fsync of a directory on failfs succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "directory fsync: {e}");

    drop((f, d));
    drop(fs);
    assert!(
        !failfs::is_mounted(&mnt),
        "failfs still mounted at {}",
        mnt.display()
    );
}
