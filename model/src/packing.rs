//! How a batch of sequences becomes one packed row for a training forward.
//!
//! Three layouts of the same sequences, each giving the same logprobs and gradients
//! (tested):
//!
//! - [`Packing::Padded`]: every sequence right-padded to the longest, each its own
//!   segment; the pad tokens are computed and ignored (what a padded batch costs).
//! - [`Packing::Packed`]: sequences back to back, no padding.
//! - [`Packing::SharedPrefix`]: packed, and sequences that share their *shareable
//!   prefix* (the tokens before their first scored token: a group's prompt) lay it out
//!   once. Each member's remaining tokens form a segment that attends to that prefix
//!   and causally to itself, with positions continuing after the prefix — so the
//!   prompt's forward runs once per group and its backward collects every member's
//!   gradient.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ops::attention::Segment;

/// `[trainer] packing`: the layout of a training forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Right-padded to the longest sequence (the reference layout; slowest).
    Padded,
    /// Back to back, no padding.
    Packed,
    /// Packed, with each shared prompt laid out once.
    #[default]
    SharedPrefix,
}

/// How a training forward runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    pub packing: Packing,
    /// Keep only each decoder layer's input and recompute the layer in the backward
    /// (activation checkpointing): memory per layer falls from every activation to one
    /// (T, d) tensor, for about one more forward of compute.
    pub checkpoint_layers: bool,
}

impl From<Packing> for ForwardOptions {
    fn from(packing: Packing) -> Self {
        ForwardOptions {
            packing,
            checkpoint_layers: false,
        }
    }
}

/// Where one input sequence lies in the packed row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    /// Packed index of the sequence's token 0.
    prefix_start: usize,
    /// Tokens 0..prefix_len are at prefix_start..; the rest at suffix_start...
    prefix_len: usize,
    suffix_start: usize,
}

/// Sequences laid out as one packed row: token ids, RoPE positions and segments.
#[derive(Clone, Debug)]
pub struct PackedBatch {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub segments: Arc<Vec<Segment>>,
    places: Vec<Place>,
}

impl PackedBatch {
    /// Lays out `seqs`; `shareable[i]` is how many leading tokens of sequence i may be
    /// shared with other sequences that start with the same tokens (0 = none; at most
    /// its length − 1). `pad_id` fills [`Packing::Padded`] rows.
    pub fn build(
        seqs: &[Vec<u32>],
        shareable: &[usize],
        packing: Packing,
        pad_id: u32,
    ) -> Result<Self> {
        if seqs.len() != shareable.len() {
            return Err(Error::invalid("one shareable prefix length per sequence"));
        }
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(Error::invalid(format!("sequence {i} is empty")));
        }
        let mut b = PackedBatch {
            ids: Vec::new(),
            positions: Vec::new(),
            segments: Arc::new(Vec::new()),
            places: vec![
                Place {
                    prefix_start: 0,
                    prefix_len: 0,
                    suffix_start: 0,
                };
                seqs.len()
            ],
        };
        let mut segments = Vec::new();
        match packing {
            Packing::Padded => {
                let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
                for (i, s) in seqs.iter().enumerate() {
                    let start = b.ids.len();
                    b.places[i] = Place {
                        prefix_start: start,
                        prefix_len: s.len(),
                        suffix_start: start + s.len(),
                    };
                    b.ids.extend_from_slice(s);
                    b.ids.extend(std::iter::repeat_n(pad_id, t - s.len()));
                    let last = s.len() as u32 - 1;
                    b.positions.extend((0..t as u32).map(|p| p.min(last)));
                    segments.push(Segment {
                        start,
                        len: t,
                        prefix: None,
                    });
                }
            }
            Packing::Packed | Packing::SharedPrefix => {
                let share = packing == Packing::SharedPrefix;
                // Sequences by shared prefix, in order of first appearance.
                let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
                let mut index: HashMap<&[u32], usize> = HashMap::new();
                for (i, (s, &p)) in seqs.iter().zip(shareable).enumerate() {
                    let p = p.min(s.len() - 1);
                    if share && p > 0 {
                        if let Some(&g) = index.get(&s[..p]) {
                            groups[g].1.push(i);
                            continue;
                        }
                        index.insert(&s[..p], groups.len());
                    }
                    groups.push((if share { p } else { 0 }, vec![i]));
                }
                for (p, members) in groups {
                    if members.len() == 1 || p == 0 {
                        for i in members {
                            b.push_plain(&mut segments, i, &seqs[i]);
                        }
                        continue;
                    }
                    let prefix_start = b.ids.len();
                    let first = &seqs[members[0]];
                    b.ids.extend_from_slice(&first[..p]);
                    b.positions.extend(0..p as u32);
                    segments.push(Segment {
                        start: prefix_start,
                        len: p,
                        prefix: None,
                    });
                    for i in members {
                        let start = b.ids.len();
                        let s = &seqs[i];
                        b.places[i] = Place {
                            prefix_start,
                            prefix_len: p,
                            suffix_start: start,
                        };
                        b.ids.extend_from_slice(&s[p..]);
                        b.positions.extend(p as u32..s.len() as u32);
                        segments.push(Segment {
                            start,
                            len: s.len() - p,
                            prefix: Some((prefix_start, p)),
                        });
                    }
                }
            }
        }
        b.segments = Arc::new(segments);
        Ok(b)
    }

    fn push_plain(&mut self, segments: &mut Vec<Segment>, i: usize, s: &[u32]) {
        let start = self.ids.len();
        self.places[i] = Place {
            prefix_start: start,
            prefix_len: s.len(),
            suffix_start: start + s.len(),
        };
        self.ids.extend_from_slice(s);
        self.positions.extend(0..s.len() as u32);
        segments.push(Segment {
            start,
            len: s.len(),
            prefix: None,
        });
    }

    /// Tokens in the packed row (what a forward computes).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The packed index of token `j` of sequence `i`.
    pub fn row(&self, i: usize, j: usize) -> usize {
        let p = &self.places[i];
        if j < p.prefix_len {
            p.prefix_start + j
        } else {
            p.suffix_start + j - p.prefix_len
        }
    }
}

/// Splits sequences `0..n` into micro-batches whose packed rows hold at most
/// `max_tokens` tokens each, keeping sequences that share a prefix together while
/// they fit (the prefix is counted once per micro-batch). A sequence longer than the
/// budget gets a micro-batch of its own. The order of sequences is kept.
pub fn microbatches(
    seqs: &[Vec<u32>],
    shareable: &[usize],
    packing: Packing,
    max_tokens: usize,
) -> Vec<std::ops::Range<usize>> {
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    let mut prefixes: Vec<&[u32]> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let p = shareable.get(i).copied().unwrap_or(0).min(s.len() - 1);
        let cost = match packing {
            Packing::Padded => longest,
            Packing::Packed => s.len(),
            Packing::SharedPrefix => {
                if p > 0 && prefixes.contains(&&s[..p]) {
                    s.len() - p
                } else {
                    s.len()
                }
            }
        };
        if i > start && tokens + cost > max_tokens {
            out.push(start..i);
            start = i;
            tokens = 0;
            prefixes.clear();
            // Recount: the prefix is new to this micro-batch.
            tokens += match packing {
                Packing::Padded => longest,
                _ => s.len(),
            };
        } else {
            tokens += cost;
        }
        if p > 0 {
            prefixes.push(&s[..p]);
        }
    }
    if start < seqs.len() {
        out.push(start..seqs.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs() -> (Vec<Vec<u32>>, Vec<usize>) {
        (
            vec![
                vec![1, 2, 3, 10, 11],
                vec![1, 2, 3, 20],
                vec![4, 5, 30, 31, 32],
                vec![1, 2, 3, 40, 41, 42],
            ],
            vec![3, 3, 2, 3],
        )
    }

    #[test]
    fn shared_prefix_lays_each_prompt_out_once() {
        let (s, p) = seqs();
        let b = PackedBatch::build(&s, &p, Packing::SharedPrefix, 0).unwrap();
        // prompt [1,2,3] once + 2 + 1 + 3 suffix tokens, then the lone sequence whole.
        assert_eq!(b.len(), 3 + 2 + 1 + 3 + 5);
        for (i, seq) in s.iter().enumerate() {
            for (j, &tok) in seq.iter().enumerate() {
                let r = b.row(i, j);
                assert_eq!(b.ids[r], tok, "sequence {i} token {j}");
                assert_eq!(b.positions[r] as usize, j, "sequence {i} token {j}");
            }
        }
        crate::ops::attention::check_segments(&b.segments, b.len()).unwrap();
    }

    #[test]
    fn packed_and_padded_rows_hold_every_token() {
        let (s, p) = seqs();
        for (packing, len) in [(Packing::Packed, 20), (Packing::Padded, 24)] {
            let b = PackedBatch::build(&s, &p, packing, 0).unwrap();
            assert_eq!(b.len(), len, "{packing:?}");
            for (i, seq) in s.iter().enumerate() {
                for (j, &tok) in seq.iter().enumerate() {
                    assert_eq!(b.ids[b.row(i, j)], tok);
                    assert_eq!(b.positions[b.row(i, j)] as usize, j);
                }
            }
            crate::ops::attention::check_segments(&b.segments, b.len()).unwrap();
        }
    }

    #[test]
    fn microbatches_respect_the_token_budget() {
        let (s, p) = seqs();
        // Shared: 5, +1, +5 (new prompt), +3 → [0..3] = 11 tokens, then [3].
        assert_eq!(
            microbatches(&s, &p, Packing::SharedPrefix, 11),
            vec![0..3, 3..4]
        );
        assert_eq!(
            microbatches(&s, &p, Packing::Packed, 10),
            vec![0..2, 2..3, 3..4]
        );
        assert_eq!(microbatches(&s, &p, Packing::Padded, 12), vec![0..2, 2..4]);
        // A budget below one sequence still gives every sequence a micro-batch.
        assert_eq!(microbatches(&s, &p, Packing::Packed, 1).len(), 4);
    }
}
