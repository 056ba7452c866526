//! Lines: the bounded line reader under every connection.
//!
//! Owns [`LineReader`], which splits a byte stream at `\n` and never holds
//! more than its limit of one line: a longer line is skipped whole and
//! reported as [`Line::TooLong`], so the connection can refuse it and go on
//! with the next one (docs/protocol.md, "Limits").
//!
//! Invariants: a trailing `\r` is dropped and blank lines are skipped;
//! [`LineReader::next_line`] is cancel-safe (its state lives in the struct,
//! so a line read half-way survives a `select!`).

use std::io;

use tokio::io::{AsyncBufReadExt, BufReader};

/// What [`LineReader::next_line`] read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    Complete(Vec<u8>),
    /// A line over the limit, skipped whole; its length so far.
    TooLong(usize),
    Eof,
}

/// Newline-delimited lines with a length limit.
pub(crate) struct LineReader<R> {
    reader: BufReader<R>,
    max: usize,
    /// The line so far, while it is within `max`.
    line: Vec<u8>,
    /// Bytes of the current line seen, kept counting past `max`.
    seen: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(reader: R, max: usize) -> Self {
        LineReader {
            reader: BufReader::with_capacity(64 * 1024, reader),
            max,
            line: Vec::new(),
            seen: 0,
        }
    }

    pub(crate) async fn next_line(&mut self) -> io::Result<Line> {
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                let seen = std::mem::take(&mut self.seen);
                let line = std::mem::take(&mut self.line);
                return Ok(match seen {
                    0 => Line::Eof,
                    n if n > self.max => Line::TooLong(n),
                    _ => Line::Complete(line),
                });
            }
            let newline = available.iter().position(|b| *b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            self.seen += chunk.len();
            if self.seen <= self.max {
                self.line.extend_from_slice(chunk);
            } else {
                self.line = Vec::new();
            }
            let consumed = chunk.len() + usize::from(newline.is_some());
            self.reader.consume(consumed);
            if newline.is_some() {
                let seen = std::mem::take(&mut self.seen);
                let mut line = std::mem::take(&mut self.line);
                if seen > self.max {
                    return Ok(Line::TooLong(seen));
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Line::Complete(line));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn line_reader_skips_long_lines_and_keeps_going() {
        let input: &[u8] = b"short\n0123456789abcdef\r\n\nlast";
        let mut lines = LineReader::new(input, 8);
        assert_eq!(
            lines.next_line().await.unwrap(),
            Line::Complete(b"short".to_vec())
        );
        assert!(matches!(lines.next_line().await.unwrap(), Line::TooLong(_)));
        assert_eq!(
            lines.next_line().await.unwrap(),
            Line::Complete(b"last".to_vec())
        );
        assert_eq!(lines.next_line().await.unwrap(), Line::Eof);
    }
}
