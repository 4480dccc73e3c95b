//! `tandem generate`: sample completions for one prompt.

use anyhow::{Context, Result};
use clap::Args;
use tandem_model::SamplingParams;

#[derive(Args)]
pub struct GenerateArgs {
    /// HF model folder, .gguf file, or `smollm2` / `gemma3-270m` (fetched on first use).
    #[arg(long)]
    model: String,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Optional system message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Extra chat template variables as a JSON object (with --chat), e.g.
    /// '{"enable_thinking": false}' for Qwen3; as `[data] chat_template_kwargs`.
    #[arg(long, value_name = "JSON")]
    chat_template_kwargs: Option<String>,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Number of samples (generated together; the prompt is prefilled once).
    #[arg(short = 'n', long = "samples", default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if a.samples == 0 {
        anyhow::bail!("-n/--samples must be at least 1");
    }
    let mut p = tandem_model::load_model(&a.model)?;
    if let Some(json) = &a.chat_template_kwargs {
        let kwargs: tandem_data::TemplateKwargs = serde_json::from_str(json)
            .context("--chat-template-kwargs: expected a JSON object of variables")?;
        kwargs.validate_as("--chat-template-kwargs")?;
        p.tokenizer.set_chat_template_kwargs(kwargs.0)?;
    }
    let ids = tandem_generator::render::prompt_ids(
        &p.tokenizer,
        tandem_generator::render::PromptInput::Text(&a.prompt),
        a.chat,
        a.system.as_deref(),
    )
    .context("--prompt")?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        stop_token_ids: p.stop_token_ids(),
        seed: a.seed,
    };
    let start = std::time::Instant::now();
    // One request of N samples: the prompt is prefilled once.
    let out = tandem_model::generate_groups(&p.model, vec![ids], a.samples, params)
        .context("generating")?
        .remove(0);
    let tokens: usize = out.iter().map(|c| c.tokens.len()).sum();
    for (i, c) in out.iter().enumerate() {
        if a.samples > 1 {
            println!(
                "--- sample {} ({:?}, {} tokens)",
                i + 1,
                c.finish_reason,
                c.tokens.len()
            );
        }
        println!("{}", p.tokenizer.decode(&c.tokens, true)?.trim_end());
    }
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        tokens,
        seconds = format!("{secs:.2}"),
        tok_per_s = format!("{:.1}", tokens as f64 / secs),
        "generated"
    );
    Ok(())
}
