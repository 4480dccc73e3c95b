//! Tests that need an external tool (promtool, Slurm, kubectl, a Python with grpcio, …:
//! tests/common/tools.rs) fail when it is missing, naming it. With
//! `TANDEM_SKIP_MISSING_TOOLS=1` this script looks for each tool as the tests would and
//! sets `cfg(missing_<tool>)` for those it does not find; the tests that need one carry
//! `#[cfg_attr(missing_<tool>, ignore = "…")]`, so the harness reports them as
//! ignored, never as passed. (libtest cannot ignore a test at run time; a cfg decided
//! at build time is what makes "ignored" show.) Without the variable nothing is probed
//! and no cfg is set.

#[path = "tests/common/tools.rs"]
mod tools;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=tests/common/tools.rs");
    println!("cargo::rerun-if-env-changed=TANDEM_SKIP_MISSING_TOOLS");
    for tool in tools::Tool::ALL {
        println!("cargo::rustc-check-cfg=cfg({})", tool.cfg());
    }
    if std::env::var("TANDEM_SKIP_MISSING_TOOLS").as_deref() != Ok("1") {
        return;
    }
    // Where a tool may appear: the variables that name it, and the folders it is looked
    // for in (a tool installed later into one of them re-runs this script).
    for var in tools::ENV_VARS {
        println!("cargo::rerun-if-env-changed={var}");
    }
    for dir in tools::search_dirs() {
        if dir.is_absolute() && dir.is_dir() {
            println!("cargo::rerun-if-changed={}", dir.display());
        }
    }
    for tool in tools::Tool::ALL {
        if let Err(why) = tool.find() {
            println!("cargo::rustc-cfg={}", tool.cfg());
            println!(
                "cargo::warning=TANDEM_SKIP_MISSING_TOOLS=1: the tests that need {} are \
                 ignored: {why}",
                tool.name()
            );
        }
    }
}
