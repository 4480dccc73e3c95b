//! SFT against tools/sft_reference.py (transformers + PyTorch): the masked NLL, the
//! assistant masks a chat template gives, and the loss of the tiny model; and the
//! errors bad records get.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tandem_model::ChatMessage;
use tandem_trainer::offline::sft::{self, Example, Masking, Render, Tokenized};

fn fixture() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sft.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn conversations(f: &Value) -> Vec<Vec<ChatMessage>> {
    serde_json::from_value(f["conversations"].clone()).unwrap()
}

#[test]
fn masked_nll_matches_cross_entropy_with_ignore_index() {
    let f = fixture();
    let c = &f["masked_nll"];
    let logits: Vec<Vec<f64>> = serde_json::from_value(c["logits"].clone()).unwrap();
    let labels: Vec<i64> = serde_json::from_value(c["labels"].clone()).unwrap();
    let kept: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != -100).collect();
    let rows: Vec<f64> = kept.iter().flat_map(|&i| logits[i].clone()).collect();
    let v = logits[0].len();
    let l = Tensor::from_vec(rows, (kept.len(), v), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(
        kept.iter().map(|&i| labels[i] as u32).collect::<Vec<_>>(),
        kept.len(),
        &Device::Cpu,
    )
    .unwrap();
    let (lp, _) = tandem_model::logprob::token_logprobs(&l, &y, 1.0).unwrap();
    let loss = sft::masked_nll(&lp).unwrap().to_scalar::<f64>().unwrap();
    let want = c["loss"].as_f64().unwrap();
    assert!((loss - want).abs() <= 1e-6, "{loss} vs {want}");
}

#[test]
fn assistant_masks_and_loss_match_transformers() {
    let f = fixture();
    let p = tandem_model::preset::init("tiny", 0, &Device::Cpu).unwrap();
    for case in f["cases"].as_array().unwrap() {
        let masking: Masking = serde_json::from_value(case["masking"].clone()).unwrap();
        let render = Render {
            tokenizer: &p.tokenizer,
            system: None,
            masking,
            eos: Some(2),
            max_len: 512,
        };
        let mut batch = Vec::new();
        for (conv, want) in conversations(&f)
            .into_iter()
            .zip(case["records"].as_array().unwrap())
        {
            let t = render
                .tokenize(&Example::Conversation(conv.clone()))
                .unwrap()
                .unwrap();
            let want = Tokenized {
                ids: serde_json::from_value(want["ids"].clone()).unwrap(),
                targets: serde_json::from_value(want["targets"].clone()).unwrap(),
            };
            assert_eq!(t, want, "{masking:?}: {conv:?}");
            // The trained tokens are the assistant turns (with their end marker), and
            // with last_turn only the last one.
            let trained: Vec<u32> = t.targets.iter().map(|&j| t.ids[j]).collect();
            let text = p.tokenizer.decode(&trained, false).unwrap();
            let turns: Vec<&ChatMessage> = conv.iter().filter(|m| m.role == "assistant").collect();
            let expected: String = match masking {
                Masking::AllAssistant => turns
                    .iter()
                    .map(|m| format!("{}<|im_end|>\n", m.content))
                    .collect(),
                Masking::LastTurn => format!("{}<|im_end|>\n", turns.last().unwrap().content),
            };
            assert_eq!(text, expected);
            batch.push(t);
        }
        let (loss, n) = sft::loss(&p.model, &p.model.weights(), &batch).unwrap();
        let loss = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let want = case["loss"].as_f64().unwrap();
        assert_eq!(n, batch.iter().map(|t| t.targets.len()).sum::<usize>());
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{masking:?}: {loss} vs {want}"
        );
    }
}

#[test]
fn prompt_tokens_are_context_not_targets() {
    let p = tandem_model::preset::init("tiny", 0, &Device::Cpu).unwrap();
    let render = Render {
        tokenizer: &p.tokenizer,
        system: None,
        masking: Masking::AllAssistant,
        eos: Some(2),
        max_len: 512,
    };
    let ex = |prompt: &str| Example::Text {
        prompt: prompt.into(),
        completion: " 7".into(),
    };
    let a = render.tokenize(&ex("3 + 4 =")).unwrap().unwrap();
    let b = render.tokenize(&ex("3 + 4 =")).unwrap().unwrap();
    assert_eq!(a, b);
    let start = p.tokenizer.encode("3 + 4 =").unwrap().len();
    assert_eq!(a.targets, (start..a.ids.len()).collect::<Vec<_>>());
    assert_eq!(
        *a.ids.last().unwrap(),
        2,
        "text completions end with the end token"
    );
    // The loss is the mean over the completion's tokens only: scoring the prompt's
    // tokens too would change it.
    let w = p.model.weights();
    let (l, n) = sft::loss(&p.model, &w, std::slice::from_ref(&a)).unwrap();
    let all = Tokenized {
        ids: a.ids.clone(),
        targets: (1..a.ids.len()).collect(),
    };
    let (l_all, n_all) = sft::loss(&p.model, &w, &[all]).unwrap();
    assert_eq!(n, a.ids.len() - start);
    assert!(n_all > n);
    let out = p
        .model
        .completion_logprobs(&w, std::slice::from_ref(&a.ids), &[start], 1.0)
        .unwrap();
    let direct = -out.logprobs.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((l.to_scalar::<f32>().unwrap() - direct).abs() < 1e-6);
    assert!((l_all.to_scalar::<f32>().unwrap() - direct).abs() > 1e-4);
    // Truncation keeps only targets inside the cut, and drops a record left with none.
    let short = Render {
        max_len: start,
        ..render
    };
    assert_eq!(short.tokenize(&ex("3 + 4 =")).unwrap(), None);
}

#[test]
fn bad_records_name_the_line_and_field() {
    use serde_json::json;
    let cases = [
        (json!({"text": "hi"}), "needs `messages`"),
        (json!({"prompt": "hi"}), "`prompt` needs a `completion`"),
        (json!({"completion": "hi"}), "`completion` needs a `prompt`"),
        (
            json!({"prompt": "hi", "completion": ""}),
            "`completion` is empty",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "no assistant turn",
        ),
        (
            json!({"messages": [{"role": "user", "content": 3}]}),
            "string `role` and `content`",
        ),
        (
            json!({"messages": [{"role": "bot", "content": "x"}]}),
            "role \"bot\"",
        ),
        (json!({"messages": "hello"}), "`messages` must be"),
        (
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
            "assistant message 1 is empty",
        ),
        (
            json!({"prompt": "q", "completion": [{"role": "user", "content": "x"}]}),
            "must all be assistant",
        ),
        (
            json!({"messages": [], "prompt": "q", "completion": "a"}),
            "not both",
        ),
    ];
    for (row, needle) in cases {
        let e = Example::from_row(&row, "data.jsonl:4")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.jsonl:4") && e.contains(needle),
            "{row}: {e}"
        );
    }
    assert!(matches!(
        Example::from_row(&json!({"prompt": [{"role": "user", "content": "q"}], "completion": "a", "id": 3}), "x").unwrap(),
        Example::Conversation(ref m) if m.len() == 2 && m[1].role == "assistant"
    ));
}

/// The stage saves its model as it came: a bf16 model (trained in f32 on the CPU) comes
/// out in bf16; `[model] save_dtype = "f32"` asks for f32.
#[test]
fn the_trained_model_is_saved_in_the_dtype_it_came_in() {
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start");
    let p = tandem_model::preset::init("tiny", 0, &Device::Cpu).unwrap();
    tandem_model::save_hf(&p, &start, DType::BF16).unwrap();
    for (save_dtype, torch, dtype) in [
        ("", "bfloat16", DType::BF16),
        ("save_dtype = \"f32\"\n", "float32", DType::F32),
    ] {
        let out = dir.path().join(format!("out-{torch}"));
        let text = format!(
            "[model]\npath = {:?}\n{save_dtype}\n[data]\nkind = \"arithmetic\"\n\n\
             [sft]\nexamples = 8\n\n[train]\nepochs = 1\nbatch_size = 4\nmax_len = 64\n\
             val_fraction = 0.25\nout_dir = {:?}\n",
            start.to_str().unwrap(),
            out.to_str().unwrap()
        );
        let cfg: sft::SftConfig = toml::from_str(&text).unwrap();
        sft::run(&cfg).unwrap();
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("final/config.json")).unwrap())
                .unwrap();
        assert_eq!(config["torch_dtype"], torch);
        let q = tandem_model::load(
            out.join("final").to_str().unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(q.weights_dtype, dtype);
    }
    let text = format!(
        "[model]\npath = {:?}\nsave_dtype = \"int8\"\n",
        start.to_str().unwrap()
    );
    let cfg: sft::SftConfig = toml::from_str(&text).unwrap();
    let e = sft::run(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("[model] save_dtype") && e.contains("\"int8\""),
        "{e}"
    );
}
