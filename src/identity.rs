//! Who workers run as: the identity `--user`/`--group` resolve to. A plain
//! value at the bottom of the module graph, so the parts that act on it
//! (the fork child drops to it, the notify socket is made reachable by it)
//! need nothing above them. Resolving a name to it is `config.rs`'s job.

/// Who workers run as after the privilege drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Target user id.
    pub uid: u32,
    /// Target group id.
    pub gid: u32,
    /// Supplementary groups (the user's group list, looked up at start).
    pub groups: Vec<u32>,
    /// The user's name, for messages.
    pub user_name: String,
}
