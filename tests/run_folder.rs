//! A run folder another user controls is refused before anything is written into it:
//! links planted there never lead `tandem run` (perhaps root) to overwrite their
//! targets.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
#[cfg_attr(missing_root, ignore = "needs root (TANDEM_SKIP_MISSING_TOOLS=1)")]
fn links_planted_in_another_users_run_folder_are_never_followed() {
    common::require(common::tools::Tool::Root);
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "root's file").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("logs")).unwrap();
    std::os::unix::fs::symlink(&victim, run.join("logs/coordinator.log")).unwrap();
    std::os::unix::fs::symlink(&victim, run.join("config.tmp")).unwrap();
    std::os::unix::fs::symlink(&victim, run.join("token")).unwrap();
    // Another user's folder (uid 10001), as in a shared scratch space.
    let st = Command::new("chown")
        .args(["-hR", "10001:10001", run.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nsteps = 1\nrun_dir = \"{}\"\n[model]\npath = \"preset:tiny\"\n",
            run.display()
        ),
    )
    .unwrap();
    let out = common::tandem(&["run", cfg.to_str().unwrap()]);
    common::assert_clean_failure(&out, &["[run] run_dir", "belongs to uid 10001"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file");
}

/// A run's config (which may hold a reward service's token) and its tokens are readable
/// by the user who ran it only, and the run folder is private when `tandem run` makes it.
#[test]
fn a_runs_secrets_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::init_tiny(dir.path());
    let run = dir.path().join("runs/r");
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nsteps = 1\nbatch_groups = 1\ngroup_size = 2\ngenerators = 1\nrun_dir = \"{}\"\n[model]\npath = \"{}\"\n[data]\nkind = \"arithmetic\"\n[generator]\nmax_new_tokens = 4\nprompts_per_batch = 1\n",
            run.display(),
            model.display()
        ),
    )
    .unwrap();
    common::ok(common::tandem(&["run", cfg.to_str().unwrap()]));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700);
    for f in ["config.toml", "token", "generator-token"] {
        assert_eq!(mode(&run.join(f)), 0o600, "{f}");
    }
}
