//! Datasets: the synthetic task, JSONL and Parquet prompt files, and their errors.

use std::path::Path;

use tandem_data::{read_prompts, DataConfig, DataKind, Dataset, PromptBody};

#[test]
fn arithmetic_is_deterministic_and_correct() {
    let cfg = DataConfig {
        operators: vec!["+".into(), "-".into(), "*".into()],
        digits: 2,
        ..Default::default()
    };
    let d = Dataset::load(&cfg).unwrap();
    for i in 0..200 {
        let p = d.get(i);
        assert_eq!(p, d.get(i));
        let PromptBody::Text(t) = &p.body else {
            panic!()
        };
        let q = t
            .strip_prefix("What is ")
            .unwrap()
            .split('?')
            .next()
            .unwrap();
        let parts: Vec<&str> = q.split(' ').collect();
        let (a, b): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
        assert!((10..=99).contains(&a) && (10..=99).contains(&b), "{q}");
        let expect = match parts[1] {
            "+" => a + b,
            "-" => a - b,
            _ => a * b,
        };
        assert_eq!(p.answer.as_deref(), Some(expect.to_string().as_str()));
        assert!(expect >= 0);
    }
    assert_ne!(d.get(0), d.get(1));
}

#[test]
fn jsonl_fields_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"prompt": "2+2?", "answer": 4}"#, "\n",
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "ground_truth": "x"}"#, "\n",
            "\n",
            r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}"#, "\n",
        ),
    )
    .unwrap();
    let rows = read_prompts(&path, false).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].body, PromptBody::Text("2+2?".into()));
    assert_eq!(rows[0].answer.as_deref(), Some("4"));
    let PromptBody::Messages(m) = &rows[1].body else {
        panic!()
    };
    assert_eq!(
        m.len(),
        1,
        "the assistant turn is the completion, not the prompt"
    );
    assert_eq!(rows[2].answer, None);
    let cfg = DataConfig {
        kind: DataKind::Jsonl,
        path: Some(path.clone()),
        ..Default::default()
    };
    let d = Dataset::load(&cfg).unwrap();
    let mut epoch: Vec<_> = (0..3).map(|i| format!("{:?}", d.get(i))).collect();
    epoch.sort();
    let mut all: Vec<_> = rows.iter().map(|r| format!("{r:?}")).collect();
    all.sort();
    assert_eq!(epoch, all, "an epoch visits every row once");

    for (line, needle) in [
        (r#"{"answer": 3}"#, "needs `prompt` or `messages`"),
        (r#"{"prompt": 5}"#, "`prompt` must be"),
        (r#"{"prompt": "x", "answer": [1]}"#, "`answer`"),
        (
            r#"{"prompt": "x", "info": [1]}"#,
            "`info` (the info) must be a JSON object",
        ),
        (
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            "robot",
        ),
        (r#"{"prompt": "   "}"#, "empty"),
        ("{not json", "p.jsonl:2"),
    ] {
        std::fs::write(&path, format!("{{\"prompt\": \"ok\"}}\n{line}\n")).unwrap();
        let e = read_prompts(&path, false).unwrap_err().to_string();
        assert!(e.contains("p.jsonl:2") && e.contains(needle), "{line}: {e}");
    }
}

/// A Parquet file written by pyarrow (tools/make_prompt_parquet.py) reads like JSONL.
#[test]
fn parquet_rows_read_like_jsonl() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/prompts.parquet");
    let cfg = DataConfig {
        kind: DataKind::Parquet,
        path: Some(path.clone()),
        shuffle: false,
        ..Default::default()
    };
    let d = Dataset::load(&cfg).unwrap();
    assert_eq!(d.epoch_len(), Some(3));
    assert_eq!(d.get(0).body, PromptBody::Text("What is 2+2?".into()));
    assert_eq!(d.get(0).answer.as_deref(), Some("4"));
    let PromptBody::Messages(m) = d.get(1).body else {
        panic!()
    };
    assert_eq!(
        m.iter().map(|t| t.role.as_str()).collect::<Vec<_>>(),
        ["system", "user"]
    );
    assert_eq!(m[1].content, "Capital of France?");
    assert_eq!(d.get(1).answer.as_deref(), Some("Paris"));
    assert_eq!(d.get(2).answer, None);
    assert_eq!(d.get(3), d.get(0), "the second epoch starts over");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("x.parquet");
    std::fs::write(&bad, "not parquet").unwrap();
    let e = read_prompts(&bad, true).unwrap_err().to_string();
    assert!(e.contains("x.parquet") && e.contains("Parquet"), "{e}");
}

#[test]
fn bad_config_is_named() {
    for (cfg, needle) in [
        (
            DataConfig {
                digits: 0,
                ..Default::default()
            },
            "digits",
        ),
        (
            DataConfig {
                operators: vec!["/".into()],
                ..Default::default()
            },
            "operators",
        ),
        (
            DataConfig {
                template: "no slot".into(),
                ..Default::default()
            },
            "template",
        ),
        (
            DataConfig {
                kind: DataKind::Jsonl,
                ..Default::default()
            },
            "path",
        ),
    ] {
        let e = Dataset::load(&cfg).err().unwrap().to_string();
        assert!(e.contains(needle), "{e}");
    }
}
