//! Who the workers run as: `--user` and `--group` resolved against the
//! user and group databases (names or bare ids, which containers often
//! have without an entry), the supplementary groups looked up before any
//! fork, and the rule that changing identity needs procman to start as
//! root.

use std::ffi::CString;

use nix::unistd::{Gid, Group, Uid, User};

use super::{invalid, Environment};
use crate::cli::Cli;
use crate::error::{Error, Result};
use crate::identity::Credentials;

pub(super) fn credentials(cli: &Cli, env: &Environment) -> Result<Option<Credentials>> {
    if !cli.is_set("user") && !cli.is_set("group") {
        return Ok(None);
    }
    let egid = nix::unistd::getegid().as_raw();
    // (uid, the user's primary gid, name for messages, name for getgrouplist)
    let (uid, user_gid, name, account) = match cli.text("user") {
        None => (env.euid, egid, "(unchanged)".to_string(), None),
        Some(u) => {
            let number = u.parse::<u32>().ok();
            let entry = match number {
                Some(n) => User::from_uid(Uid::from_raw(n)).ok().flatten(),
                None => User::from_name(u).ok().flatten(),
            };
            match (entry, number) {
                (Some(user), _) => (
                    user.uid.as_raw(),
                    user.gid.as_raw(),
                    user.name.clone(),
                    Some(user.name),
                ),
                // A bare uid without a passwd entry is fine (containers).
                (None, Some(n)) => (n, n, u.to_string(), None),
                (None, None) => return Err(invalid("user", u, "no such user")),
            }
        }
    };
    let gid = match cli.text("group") {
        None => user_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .map(|gr| gr.gid.as_raw())
                .ok_or_else(|| invalid("group", g, "no such group"))?,
        },
    };
    if env.euid != 0 && (uid != env.euid || gid != egid) {
        return Err(Error::usage(format!(
            "'--user'/'--group' need procman to start as root (it runs as uid {}); drop them or start as root",
            env.euid
        )));
    }
    // Supplementary groups are looked up now: getgrouplist reads files and
    // allocates, which a forked child must not do.
    let groups = account
        .and_then(|n| CString::new(n).ok())
        .and_then(|n| nix::unistd::getgrouplist(&n, Gid::from_raw(gid)).ok())
        .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![gid]);
    Ok(Some(Credentials {
        uid,
        gid,
        groups,
        user_name: name,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::tests::env;
    use super::super::Config;
    use super::*;

    #[test]
    fn dropping_privileges_needs_root() {
        let cli = Cli::try_parse_from(["procman", "-u", "nobody", "--", "true"]).expect("parses");
        let err = Config::from_cli(&cli, &env()).expect_err("not root");
        assert!(
            err.to_string().contains("need procman to start as root"),
            "{err}"
        );
        let mut root = env();
        root.euid = 0;
        let c = Config::from_cli(&cli, &root).expect("root may");
        let cred = c.credentials.expect("credentials");
        assert_eq!(cred.user_name, "nobody");
        assert!(cred.groups.contains(&cred.gid));
    }
}
