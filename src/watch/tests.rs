//! The filter's matching, and the watcher against real directories.

use super::*;

fn defaults() -> Filter {
    Filter {
        include: DEFAULT_INCLUDE.iter().map(|s| s.to_string()).collect(),
        exclude: DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn globs_match_whole_names() {
    assert!(glob("*.py", "app.py"));
    assert!(!glob("*.py", "app.pyc"));
    assert!(!glob("*.py", "app.py~"));
    assert!(glob(".*.swp", ".app.py.swp"));
    assert!(glob("*~", "app.py~"));
    assert!(glob(".#*", ".#app.py"));
    assert!(glob("a?c", "abc"));
    assert!(glob("[a-c]x", "bx"));
    assert!(!glob("[!a-c]x", "bx"));
    assert!(glob("*.[ch]", "x.h"));
    assert!(glob("[", "["));
    assert!(glob("*a*b", "xxaxxb"));
    assert!(!glob("*a*b", "xxaxxbc"));
    assert!(glob("*", ""));
}

#[test]
fn the_default_filter_counts_sources_only() {
    let f = defaults();
    assert!(f.counts(Path::new("app.py")));
    assert!(f.counts(Path::new("pkg/sub/mod.py")));
    assert!(!f.counts(Path::new("__pycache__/app.cpython-312.pyc")));
    assert!(!f.counts(Path::new("__pycache__/x.py")));
    assert!(!f.counts(Path::new(".venv/lib/site.py")));
    assert!(!f.counts(Path::new("node_modules/a/b.py")));
    assert!(!f.counts(Path::new(".git/hooks/x.py")));
    assert!(!f.counts(Path::new(".app.py.swp")));
    assert!(!f.counts(Path::new("app.py~")));
    assert!(!f.counts(Path::new(".#app.py")));
    assert!(!f.counts(Path::new("4913")));
    assert!(!f.counts(Path::new("README.md")));
}

/// Reads until `want` says the changes so far are enough (10 s at most).
fn read_until(w: &mut Watcher, want: impl Fn(&Watcher, &[PathBuf]) -> bool) -> Vec<PathBuf> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut all = Vec::new();
    while !want(w, &all) && std::time::Instant::now() < deadline {
        all.extend(w.read().0);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    all
}

#[test]
fn a_root_deleted_or_moved_away_and_made_again_is_watched_again() {
    let base = std::env::temp_dir().join(format!("procman-watch-root-{}", std::process::id()));
    let root = base.join("app");
    std::fs::create_dir_all(root.join("pkg")).expect("mkdir");
    let mut w = Watcher::new(vec![root.clone()], defaults()).expect("inotify");
    assert_eq!(w.watched(), 2);
    let app = root.join("app.py");
    for how in ["deleted", "moved away"] {
        std::fs::write(&app, "v = 1").expect("write");
        read_until(&mut w, |_, c| c.contains(&app));
        if how == "deleted" {
            std::fs::remove_dir_all(&root).expect("rm");
        } else {
            std::fs::rename(&root, base.join("old")).expect("mv");
        }
        let gone = read_until(&mut w, |w, _| w_is_awaiting(w));
        assert!(w_is_awaiting(&w), "{how}: awaited ({gone:?})");
        assert_eq!(w.watched(), 0, "{how}: nothing under it watched");
        // Made again, with a file already in it: that file counts.
        std::fs::create_dir_all(root.join("pkg")).expect("mkdir");
        std::fs::write(root.join("pkg/m.py"), "").expect("write");
        let back = read_until(&mut w, |_, c| c.contains(&root.join("pkg/m.py")));
        assert!(back.contains(&root.join("pkg/m.py")), "{how}: {back:?}");
        assert!(!w_is_awaiting(&w), "{how}: the parent's watch is dropped");
        // And edits in it are seen again.
        std::fs::write(&app, "v = 2").expect("write");
        let edited = read_until(&mut w, |_, c| c.contains(&app));
        assert!(edited.contains(&app), "{how}: an edit after: {edited:?}");
        let _ = std::fs::remove_dir_all(base.join("old"));
    }
    std::fs::remove_dir_all(&base).expect("rm");
}

fn w_is_awaiting(w: &Watcher) -> bool {
    !w.awaited.is_empty()
}

#[test]
fn an_include_with_a_slash_matches_the_relative_path() {
    let mut f = defaults();
    f.include.push("templates/*.html".into());
    assert!(f.counts(Path::new("templates/a.html")));
    assert!(!f.counts(Path::new("a.html")));
}
