//! Datasets as they come: a record's `info` and its extra fields, `[data] columns`
//! (dotted paths into nested objects and Parquet structs), every refusal by name, and
//! `[data] eval_fraction`'s split, checked exhaustively on a small file.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tandem_data::{
    read_prompts, read_prompts_with, Columns, DataConfig, DataKind, Dataset, PromptBody, Split,
    INFO_BYTES,
};

/// A `[data]` section as the run's TOML gives it.
fn data(toml_text: &str) -> DataConfig {
    #[derive(serde::Deserialize)]
    struct Doc {
        data: DataConfig,
    }
    toml::from_str::<Doc>(toml_text)
        .unwrap_or_else(|e| panic!("{toml_text}: {e}"))
        .data
}

fn info(p: &tandem_data::Prompt) -> Value {
    p.info
        .as_deref()
        .map(|t| serde_json::from_str(t).unwrap())
        .unwrap_or(Value::Null)
}

#[test]
fn info_and_extra_fields_ride_along() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    let lines = [
        json!({"prompt": "2+2?", "answer": 4, "info": {"task": "add", "id": 1}, "source": "gsm8k", "level": 3}),
        json!({"prompt": "x", "info": "{\"tests\": [1, 2]}"}),
        json!({"prompt": "y", "answer": "a", "ground_truth": "g", "completion": "c"}),
        json!({"prompt": "z", "source": "s", "info": {"source": "s"}}),
        json!({"messages": [{"role": "user", "content": "hi"}], "extra": null, "info": null}),
        json!({"prompt": "w", "tags": ["a", "b"], "meta": {"k": {"deep": true}}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let rows = read_prompts(&path, false).unwrap();
    assert_eq!(
        info(&rows[0]),
        json!({"task": "add", "id": 1, "source": "gsm8k", "level": 3})
    );
    assert_eq!(rows[0].answer.as_deref(), Some("4"));
    // A string holding an object (as `datasets` stores a dict whose keys vary).
    assert_eq!(info(&rows[1]), json!({"tests": [1, 2]}));
    // `answer` wins; `ground_truth` beside it, and `completion`, ride in info.
    assert_eq!(rows[2].answer.as_deref(), Some("a"));
    assert_eq!(
        info(&rows[2]),
        json!({"ground_truth": "g", "completion": "c"})
    );
    // A field that copies an info key with the same value is fine.
    assert_eq!(info(&rows[3]), json!({"source": "s"}));
    // Nulls are absent: no info at all.
    assert_eq!(rows[4].info, None);
    // Lists and objects as they are.
    assert_eq!(
        info(&rows[5]),
        json!({"tags": ["a", "b"], "meta": {"k": {"deep": true}}})
    );
    // The info is compact JSON of one object.
    assert!(!rows[0].info.as_ref().unwrap().contains(": "));
}

#[test]
fn every_refusal_names_the_line_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    let big = "x".repeat(INFO_BYTES);
    let cases: Vec<(String, Option<Columns>, &str)> = vec![
        (
            json!({"prompt": "x", "info": 5}).to_string(),
            None,
            "`info` (the info) must be a JSON object",
        ),
        (
            json!({"prompt": "x", "info": "[1]"}).to_string(),
            None,
            "does not hold a JSON object",
        ),
        (
            json!({"prompt": "x", "level": 1, "info": {"level": 2}}).to_string(),
            None,
            "field `level` and `info.level` hold different values",
        ),
        (
            json!({"prompt": "x", "blob": big}).to_string(),
            None,
            "INFO_BYTES",
        ),
        (
            json!({"prompt": "x"}).to_string(),
            Some(Columns {
                prompt: Some("question".into()),
                ..Default::default()
            }),
            "no field `question` ([data] columns.prompt",
        ),
        (
            json!({"question": "x", "reward_model": {"style": "rule"}}).to_string(),
            Some(Columns {
                prompt: Some("question".into()),
                answer: Some("reward_model.ground_truth".into()),
                ..Default::default()
            }),
            "no field `reward_model.ground_truth` ([data] columns.answer",
        ),
        (
            json!({"question": "x", "ex": {"a": 1}}).to_string(),
            Some(Columns {
                prompt: Some("question".into()),
                info: Some("extra_info".into()),
                ..Default::default()
            }),
            "columns.info",
        ),
        (
            json!({"question": ["not", "messages"]}).to_string(),
            Some(Columns {
                prompt: Some("question".into()),
                ..Default::default()
            }),
            "`question` as a conversation",
        ),
        (
            json!({"q": "x", "gt": [1]}).to_string(),
            Some(Columns {
                prompt: Some("q".into()),
                answer: Some("gt".into()),
                ..Default::default()
            }),
            "`gt` (the answer) must be a string or a number",
        ),
    ];
    for (line, columns, needle) in cases {
        std::fs::write(&path, format!("{{\"prompt\": \"ok\", \"q\": \"ok\", \"gt\": \"1\", \"question\": \"ok\", \"reward_model\": {{\"ground_truth\": \"1\"}}, \"extra_info\": {{}}}}\n{line}\n")).unwrap();
        let e = read_prompts_with(&path, false, columns.as_ref())
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.jsonl:2") && e.contains(needle), "{line}: {e}");
    }
    // Unknown targets and malformed names are refused when the config is read.
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        data: DataConfig,
    }
    let e = toml::from_str::<Doc>("[data]\ncolumns = { question = \"q\" }\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("question") && e.contains("prompt") && e.contains("answer"),
        "{e}"
    );
    for (columns, needle) in [
        ("{ prompt = \"a..b\" }", "columns.prompt"),
        ("{ answer = \"\" }", "columns.answer"),
        ("{ prompt = \"q\", answer = \"q\" }", "read the same field"),
        (
            "{ answer = \"rm\", info = \"rm.extra\" }",
            "read the same field",
        ),
    ] {
        let cfg = data(&format!(
            "[data]\nkind = \"jsonl\"\npath = \"{}\"\ncolumns = {columns}\n",
            path.display()
        ));
        let e = Dataset::load(&cfg).err().unwrap().to_string();
        assert!(e.contains(needle), "{columns}: {e}");
    }
}

/// TRL / verl names: `question`, `reward_model.ground_truth`, `extra_info`; what the
/// mapping does not read rides in info, what a dotted path reads leaves its parent.
#[test]
fn columns_map_a_file_s_own_names_and_dotted_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("verl.jsonl");
    let lines = [
        json!({"question": "What is 2+3?", "data_source": "openai/gsm8k",
               "reward_model": {"ground_truth": "5", "style": "rule"},
               "extra_info": {"split": "train", "index": 0}}),
        json!({"question": [{"role": "user", "content": "7*6?"}],
               "reward_model": {"ground_truth": 42},
               "extra_info": "{\"index\": 1}"}),
        // A field named with the dots itself wins over the path.
        json!({"question": "q", "reward_model.ground_truth": "top",
               "reward_model": {"ground_truth": "nested"}, "extra_info": {}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let cfg = data(&format!(
        "[data]\nkind = \"jsonl\"\npath = \"{}\"\nshuffle = false\n\
         columns = {{ prompt = \"question\", answer = \"reward_model.ground_truth\", info = \"extra_info\" }}\n",
        path.display()
    ));
    let d = Dataset::load(&cfg).unwrap();
    let p = d.get(0);
    assert_eq!(p.body, PromptBody::Text("What is 2+3?".into()));
    assert_eq!(p.answer.as_deref(), Some("5"));
    assert_eq!(
        info(&p),
        json!({"split": "train", "index": 0, "data_source": "openai/gsm8k",
               "reward_model": {"style": "rule"}})
    );
    let p = d.get(1);
    assert!(matches!(p.body, PromptBody::Messages(ref m) if m[0].content == "7*6?"));
    assert_eq!(p.answer.as_deref(), Some("42"));
    // The parent emptied by the path is gone.
    assert_eq!(info(&p), json!({"index": 1}));
    let p = d.get(2);
    assert_eq!(p.answer.as_deref(), Some("top"));
    assert_eq!(
        info(&p),
        json!({"reward_model": {"ground_truth": "nested"}})
    );
    // Only the answer mapped: `prompt` is still read by its own name.
    let only = Columns {
        answer: Some("reward_model.ground_truth".into()),
        ..Default::default()
    };
    std::fs::write(
        &path,
        "{\"prompt\": \"p\", \"reward_model\": {\"ground_truth\": \"1\"}}\n",
    )
    .unwrap();
    let rows = read_prompts_with(&path, false, Some(&only)).unwrap();
    assert_eq!(rows[0].answer.as_deref(), Some("1"));
    assert_eq!(rows[0].info, None);
}

/// A Parquet file written here with the `parquet` crate's column writer: a string
/// column, a struct, an optional int and a list of strings (rows 1 and 3 full, row 2
/// with a null struct field, a null int and an empty list).
fn write_parquet(path: &Path) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let schema = parse_message_type(
        "message schema {
            REQUIRED BYTE_ARRAY question (UTF8);
            OPTIONAL group reward_model {
                OPTIONAL BYTE_ARRAY ground_truth (UTF8);
                OPTIONAL BYTE_ARRAY style (UTF8);
            }
            OPTIONAL INT32 level;
            OPTIONAL group tags (LIST) {
                REPEATED group list {
                    OPTIONAL BYTE_ARRAY element (UTF8);
                }
            }
        }",
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), Default::default()).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let bytes = |xs: &[&str]| xs.iter().map(|&s| ByteArray::from(s)).collect::<Vec<_>>();
    let mut column = 0;
    while let Some(mut c) = rg.next_column().unwrap() {
        match column {
            0 => c.typed::<ByteArrayType>().write_batch(
                &bytes(&["What is 2+3?", "What is 7*6?", "What is 9-4?"]),
                None,
                None,
            ),
            1 => c.typed::<ByteArrayType>().write_batch(
                &bytes(&["5", "42", "5"]),
                Some(&[2, 2, 2]),
                None,
            ),
            2 => c.typed::<ByteArrayType>().write_batch(
                &bytes(&["rule", "rule"]),
                Some(&[2, 1, 2]),
                None,
            ),
            3 => c
                .typed::<Int32Type>()
                .write_batch(&[1, 3], Some(&[1, 0, 1]), None),
            _ => c.typed::<ByteArrayType>().write_batch(
                &bytes(&["add", "easy", "sub"]),
                Some(&[3, 3, 1, 3]),
                Some(&[0, 1, 0, 0]),
            ),
        }
        .unwrap();
        c.close().unwrap();
        column += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_structs_lists_and_dotted_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("verl.parquet");
    write_parquet(&path);
    let cfg = data(&format!(
        "[data]\nkind = \"parquet\"\npath = \"{}\"\nshuffle = false\n\
         columns = {{ prompt = \"question\", answer = \"reward_model.ground_truth\" }}\n",
        path.display()
    ));
    let d = Dataset::load(&cfg).unwrap();
    assert_eq!(d.epoch_len(), Some(3));
    let p = d.get(0);
    assert_eq!(p.body, PromptBody::Text("What is 2+3?".into()));
    assert_eq!(p.answer.as_deref(), Some("5"));
    assert_eq!(
        info(&p),
        json!({"reward_model": {"style": "rule"}, "level": 1, "tags": ["add", "easy"]})
    );
    let p = d.get(1);
    assert_eq!(p.answer.as_deref(), Some("42"));
    // A null inside a struct stays as the struct holds it; a null column is absent.
    assert_eq!(
        info(&p),
        json!({"reward_model": {"style": null}, "tags": []})
    );
    assert_eq!(info(&d.get(2))["tags"], json!(["sub"]));
    // Without the mapping the file has no prompt: refused by row.
    let plain = DataConfig {
        columns: None,
        ..cfg.clone()
    };
    let e = Dataset::load(&plain).err().unwrap().to_string();
    assert!(
        e.contains("verl.parquet row 1") && e.contains("needs `prompt`"),
        "{e}"
    );
    // A mapped struct field that is null in a row: refused naming the row.
    let style = DataConfig {
        columns: Some(Columns {
            prompt: Some("question".into()),
            answer: Some("reward_model.style".into()),
            info: None,
        }),
        ..cfg
    };
    let e = Dataset::load(&style).err().unwrap().to_string();
    assert!(
        e.contains("verl.parquet row 2") && e.contains("no field `reward_model.style`"),
        "{e}"
    );
}

/// The training stream and the held-out side, for every record of a small file at
/// several fractions: disjoint, together the whole file, the held-out side exactly the
/// records the rule holds out (in file order), and the training stream over several
/// epochs never reaching one of them.
#[test]
fn the_eval_split_is_disjoint_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    let n = 97usize;
    let text: String = (0..n)
        .map(|i| format!("{}\n", json!({"prompt": format!("p{i}"), "id": i})))
        .collect();
    std::fs::write(&path, text).unwrap();
    let id = |p: &tandem_data::Prompt| info(p)["id"].as_u64().unwrap() as usize;
    for fraction in [0.05, 0.2, 0.5, 0.9] {
        for shuffle in [true, false] {
            let train_cfg = DataConfig {
                kind: DataKind::Jsonl,
                path: Some(path.clone()),
                eval_fraction: fraction,
                shuffle,
                ..Default::default()
            };
            let held_cfg = DataConfig {
                split: Split::HeldOut,
                ..train_cfg.clone()
            };
            let (train, held) = (
                Dataset::load(&train_cfg).unwrap(),
                Dataset::load(&held_cfg).unwrap(),
            );
            let rule: BTreeSet<usize> = (0..n)
                .filter(|&i| tandem_data::split::held_out(i as u64, fraction))
                .collect();
            let h = held.epoch_len().unwrap();
            let mut held_ids: Vec<usize> = (0..h as u64).map(|i| id(&held.get(i))).collect();
            if shuffle {
                held_ids.sort();
            }
            assert_eq!(
                held_ids,
                rule.iter().copied().collect::<Vec<_>>(),
                "{fraction}: the held-out side is the rule's (in file order unshuffled, as the evaluation reads it)"
            );
            let t = train.epoch_len().unwrap();
            assert_eq!(t + h, n, "{fraction}: every record is on one side");
            assert_eq!((train.held_out(), held.held_out()), (h, h));
            let mut epoch: Vec<usize> = (0..t as u64).map(|i| id(&train.get(i))).collect();
            epoch.sort();
            let expected: Vec<usize> = (0..n).filter(|i| !rule.contains(i)).collect();
            assert_eq!(
                epoch, expected,
                "{fraction}: an epoch visits each training record once"
            );
            assert!(
                (0..(3 * t) as u64).all(|i| !rule.contains(&id(&train.get(i)))),
                "{fraction}: no epoch reaches a held-out record"
            );
        }
    }
    // The share held out is near the fraction.
    let held = Dataset::load(&DataConfig {
        kind: DataKind::Jsonl,
        path: Some(path.clone()),
        eval_fraction: 0.2,
        split: Split::HeldOut,
        ..Default::default()
    })
    .unwrap();
    assert!((8..=32).contains(&held.epoch_len().unwrap()));
}

#[test]
fn a_split_that_empties_a_side_or_a_bad_fraction_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    std::fs::write(&path, "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let cfg = |eval_fraction: f64, split: Split| DataConfig {
        kind: DataKind::Jsonl,
        path: Some(path.clone()),
        eval_fraction,
        split,
        ..Default::default()
    };
    // Which of the two records 0.5 holds out decides the cases below.
    let held: Vec<bool> = (0..2)
        .map(|i| tandem_data::split::held_out(i, 0.001))
        .collect();
    assert_eq!(held, [false, false]);
    let e = Dataset::load(&cfg(0.001, Split::Train))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("[data] eval_fraction = 0.001 holds out none of the 2 records"),
        "{e}"
    );
    let all = (0..2).all(|i| tandem_data::split::held_out(i, 0.999));
    if all {
        let e = Dataset::load(&cfg(0.999, Split::Train))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("leaving none to train on"), "{e}");
    }
    let e = Dataset::load(&cfg(0.0, Split::HeldOut))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("set [data] eval_fraction = 0.05 or [eval] path"),
        "{e}"
    );
    for (f, needle) in [(1.0, "must be in [0, 1)"), (-0.1, "must be in [0, 1)")] {
        let e = Dataset::load(&cfg(f, Split::Train))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("[data] eval_fraction") && e.contains(needle),
            "{e}"
        );
    }
    let e = Dataset::load(&DataConfig {
        eval_fraction: 0.1,
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("eval_fraction") && e.contains("[eval] seed"),
        "{e}"
    );
}
