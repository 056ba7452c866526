//! The value types of the configuration and their serde: durations, time of
//! day, URLs shown without their password.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every commit is synced: survives a power cut.
    Full,
    /// WAL sync at checkpoints only: survives a crash of the agent, not a power cut.
    Normal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    Record,
    Exec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
}

/// Durations as people write them: read with humantime ("500ms", "30s",
/// "30d"), written in the largest whole unit ("90d", not "2months 29days…").
pub(super) mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
    }

    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if ms % 1000 != 0 {
            return format!("{ms}ms");
        }
        let secs = d.as_secs();
        for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if secs > 0 && secs % size == 0 {
                return format!("{}{unit}", secs / size);
            }
        }
        format!("{secs}s")
    }
}

/// A duration in the largest whole unit ("90d", "500ms"), as the
/// configuration writes it.
pub fn format_duration(d: Duration) -> String {
    human_duration::format(d)
}

/// Parses "HH:MM" into minutes after midnight.
pub fn parse_time_of_day(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a time of day like \"03:00\"");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// `url` with its password replaced by `***`, for logs, errors and status.
pub fn redact_url(url: &str) -> String {
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
