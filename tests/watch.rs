//! Watching a run (`[run] log_samples`, `[run] tensorboard`): one short run of the
//! tiny model, then what it wrote read back — `samples.jsonl` against the batch dumps,
//! the TensorBoard event files by a reader of this file's own (TFRecord framing, both
//! CRC-32Cs, the `tensorflow.Event` protobufs decoded by hand) and by TensorBoard's
//! own `EventAccumulator`, and `tandem report`'s samples.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

const STEPS: u64 = 4;
const LOG_SAMPLES: u64 = 2;

/// The run every test here reads (run once, by whichever test comes first).
fn run_dir() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, run) = RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let config = std::fs::read_to_string("examples/tiny-grpo.toml").unwrap()
            + "\n[eval]\nevery = 2\nprompts = 4\nsamples = 2\ntemperature = 1.0\n";
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, config).unwrap();
        ok(tandem(&[
            "run",
            cfg.to_str().unwrap(),
            "--set",
            &format!("run.steps={STEPS}"),
            "--set",
            "run.generators=1",
            "--set",
            &format!("run.log_samples={LOG_SAMPLES}"),
            "--set",
            "run.tensorboard=true",
            "--set",
            "trainer.dump_batches=true",
            "--set",
            &format!("run.run_dir={}", run.display()),
        ]));
        (dir, run)
    });
    run
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every `log_samples` steps, up to four completions: the best and worst reward of
/// the batch's first two groups, each the same completion (text, reward) as in the
/// step's batch dump, which carries the decoded text beside the ids.
#[test]
fn samples_are_the_best_and_worst_of_their_groups() {
    let run = run_dir();
    let samples = jsonl(&run.join("samples.jsonl"));
    let steps: Vec<u64> = samples
        .iter()
        .map(|s| s["step"].as_u64().unwrap())
        .collect();
    assert!(steps.iter().all(|s| s % LOG_SAMPLES == 0), "{steps:?}");
    for step in (LOG_SAMPLES..=STEPS).step_by(LOG_SAMPLES as usize) {
        let of_step: Vec<&Value> = samples.iter().filter(|s| s["step"] == step).collect();
        // Two groups of eight, so a best and a worst of each.
        assert_eq!(of_step.len(), 4, "step {step}: {of_step:?}");
        let dump = jsonl(&run.join(format!("batches/step-{step:06}.jsonl")));
        for s in of_step {
            let (group, text) = (&s["group"], s["completion_text"].as_str().unwrap());
            let rows: Vec<&Value> = dump.iter().filter(|r| &r["group"] == group).collect();
            let same = rows
                .iter()
                .find(|r| r["completion_text"] == text && r["reward"] == s["reward"])
                .unwrap_or_else(|| panic!("step {step}: {s} is in no row of the dump"));
            let prompt = same["prompt_text"].as_str().unwrap();
            assert!(prompt.ends_with(s["prompt_text"].as_str().unwrap()) && prompt.ends_with(" ="));
            let rewards = rows.iter().map(|r| r["reward"].as_f64().unwrap());
            let want = match s["pick"].as_str().unwrap() {
                "best" => rewards.fold(f64::MIN, f64::max),
                "worst" => rewards.fold(f64::MAX, f64::min),
                other => panic!("pick {other}"),
            };
            assert_eq!(s["reward"].as_f64(), Some(want), "{s}");
            assert_eq!(s["version"].as_u64(), Some(step - 1));
            let v = &s["versions"];
            assert!(
                v[0].as_u64() <= v[1].as_u64() && v[1].as_u64() <= Some(step - 1),
                "{s}"
            );
            assert!(s["advantage"].as_f64().unwrap().is_finite());
        }
    }
    // `tandem report` shows the latest step's (on stderr; stdout stays the summary).
    let o = ok(tandem(&["report", run.to_str().unwrap()]));
    serde_json::from_slice::<Value>(&o.stdout).unwrap();
    let err = stderr(&o);
    assert_eq!(err.matches(&format!("step {STEPS} ")).count(), 4, "{err}");
    assert!(
        err.contains("completion: ") && err.contains("prompt: "),
        "{err}"
    );
    // A samples file that is not JSON leaves the report standing, with a warning.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(
        run.join("metrics.jsonl"),
        other.path().join("metrics.jsonl"),
    )
    .unwrap();
    std::fs::write(other.path().join("samples.jsonl"), "not json\n{}\n").unwrap();
    let o = ok(tandem(&["report", other.path().to_str().unwrap()]));
    let err = stderr(&o);
    assert!(
        err.contains("warning: no samples shown") && err.contains("samples.jsonl:1"),
        "{err}"
    );
}

/// A batch dump carries the decoded text beside the ids and still replays through
/// `tandem train-step` (which trains the ids).
#[test]
fn a_dump_with_its_text_replays() {
    let run = run_dir();
    let dump = run.join("batches/step-000001.jsonl");
    let rows = jsonl(&dump);
    assert!(rows
        .iter()
        .all(|r| r["completion_text"].is_string() && r["prompt_text"].is_string()));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("step.toml");
    std::fs::write(
        &cfg,
        "[algorithm]\nadvantage = \"grpo\"\ntemperature = 1.0\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    ok(train_step(&run.join("final"), &dump, &cfg, &out));
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["sequences"].as_u64(), Some(rows.len() as u64), "{m}");
}

/// What one TFRecord file holds, read by this test's own decoder.
struct Events {
    file_version: Option<String>,
    /// (tag, step) → value.
    scalars: BTreeMap<(String, i64), f32>,
    /// (tag, step) → text, with the text plugin's name on each.
    texts: BTreeMap<(String, i64), String>,
}

/// The one event file of the run (the trainer started once), its records' framing and
/// CRCs checked.
#[test]
fn event_files_hold_every_metric_and_the_samples() {
    let run = run_dir();
    let files: Vec<PathBuf> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let ev = read_events(&std::fs::read(&files[0]).unwrap());
    assert_eq!(ev.file_version.as_deref(), Some("brain.Event:2"));
    let metrics = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(metrics.len() as u64, STEPS);
    let mut expected = 0;
    for line in &metrics {
        let step = line["step"].as_i64().unwrap();
        for (k, v) in line.as_object().unwrap() {
            let Some(x) = v.as_f64().filter(|_| k != "step" && k != "unix_time") else {
                continue;
            };
            let got = ev.scalars.get(&(k.clone(), step));
            assert_eq!(got, Some(&(x as f32)), "{k} at step {step}");
            expected += 1;
        }
    }
    // The evaluation before the first step, at step 0; nothing that is no metric.
    let eval0 = &jsonl(&run.join("eval.jsonl"))[0];
    let acc = eval0["eval_accuracy"].as_f64().unwrap() as f32;
    assert_eq!(ev.scalars.get(&("eval_accuracy".into(), 0)), Some(&acc));
    let at_zero = ev.scalars.keys().filter(|(_, s)| *s == 0).count();
    assert_eq!(ev.scalars.len(), expected + at_zero);
    assert!(ev
        .scalars
        .keys()
        .all(|(k, _)| k != "step" && k != "unix_time"));
    // The samples as text at their steps, each completion's lines in it.
    let samples = jsonl(&run.join("samples.jsonl"));
    let text_steps: Vec<i64> = ev.texts.keys().map(|(_, s)| *s).collect();
    assert_eq!(text_steps, [2, 4]);
    for s in &samples {
        let md = &ev.texts[&("samples".to_string(), s["step"].as_i64().unwrap())];
        for l in s["completion_text"].as_str().unwrap().lines() {
            assert!(md.contains(&format!("    {l}\n")), "{l:?} not in {md}");
        }
    }
}

/// TensorBoard itself reads the scalars and the text back.
#[test]
#[cfg_attr(
    missing_python_tensorboard,
    ignore = "needs a Python with tensorboard (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn tensorboard_reads_the_events() {
    let python = require_program(Tool::PythonTensorboard);
    let run = run_dir();
    let code = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
ea.Reload()
tags = ea.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in tags["scalars"]},
    "text": {t: [[e.step, e.tensor_proto.string_val[0].decode()] for e in ea.Tensors(t)]
             for t in tags["tensors"]},
    "text_plugin": sorted(ea.PluginTagToContent("text")),
}))
"#;
    let o = std::process::Command::new(&python)
        .args(["-c", code])
        .arg(run.join("tensorboard"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Value = serde_json::from_slice(&o.stdout).unwrap();
    let metrics = jsonl(&run.join("metrics.jsonl"));
    // As f32, the scalars' type (the JSON between may round the last bit of an f64).
    let reward: Vec<(u64, f32)> = got["scalars"]["reward_mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
        .collect();
    let want: Vec<(u64, f32)> = metrics
        .iter()
        .map(|m| {
            let r = m["reward_mean"].as_f64().unwrap() as f32;
            (m["step"].as_u64().unwrap(), r)
        })
        .collect();
    assert_eq!(reward, want);
    let eval_steps: Vec<u64> = got["scalars"]["eval_accuracy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(eval_steps, [0, 2, 4]);
    assert_eq!(got["text_plugin"], serde_json::json!(["samples"]));
    let texts = got["text"]["samples"].as_array().unwrap();
    assert_eq!(texts.len(), 2, "{texts:?}");
    let samples = jsonl(&run.join("samples.jsonl"));
    let first = samples[0]["completion_text"].as_str().unwrap();
    let line = first.lines().next().unwrap_or_default();
    assert!(texts[0][1].as_str().unwrap().contains(line), "{texts:?}");
}

/// A bad `log_samples` is refused by name before anything starts.
#[test]
fn a_bad_log_samples_is_refused_by_name() {
    for bad in ["-1", "\"often\""] {
        let o = tandem(&[
            "run",
            "examples/tiny-grpo.toml",
            "--set",
            &format!("run.log_samples={bad}"),
        ]);
        assert_clean_failure(&o, &["run.log_samples"]);
    }
}

// --- A reader of TensorBoard's files that shares nothing with the writer. ---

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's mask, written as its documentation writes it.
#[allow(clippy::manual_rotate)]
fn masked(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, both CRCs of each checked.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let (mut at, mut out) = (0, Vec::new());
    while at < bytes.len() {
        assert!(at + 12 <= bytes.len(), "a torn header at byte {at}");
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(
            u32_at(at + 8),
            masked(&bytes[at..at + 8]),
            "length CRC at {at}"
        );
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(u32_at(at + 12 + len), masked(data), "data CRC at {at}");
        out.push(data);
        at += 16 + len;
    }
    out
}

/// A protobuf field's value by wire type.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A message's fields in order: (number, value).
fn fields(mut buf: &[u8]) -> Vec<(u64, Field<'_>)> {
    fn varint(buf: &mut &[u8]) -> u64 {
        let (mut x, mut shift) = (0u64, 0);
        loop {
            let b = buf[0];
            *buf = &buf[1..];
            x |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return x;
            }
            shift += 7;
        }
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let value = match key & 7 {
            0 => Field::Varint(varint(&mut buf)),
            1 => {
                let v = u64::from_le_bytes(buf[..8].try_into().unwrap());
                buf = &buf[8..];
                Field::Fixed64(v)
            }
            2 => {
                let n = varint(&mut buf) as usize;
                let (v, rest) = buf.split_at(n);
                buf = rest;
                Field::Bytes(v)
            }
            5 => {
                let v = u32::from_le_bytes(buf[..4].try_into().unwrap());
                buf = &buf[4..];
                Field::Fixed32(v)
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, value));
    }
    out
}

fn bytes_of<'a>(f: &[(u64, Field<'a>)], n: u64) -> Option<&'a [u8]> {
    f.iter().find_map(|(k, v)| match v {
        Field::Bytes(b) if *k == n => Some(*b),
        _ => None,
    })
}

fn text_of(f: &[(u64, Field<'_>)], n: u64) -> Option<String> {
    bytes_of(f, n).map(|b| String::from_utf8(b.to_vec()).unwrap())
}

/// Decodes every `tensorflow.Event` of a file: wall_time 1, step 2, file_version 3,
/// summary 5 { value 1 { tag 1, simple_value 2, tensor 8 { dtype 1, string_val 8 },
/// metadata 9 { plugin_data 1 { plugin_name 1 } } } }.
fn read_events(bytes: &[u8]) -> Events {
    let mut ev = Events {
        file_version: None,
        scalars: BTreeMap::new(),
        texts: BTreeMap::new(),
    };
    for (i, rec) in records(bytes).into_iter().enumerate() {
        let event = fields(rec);
        let wall = event.iter().find_map(|(k, v)| match v {
            Field::Fixed64(x) if *k == 1 => Some(f64::from_bits(*x)),
            _ => None,
        });
        assert!(
            wall.is_some_and(|w| w > 1.6e9),
            "record {i}: wall_time {wall:?}"
        );
        let step = event
            .iter()
            .find_map(|(k, v)| match v {
                Field::Varint(x) if *k == 2 => Some(*x as i64),
                _ => None,
            })
            .unwrap_or(0);
        if i == 0 {
            ev.file_version = text_of(&event, 3);
            continue;
        }
        let summary = fields(bytes_of(&event, 5).expect("a summary"));
        for (k, v) in &summary {
            let (1, Field::Bytes(value)) = (k, v) else {
                panic!("Summary field {k}")
            };
            let value = fields(value);
            let tag = text_of(&value, 1).unwrap();
            let simple = value.iter().find_map(|(k, v)| match v {
                Field::Fixed32(x) if *k == 2 => Some(f32::from_bits(*x)),
                _ => None,
            });
            if let Some(x) = simple {
                assert!(ev.scalars.insert((tag, step), x).is_none());
                continue;
            }
            let tensor = fields(bytes_of(&value, 8).expect("a scalar or a tensor"));
            assert!(matches!(
                tensor.iter().find(|(k, _)| *k == 1),
                Some((_, Field::Varint(7)))
            ));
            let meta = fields(bytes_of(&value, 9).expect("a text's metadata"));
            let plugin = fields(bytes_of(&meta, 1).unwrap());
            assert_eq!(text_of(&plugin, 1).as_deref(), Some("text"));
            ev.texts.insert((tag, step), text_of(&tensor, 8).unwrap());
        }
    }
    ev
}
