//! Escape attempts against the `python` tool's sandbox, driven through `tandem tool
//! python` (the code path an episode's tool call takes), as root and as an unprivileged
//! user (uid 10001, as the Docker images run). Each attack is a program a model could
//! write; each must fail, leave nothing behind, and the next call must work.
//!
//! The "as a user" tests switch to uid 10001 when the test runs as root, and otherwise
//! run as the test's own (unprivileged) user. The "as root" tests need root: they fail
//! without it (ignored with `TANDEM_SKIP_MISSING_TOOLS=1`).

mod common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The uid the "as a user" tests run as when the test itself is root.
const USER: u32 = 10001;

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A run's files as a generator's host has them: a run folder with its tokens and
/// config, a user's home with a key, a file in /tmp, owned by whoever runs the tool.
struct Scene {
    _dir: tempfile::TempDir,
    root: PathBuf,
    run: PathBuf,
    home: PathBuf,
    bin: PathBuf,
    config: PathBuf,
    /// Who runs `tandem tool`: `Some(uid)` switches to it (the test is root).
    uid: Option<u32>,
    /// A string in every secret file and in the tool's environment: it must never
    /// appear in what the sandbox prints.
    secret: String,
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_all(path: &Path, uid: u32) {
    let st = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}"), path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Whether every folder above `path` lets others through and `path` lets them run it.
fn others_can_run(path: &Path) -> bool {
    path.ancestors().skip(1).all(|a| {
        a.as_os_str().is_empty() || std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0)
    }) && std::fs::metadata(path).is_ok_and(|m| m.mode() & 0o005 == 0o005)
}

enum As {
    Root,
    User,
}

impl Scene {
    fn new(who: As) -> Scene {
        let uid = match who {
            As::Root => {
                common::require(common::tools::Tool::Root);
                None
            }
            As::User => is_root().then_some(USER),
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let secret = format!("SECRET-{:016x}", rand_u64());
        let run = root.join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        for f in ["token", "generator-token"] {
            write(&run.join(f), &format!("{secret}\n"), 0o600);
        }
        let config = run.join("config.toml");
        write(
            &config,
            &format!(
                "# the answer key: {secret}\n[env.python]\nwall_s = 10.0\ncpu_s = 5\nmemory_mib = 256\ndisk_mib = 8\nprocesses = 32\noutput_bytes = 65536\n"
            ),
            0o600,
        );
        write(&run.join("coordinator.redb"), &secret, 0o600);
        let home = root.join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        write(&home.join(".ssh/id_ed25519"), &secret, 0o600);
        // The binary where the user may run it.
        let built = PathBuf::from(env!("CARGO_BIN_EXE_tandem"));
        let bin = if uid.is_none() || others_can_run(&built) {
            built
        } else {
            // A link where the user can reach it (a copy across file systems).
            let b = root.join("tandem");
            if std::fs::hard_link(&built, &b).is_err() {
                std::fs::copy(&built, &b).unwrap();
            }
            b
        };
        if let Some(uid) = uid {
            chown_all(&run, uid);
            chown_all(&home, uid);
        }
        Scene {
            _dir: dir,
            root,
            run,
            home,
            bin,
            config,
            uid,
            secret,
        }
    }

    /// A command run as the scene's user, with the secret in its environment (as a
    /// generator holds its token).
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &self.home)
            .env("TANDEM_TOKEN", &self.secret)
            .env("TANDEM_LOG", "warn")
            .current_dir(&self.root);
        if let Some(uid) = self.uid {
            c.uid(uid).gid(uid);
        }
        c
    }

    /// `tandem tool python` on `code` with the run's config; its output.
    fn python(&self, code: &str) -> Output {
        let file = self.root.join(format!("prog-{:x}.py", rand_u64()));
        write(&file, code, 0o644);
        let out = self
            .command(&self.bin)
            .args(["tool", "python"])
            .arg(&file)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tandem tool python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs an attack: it must print `blocked` and never `ESCAPED` or the secret; then
    /// the next call works. Returns what the attack printed.
    fn attack(&self, code: &str) -> String {
        let out = self.python(code);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !text.contains("ESCAPED"),
            "the sandbox let it through:\n{text}"
        );
        assert!(!text.contains(&self.secret), "a secret leaked:\n{text}");
        assert!(
            text.contains("blocked"),
            "the attack did not run to its end:\n{text}"
        );
        let next = self.python("print(6 * 7)");
        assert_eq!(String::from_utf8_lossy(&next.stdout).trim(), "42");
        text
    }

    /// A Python list literal of the scene's secret files.
    fn secret_files(&self) -> String {
        let files = [
            self.run.join("token"),
            self.run.join("generator-token"),
            self.run.join("config.toml"),
            self.run.join("coordinator.redb"),
            self.home.join(".ssh/id_ed25519"),
        ];
        format!(
            "{:?}",
            files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        )
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

/// Processes on this host whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

fn read_secrets(s: &Scene) {
    s.attack(&format!(
        r#"
for p in {files}:
    try:
        print("ESCAPED", p, open(p).read())
    except OSError as e:
        print("blocked", p, type(e).__name__)
import os
for d in ["{run}", "{home}", "/root", "/home", "{root}"]:
    try:
        print("ESCAPED listing", d, os.listdir(d))
    except OSError as e:
        print("blocked", d, type(e).__name__)
"#,
        files = s.secret_files(),
        run = s.run.display(),
        home = s.home.display(),
        root = s.root.display(),
    ));
}

fn read_environments(s: &Scene) {
    s.attack(&format!(
        r#"
import os
print("own environment:", sorted(os.environ))
secret = "{secret}"
for pid in [os.getppid(), 1] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    try:
        env = open(f"/proc/{{pid}}/environ", "rb").read()
    except OSError as e:
        print("blocked", pid, type(e).__name__)
        continue
    if secret.encode() in env or b"TANDEM_" in env:
        print("ESCAPED", pid, env)
print("blocked: no environment holds the secret")
"#,
        secret = s.secret
    ));
}

fn list_processes(s: &Scene) {
    let marker = format!("sentinel-{:x}", rand_u64());
    let mut sentinel = s
        .command(Path::new("/bin/sh"))
        .args(["-c", "sleep 300", &marker])
        .spawn()
        .unwrap();
    let text = s.attack(&format!(
        r#"
import os, signal
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print("processes:", pids)
for p in pids:
    cmd = open(f"/proc/{{p}}/cmdline", "rb").read()
    if b"{marker}" in cmd or b"tandem" in cmd:
        print("ESCAPED: sees", p, cmd)
for target in [{sentinel}, os.getppid()]:
    try:
        os.kill(target, signal.SIGKILL)
        print("sent SIGKILL to", target)
    except OSError as e:
        print("blocked kill", target, type(e).__name__)
try:
    os.kill(-1, signal.SIGKILL)
except OSError as e:
    print("kill(-1):", type(e).__name__)
print("blocked: done")
"#,
        sentinel = sentinel.id(),
    ));
    assert!(text.contains("processes: [1]"), "{text}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        sentinel.try_wait().unwrap().is_none(),
        "the sandbox killed a process of its host"
    );
    sentinel.kill().unwrap();
    sentinel.wait().unwrap();
}

fn write_run_folder(s: &Scene) {
    s.attack(&format!(
        r#"
import os
for p in ["{run}/evil", "{run}/config.toml", "{run}/checkpoints/step-000020/trainer.json", "{root}/evil", "/tmp/../{root}/evil"]:
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write("step = 390")
        print("wrote", p, "(inside the sandbox: its /tmp is its own)")
    except OSError as e:
        print("blocked", p, type(e).__name__)
print("blocked: done")
"#,
        run = s.run.display(),
        root = s.root.display(),
    ));
    // Whatever it wrote stayed inside the sandbox.
    assert!(!s.run.join("evil").exists());
    assert!(!s.root.join("evil").exists());
    assert!(!s.run.join("checkpoints").exists());
    let config = std::fs::read_to_string(&s.config).unwrap();
    assert!(config.contains(&s.secret) && !config.contains("390"));
}

fn reach_the_network(s: &Scene) {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let port = tcp.local_addr().unwrap().port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let sockdir = s.root.join("sockets");
    std::fs::create_dir(&sockdir).unwrap();
    std::fs::set_permissions(&sockdir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = sockdir.join("s.sock");
    let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    unix.set_nonblocking(true).unwrap();
    let abstract_name = format!("tandem-test-{:x}", rand_u64());
    let abstract_listener = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap();
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    };
    s.attack(&format!(
        r#"
import socket
def attempt(what, fn):
    try:
        fn()
        print("ESCAPED:", what)
    except OSError as e:
        print("blocked", what, type(e).__name__, e.errno)
attempt("tcp to the host's loopback", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
attempt("tcp to a public address", lambda: socket.create_connection(("1.1.1.1", 53), timeout=2))
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"x", ("127.0.0.1", {udp_port}))
attempt("udp to the host's loopback", udp)
def unix(addr):
    def go():
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(2)
        c.connect(addr)
    return go
attempt("a unix socket of the host", unix("{path}"))
attempt("an abstract unix socket of the host", unix("\0{abstract_name}"))
"#,
        path = path.display(),
    ));
    let refused =
        |r: std::io::Result<()>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(
        refused(tcp.accept().map(drop)),
        "a TCP connection reached the host"
    );
    assert!(
        refused(udp.recv(&mut [0u8; 8]).map(drop)),
        "a datagram reached the host"
    );
    assert!(
        refused(unix.accept().map(drop)),
        "the unix socket was reached"
    );
    assert!(
        refused(abstract_listener.accept().map(drop)),
        "the abstract socket was reached"
    );
}

fn fill_memory_and_disk(s: &Scene) {
    let shm_before: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let text = s.attack(
        r#"
import os
for d in ["/dev/shm", "/tmp", "/work"]:
    written = 0
    try:
        with open(os.path.join(d, "fill"), "wb") as f:
            while written < (1 << 30):
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1 << 20
        print("ESCAPED: wrote 1 GiB into", d)
    except OSError as e:
        print("blocked", d, "after", written >> 20, "MiB:", e.strerror)
    try:
        os.remove(os.path.join(d, "fill"))
    except OSError:
        pass
try:
    x = bytearray(1 << 30)
    print("ESCAPED: 1 GiB of memory")
except MemoryError:
    print("blocked: MemoryError")
"#,
    );
    assert!(text.contains("No space left on device"), "{text}");
    let shm_after: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(shm_before, shm_after, "the host's /dev/shm changed");
}

fn fork_bomb(s: &Scene) {
    let t0 = Instant::now();
    let text = s.attack(
        r#"
import os
n = 0
while True:
    try:
        if os.fork() == 0:
            import time
            time.sleep(300)
        n += 1
    except OSError as e:
        print("blocked after", n, "forks:", e.errno)
        break
"#,
    );
    assert!(text.contains(":"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

fn leave_a_process_behind(s: &Scene) {
    let marker = format!("leftover-{:x}", rand_u64());
    let t0 = Instant::now();
    s.attack(&format!(
        r#"
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        # Holds the call's stdout and stderr open, and sleeps.
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", "{marker}"])
    os._exit(0)
print("blocked: the leftover is started; main exits")
"#
    ));
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "a leftover holding the output held the call: {:?}",
        t0.elapsed()
    );
    let alive = processes_with(&marker);
    assert!(alive.is_empty(), "outlived its call: {alive:?}");
}

fn reach_another_call(s: &Scene) {
    let marker = format!("other-call-{:x}", rand_u64());
    std::thread::scope(|scope| {
        let other = scope.spawn(|| {
            s.python(&format!(
                "import time, os\nopen('{marker}', 'w').write('{secret}')\nopen('/tmp/{marker}', 'w').write('{secret}')\ntime.sleep(4)\nprint(os.listdir('.'))",
                secret = s.secret
            ))
        });
        std::thread::sleep(Duration::from_millis(1500));
        s.attack(&format!(
            r#"
import os
found = []
for top in ["/"]:
    for d, dirs, files in os.walk(top):
        if d.startswith("/proc"):
            dirs[:] = []
            continue
        if "{marker}" in files:
            found.append(d)
if found:
    print("ESCAPED: another call's files in", found)
print("blocked: looked everywhere")
"#
        ));
        let o = other.join().unwrap();
        assert!(String::from_utf8_lossy(&o.stdout).contains(&marker));
    });
}

/// Each attack as root and as an unprivileged user.
macro_rules! escape_tests {
    ($($attack:ident),* $(,)?) => {
        mod as_root {
            $(
                #[test]
                #[cfg_attr(missing_root, ignore = "needs root (TANDEM_SKIP_MISSING_TOOLS=1)")]
                fn $attack() {
                    super::$attack(&super::Scene::new(super::As::Root));
                }
            )*
        }
        mod as_user {
            $(
                #[test]
                fn $attack() {
                    super::$attack(&super::Scene::new(super::As::User));
                }
            )*
        }
    };
}

escape_tests!(
    read_secrets,
    read_environments,
    list_processes,
    write_run_folder,
    reach_the_network,
    fill_memory_and_disk,
    fork_bomb,
    leave_a_process_behind,
    reach_another_call,
);

/// `tandem tool` says why it cannot run, and runs the calculator.
#[test]
fn the_tool_command_reports_its_errors() {
    let bin = env!("CARGO_BIN_EXE_tandem");
    let out = Command::new(bin)
        .args(["tool", "python", "/no/such/file.py"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.py"));
    let out = Command::new(bin)
        .args([
            "tool",
            "python",
            "-",
            "--set",
            "env.python.interpreter=\"python3\"",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("[env.python] interpreter"),
        "{err}"
    );
    let out = Command::new(bin)
        .args(["tool", "calculator", "2*(3+4)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "14");
}
