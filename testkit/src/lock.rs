//! Cross-process locks: how test processes (nextest runs each test in a
//! process of its own) share the restartable broker node and the one-time
//! broker setup.
//!
//! A lock is a `flock` on a file: released when dropped, or by the kernel
//! when the process dies, so a crashed or killed test never leaves it held.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a test waits for a lock another test holds before giving up.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(600);

/// A held `flock` (shared or exclusive) on a file.
pub(crate) struct FileLock {
    file: File,
}

impl FileLock {
    /// Takes the lock on `path` (creating the file), polling every 50 ms;
    /// panics after `deadline`, naming the last exclusive holder.
    pub(crate) fn acquire(path: &Path, exclusive: bool, deadline: Duration) -> FileLock {
        use rustix::fs::{flock, FlockOperation};
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => panic!("cannot open lock file {}: {e}", path.display()),
        };
        let op = if exclusive {
            FlockOperation::NonBlockingLockExclusive
        } else {
            FlockOperation::NonBlockingLockShared
        };
        let start = Instant::now();
        loop {
            match flock(&file, op) {
                Ok(()) => return FileLock { file },
                Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
                Err(e) => panic!("flock {}: {e}", path.display()),
            }
            if start.elapsed() > deadline {
                let holder = fs::read_to_string(path).unwrap_or_default();
                panic!(
                    "waited {deadline:?} for the lock {} (last exclusive holder: {})",
                    path.display(),
                    holder.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Records who holds an exclusive lock, for the timeout message above.
    pub(crate) fn note_holder(&self) {
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        let exe = std::env::args().next().unwrap_or_default();
        let note = format!("pid {} ({exe}, test {test})\n", std::process::id());
        let mut file = &self.file;
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.write_all(note.as_bytes());
    }
}
