//! [`JournalSocket`]: journald's native socket, played by the test, to see
//! what the agent sends to the journal: each entry's priority and fields
//! (docs/operations.md, Logs).
//!
//! The path is global (`/run/systemd/journal/socket`), so a test holds a
//! cross-process lock while it owns it, and never takes it from a real
//! journald: when one answers there, the test fails and says so. A socket
//! file nobody answers on (left by a killed test) is replaced.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::lock::{FileLock, LOCK_WAIT};

/// Where journald listens for its native protocol.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Held while a test owns [`JOURNAL_SOCKET`].
const LOCK: &str = "/tmp/edge-outbox-test-journal.lock";

/// One journal entry: its fields, each value as sent.
#[derive(Debug, Clone, Default)]
pub struct JournalEntry {
    pub fields: BTreeMap<String, Vec<u8>>,
}

impl JournalEntry {
    /// A field's value as text (lossy), if the entry has it.
    pub fn get(&self, field: &str) -> Option<String> {
        self.fields
            .get(field)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Parses one datagram of journald's native protocol: `KEY=VALUE\n`, or
    /// `KEY\n`, a 64-bit little-endian length, the value and `\n`.
    pub fn parse(mut data: &[u8]) -> Result<JournalEntry, String> {
        let mut entry = JournalEntry::default();
        while !data.is_empty() {
            let end = data
                .iter()
                .position(|&b| b == b'\n')
                .ok_or("a field without its newline")?;
            let line = &data[..end];
            data = &data[end + 1..];
            if let Some(eq) = line.iter().position(|&b| b == b'=') {
                let key = String::from_utf8_lossy(&line[..eq]).into_owned();
                entry.fields.insert(key, line[eq + 1..].to_vec());
                continue;
            }
            let key = String::from_utf8_lossy(line).into_owned();
            let (len, rest) = data
                .split_first_chunk::<8>()
                .ok_or_else(|| format!("{key}: no length"))?;
            let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|e| e.to_string())?;
            if rest.len() < len + 1 || rest[len] != b'\n' {
                return Err(format!("{key}: a value shorter than its length {len}"));
            }
            entry.fields.insert(key, rest[..len].to_vec());
            data = &rest[len + 1..];
        }
        Ok(entry)
    }
}

/// The journal's socket, bound by the test.
pub struct JournalSocket {
    socket: Option<UnixDatagram>,
    _lock: FileLock,
}

impl JournalSocket {
    /// Takes the lock, then binds [`JOURNAL_SOCKET`] (creating its directory).
    /// Panics when a real journald answers there.
    pub fn bind() -> JournalSocket {
        let lock = FileLock::acquire(Path::new(LOCK), true, LOCK_WAIT);
        lock.note_holder();
        let path = Path::new(JOURNAL_SOCKET);
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                let probe = UnixDatagram::unbound().expect("a datagram socket");
                // journald discards an empty datagram: what the journald
                // crate itself sends to check the socket.
                if probe.send_to(&[], path).is_ok() {
                    panic!(
                        "a journald listens at {JOURNAL_SOCKET}; this test plays journald on \
                         that path and will not take it from a real one: run it where no \
                         journald runs (CI's container has none)"
                    );
                }
                std::fs::remove_file(path).expect("removing a stale journal socket");
            }
            Ok(_) => panic!("{JOURNAL_SOCKET} exists and is not a socket; not touching it"),
            Err(_) => {}
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("creating the journal's directory");
        }
        let socket = UnixDatagram::bind(path).expect("binding the journal socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        JournalSocket {
            socket: Some(socket),
            _lock: lock,
        }
    }

    /// Closes and removes the socket but keeps the lock: journald is then
    /// unreachable for the agent, and no other test can bind it meanwhile.
    pub fn remove(&mut self) {
        if self.socket.take().is_some() {
            let _ = std::fs::remove_file(JOURNAL_SOCKET);
        }
    }

    /// Collects entries until `done` holds for those collected so far, or
    /// panics after `deadline` naming `what` and showing what came.
    pub fn collect_until(
        &self,
        what: &str,
        deadline: Duration,
        mut done: impl FnMut(&[JournalEntry]) -> bool,
    ) -> Vec<JournalEntry> {
        let socket = self
            .socket
            .as_ref()
            .expect("the journal socket was removed");
        let start = Instant::now();
        let mut entries = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            if let Ok(n) = socket.recv(&mut buf) {
                if n > 0 {
                    match JournalEntry::parse(&buf[..n]) {
                        Ok(entry) => entries.push(entry),
                        Err(e) => panic!(
                            "not journald's native protocol ({e}): {:?}",
                            String::from_utf8_lossy(&buf[..n])
                        ),
                    }
                }
            }
            if done(&entries) {
                return entries;
            }
            if start.elapsed() > deadline {
                panic!("no {what} in the journal within {deadline:?}; it got: {entries:#?}");
            }
        }
    }
}

impl Drop for JournalSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_field_forms_parse() {
        let mut data = b"PRIORITY=4\nMESSAGE\n".to_vec();
        data.extend_from_slice(&5u64.to_le_bytes());
        data.extend_from_slice(b"a\nb=c\nEO_X=1\n");
        let e = JournalEntry::parse(&data).unwrap();
        assert_eq!(e.get("PRIORITY").as_deref(), Some("4"));
        assert_eq!(e.get("MESSAGE").as_deref(), Some("a\nb=c"));
        assert_eq!(e.get("EO_X").as_deref(), Some("1"));
        assert!(JournalEntry::parse(b"MESSAGE\n\x09\0\0\0\0\0\0\0ab\n").is_err());
    }
}
