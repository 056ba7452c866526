//! Filters: which rows an operator's `list`, `export`, `retry --failed` and
//! `discard --failed` act on (docs/cli.md, Filters).
//!
//! Owns [`RowFilter`] (the typed filters, parsed once by the CLI), [`ListOrder`]
//! and the one place that turns a filter into SQL: [`RowFilter::clause`],
//! a `WHERE` condition of fixed fragments, one per filter given, whose
//! values are bound parameters. Nothing a user typed is ever part of the
//! SQL text.
//!
//! Invariants:
//! - Every filter narrows: no filter means every row (of the status the
//!   command fixes, if it fixes one); filters combine with AND.
//! - `exchange` and `routing_key` match exactly (`""` is the default
//!   exchange); `error` is a case-sensitive substring of `last_error`
//!   (`instr`, not `LIKE`: `%` and `_` are plain characters); a row
//!   without `last_error` never matches an `error` filter; `created_before`
//!   compares `create_time` (a row without one never matches).
//! - The status fragment is `status = :status`, so a filtered status still
//!   walks the status index in rowid order.

use rusqlite::types::Value;
use rusqlite::ToSql;

use super::Status;

/// Which rows: each `Some` narrows the selection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RowFilter {
    pub(crate) status: Option<Status>,
    pub(crate) exchange: Option<String>,
    pub(crate) routing_key: Option<String>,
    /// A substring of `last_error`.
    pub(crate) error: Option<String>,
    /// Rows whose `create_time` (epoch ms) is before this.
    pub(crate) created_before: Option<i64>,
}

/// Insertion (`rowid`) order, which is also age order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum ListOrder {
    /// Newest first: what `list` shows by default.
    #[default]
    NewestFirst,
    /// Oldest first: `list --oldest`, and `export` (the order the forwarder
    /// publishes in, kept by the host that imports them).
    OldestFirst,
}

impl ListOrder {
    pub(crate) fn sql(self) -> &'static str {
        match self {
            ListOrder::NewestFirst => "ORDER BY rowid DESC",
            ListOrder::OldestFirst => "ORDER BY rowid",
        }
    }
}

/// A filter as SQL: the condition (`1` when there is none) and its
/// parameters by name.
pub(crate) struct Clause {
    pub(crate) condition: String,
    params: Vec<(&'static str, Value)>,
}

impl Clause {
    /// The parameters for `rusqlite`, with `extra` ones the statement adds.
    pub(crate) fn params<'a>(
        &'a self,
        extra: &[(&'a str, &'a dyn ToSql)],
    ) -> Vec<(&'a str, &'a dyn ToSql)> {
        let mut all: Vec<(&str, &dyn ToSql)> = extra.to_vec();
        all.extend(self.params.iter().map(|(n, v)| (*n, v as &dyn ToSql)));
        all
    }
}

impl RowFilter {
    /// The `WHERE` condition of this filter; `status` is left out when the
    /// statement fixes the status itself (`retry`, `discard`).
    pub(crate) fn clause(&self, with_status: bool) -> Clause {
        let mut parts: Vec<&'static str> = Vec::new();
        let mut params: Vec<(&'static str, Value)> = Vec::new();
        if let (true, Some(status)) = (with_status, self.status) {
            parts.push("status = :f_status");
            params.push((":f_status", Value::Integer(status.code())));
        }
        let texts = [
            ("exchange = :f_exchange", ":f_exchange", &self.exchange),
            (
                "routing_key = :f_routing_key",
                ":f_routing_key",
                &self.routing_key,
            ),
            ("instr(last_error, :f_error) > 0", ":f_error", &self.error),
        ];
        for (part, name, value) in texts {
            if let Some(value) = value {
                parts.push(part);
                params.push((name, Value::Text(value.clone())));
            }
        }
        if let Some(before) = self.created_before {
            parts.push("create_time < :f_created_before");
            params.push((":f_created_before", Value::Integer(before)));
        }
        let condition = if parts.is_empty() {
            "1".to_string()
        } else {
            parts.join(" AND ")
        };
        Clause { condition, params }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::params;

    use super::*;
    use crate::config::Synchronous;
    use crate::store::open::open_writer_connection;
    use crate::store::{Admin, Database, Reader};

    /// (id, status, exchange, routing key, last error, create time).
    type Fixture = (
        &'static str,
        Status,
        &'static str,
        &'static str,
        Option<&'static str>,
        i64,
    );

    /// Rows `a`..`f`, inserted in this order (rowid = age order).
    const ROWS: [Fixture; 6] = [
        (
            "a",
            Status::Failed,
            "ex",
            "k1",
            Some("NOT_FOUND - no exchange"),
            100,
        ),
        ("b", Status::Failed, "ex", "k2", Some("nack"), 200),
        (
            "c",
            Status::Delivering,
            "ex",
            "k1",
            Some("NO_ROUTE 312"),
            300,
        ),
        ("d", Status::Failed, "other", "k1", Some("50%_off"), 400),
        ("e", Status::Delivered, "", "k1", None, 500),
        ("f", Status::Failed, "ex", "k1", None, 600),
    ];

    fn fixture(dir: &Path) -> Reader {
        let path = dir.join("t.db");
        let conn = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
        for (id, status, exchange, key, error, time) in ROWS {
            conn.execute(
                "INSERT INTO msg_log (id, msg, status, exchange, routing_key, last_error, \
                 create_time) VALUES (?1, 'x', ?2, ?3, ?4, ?5, ?6)",
                params![id, status, exchange, key, error, time],
            )
            .unwrap();
        }
        Reader::open(&Database::plain(&path)).unwrap()
    }

    fn ids(reader: &Reader, filter: &RowFilter, order: ListOrder) -> Vec<String> {
        let rows = reader.list(filter, order, 100).unwrap();
        rows.into_iter().map(|r| r.id).collect()
    }

    #[test]
    fn each_filter_narrows_and_they_combine() {
        let dir = tempfile::tempdir().unwrap();
        let reader = fixture(dir.path());
        let all = RowFilter::default();
        let text = |s: &str| Some(s.to_string());
        let cases = [
            (all.clone(), "fedcba"),
            (
                RowFilter {
                    status: Some(Status::Failed),
                    ..all.clone()
                },
                "fdba",
            ),
            (
                RowFilter {
                    exchange: text("ex"),
                    ..all.clone()
                },
                "fcba",
            ),
            (
                RowFilter {
                    exchange: text(""),
                    ..all.clone()
                },
                "e",
            ),
            (
                RowFilter {
                    routing_key: text("k2"),
                    ..all.clone()
                },
                "b",
            ),
            // A substring, case-sensitive; `%` and `_` are plain characters.
            (
                RowFilter {
                    error: text("NO"),
                    ..all.clone()
                },
                "ca",
            ),
            (
                RowFilter {
                    error: text("no"),
                    ..all.clone()
                },
                "a",
            ),
            (
                RowFilter {
                    error: text("%_"),
                    ..all.clone()
                },
                "d",
            ),
            (
                RowFilter {
                    error: text("_"),
                    ..all.clone()
                },
                "dca",
            ),
            (
                RowFilter {
                    created_before: Some(300),
                    ..all.clone()
                },
                "ba",
            ),
            (
                RowFilter {
                    status: Some(Status::Failed),
                    exchange: text("ex"),
                    routing_key: text("k1"),
                    created_before: Some(700),
                    ..all.clone()
                },
                "fa",
            ),
            // Quotes and SQL in a value are data.
            (
                RowFilter {
                    exchange: text("ex' OR 1=1 --"),
                    ..all.clone()
                },
                "",
            ),
        ];
        for (filter, want) in cases {
            let newest: String = ids(&reader, &filter, ListOrder::NewestFirst).concat();
            assert_eq!(newest, want, "{filter:?}");
            let oldest: String = ids(&reader, &filter, ListOrder::OldestFirst).concat();
            assert_eq!(oldest, want.chars().rev().collect::<String>(), "{filter:?}");
        }
        assert_eq!(
            reader.list(&all, ListOrder::OldestFirst, 2).unwrap().len(),
            2
        );
    }

    #[test]
    fn filtered_retry_and_discard_touch_only_failed_rows_they_select() {
        let dir = tempfile::tempdir().unwrap();
        let reader = fixture(dir.path());
        let mut admin = Admin::open(&Database::plain(dir.path().join("t.db"))).unwrap();
        // `status` in the filter is ignored: only failed rows move.
        let ex = RowFilter {
            status: Some(Status::Delivering),
            exchange: Some("ex".into()),
            routing_key: Some("k1".into()),
            ..RowFilter::default()
        };
        assert_eq!(admin.retry_failed(&ex).unwrap(), 2);
        assert_eq!(reader.status_of("a").unwrap(), Some(Status::Delivering));
        assert_eq!(reader.status_of("f").unwrap(), Some(Status::Delivering));
        assert_eq!(reader.status_of("b").unwrap(), Some(Status::Failed));
        let old = RowFilter {
            created_before: Some(450),
            ..RowFilter::default()
        };
        assert_eq!(admin.discard_failed(&old).unwrap(), 2, "b and d");
        let left: String = ids(&reader, &RowFilter::default(), ListOrder::OldestFirst).concat();
        assert_eq!(left, "acef");
        assert_eq!(admin.discard_failed(&RowFilter::default()).unwrap(), 0);
    }

    #[test]
    fn batches_cover_every_selected_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
        let tx = conn.transaction().unwrap();
        for i in 0..2500 {
            let ex = if i % 5 == 0 { "skip" } else { "ex" };
            tx.execute(
                "INSERT INTO msg_log (id, msg, status, exchange, create_time) \
                 VALUES (?1, 'x', ?2, ?3, 1)",
                params![format!("m{i}"), Status::Failed, ex],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let mut admin = Admin::open(&Database::plain(&path)).unwrap();
        let ex = RowFilter {
            exchange: Some("ex".into()),
            ..RowFilter::default()
        };
        assert_eq!(admin.retry_failed(&ex).unwrap(), 2000);
        assert_eq!(admin.discard_failed(&RowFilter::default()).unwrap(), 500);
        let reader = Reader::open(&Database::plain(&path)).unwrap();
        assert_eq!(reader.counts().unwrap().delivering, 2000);
        assert_eq!(reader.counts().unwrap().total(), 2000);
    }

    #[test]
    fn discard_by_id_deletes_failed_fails_delivering_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let reader = fixture(dir.path());
        let mut admin = Admin::open(&Database::plain(dir.path().join("t.db"))).unwrap();
        let given: Vec<String> = ["a", "c", "e", "zz"].map(String::from).to_vec();
        let done = admin.discard(&given).unwrap();
        assert_eq!(done.deleted, ["a"]);
        assert_eq!(done.failed, ["c"]);
        assert_eq!(done.refused, [("e".to_string(), Status::Delivered)]);
        assert_eq!(done.missing, ["zz"]);
        assert_eq!(reader.status_of("a").unwrap(), None);
        let c = reader.get("c").unwrap().unwrap();
        assert_eq!(c.status, Status::Failed);
        assert_eq!(c.last_error.as_deref(), Some("discarded by operator"));
        assert_eq!(reader.status_of("e").unwrap(), Some(Status::Delivered));
        // Twice: the row discarded to failed is now deleted.
        let again = admin.discard(&["c".to_string()]).unwrap();
        assert_eq!(again.deleted, ["c"]);
    }
}
