//! CPU time of a process (the agent), from `/proc/<pid>/stat`: whether it
//! has gone back to idle once its work is done.

use std::time::{Duration, Instant};

/// User plus system CPU time `pid` has used so far; `None` once it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it are counted from its closing parenthesis.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14, 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second();
    if ticks == 0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

/// The share of one core `pid` used over the next `window` (0.25 = 25%),
/// measured by sampling [`cpu_time`] at both ends. Panics when the process
/// is gone.
pub fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_time(pid).unwrap_or_else(|| panic!("no process {pid}"));
    let start = Instant::now();
    std::thread::sleep(window);
    let after = cpu_time(pid).unwrap_or_else(|| panic!("no process {pid}"));
    let wall = start.elapsed();
    after.saturating_sub(before).as_secs_f64() / wall.as_secs_f64()
}
