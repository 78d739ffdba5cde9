//! The link to procman's own supervisor (systemd, or anything speaking
//! sd_notify): READY/RELOADING/STOPPING/STATUS, and the watchdog ping when
//! `WATCHDOG_USEC` asks for one. Without `NOTIFY_SOCKET`, sending is a
//! no-op.

use std::time::{Duration, Instant};

use crate::notify::SystemdNotifier;
use crate::policy::Due;

/// procman's side of sd_notify.
pub(super) struct SystemdLink {
    notifier: Option<SystemdNotifier>,
    watchdog: Option<(Duration, Instant)>,
}

impl SystemdLink {
    /// From procman's environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`).
    pub(super) fn from_env(now: Instant) -> SystemdLink {
        let notifier = SystemdNotifier::from_env(std::env::var_os("NOTIFY_SOCKET").as_deref());
        let interval = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        SystemdLink {
            notifier,
            watchdog: interval.map(|d| (d, now + d)),
        }
    }

    /// Sends `text` (newline-separated assignments), if anyone listens.
    pub(super) fn send(&self, text: &str) {
        if let Some(sd) = &self.notifier {
            sd.send(text);
        }
    }

    /// The next watchdog ping, if the watchdog is on.
    pub(super) fn deadline(&self) -> Option<(Instant, Due)> {
        self.watchdog.map(|(_, at)| (at, Due::SystemdWatchdog))
    }

    /// The ping is due: sends it and schedules the next.
    pub(super) fn ping(&mut self, now: Instant) {
        self.send("WATCHDOG=1");
        if let Some((interval, at)) = &mut self.watchdog {
            *at = now + *interval;
        }
    }
}

/// `WATCHDOG_USEC/2` when systemd's watchdog is on for procman (`me`):
/// `WATCHDOG_PID`, when set, must name it.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok()?;
    if let Some(pid) = pid {
        if pid.parse::<u32>().ok()? != me {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_interval_when_it_is_for_us() {
        let half = Some(Duration::from_secs(5));
        let table = [
            (Some("10000000"), None, half),
            (Some("10000000"), Some("42"), half),
            (Some("10000000"), Some("43"), None),
            (Some("10000000"), Some("x"), None),
            (Some("0"), None, None),
            (Some("ten"), None, None),
            (None, Some("42"), None),
        ];
        for (usec, pid, want) in table {
            assert_eq!(watchdog_interval(usec, pid, 42), want, "{usec:?} {pid:?}");
        }
    }
}
