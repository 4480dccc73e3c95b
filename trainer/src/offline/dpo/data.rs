//! DPO's data: preference pairs (chosen, rejected) with the frozen reference's summed
//! log-probabilities, computed once before training.

use candle_core::DType;
use tandem_model::Model;

use super::loss::sequence_logps;
use crate::error::{invalid, Result};
use crate::offline::rm::data::Tokens;
use crate::offline::sft::data::Tokenized;

/// A pair with its reference log-probabilities.
#[derive(Clone, Debug)]
pub struct Pair {
    pub chosen: Tokenized,
    pub rejected: Tokenized,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

/// Pairs with reference log-probabilities from `reference` (detached weights), in
/// batches of `batch`.
pub fn with_reference(
    reference: &Model,
    comparisons: &[Tokens],
    batch: usize,
) -> Result<Vec<Pair>> {
    let w = reference.inference_weights();
    let mut out = Vec::with_capacity(comparisons.len());
    for chunk in comparisons.chunks(batch.max(1)) {
        let seqs: Vec<&Tokenized> = chunk
            .iter()
            .map(|c| match &c.responses[..] {
                [a, b] => Ok([a, b]),
                _ => Err(invalid(
                    "DPO needs exactly two responses per record (chosen, rejected)",
                )),
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let (lp, _) = sequence_logps(reference, &w, &seqs)?;
        let lp = lp.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for (i, c) in chunk.iter().enumerate() {
            out.push(Pair {
                chosen: c.responses[0].clone(),
                rejected: c.responses[1].clone(),
                ref_chosen: lp[2 * i],
                ref_rejected: lp[2 * i + 1],
            });
        }
    }
    Ok(out)
}
