//! The local (sliding-window) layers' pages: a second pool, whose pages a sequence
//! gives back as soon as every query still to come lies past them.
//!
//! A local layer's query at position q sees keys q − W + 1 ..= q (W = the window). A
//! step feeds a sequence's tokens from `computed` on, so the keys its queries can still
//! read begin at `computed + 1 − W`: a local page whose tokens all lie before that is
//! released ([`LocalPool::fit`]), while the global layers keep every page. A sequence
//! then holds at most ⌈(W + C) / P⌉ + 1 local pages (C = the prefill chunk, the most
//! tokens it feeds in one step), whatever its length.
//!
//! The KV budget (`kv_cache_tokens` tokens of every layer) is shared out in bytes: the
//! local pool gets what `max_running` sequences can hold at most (never more than the
//! whole budget's pages), the global layers the rest, so a model with local layers
//! holds longer sequences in the same memory ([`PoolSizes::split`]).

use super::pages::{PageCopy, PagePool};
use super::scheduler::Seq;
use crate::config::ModelConfig;

/// How many layers of each kind a model has and the local layers' window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalLayers {
    pub window: usize,
    pub local: usize,
    pub global: usize,
}

impl LocalLayers {
    /// The local layers of `cfg`; `None` when every layer is global.
    pub fn of(cfg: &ModelConfig) -> Option<Self> {
        let sw = cfg.sliding_window.as_ref()?;
        let local = sw.local.iter().filter(|&&l| l).count();
        (local > 0).then_some(LocalLayers {
            window: sw.size,
            local,
            global: cfg.num_hidden_layers - local,
        })
    }
}

/// Pages of each pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSizes {
    pub global: usize,
    pub local: usize,
}

impl PoolSizes {
    /// `budget` pages of every layer shared out: the local pool gets
    /// min(budget, max_running · (⌈(W + C) / P⌉ + 2)) pages (each running sequence's
    /// most, and a page for a fork's copy), the global layers the bytes left:
    /// (budget · L − local · L_local) / L_global pages.
    pub fn split(
        budget: usize,
        layers: LocalLayers,
        (max_running, prefill_chunk, page_size): (usize, usize, usize),
    ) -> Self {
        let per_seq = (layers.window + prefill_chunk).div_ceil(page_size) + 2;
        let local = budget.min(max_running.saturating_mul(per_seq));
        let global = match layers.global {
            0 => budget,
            g => {
                let all = layers.local + g;
                (budget.saturating_mul(all) - local * layers.local) / g
            }
        };
        PoolSizes {
            global: global.max(1),
            local: local.max(1),
        }
    }
}

/// A sequence's local pages: `pages[i]` holds its tokens of page `base + i`; the
/// pages before `base` were released.
#[derive(Clone, Debug, Default)]
pub(crate) struct LocalHold {
    pub pages: Vec<u32>,
    pub base: usize,
}

/// The local layers' page pool and window.
#[derive(Debug)]
pub(crate) struct LocalPool {
    pub pool: PagePool,
    window: usize,
}

impl LocalPool {
    pub fn new(pages: usize, page_size: usize, window: usize) -> Self {
        LocalPool {
            pool: PagePool::new(pages, page_size),
            window,
        }
    }

    /// Pages a sequence of `tokens` tokens holds at most when it feeds up to `chunk`
    /// tokens a step: ⌈(W + chunk) / P⌉ + 1, and no more than its tokens need.
    pub fn most_for(&self, tokens: usize, chunk: usize) -> usize {
        let ps = self.pool.page_size();
        self.pool
            .pages_for(tokens)
            .min((self.window + chunk).div_ceil(ps) + 1)
    }

    /// Releases `s`'s local pages that no query from `s.computed` on can read and
    /// takes pages for its tokens up to `end` (exclusive). False, with the pages it
    /// could take kept, when the pool has none left.
    pub fn fit(&mut self, s: &mut Seq, end: usize) -> bool {
        let ps = self.pool.page_size();
        let h = &mut s.local;
        let first = (s.computed + 1).saturating_sub(self.window) / ps;
        let gone = first.saturating_sub(h.base).min(h.pages.len());
        self.pool.release(&h.pages[..gone]);
        h.pages.drain(..gone);
        h.base = if h.pages.is_empty() {
            first.max(h.base)
        } else {
            h.base + gone
        };
        while (h.base + h.pages.len()) * ps < end {
            match self.pool.alloc() {
                Some(p) => h.pages.push(p),
                None => return false,
            }
        }
        true
    }

    /// The local slot of token `t` of a sequence holding `h`; `None` when its page
    /// was released (no query can read it any more).
    pub fn slot(&self, h: &LocalHold, t: usize) -> Option<u32> {
        let ps = self.pool.page_size();
        let i = (t / ps).checked_sub(h.base)?;
        h.pages.get(i).map(|&p| p * ps as u32 + (t % ps) as u32)
    }

    /// Gives back every page of `h`.
    pub fn release(&mut self, h: &mut LocalHold) {
        self.pool.release(&h.pages);
        h.pages.clear();
        h.base = 0;
    }

    /// A fork's hold of a prompt of `tokens` tokens held as `parent`: the full pages
    /// shared, a page of its own for the partly filled last one, whose copy (from, to,
    /// tokens) is returned; `None` when no page was free for it.
    pub fn fork(
        &mut self,
        parent: &LocalHold,
        tokens: usize,
    ) -> Option<(LocalHold, Option<PageCopy>)> {
        let ps = self.pool.page_size();
        let (full, partial) = (tokens / ps, tokens % ps);
        let shared = full.saturating_sub(parent.base).min(parent.pages.len());
        let mut h = LocalHold {
            pages: parent.pages[..shared].to_vec(),
            base: parent.base,
        };
        for &p in &h.pages {
            self.pool.share(p);
        }
        let mut copy = None;
        if partial > 0 {
            let Some(p) = self.pool.alloc() else {
                self.release(&mut h);
                return None;
            };
            if let Some(&from) = parent.pages.get(shared) {
                copy = Some((from, p, partial));
            }
            h.pages.push(p);
        }
        Some((h, copy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(tokens: usize, computed: usize) -> Seq {
        let mut s = Seq::prompt(0, &vec![1; tokens], vec![0], vec![]);
        s.computed = computed;
        s
    }

    /// A decoding sequence keeps the pages its window reaches and no more, the pages
    /// it gives back return to the pool, and every token a query can read has a slot.
    #[test]
    fn pages_behind_the_window_are_given_back() {
        // Window 6, pages of 4.
        let mut l = LocalPool::new(8, 4, 6);
        let mut s = seq(1, 0);
        for t in 0..40 {
            s.computed = t;
            assert!(l.fit(&mut s, t + 1), "token {t}");
            // Keys t − 5 ..= t are readable; everything before page (t − 5) / 4 is gone.
            for k in (t + 1).saturating_sub(6)..=t {
                assert!(l.slot(&s.local, k).is_some(), "token {t}: key {k}");
            }
            assert!(s.local.pages.len() <= l.most_for(t + 1, 1), "token {t}");
            assert_eq!(l.pool.used_pages(), s.local.pages.len());
        }
        assert_eq!(s.local.base, (40 - 6) / 4);
        l.release(&mut s.local);
        assert_eq!(l.pool.free_pages(), 8);
    }

    /// A prompt's chunk takes pages for every token it feeds; an exhausted pool says
    /// so and keeps what it took.
    #[test]
    fn a_chunk_takes_its_pages_or_reports_the_pool_empty() {
        let mut l = LocalPool::new(3, 4, 6);
        let mut s = seq(30, 0);
        assert!(l.fit(&mut s, 12));
        assert_eq!(s.local.pages.len(), 3);
        s.computed = 12;
        // Tokens 12..20: keys from 7 on; page 0 (0..4) goes, pages for 12..20 are needed.
        assert!(!l.fit(&mut s, 20), "4 pages needed, 3 in the pool");
        assert_eq!((s.local.base, s.local.pages.len()), (1, 3));
    }

    /// The budget in bytes: the local pool gets what the running sequences can hold, the
    /// global layers the rest.
    #[test]
    fn the_budget_is_shared_out_by_bytes() {
        let layers = LocalLayers {
            window: 512,
            local: 15,
            global: 3,
        };
        // 2048 pages of 16 tokens, 4 sequences of (512 + 256) / 16 + 2 = 50 pages.
        let s = PoolSizes::split(2048, layers, (4, 256, 16));
        assert_eq!(s.local, 200);
        assert_eq!(s.global, (2048 * 18 - 200 * 15) / 3);
        assert!(s.global * 3 + s.local * 15 <= 2048 * 18);
        // Many sequences: the local pool is capped at the budget, as without windows.
        let s = PoolSizes::split(2048, layers, (64, 256, 16));
        assert_eq!((s.global, s.local), (2048, 2048));
    }
}
