//! The README's nginx recipe with a real nginx (issue 25, item 5): nginx
//! as www-data → procman's uvicorn workers as `--user nobody` on a unix
//! socket. nginx is Debian's package (scripts/test installs it), started
//! by the test in the foreground with its own prefix, config, pid file and
//! port; no system service is involved.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(90);

/// nginx in the foreground (`daemon off`), killed with its workers when
/// dropped.
struct Nginx {
    child: Child,
    pidfile: PathBuf,
    error_log: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // The master stopped first (it would replace a killed worker),
        // then its workers, then the master.
        let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
        let workers = descendants_of(pid);
        for &p in &workers {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Orphaned, the workers are this test process's (a subreaper's):
        // reap them, or they stay zombies.
        for p in workers {
            wait_for(Duration::from_secs(10), || {
                match waitpid(Pid::from_raw(p), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => None,
                    _ => Some(()),
                }
            });
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The README's recipe (its `upstream` and `location /` blocks, the
/// socket's path made this test's), in an nginx.conf whose every path is in
/// `dir`. `retry`: the README's upstream as it is (the socket listed twice);
/// without, listed once.
fn nginx_conf(dir: &Path, socket: &Path, http: u16, https: u16, retry: bool) -> String {
    let d = dir.display();
    let sock = socket.display().to_string();
    let mut upstream = readme_block("upstream app {", "\n}").replace("/run/app/app.sock", &sock);
    if !retry {
        let line = format!("    server unix:{sock} max_fails=0;\n");
        let once = upstream.replacen(&line, "", 1);
        assert_ne!(once, upstream, "README's upstream lists the socket twice");
        upstream = once;
    }
    let location = readme_block("    location / {", "\n    }");
    format!(
        "user www-data;\ndaemon off;\nmaster_process on;\nworker_processes 1;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n\
           client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           {upstream}\n\
           server {{\n    listen 127.0.0.1:{http};\n    listen 127.0.0.1:{https} ssl;\n\
             ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
             {location}\n  }}\n}}\n",
    )
}

/// The README's nginx recipe from the line starting with `first` to the
/// first `end` after it (included).
fn readme_block(first: &str, end: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let start = readme
        .find(&format!("\n{first}"))
        .unwrap_or_else(|| panic!("README: the nginx recipe's {first:?}"))
        + 1;
    let stop = readme[start..].find(end).expect("its end") + start + end.len();
    readme[start..stop].to_string()
}

fn start_nginx(dir: &Path, conf: &str) -> Nginx {
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf).expect("nginx.conf");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl");
    // Debian puts it in /usr/sbin, which a user's PATH may lack.
    let program = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nginx");
    let child = Command::new(program)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&file)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (Debian's nginx-light: scripts/test installs it)");
    Nginx {
        child,
        pidfile: dir.join("nginx.pid"),
        error_log: dir.join("error.log"),
    }
}

/// `curl` from 127.0.0.2 (a client address that is neither nginx's nor
/// procman's) to nginx: the app's view of the request.
fn scope_via(url: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "10", "--interface", "127.0.0.2", url])
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout).to_string();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body:?}"))
}

/// procman (`workers` uvicorn workers of scope_app as `nobody`, on a unix
/// socket) behind nginx (as `www-data`), once nginx answers 200.
struct Setup {
    nginx: Nginx,
    h: Harness,
    http: u16,
    https: u16,
}

fn behind_nginx(name: &str, workers: &str, retry: bool) -> Setup {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CI runs as root)"
    );
    let start = Start::new(name, &[]).no_default_bind().json();
    let dir = start.dir().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = dir.join("app.sock");
    let python = system_venv_python();
    let h = start
        .args([
            "scope_app:main",
            "--python",
            python.to_str().expect("utf8"),
            "--chdir",
            apps_dir().to_str().expect("utf8"),
            "--no-access-log",
            "-u",
            "nobody",
            "-w",
            workers,
            "-b",
            &format!("unix:{}", socket.display()),
        ])
        .spawn();
    h.expect_event("all-ready", BOOT, "workers ready", |_| true);

    let (http, https) = (free_port(), free_port());
    let nginx = start_nginx(&dir, &nginx_conf(&dir, &socket, http, https, retry));
    let ok = wait_for(BOOT, || {
        Command::new("curl")
            .args(["-sf", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{http}/pid"))
            .output()
            .ok()
            .filter(|o| o.status.success())
    });
    assert!(
        ok.is_some(),
        "nginx did not answer 200:\n{}",
        std::fs::read_to_string(&nginx.error_log).unwrap_or_default()
    );
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666, "the socket file's default mode");
    Setup {
        nginx,
        h,
        http,
        https,
    }
}

#[test]
fn nginx_as_www_data_reaches_nobody_workers_on_a_unix_socket_with_zero_502() {
    let Setup {
        nginx,
        h,
        http,
        https,
    } = behind_nginx("nginx", "2", true);
    let base = format!("http://127.0.0.1:{http}");

    // The real client and scheme, through nginx and the unix socket.
    let v = scope_via(&format!("https://127.0.0.1:{https}/scope"));
    assert_eq!(v["client"], "127.0.0.2", "{v}");
    assert_eq!(v["scheme"], "https", "{v}");
    let v = scope_via(&format!("{base}/scope"));
    assert_eq!(v["client"], "127.0.0.2", "{v}");
    assert_eq!(v["scheme"], "http", "{v}");

    // Load through nginx across two HUPs and a kill -9 of a worker.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
    let load = Load::start(addr, 4, 100_000, Duration::from_secs(240));
    for generation in [2, 3] {
        h.signal(Signal::SIGHUP);
        h.expect_event("reload-done", BOOT, "reload", |e| {
            e["generation"] == generation
        });
    }
    let before = load.done();
    h.check(
        wait_for(BOOT, || (load.done() > before + 50).then_some(())).is_some(),
        "requests after the reloads",
    );
    // A worker of the current generation: it answered after the reloads.
    let victim: i32 = http_get(addr, "/pid")
        .ok()
        .and_then(|(_, body)| body.trim().parse().ok())
        .expect("a worker's pid through nginx");
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill -9");
    h.check(
        wait_for(BOOT, || {
            (h.count_events("ready", |e| e["generation"] == 3) >= 3).then_some(())
        })
        .is_some(),
        "the killed worker's replacement is ready",
    );
    let before = load.done();
    h.check(
        wait_for(BOOT, || (load.done() > before + 50).then_some(())).is_some(),
        "requests after the kill",
    );
    let report = load.finish();
    let errors = std::fs::read_to_string(&nginx.error_log).unwrap_or_default();
    eprintln!(
        "through nginx: {} answered 200, {} failed",
        report.ok,
        report.failures.len()
    );
    assert!(report.ok > 200, "{report:?}");
    assert!(
        report.failures.is_empty(),
        "{} of {} failed: {:?}\n{errors}",
        report.failures.len(),
        report.ok + report.failures.len(),
        &report.failures[..report.failures.len().min(10)]
    );
    drop(nginx);
}

/// A GET through nginx that a worker was serving when it was killed (kill
/// -9, the OOM killer): `slow` is in flight, its worker is killed, and the
/// answer is the status nginx gave (and the pid that answered, if one).
fn killed_while_serving(s: &Setup) -> (u16, Option<i32>) {
    // The one worker, and its sockets before the request.
    let worker: i32 = http_get_pid(s);
    let idle = idle_fd_count(worker);
    let url = format!("http://127.0.0.1:{}/slow?s=3", s.http);
    let client = std::thread::spawn(move || {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "60", "-w", "\n%{http_code}", &url])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), json_pid(body))
    });
    // It holds the request once it has one more socket open.
    s.h.check(
        wait_for(BOOT, || (open_fds(worker).len() > idle).then_some(())).is_some(),
        "the slow request reached the worker",
    );
    kill(Pid::from_raw(worker), Signal::SIGKILL).expect("kill -9");
    let (code, pid) = client.join().expect("client");
    assert_ne!(pid, Some(worker), "answered by the killed worker");
    (code, pid)
}

fn http_get_pid(s: &Setup) -> i32 {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{}/pid", s.http))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a worker's pid")
}

#[test]
fn the_recipes_upstream_retries_a_get_whose_worker_was_killed() {
    // The README's upstream (the socket twice): nginx retries, the
    // replacement answers.
    let s = behind_nginx("nginx-retry", "1", true);
    let (code, pid) = killed_while_serving(&s);
    assert_eq!(code, 200, "with the README's upstream");
    assert!(pid.is_some());
    drop(s);
    // Listed once, the same kill is a 502: the line is what saves it.
    let s = behind_nginx("nginx-once", "1", false);
    let (code, _) = killed_while_serving(&s);
    assert_eq!(code, 502, "with the socket listed once");
}
