//! The value types of the configuration, each with the serde that reads it
//! from what users write and writes it back the same way
//! (docs/configuration.md, "Value syntax").
//!
//! Role: every string of the file that stands for something else (a file
//! mode, a time of day, an exchange type, an address, a duration, "not set")
//! is parsed here, once, at load. Components receive the type and never parse
//! a string again, so none of them can fall back silently on a bad value.
//!
//! Invariants:
//! - A value that does not parse is refused with a message quoting it; the
//!   loader adds the key ([`super::load`]).
//! - Serializing a value gives the text users write ("0660", "03:00", "30s",
//!   "" for not set), so `edge-outbox check-config` prints a file that loads
//!   again to the same values.

use std::time::Duration;

use chrono::NaiveTime;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Synchronous {
    /// Every commit is synced: survives a power cut.
    Full,
    /// WAL sync at checkpoints only: survives a crash of the agent, not a power cut.
    Normal,
}

/// The order the backlog is forwarded in, within a priority
/// (`publish.order`; docs/forwarding.md, Passes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Order {
    /// Oldest first: the order messages were submitted in.
    #[default]
    OldestFirst,
    /// Newest first: live data first after an outage.
    NewestFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HandlerKind {
    Record,
    Exec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Auto,
    Json,
}

/// Permission bits of a file (at most `0o777`), written as an octal string
/// ("0660") so that TOML does not read it as a decimal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FileMode(u32);

impl FileMode {
    /// Read and write for the owner and the group: the socket's default.
    pub(crate) const OWNER_AND_GROUP: FileMode = FileMode(0o660);

    /// The bits, for `chmod`.
    pub(crate) fn bits(self) -> u32 {
        self.0
    }
}

impl TryFrom<String> for FileMode {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        match u32::from_str_radix(&text, 8) {
            Ok(bits) if bits <= 0o777 => Ok(FileMode(bits)),
            _ => Err(format!("{text:?} is not an octal file mode like \"0660\"")),
        }
    }
}

impl From<FileMode> for String {
    fn from(mode: FileMode) -> String {
        format!("{:04o}", mode.0)
    }
}

/// A local time of day to the minute, written "HH:MM".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeOfDay(NaiveTime);

impl TimeOfDay {
    /// 03:00, the purge's default: the quietest hour on most hosts.
    pub(crate) const THREE_AM: TimeOfDay = match NaiveTime::from_hms_opt(3, 0, 0) {
        Some(time) => TimeOfDay(time),
        None => TimeOfDay(NaiveTime::MIN),
    };

    pub(crate) fn time(self) -> NaiveTime {
        self.0
    }
}

impl std::str::FromStr for TimeOfDay {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not a time of day like \"03:00\"");
        let (h, m) = text.split_once(':').ok_or_else(bad)?;
        let h: u32 = h.parse().map_err(|_| bad())?;
        let m: u32 = m.parse().map_err(|_| bad())?;
        NaiveTime::from_hms_opt(h, m, 0)
            .map(TimeOfDay)
            .ok_or_else(bad)
    }
}

impl TryFrom<String> for TimeOfDay {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<TimeOfDay> for String {
    fn from(at: TimeOfDay) -> String {
        at.0.format("%H:%M").to_string()
    }
}

/// The AMQP exchange types a binding may declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ExchangeKind {
    #[default]
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    fn name(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl TryFrom<String> for ExchangeKind {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ]
        .into_iter()
        .find(|kind| kind.name() == text)
        .ok_or_else(|| format!("{text:?} is not one of direct, fanout, topic, headers"))
    }
}

impl From<ExchangeKind> for String {
    fn from(kind: ExchangeKind) -> String {
        kind.name().to_string()
    }
}

impl From<ExchangeKind> for lapin::ExchangeKind {
    fn from(kind: ExchangeKind) -> lapin::ExchangeKind {
        match kind {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

/// Counts that must be at least 1, read as the plain integer and refused at
/// 0 with the same words for every key (`deserialize_with`). Serializing
/// needs nothing: the `NonZero*` types serialize as their integer.
pub(super) mod at_least_one {
    use std::num::{NonZeroU16, NonZeroU32, NonZeroU64, NonZeroUsize};

    use serde::de::{DeserializeOwned, Error};
    use serde::{Deserialize, Deserializer};

    /// A `NonZero*` type and the integer it is read as.
    pub(crate) trait NonZero: Sized {
        type Int: DeserializeOwned;
        fn new(n: Self::Int) -> Option<Self>;
    }

    macro_rules! non_zero {
        ($($t:ty: $int:ty),*) => {$(
            impl NonZero for $t {
                type Int = $int;
                fn new(n: $int) -> Option<Self> {
                    <$t>::new(n)
                }
            }
        )*};
    }
    non_zero!(NonZeroU16: u16, NonZeroU32: u32, NonZeroU64: u64, NonZeroUsize: usize);

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: NonZero>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let n = T::Int::deserialize(deserializer)?;
        T::new(n).ok_or_else(|| D::Error::custom("must be at least 1"))
    }
}

/// `Option<String>` and `Option<PathBuf>` written as a string where `""`
/// means "not set", as users write it (`queue = ""`: no consumer).
pub(super) mod empty_is_none {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer, T: Serialize>(
        value: &Option<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => value.serialize(serializer),
            None => serializer.serialize_str(""),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: From<String>>(
        deserializer: D,
    ) -> Result<Option<T>, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok((!text.is_empty()).then(|| T::from(text)))
    }
}

/// An optional `IP:PORT` listening address, `""` when there is none.
pub(super) mod optional_address {
    use std::net::SocketAddr;

    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        address: &Option<SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match address {
            Some(address) => serializer.collect_str(address),
            None => serializer.serialize_str(""),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            D::Error::custom(format!(
                "{text:?} is not an address like \"127.0.0.1:9464\""
            ))
        })
    }
}

/// Durations as people write them: read with humantime ("500ms", "30s",
/// "30d"), written in the largest whole unit ("90d", not "2months 29days…").
pub(super) mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }

    pub(crate) fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if !ms.is_multiple_of(1000) {
            return format!("{ms}ms");
        }
        let secs = d.as_secs();
        for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if secs > 0 && secs.is_multiple_of(size) {
                return format!("{}{unit}", secs / size);
            }
        }
        format!("{secs}s")
    }
}

/// An optional duration, `""` when there is none (off).
pub(super) mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        d: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => serializer.serialize_str(&super::human_duration::format(*d)),
            None => serializer.serialize_str(""),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() {
            return Ok(None);
        }
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }
}

/// A duration in the largest whole unit ("90d", "500ms"), as the
/// configuration writes it.
pub(crate) fn format_duration(d: Duration) -> String {
    human_duration::format(d)
}

/// `url` with its password replaced by `***`, for logs, errors and status.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_in_whole_units() {
        let f = human_duration::format;
        assert_eq!(f(Duration::from_secs(90 * 86_400)), "90d");
        assert_eq!(f(Duration::from_secs(7_200)), "2h");
        assert_eq!(f(Duration::from_secs(90)), "90s");
        assert_eq!(f(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn time_of_day() {
        let at: TimeOfDay = "03:00".parse().unwrap();
        assert_eq!(at, TimeOfDay::THREE_AM);
        assert_eq!(String::from(at), "03:00");
        assert_eq!(String::from("23:59".parse::<TimeOfDay>().unwrap()), "23:59");
        assert!("24:00".parse::<TimeOfDay>().is_err());
        assert!("12:60".parse::<TimeOfDay>().is_err());
        assert!("3".parse::<TimeOfDay>().is_err());
    }

    #[test]
    fn file_modes_are_octal_up_to_0777() {
        let mode = FileMode::try_from("0600".to_string()).unwrap();
        assert_eq!(mode.bits(), 0o600);
        assert_eq!(String::from(mode), "0600");
        assert_eq!(String::from(FileMode::OWNER_AND_GROUP), "0660");
        assert!(FileMode::try_from("999".to_string()).is_err());
        assert!(FileMode::try_from("1777".to_string()).is_err());
        assert!(FileMode::try_from(String::new()).is_err());
    }

    #[test]
    fn exchange_kinds_round_trip() {
        for name in ["direct", "fanout", "topic", "headers"] {
            let kind = ExchangeKind::try_from(name.to_string()).unwrap();
            assert_eq!(String::from(kind), name);
        }
        let e = ExchangeKind::try_from("x-delayed-message".to_string()).unwrap_err();
        assert!(e.contains("direct, fanout, topic, headers"), "{e}");
        assert_eq!(
            lapin::ExchangeKind::from(ExchangeKind::Topic),
            lapin::ExchangeKind::Topic
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host/vh"), "amqp://host/vh");
    }
}
