//! How the master logs the lifecycle events of its children: one macro
//! for a worker's (`worker_event!`) and one for a zygote's
//! (`zygote_event!`), so the JSON fields tests and log readers wait for
//! (`event`, `reason`, `worker`, `zygote`, `slot`, `generation`) are spelt
//! once and come in the same order everywhere; the text of each line stays
//! at its site. Declared first among the master's modules, so all of them
//! can use them.

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

/// Logs a lifecycle event of zygote `$z` (a [`crate::zygote::Zygote`]) at
/// `$level`: the text, and the fields `event`, `reason` (when given),
/// `zygote` and `generation`.
macro_rules! zygote_event {
    ($level:ident, $event:literal, reason = $reason:expr, $z:expr, $($text:tt)+) => {
        tracing::$level!(
            event = $event,
            reason = $reason,
            zygote = $z.pid.as_raw(),
            generation = $z.generation,
            $($text)+
        )
    };
    ($level:ident, $event:literal, $z:expr, $($text:tt)+) => {
        tracing::$level!(
            event = $event,
            zygote = $z.pid.as_raw(),
            generation = $z.generation,
            $($text)+
        )
    };
}
