//! How the master logs a worker's lifecycle events: one macro,
//! `worker_event!`, for every site, so the JSON fields tests and log
//! readers wait for (`event`, `reason`, `worker`, `zygote`, `slot`,
//! `generation`) are spelt once and come in the same order everywhere; the
//! text of each line stays at its site. Declared first among the master's
//! modules, so all of them can use it.

/// Logs a lifecycle event of worker `$w` (a [`crate::workers::Worker`])
/// at `$level`: the text, and with `--log-format json` the stable fields
/// `event`, `reason` (when given), `worker`, `zygote` (a worker it forked,
/// when given), `slot` and `generation` that tests and tools wait for.
/// Field names and order are part of the format.
macro_rules! worker_event {
    ($level:ident, $event:literal, reason = $reason:expr, $w:expr, $($text:tt)+) => {
        tracing::$level!(
            event = $event,
            reason = $reason,
            worker = $w.pid.as_raw(),
            slot = $w.slot,
            generation = $w.generation,
            $($text)+
        )
    };
    ($level:ident, $event:literal, $w:expr, zygote = $zygote:expr, $($text:tt)+) => {
        tracing::$level!(
            event = $event,
            worker = $w.pid.as_raw(),
            zygote = $zygote,
            slot = $w.slot,
            generation = $w.generation,
            $($text)+
        )
    };
    ($level:ident, $event:literal, $w:expr, $($text:tt)+) => {
        tracing::$level!(
            event = $event,
            worker = $w.pid.as_raw(),
            slot = $w.slot,
            generation = $w.generation,
            $($text)+
        )
    };
}
