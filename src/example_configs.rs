//! Every `examples/*.toml` parses and validates as the config of the command its
//! `# command:` line names. A file that reads an earlier stage's output names it on a
//! `# needs: PATH (from examples/X.toml)` line, and X must write exactly PATH; any other
//! path the config gives must exist in the repository.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use tandem_data::DataConfig;
use tandem_generator::rejection::RejectionConfig;
use tandem_model::ModelSection;
use tandem_trainer::offline::dpo::DpoConfig;
use tandem_trainer::offline::rm::RmConfig;
use tandem_trainer::offline::sft::SftConfig;

use crate::run_config::RunConfig;
use tandem_launch::config_file::parse_with_overrides;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Example {
    file: String,
    text: String,
    command: String,
    /// (path, the example that writes it).
    needs: Vec<(String, String)>,
}

fn examples() -> Vec<Example> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let file = format!("examples/{}", path.file_name().unwrap().to_string_lossy());
        let text = std::fs::read_to_string(&path).unwrap();
        let header = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .map(str::to_string)
                .collect()
        };
        let command = header("command");
        assert_eq!(command.len(), 1, "{file}: one `# command: tandem …` line");
        let needs = header("needs")
            .iter()
            .map(|n| {
                let (p, from) = n
                    .split_once(" (from ")
                    .unwrap_or_else(|| panic!("{file}: `# needs: PATH (from examples/X.toml)`"));
                (p.to_string(), from.trim_end_matches(')').to_string())
            })
            .collect();
        out.push(Example {
            file,
            text: text.clone(),
            command: command[0].clone(),
            needs,
        });
    }
    assert!(out.len() >= 10, "{} examples", out.len());
    out
}

fn parse<T: DeserializeOwned>(e: &Example) -> T {
    parse_with_overrides(&e.text, &[]).unwrap_or_else(|err| panic!("{}: {err:#}", e.file))
}

/// Strings of the paths that are set.
fn paths<'a>(ps: impl IntoIterator<Item = &'a Option<PathBuf>>) -> Vec<String> {
    ps.into_iter()
        .flatten()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// An offline stage reads its model and data and writes `out_dir/final`.
fn stage(model: &ModelSection, data: &DataConfig, out_dir: &Path) -> (Vec<String>, String) {
    let mut read = vec![model.path.clone()];
    read.extend(paths([&data.path]));
    (read, out_dir.join("final").to_string_lossy().into_owned())
}

/// Validates the example as its command's config; returns the paths it reads and the
/// one it writes for a later stage.
fn inspect(e: &Example) -> (Vec<String>, String) {
    let invalid = |err: &dyn std::fmt::Display| -> ! { panic!("{}: {err:#}", e.file) };
    match e.command.as_str() {
        "tandem run" => {
            let c = RunConfig::parse(&e.text, &[]).unwrap_or_else(|err| invalid(&err));
            let mut read = vec![c.model.path.clone()];
            read.extend(paths([&c.data.path, &c.eval.path]));
            read.extend(c.reward.model.clone());
            read.extend(c.reward.judge.clone());
            // An agent program's script (an argument naming a file).
            read.extend(
                c.env
                    .agent
                    .iter()
                    .skip(1)
                    .filter(|a| a.contains('/'))
                    .cloned(),
            );
            let out = Path::new(&c.run.run_dir).join("final");
            (read, out.to_string_lossy().into_owned())
        }
        "tandem sft" => {
            let c: SftConfig = parse(e);
            c.validate().unwrap_or_else(|err| invalid(&err));
            stage(&c.model, &c.data, &c.train.out_dir)
        }
        "tandem rm" => {
            let c: RmConfig = parse(e);
            c.validate().unwrap_or_else(|err| invalid(&err));
            stage(&c.model, &c.data, &c.train.out_dir)
        }
        "tandem dpo" => {
            let c: DpoConfig = parse(e);
            c.validate().unwrap_or_else(|err| invalid(&err));
            stage(&c.model, &c.data, &c.train.out_dir)
        }
        "tandem rejection-sample" => {
            let c: RejectionConfig = parse(e);
            c.validate().unwrap_or_else(|err| invalid(&err));
            let mut read = vec![c.model.path.clone()];
            read.extend(paths([&c.data.path, &c.rejection.sft]));
            read.extend(c.reward.model.clone());
            (read, c.rejection.out.to_string_lossy().into_owned())
        }
        other => panic!("{}: unknown command `{other}`", e.file),
    }
}

#[test]
fn every_example_parses_and_names_what_it_needs() {
    let all = examples();
    let seen: Vec<(Vec<String>, String)> = all.iter().map(inspect).collect();
    for (e, (read, _)) in all.iter().zip(&seen) {
        for (p, _) in &e.needs {
            assert!(
                read.contains(p),
                "{}: `# needs: {p}`, but it does not read it",
                e.file
            );
        }
        for p in read {
            let named = e.needs.iter().any(|(n, _)| n == p);
            let fetchable = tandem_model::fetch::KNOWN.iter().any(|k| k.name == p);
            let builtin = fetchable || p.starts_with("preset:");
            assert!(
                builtin || named || repo().join(p).exists(),
                "{}: reads `{p}`, which is not in the repository: name the stage that writes it on a `# needs:` line",
                e.file
            );
        }
        for (p, from) in &e.needs {
            let i = all.iter().position(|x| x.file == *from).unwrap_or_else(|| {
                panic!("{}: needs {p} from {from}, which does not exist", e.file)
            });
            let writes = &seen[i].1;
            assert!(
                writes == p,
                "{}: needs {p}, but {from} writes {writes}",
                e.file
            );
        }
    }
}
